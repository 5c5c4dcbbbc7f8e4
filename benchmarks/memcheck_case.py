"""A small run of every op and option, for `compute-sanitizer --tool memcheck`.

    compute-sanitizer --tool memcheck python benchmarks/memcheck_case.py [--device cuda]
    python benchmarks/memcheck_case.py --device cpu     # the GPU check's dry run
"""

import argparse

import torch

from gfmrag_fast.ops import AGGREGATES, MESSAGES, dense_tail, easy_edge_mask, negative_sampling, rel_aggregate
from gfmrag_fast.synthetic import synthetic_kg

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
device = parser.parse_args().device
torch.manual_seed(0)
graph = synthetic_kg(300, 2000, 20, device=device)
triples = torch.stack([graph.edge_index[0, :16], graph.edge_index[1, :16], graph.edge_type[:16]], 1)
batch = negative_sampling(graph, triples, 32)
mask = easy_edge_mask(graph, batch)
for dtype in (torch.float32, torch.bfloat16):
    for message in MESSAGES:
        for aggregate in AGGREGATES:
            for per_query in (False, True):
                x = torch.randn(3, 300, 40, device=device, dtype=dtype, requires_grad=True)
                rel = torch.randn(*((3,) if per_query else ()), 20, 40, device=device, dtype=dtype, requires_grad=True)
                w = torch.rand(graph.num_edges, device=device, dtype=dtype, requires_grad=True)
                out = rel_aggregate(x, rel, graph, w, mask, message, aggregate)
                out.float().square().sum().backward()
# dense_tail: every channels-per-lane variant and its edges, one or several row chunks, with and
# without parameters and short cut, float32 and bfloat16 (float32 parameters, as under autocast).
for dtype in (torch.float32, torch.bfloat16):
    for rows, dim in ((1, 1), (130, 33), (300, 64), (50, 129), (40, 512), (9, 1024)):
        for full in (True, False):
            x, u = (torch.randn(rows, dim, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
            weight = torch.randn(dim, 2 * dim, device=device, dtype=dtype, requires_grad=True)
            params = [torch.randn(dim, device=device, requires_grad=True) if full else None for _ in range(3)]
            out = dense_tail(x, u, weight, *params, residual=full)
            out.float().square().sum().backward()
if device == "cuda":
    torch.cuda.synchronize()
print(f"memcheck case ran: all ops, options and dtypes on {device}")
