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

The locality cases time the kernel on one graph under three entity numberings: shuffled (random
ids), original (the graph's own: first appearance in kg.txt for the bundled MuSiQue KG; for the
real-shape generator that is already a random numbering, it shuffles ids) and locality
(gfmrag_fast.data.ordering.locality_order, what ``entity_order: locality`` gives at stage 2). Only
the ids differ: same edges in the same order, same x. A table of their ratios to the shuffled
numbering is printed at the end.
"""

import functools
import os
import time

import pytest
import torch
from torch_geometric.nn import MessagePassing

from gfmrag_fast.data import read_triples
from gfmrag_fast.data.ordering import locality_order, relabel
from gfmrag_fast.ops import RelGraph, rel_aggregate, rel_aggregate_reference
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


def aggregate_once(fn, x, relation, graph, direction, grad_out):
    """One timed call: the forward alone (no autograd), or forward + backward of grad_out."""
    if direction == "forward":
        with torch.no_grad():
            fn(x, relation, graph)
    else:
        x.grad = relation.grad = None
        fn(x, relation, graph).backward(grad_out)


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
    grad_out = None
    if direction == "forward_backward":
        x.requires_grad_(True)
        relation.requires_grad_(True)
        grad_out = torch.randn(x.shape, generator=gen).to(device, dtype)

    def run():
        aggregate_once(fn, x, relation, graph, direction, grad_out)

    name = case_name(case, shape, per_query, dtype, node_major)
    info = {}
    if device == "cpu":
        floor_bytes = (2 if direction == "forward" else 5) * x.nbytes
        info["floor_ms"] = floor_bytes / copy_bandwidth() * 1e3
    measure(run, f"rel_aggregate/{name}/{device}/{direction}", impl, device, rounds=5 if device == "cpu" else 10,
            dtype=str(dtype), shape=shape, per_query=per_query, node_major=node_major, num_nodes=num_nodes,
            num_edges=2 * num_triples, num_relations=num_relations, batch=batch, dim=dim, **info)


# ------------------------------------------------------------------------------------ locality
MUSIQUE_KG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "data", "musique_hippo", "processed", "stage1", "kg.txt")
LOCALITY_BATCH, LOCALITY_DIM = 8, 64
NUMBERINGS = ("shuffled", "original", "locality")
_LOCALITY = {}  # (graph, layout, direction) -> {numbering: (median wall ms, median CPU ms)}


@functools.lru_cache(maxsize=1)
def musique_graph():
    """The bundled MuSiQue KG as stage 2 numbers it by default: entities and relations in order of
    first appearance, every triple plus its inverse edge."""
    ent, rel, triples = {}, {}, []
    for h, r, t in read_triples(MUSIQUE_KG)[0]:
        triples.append((ent.setdefault(h, len(ent)), ent.setdefault(t, len(ent)), rel.setdefault(r, len(rel))))
    hrt = torch.tensor(triples)
    edge_index = torch.cat([hrt[:, :2].t(), hrt[:, :2].t().flip(0)], dim=1)
    edge_type = torch.cat([hrt[:, 2], hrt[:, 2] + len(rel)])
    return RelGraph(edge_index, edge_type, len(ent), 2 * len(rel))


LOCALITY_GRAPHS = {
    "hotpotqa4-skewed": lambda: synthetic_graph("skewed", 20_539, 24_677, 8_762, "cpu"),
    "musique": musique_graph,
}


@functools.lru_cache(maxsize=len(NUMBERINGS))
def numbered_graph(graph_name, numbering):
    graph = LOCALITY_GRAPHS[graph_name]()
    edge_index, n = graph.edge_index.long(), graph.num_nodes
    if numbering == "original":
        return graph
    if numbering == "shuffled":
        new_id = torch.randperm(n, generator=torch.Generator().manual_seed(2))
    else:
        new_id = relabel(locality_order(edge_index, n))
    return RelGraph(new_id[edge_index], graph.edge_type, n, graph.num_relations)


@pytest.fixture(scope="module")
def locality_table(request):
    yield _LOCALITY
    if not _LOCALITY:
        return
    lines = [f"rel_aggregate by entity numbering (CPU, B = {LOCALITY_BATCH}, d = {LOCALITY_DIM}, float32, "
             "shared table; median wall / CPU ms of calls taking turns, speed-up over shuffled)"]
    for (graph, layout, direction), times in sorted(_LOCALITY.items()):
        wall0, cpu0 = times["shuffled"]
        cells = [f"{k} {wall:7.2f} / {cpu:7.2f} ms ({wall0 / wall:4.2f}x / {cpu0 / cpu:4.2f}x)"
                 for k, (wall, cpu) in times.items()]
        lines.append(f"  {graph:16s} {layout:11s} {direction:16s} " + "  ".join(cells))
    # Printed past pytest's output capture, which holds a module fixture's teardown output.
    with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        print("\n" + "\n".join(lines), flush=True)


@pytest.mark.parametrize("direction", ["forward", "forward_backward"])
@pytest.mark.parametrize("layout", ["batch_major", "node_major"])
@pytest.mark.parametrize("graph_name", list(LOCALITY_GRAPHS))
def test_rel_aggregate_locality(locality_table, graph_name, layout, direction, rounds=11):
    """The three numberings take turns call by call, so that load from other processes on the
    machine falls on all three alike; medians of wall time and of this process's CPU time."""
    gen = torch.Generator().manual_seed(1)
    num_nodes = LOCALITY_GRAPHS[graph_name]().num_nodes
    shape = (num_nodes, LOCALITY_BATCH, LOCALITY_DIM) if layout == "node_major" else \
        (LOCALITY_BATCH, num_nodes, LOCALITY_DIM)
    x = torch.randn(shape, generator=gen, requires_grad=direction == "forward_backward")
    relation = torch.randn(numbered_graph(graph_name, "original").num_relations, LOCALITY_DIM, generator=gen,
                           requires_grad=direction == "forward_backward")
    grad_out = torch.randn(shape, generator=gen)
    fn = functools.partial(rel_aggregate, node_major=layout == "node_major")

    def run(graph):
        aggregate_once(fn, x, relation, graph, direction, grad_out)

    from bench_train_step import take_turns

    times = take_turns({numbering: functools.partial(run, numbered_graph(graph_name, numbering))
                        for numbering in NUMBERINGS}, "cpu", rounds)
    locality_table[(graph_name, layout, direction)] = {
        numbering: (times[numbering]["step_ms"], times[numbering]["step_cpu_ms"]) for numbering in NUMBERINGS}


