"""rel_aggregate (fused kernels) against the pure-PyTorch scatter reference and a PyG
MessagePassing layer doing the same computation, in the same run.

    pytest benchmarks/bench_rel_aggregate.py            # CPU case; CUDA cases too when a GPU is present

Graphs are synthetic and seeded (gfmrag_fast.synthetic.synthetic_kg): T random triples plus their
inverse edges, so E = 2T.
"""

import functools

import pytest
import torch
from torch_geometric.nn import MessagePassing

from gfmrag_fast.ops import rel_aggregate, rel_aggregate_reference
from gfmrag_fast.synthetic import synthetic_kg

# name: (num_nodes N, triples T (E = 2T), relation types 2R, batch B, dim d)
CPU_CASES = {"cpu-N20k-E200k": (20_000, 100_000, 400, 4, 64)}
CUDA_CASES = {
    "hotpotqa-B8": (82_157, 98_709, 35_046, 8, 512),
    "big-B8": (100_000, 500_000, 10_000, 8, 512),
    "hotpotqa-B1": (82_157, 98_709, 35_046, 1, 512),
}


class PyGRelationalConv(MessagePassing):
    """The same layer as PyG users write it: distmult messages on [B, E, d], scatter-summed."""

    def __init__(self):
        # GFM-RAG gathers from edge_index[1] into edge_index[0]: PyG's target_to_source flow.
        super().__init__(aggr="add", flow="target_to_source", node_dim=1)

    def forward(self, x, relation, edge_index, edge_type):
        return self.propagate(edge_index, x=x, relation=relation, edge_type=edge_type, size=(x.size(1), x.size(1)))

    def message(self, x_j, relation, edge_type):
        return x_j * relation[edge_type]


_pyg_conv = PyGRelationalConv()


def pyg_aggregate(x, relation, graph):
    return _pyg_conv(x, relation, graph.edge_index, graph.edge_type)


IMPLS = {"kernel": rel_aggregate, "reference": rel_aggregate_reference, "pyg": pyg_aggregate}


def _cases():
    cases = [pytest.param(name, "cpu", id=f"{name}-cpu") for name in CPU_CASES]
    if torch.cuda.is_available():
        cases += [pytest.param(name, "cuda", id=f"{name}-cuda") for name in CUDA_CASES]
    return cases


@functools.lru_cache(maxsize=None)
def synthetic_graph(num_nodes, num_triples, num_relations, device):
    return synthetic_kg(num_nodes, num_triples, num_relations, seed=0, device=device)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("direction", ["forward", "forward_backward"])
@pytest.mark.parametrize("case,device", _cases())
@pytest.mark.parametrize("dtype", [torch.float32], ids=["fp32"])
def test_rel_aggregate(measure, case, device, direction, impl, dtype):
    num_nodes, num_triples, num_relations, batch, dim = {**CPU_CASES, **CUDA_CASES}[case]
    graph = synthetic_graph(num_nodes, num_triples, num_relations, device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, num_nodes, dim, generator=gen).to(device, dtype)
    relation = torch.randn(num_relations, dim, generator=gen).to(device, dtype)
    fn = IMPLS[impl]
    if direction == "forward_backward":
        x.requires_grad_(True)
        relation.requires_grad_(True)
        grad_out = torch.randn(x.shape, generator=gen).to(device, dtype)

    def run():
        if direction == "forward":
            with torch.no_grad():
                fn(x, relation, graph)
        else:
            x.grad = relation.grad = None
            fn(x, relation, graph).backward(grad_out)

    measure(run, f"rel_aggregate/{case}/{device}/{direction}", impl, device, rounds=5 if device == "cpu" else 10,
            dtype=str(dtype), num_nodes=num_nodes, num_edges=2 * num_triples, num_relations=num_relations,
            batch=batch, dim=dim)
