"""A small CUDA run of every op and option, for `compute-sanitizer --tool memcheck`."""

import torch

from gfmrag_fast.ops import AGGREGATES, MESSAGES, easy_edge_mask, negative_sampling, rel_aggregate
from gfmrag_fast.synthetic import synthetic_kg

torch.manual_seed(0)
graph = synthetic_kg(300, 2000, 20, device="cuda")
triples = torch.stack([graph.edge_index[0, :16], graph.edge_index[1, :16], graph.edge_type[:16]], 1)
batch = negative_sampling(graph, triples, 32)
mask = easy_edge_mask(graph, batch)
for dtype in (torch.float32, torch.bfloat16):
    for message in MESSAGES:
        for aggregate in AGGREGATES:
            for per_query in (False, True):
                x = torch.randn(3, 300, 40, device="cuda", dtype=dtype, requires_grad=True)
                rel = torch.randn(*((3,) if per_query else ()), 20, 40, device="cuda", dtype=dtype, requires_grad=True)
                w = torch.rand(graph.num_edges, device="cuda", dtype=dtype, requires_grad=True)
                out = rel_aggregate(x, rel, graph, w, mask, message, aggregate)
                out.float().square().sum().backward()
torch.cuda.synchronize()
print("memcheck case ran: all ops, options and dtypes")