# ------------------------------------------------------------------ the CPU's joint backward
JOINT_CASES = {  # graph, batch (d = 64, node major, shared table: a training step's layer)
    "musique-B32": ("musique", 32),
    "hotpotqa4-skewed-B8": ("hotpotqa4-skewed", 8),
}


@pytest.mark.parametrize("impl", ["joint", "two_kernels"])
@pytest.mark.parametrize("case", list(JOINT_CASES))
def test_joint_backward(measure, case, impl):
    """x's and the relation table's gradients on the CPU: in one walk of the edges by source (what
    autograd calls there, rel_aggregate_backward_x_relation) against the input and relation
    kernels called one after the other. Compare the two impls' medians of one case."""
    graph_name, batch = JOINT_CASES[case]
    graph = LOCALITY_GRAPHS[graph_name]()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(graph.num_nodes, batch, 64, generator=gen)
    relation = torch.randn(graph.num_relations, 64, generator=gen)
    mask = torch.rand(graph.num_edges, generator=gen) < 0.01  # a pre-training batch's removed edges
    ops = torch.ops.gfmrag_fast
    out, aux = ops.rel_aggregate(x, relation, graph.arrays, None, mask, "distmult", "sum", True)
    args = (torch.randn(out.shape, generator=gen), x, relation, aux, graph.arrays, None, mask, "distmult", "sum", True)

    def run():
        if impl == "joint":
            ops.rel_aggregate_backward_x_relation(*args)
        else:
            ops.rel_aggregate_backward_x(*args)
            ops.rel_aggregate_backward_relation(*args)

    measure(run, f"rel_aggregate_backward/{case}/cpu", impl, "cpu", rounds=7, batch=batch, dim=64,
            num_nodes=graph.num_nodes, num_edges=graph.num_edges)
