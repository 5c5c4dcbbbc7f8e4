"""rel_aggregate (fused kernels) against the pure-PyTorch scatter reference and a PyG
MessagePassing layer doing the same computation, in the same run.

    pytest benchmarks/bench_rel_aggregate.py            # CPU cases; CUDA cases too when a GPU is present

Graphs are synthetic and seeded, T triples plus their inverse edges (E = 2T), in two shapes side by
side: "uniform" (gfmrag_fast.synthetic.synthetic_kg) and "skewed", the shape of a real GFM-RAG
index (gfmrag_fast.synthetic.real_shape_kg: one synonym relation with 45.6 % of the triples,
Zipf-like hub degrees, fitted to the bundled MuSiQue KG). Relation tables are shared [2R, d] (as
GFM-RAG uses them) or per query [B, 2R, d]. The kernel also runs node major (x as [N, B, d]). The
reference and PyG run only for the shared float32 table, batch major: they are the baselines.

On the CPU every case also reports its time over a copy floor: the traffic the op cannot avoid
(forward: x read once and the output written once, 2 |x|; forward + backward: 5 |x|, adding
grad_out and x read and grad_x written) at the copy bandwidth of the machine, measured in the same
test as bytes read + written per second by a 256 MiB torch copy into preallocated memory.
"""

import functools
import time

import pytest
import torch
from torch_geometric.nn import MessagePassing

from gfmrag_fast.ops import rel_aggregate, rel_aggregate_reference
from gfmrag_fast.synthetic import real_shape_kg, synthetic_kg

# name: (num_nodes N, triples T (E = 2T), relation types 2R, batch B, dim d)
CPU_CASES = {
    "cpu-N20k-E200k": (20_000, 100_000, 400, 4, 64),
    "cpu-hotpotqa4-B8": (20_539, 24_677, 8_762, 8, 64),  # HotpotQA / 4 (issue 11, item 8)
}
CUDA_CASES = {
    "hotpotqa-B8": (82_157, 98_709, 35_046, 8, 512),
    "big-B8": (100_000, 500_000, 10_000, 8, 512),
    "hotpotqa-B1": (82_157, 98_709, 35_046, 1, 512),
    "huge-B8": (1_000_000, 2_500_000, 10_000, 8, 512),
}
SHAPES = {"uniform": synthetic_kg, "skewed": real_shape_kg}


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


@functools.lru_cache(maxsize=2)
def synthetic_graph(shape, num_nodes, num_triples, num_relations, device):
    return SHAPES[shape](num_nodes, num_triples, num_relations, seed=0, device=device)


def case_name(case, shape, per_query, dtype, node_major=False):
    return (f"{case}-{shape}" + ("-perquery" if per_query else "") + ("" if dtype == torch.float32 else "-bf16")
            + ("-nodemajor" if node_major else ""))


@functools.lru_cache(maxsize=1)
def _copy_buffers():
    src = torch.randn(64 * 2**20)  # 256 MiB, far beyond the caches
    return src, torch.empty_like(src)


def copy_bandwidth(rounds=5):
    """Bytes read + written per second by a large torch copy into preallocated memory (median)."""
    src, dst = _copy_buffers()
    dst.copy_(src)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.nbytes / sorted(times)[len(times) // 2]


@pytest.mark.parametrize("layout", ["batch_major", "node_major"])
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("direction", ["forward", "forward_backward"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("per_query", [False, True], ids=["shared", "perquery"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("case,device", _cases())
def test_rel_aggregate(measure, case, device, shape, per_query, dtype, direction, impl, layout):
    node_major = layout == "node_major"
    if impl != "kernel" and (per_query or dtype != torch.float32 or node_major):
        pytest.skip("baselines run for the shared float32 table, batch major, only")
    if device == "cpu" and dtype != torch.float32:
        pytest.skip("bf16 is a GPU format; the CPU suite measures float32")
    if device == "cuda" and node_major and (per_query or dtype != torch.float32):
        pytest.skip("on the GPU, node major runs for the shared float32 table only (the GPU check's time budget)")
    num_nodes, num_triples, num_relations, batch, dim = {**CPU_CASES, **CUDA_CASES}[case]
    graph = synthetic_graph(shape, num_nodes, num_triples, num_relations, device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, num_nodes, dim, generator=gen).to(device, dtype)
    if node_major:
        x = x.transpose(0, 1).contiguous()
    rel_shape = (batch, num_relations, dim) if per_query else (num_relations, dim)
    relation = torch.randn(rel_shape, generator=gen).to(device, dtype)
    fn = functools.partial(rel_aggregate, node_major=True) if node_major else IMPLS[impl]
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

    name = case_name(case, shape, per_query, dtype, node_major)
    info = {}
    if device == "cpu":
        floor_bytes = (2 if direction == "forward" else 5) * x.nbytes
        info["floor_ms"] = floor_bytes / copy_bandwidth() * 1e3
    measure(run, f"rel_aggregate/{name}/{device}/{direction}", impl, device, rounds=5 if device == "cpu" else 10,
            dtype=str(dtype), shape=shape, per_query=per_query, node_major=node_major, num_nodes=num_nodes,
            num_edges=2 * num_triples, num_relations=num_relations, batch=batch, dim=dim, **info)
