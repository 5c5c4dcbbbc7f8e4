"""rel_aggregate against its pure-PyTorch reference, gradients, op registration and bad input."""

import itertools
import os

import pytest
import torch
from torch.library import opcheck

from gfmrag_fast.ops import AGGREGATES, MESSAGES, RelGraph, rel_aggregate, rel_aggregate_reference
from gfmrag_fast.ops.balance import balance_report, kg_graph
from gfmrag_fast.synthetic import random_graph, real_shape_kg

from helpers import DEVICES

MUSIQUE_KG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "musique_hippo",
                          "processed", "stage1", "kg.txt")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# (rtol, atol relative to the largest reference value)
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 2e-3), torch.bfloat16: (2e-2, 1e-2)}


def make_inputs(device, dtype, per_query, weighted, masked, *, num_nodes=40, num_edges=300, num_relations=9,
                batch=3, dim=6, seed=0, duplicates=True):
    edge_index, edge_type = random_graph(num_nodes, num_edges, num_relations, seed=seed, duplicates=duplicates)
    graph = RelGraph(edge_index, edge_type, num_nodes, num_relations).to(device)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, num_nodes, dim, generator=gen)
    rel_shape = (batch, num_relations, dim) if per_query else (num_relations, dim)
    relation = torch.randn(rel_shape, generator=gen)
    weight = torch.rand(num_edges, generator=gen) + 0.5 if weighted else None
    mask = torch.rand(num_edges, generator=gen) < 0.3 if masked else None
    if masked:
        mask[edge_index[0] == 1] = True  # node 1 loses every in-edge: it must get 0
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return graph, cast(x), cast(relation), cast(weight), (None if mask is None else mask.to(device))


# The backward ops per device: the CPU also has both gradients in one call (what autograd uses there).
_GRAD_OPS = ("rel_aggregate_backward_x", "rel_aggregate_backward_relation", "rel_aggregate_backward_edge_weight")
BACKWARD_OPS = {"cpu": _GRAD_OPS + ("rel_aggregate_backward_x_relation",), "cuda": _GRAD_OPS}


def assert_close_scaled(actual, expected, dtype):
    rtol, atol = TOL[dtype]
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol * scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("message", MESSAGES)
@pytest.mark.parametrize("aggregate", AGGREGATES)
@pytest.mark.parametrize("per_query,weighted,masked", list(itertools.product([False, True], repeat=3)))
def test_matches_reference(device, dtype, message, aggregate, per_query, weighted, masked):
    graph, x, relation, weight, mask = make_inputs(device, dtype, per_query, weighted, masked)
    leaves = [t for t in (x, relation, weight) if t is not None]
    for t in leaves:
        t.requires_grad_(True)
    out = rel_aggregate(x, relation, graph, weight, mask, message, aggregate)
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device

    # The reference runs in float64 on the same (rounded) values: the kernels accumulate in float32
    # or better, so low-precision results differ from it only by their own rounding.
    leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
    it = iter(leaves64)
    x64, rel64 = next(it), next(it)
    w64 = next(it) if weighted else None
    expected = rel_aggregate_reference(x64, rel64, graph, w64, mask, message, aggregate)
    assert_close_scaled(out, expected, dtype)

    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(device)
    grads = torch.autograd.grad(out, leaves, grad_out.to(dtype))
    expected_grads = torch.autograd.grad(expected, leaves64, grad_out.double())
    for got, want, leaf in zip(grads, expected_grads, leaves):
        assert got.shape == leaf.shape and got.dtype == dtype
        assert_close_scaled(got, want, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_rows_give_zero(device):
    graph, x, relation, _, mask = make_inputs(device, torch.float32, False, False, True)
    for aggregate in AGGREGATES:
        out = rel_aggregate(x, relation, graph, edge_mask=mask, aggregate=aggregate)
        assert torch.all(out[:, -1] == 0), "isolated node"
        assert torch.all(out[:, 1] == 0), "node whose in-edges are all masked"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("message", MESSAGES)
@pytest.mark.parametrize("aggregate", AGGREGATES)
@pytest.mark.parametrize("per_query", [False, True])
def test_gradcheck(device, message, aggregate, per_query):
    # No parallel duplicates: identical messages tie under max/min, where the function is not
    # differentiable and finite differences disagree with any choice of subgradient.
    graph, x, relation, weight, mask = make_inputs(
        device, torch.float64, per_query, True, True, num_nodes=12, num_edges=60, num_relations=4, batch=2,
        dim=3, duplicates=False,
    )
    x.requires_grad_(True)
    relation.requires_grad_(True)
    weight.requires_grad_(True)
    fn = lambda x, r, w: rel_aggregate(x, r, graph, w, mask, message, aggregate)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, relation, weight), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("aggregate", AGGREGATES)
@pytest.mark.parametrize("per_query", [False, True])
def test_opcheck(device, aggregate, per_query):
    graph, x, relation, weight, mask = make_inputs(device, torch.float32, per_query, True, True, num_nodes=15,
                                                   num_edges=50, dim=4, duplicates=False)
    x.requires_grad_(True)
    relation.requires_grad_(True)
    weight.requires_grad_(True)
    ops = torch.ops.gfmrag_fast
    args = (x, relation, graph.arrays, weight, mask, "distmult", aggregate)
    opcheck(ops.rel_aggregate.default, args)
    out, aux = ops.rel_aggregate(*args)
    grad_out = torch.randn_like(out)
    for name in BACKWARD_OPS[device]:
        bargs = (grad_out, x.detach(), relation.detach(), aux, graph.arrays, weight.detach(), mask, "transe", aggregate)
        opcheck(getattr(ops, name).default, bargs)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_deterministic(device):
    graph, x, relation, weight, mask = make_inputs(device, torch.float32, False, True, True, num_nodes=64,
                                                   num_edges=4000, dim=32)
    runs = []
    for _ in range(3):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, relation, weight)]
        out = rel_aggregate(leaves[0], leaves[1], graph, leaves[2], mask)
        runs.append(torch.autograd.grad(out.square().sum(), leaves))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_torch_compile_fullgraph():
    graph, x, relation, weight, mask = make_inputs("cpu", torch.float32, True, True, True)
    x.requires_grad_(True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def layer(x, relation, weight, mask):
        return torch.relu(rel_aggregate(x, relation, graph, weight, mask, "distmult", "mean") + x)

    out = layer(x, relation, weight, mask)
    expected = torch.relu(rel_aggregate_reference(x, relation, graph, weight, mask, "distmult", "mean") + x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    graph, x, relation, weight, mask = make_inputs(device, torch.float32, False, True, True)
    x_nc = x.transpose(1, 2).contiguous().transpose(1, 2)
    relation_nc = relation.t().contiguous().t()
    weight_nc = torch.stack([weight, weight], 1)[:, 0]
    assert not (x_nc.is_contiguous() or relation_nc.is_contiguous() or weight_nc.is_contiguous())
    out = rel_aggregate(x_nc, relation_nc, graph, weight_nc, mask)
    torch.testing.assert_close(out, rel_aggregate(x, relation, graph, weight, mask))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("aggregate", AGGREGATES)
def test_empty_graph_and_empty_batch(device, aggregate):
    empty = RelGraph(torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 5, 3).to(device)
    x = torch.randn(2, 5, 4, device=device, requires_grad=True)
    relation = torch.randn(3, 4, device=device, requires_grad=True)
    out = rel_aggregate(x, relation, empty, aggregate=aggregate)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(relation.grad, torch.zeros_like(relation))

    graph, x, relation, _, _ = make_inputs(device, torch.float32, False, False, False)
    assert rel_aggregate(x[:0], relation, graph, aggregate=aggregate).shape == (0, 40, 6)
    assert rel_aggregate(x[..., :0], relation[:, :0], graph, aggregate=aggregate).shape == (3, 40, 0)
    no_nodes = RelGraph(torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 0, 3)
    out = rel_aggregate(torch.randn(2, 0, 4, device=device), torch.randn(3, 4, device=device), no_nodes.to(device))
    assert out.shape == (2, 0, 4)


def test_relgraph_validation():
    edge_index = torch.tensor([[0, 1, 2], [1, 2, 0]])
    edge_type = torch.tensor([0, 1, 0])
    with pytest.raises(ValueError, match=r"edge_index values must be in \[0, num_nodes = 2\)"):
        RelGraph(edge_index, edge_type, 2)
    with pytest.raises(ValueError, match="edge_index values"):
        RelGraph(torch.tensor([[0, -1], [1, 0]]), torch.tensor([0, 0]), 3)
    with pytest.raises(ValueError, match="edge_type values must be >= 0"):
        RelGraph(edge_index, torch.tensor([0, -1, 0]), 3)
    with pytest.raises(ValueError, match="num_relations = 1 but edge_type holds relation 1"):
        RelGraph(edge_index, edge_type, 3, num_relations=1)
    with pytest.raises(ValueError, match=r"edge_index must be a tensor of shape \[2, E\]"):
        RelGraph(edge_index.t(), edge_type, 3)
    with pytest.raises(ValueError, match=r"edge_type must have shape \[E\] = \[3\]"):
        RelGraph(edge_index, edge_type[:2], 3)
    with pytest.raises(TypeError, match="edge_index must hold integers"):
        RelGraph(edge_index.float(), edge_type, 3)
    graph = RelGraph(edge_index, edge_type, 3)
    assert graph.num_relations == 2 and graph.num_edges == 3
    assert graph.in_degree.tolist() == [1, 1, 1]
    assert graph.to("cpu") is graph


def test_bad_inputs_raise_clear_errors():
    graph, x, relation, weight, mask = make_inputs("cpu", torch.float32, False, True, True)
    cases = [
        (dict(x=x[0]), ValueError, r"x must have shape \[B, N, d\]"),
        (dict(x=x[:, :-1]), ValueError, "x has N = 39 nodes but the graph has 40"),
        (dict(relation=relation[:-1]), ValueError, "relation has R = 8 rows but the graph has num_relations = 9"),
        (dict(relation=relation[:, :-1]), ValueError, "relation has last dimension 5 but x has d = 6"),
        (dict(relation=relation.expand(2, -1, -1)), ValueError, "per-query relation .* has B = 2 but x has B = 3"),
        (dict(relation=relation.double()), ValueError, "relation has dtype Double but x has Float"),
        (dict(edge_weight=weight[:-1]), ValueError, r"edge_weight must have shape \[E\] = \[300\]"),
        (dict(edge_weight=weight.double()), ValueError, "edge_weight has dtype Double"),
        (dict(edge_mask=mask.int()), ValueError, "edge_mask must be bool"),
        (dict(edge_mask=mask[:5]), ValueError, r"edge_mask must have shape \[E\]"),
        (dict(message="rotate"), ValueError, "message must be one of"),
        (dict(aggregate="pna"), ValueError, "aggregate must be one of"),
        (dict(graph=graph.edge_index), TypeError, "graph must be a RelGraph"),
        (dict(x=x.long()), ValueError, "x must be floating point"),
        (dict(x=x.to("meta")), ValueError, "graph is on cpu but x is on meta"),
    ]
    base = dict(x=x, relation=relation, graph=graph, edge_weight=weight, edge_mask=mask)
    for change, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            rel_aggregate(**{**base, **change})


def test_raw_op_rejects_malformed_graph_arrays():
    graph, x, relation, _, _ = make_inputs("cpu", torch.float32, False, False, False)
    arrays = list(graph.arrays)
    arrays[1] = arrays[1].long()
    with pytest.raises(ValueError, match="graph array dst_src must be a contiguous 1-D int32 tensor"):
        torch.ops.gfmrag_fast.rel_aggregate(x, relation, arrays, None, None, "distmult", "sum")
    with pytest.raises(ValueError, match="graph must hold 24 prepared arrays"):
        torch.ops.gfmrag_fast.rel_aggregate(x, relation, graph.arrays[:5], None, None, "distmult", "sum")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.cuda
def test_mixed_devices_raise():
    graph, x, relation, weight, mask = make_inputs("cpu", torch.float32, False, True, True)
    with pytest.raises(ValueError, match="use graph.to"):
        rel_aggregate(x.cuda(), relation.cuda(), graph)
    cuda_graph = graph.to("cuda")
    with pytest.raises(ValueError, match="relation is on cpu but x is on cuda"):
        rel_aggregate(x.cuda(), relation, cuda_graph)
    with pytest.raises(ValueError, match="edge_weight is on cpu"):
        rel_aggregate(x.cuda(), relation.cuda(), cuda_graph, weight)


# --- skewed graphs, long rows cut into pieces (RelGraph's chunk_size) ----------------------------


def skewed_inputs(device, dtype, per_query, weighted, masked, *, chunk_size=4, num_nodes=60, num_triples=300,
                  num_relations=8, batch=3, dim=5, seed=0, unique=False, cut=True):
    """A real-shape graph (a relation with ~45 % of the edges, Zipf hubs) whose long rows the plan
    cuts into several pieces (asserted unless not `cut`). `unique` drops parallel copies of an edge (identical messages tie
    under max/min, where finite differences disagree with any subgradient)."""
    shaped = real_shape_kg(num_nodes, num_triples, num_relations, seed=seed)
    edge_index, edge_type = shaped.edge_index, shaped.edge_type
    if unique:
        seen, keep = set(), []
        for e, key in enumerate(zip(edge_index[0].tolist(), edge_index[1].tolist(), edge_type.tolist())):
            if key not in seen:
                seen.add(key)
                keep.append(e)
        edge_index, edge_type = edge_index[:, keep], edge_type[keep]
    graph = RelGraph(edge_index, edge_type, num_nodes, num_relations, chunk_size=chunk_size)
    for list_name in ("dst", "src", "rel") if cut else ():  # every kernel runs both of its passes
        assert graph.arrays[RelGraph.FIELDS.index(f"{list_name}_piece_begin")].numel() > 0
    num_edges = graph.num_edges
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, num_nodes, dim, generator=gen)
    relation = torch.randn(*((batch,) if per_query else ()), num_relations, dim, generator=gen)
    weight = torch.rand(num_edges, generator=gen) + 0.5 if weighted else None
    mask = torch.rand(num_edges, generator=gen) < 0.2 if masked else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return graph.to(device), cast(x), cast(relation), cast(weight), (None if mask is None else mask.to(device))


def _forward_and_grads(graph, x, relation, weight, mask, message, aggregate, node_major=False, grad_out=None):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, relation, weight)]
    xin = leaves[0].transpose(0, 1).contiguous() if node_major else leaves[0]
    out = rel_aggregate(xin, leaves[1], graph, leaves[2], mask, message, aggregate, node_major=node_major)
    out = out.transpose(0, 1) if node_major else out
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out)
    return [out.detach()] + list(torch.autograd.grad(out, leaves, grad_out))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("message", MESSAGES)
@pytest.mark.parametrize("aggregate", AGGREGATES)
@pytest.mark.parametrize("per_query", [False, True])
def test_skewed_graph_matches_reference(device, dtype, message, aggregate, per_query):
    graph, x, relation, weight, mask = skewed_inputs(device, dtype, per_query, True, True)
    leaves64 = [t.detach().double().requires_grad_(True) for t in (x, relation, weight)]
    expected = rel_aggregate_reference(*leaves64[:2], graph, leaves64[2], mask, message, aggregate)
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(3)).to(device)
    want = [expected.detach()] + list(torch.autograd.grad(expected, leaves64, grad_out))
    got = _forward_and_grads(graph, x, relation, weight, mask, message, aggregate, grad_out=grad_out.to(dtype))
    for g, w in zip(got, want):
        assert g.dtype == dtype
        assert_close_scaled(g, w, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("message", MESSAGES)
@pytest.mark.parametrize("aggregate", AGGREGATES)
@pytest.mark.parametrize("per_query", [False, True])
def test_skewed_gradcheck(device, message, aggregate, per_query):
    graph, x, relation, weight, mask = skewed_inputs(device, torch.float64, per_query, True, True, chunk_size=3,
                                                     num_nodes=20, num_triples=60, num_relations=4, batch=2, dim=3,
                                                     unique=True)
    leaves = [t.requires_grad_(True) for t in (x, relation, weight)]
    fn = lambda x, r, w: rel_aggregate(x, r, graph, w, mask, message, aggregate)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("aggregate", AGGREGATES)
@pytest.mark.parametrize("per_query", [False, True])
def test_node_major_matches_batch_major_bit_for_bit(device, aggregate, per_query):
    # Per (b, v, c) the kernels do the same operations in the same order in both layouts.
    graph, x, relation, weight, mask = skewed_inputs(device, torch.float32, per_query, True, True)
    batch_major = _forward_and_grads(graph, x, relation, weight, mask, "distmult", aggregate)
    node_major = _forward_and_grads(graph, x, relation, weight, mask, "distmult", aggregate, node_major=True)
    for a, b in zip(batch_major, node_major):
        assert torch.equal(a, b)
    expected = rel_aggregate_reference(x.transpose(0, 1), relation, graph, weight, mask, "distmult", aggregate,
                                       node_major=True)
    assert_close_scaled(node_major[0].transpose(0, 1), expected, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("aggregate", AGGREGATES)
def test_pieces_change_only_the_rounding_of_sums(device, aggregate):
    # max/min fold pieces exactly as edges (the earliest of equal candidates wins): bit for bit.
    inputs = [skewed_inputs(device, torch.float32, False, True, True, chunk_size=c, cut=c < 10) for c in (2, 4, 10_000)]
    results = [_forward_and_grads(*i, "distmult", aggregate) for i in inputs]
    for other in results[1:]:
        if aggregate in ("max", "min"):
            assert torch.equal(results[0][0], other[0])
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_results_do_not_depend_on_the_thread_count():
    graph, x, relation, weight, mask = skewed_inputs("cpu", torch.float32, True, True, True, chunk_size=3,
                                                     num_nodes=200, num_triples=2000, dim=16)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            runs.append(_forward_and_grads(graph, x, relation, weight, mask, "distmult", "mean"))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("aggregate", AGGREGATES)
@pytest.mark.parametrize("node_major", [False, True])
def test_opcheck_pieces(device, aggregate, node_major):
    graph, x, relation, weight, mask = skewed_inputs(device, torch.float32, node_major, True, True, chunk_size=3,
                                                     num_nodes=20, num_triples=60, num_relations=4, batch=2, dim=4,
                                                     unique=True)
    if node_major:
        x = x.transpose(0, 1).contiguous()
    for t in (x, relation, weight):
        t.requires_grad_(True)
    ops = torch.ops.gfmrag_fast
    args = (x, relation, graph.arrays, weight, mask, "distmult", aggregate, node_major)
    opcheck(ops.rel_aggregate.default, args)
    out, aux = ops.rel_aggregate(*args)
    for name in BACKWARD_OPS[device]:
        bargs = (torch.randn_like(out), x.detach(), relation.detach(), aux, graph.arrays, weight.detach(), mask,
                 "distmult", aggregate, node_major)
        opcheck(getattr(ops, name).default, bargs)


def test_large_outputs_reuse_memory_only_once_freed():
    # Outputs of 4 MiB or more come from a buffer cache (csrc/output_buffers.h): a live output is
    # never handed out again, a freed one is, and the tensors stay ordinary (resizable).
    graph, x, relation, _, _ = make_inputs("cpu", torch.float32, False, False, False, num_nodes=40, dim=6)
    big = torch.randn(6007, 40, 6)  # 5.8 MB, a size no other test uses
    first = rel_aggregate(big, relation, graph)
    kept = first.clone()
    second = rel_aggregate(big * 2, relation, graph)
    assert first.data_ptr() != second.data_ptr() and torch.equal(first, kept)
    pointer = second.data_ptr()
    del second
    third = rel_aggregate(big, relation, graph)
    assert third.data_ptr() == pointer and torch.equal(third, kept)
    third.resize_(2 * third.numel())
    third.zero_()


def test_plan_pieces_cover_long_rows():
    edge_index, edge_type = random_graph(40, 300, 5, seed=4)
    graph = RelGraph(edge_index, edge_type, 40, 5, chunk_size=7)
    arrays = dict(zip(RelGraph.FIELDS, graph.arrays))
    for name, rows in (("dst", 40), ("src", 40), ("rel", 5)):
        ptr, piece_ptr = arrays[f"{name}_ptr"].long(), arrays[f"{name}_piece_ptr"].long()
        begin, end = arrays[f"{name}_piece_begin"].long(), arrays[f"{name}_piece_end"].long()
        assert ((end - begin) <= 7).all() and ((end - begin) >= 1).all()
        for r in range(rows):
            pieces = range(piece_ptr[r], piece_ptr[r + 1])
            if ptr[r + 1] - ptr[r] <= 7:
                assert len(pieces) == 0
            else:  # consecutive, covering the row exactly
                assert begin[pieces[0]] == ptr[r] and end[pieces[-1]] == ptr[r + 1]
                assert all(end[p] == begin[p + 1] for p in pieces[:-1])
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size must be a positive int"):
            RelGraph(edge_index, edge_type, 40, 5, chunk_size=bad)


def test_balance_report_counts_the_plan():
    edge_index, edge_type = random_graph(40, 300, 5, seed=4)
    graph = RelGraph(edge_index, edge_type, 40, 5, chunk_size=7)
    report = balance_report(graph, batch=3)
    assert set(report) == {"forward", "grad_x", "grad_relation_shared", "grad_relation_per_query", "grad_edge_weight"}
    arrays = dict(zip(RelGraph.FIELDS, graph.arrays))
    pieces = {name: arrays[f"{name}_piece_begin"].numel() for name in ("dst", "src", "rel")}
    assert report["forward"]["thread_groups"] == 3 * (40 + pieces["dst"])
    assert report["forward"]["max_serial_edges"] <= 7
    assert report["grad_relation_per_query"]["max_serial_edges"] <= 7
    assert report["grad_relation_shared"]["thread_groups"] == 5 + pieces["rel"]
    assert report["grad_relation_shared"]["max_serial_edges"] == 3 * report["grad_relation_per_query"]["max_serial_edges"]
    assert report["grad_edge_weight"] == {"thread_groups": 300, "max_serial_edges": 3, "mean_serial_edges": 3.0,
                                          "max_partials_folded": 0}
    # Every edge is visited once per batch element, by a piece or by its whole row.
    total = report["forward"]["mean_serial_edges"] * report["forward"]["thread_groups"]
    assert total == pytest.approx(300 * 3, rel=1e-3)  # the mean is rounded to 3 decimals


@pytest.mark.skipif(not os.path.isfile(MUSIQUE_KG), reason="needs data/musique_hippo")
def test_balance_report_musique_scaled_4x_stays_under_1024():
    report = balance_report(kg_graph(MUSIQUE_KG, scale=4), batch=8)
    assert all(row["max_serial_edges"] <= 1024 for row in report.values()), report


# --------------------------------------------------------------- the CPU's joint backward (x and relation)
def _backward_args(graph, x, relation, weight, mask, message, aggregate, node_major, seed=5):
    ops = torch.ops.gfmrag_fast
    out, aux = ops.rel_aggregate(x, relation, graph.arrays, weight, mask, message, aggregate, node_major)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return (grad_out, x, relation, aux, graph.arrays, weight, mask, message, aggregate, node_major)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("message", MESSAGES)
@pytest.mark.parametrize("aggregate", AGGREGATES)
@pytest.mark.parametrize("per_query", [False, True])
@pytest.mark.parametrize("node_major", [False, True])
def test_joint_backward_matches_the_two_kernels(dtype, message, aggregate, per_query, node_major):
    # Both gradients in one walk by source: grad_x is the input kernel's bit for bit; the relation
    # gradient sums in another (fixed) order, so it matches the relation kernel and the float64
    # reference to rounding. max/min and per-query relations take the two kernels: bit for bit.
    graph, x, relation, weight, mask = skewed_inputs("cpu", dtype, per_query, True, True, num_nodes=80,
                                                     num_triples=600, num_relations=10, batch=4, dim=12)
    if node_major:
        x = x.transpose(0, 1).contiguous()
    ops = torch.ops.gfmrag_fast
    args = _backward_args(graph, x, relation, weight, mask, message, aggregate, node_major)
    grad_x, grad_relation = ops.rel_aggregate_backward_x_relation(*args)
    assert torch.equal(grad_x, ops.rel_aggregate_backward_x(*args))
    separate = ops.rel_aggregate_backward_relation(*args)
    assert grad_relation.shape == relation.shape and grad_relation.dtype == dtype
    if per_query or aggregate in ("max", "min"):
        assert torch.equal(grad_relation, separate)
    else:
        assert_close_scaled(grad_relation, separate.double(), dtype)
    x64 = x.double().requires_grad_(True)
    rel64 = relation.double().requires_grad_(True)
    expected = rel_aggregate_reference(x64, rel64, graph, weight.double(), mask, message, aggregate,
                                       node_major=node_major)
    _, want = torch.autograd.grad(expected, (x64, rel64), args[0].double())
    assert_close_scaled(grad_relation, want, dtype)


@pytest.mark.parametrize("aggregate", ["sum", "mean"])
def test_autograd_takes_the_joint_backward_on_the_cpu(aggregate):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.name())
            return func(*args, **(kwargs or {}))

    graph, x, relation, weight, mask = skewed_inputs("cpu", torch.float32, False, True, True)
    for wants, expected in (((True, True), ["gfmrag_fast::rel_aggregate_backward_x_relation"]),
                            ((True, False), ["gfmrag_fast::rel_aggregate_backward_x"]),
                            ((False, True), ["gfmrag_fast::rel_aggregate_backward_relation"])):
        xs, rel = x.clone().requires_grad_(wants[0]), relation.clone().requires_grad_(wants[1])
        out = rel_aggregate(xs, rel, graph, weight, mask, aggregate=aggregate)
        with Calls() as calls:
            out.backward(torch.ones_like(out))
        assert [n for n in calls.names if n.startswith("gfmrag_fast::")] == expected


def test_joint_backward_does_not_depend_on_the_thread_count():
    # The relation sums go into blocks fixed by the graph, not by the threads; hubs cut into pieces.
    graph, x, relation, weight, mask = skewed_inputs("cpu", torch.float32, False, True, True, chunk_size=3,
                                                     num_nodes=200, num_triples=2000, dim=16)
    args = _backward_args(graph, x.transpose(0, 1).contiguous(), relation, weight, mask, "distmult", "sum", True)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            runs.append(torch.ops.gfmrag_fast.rel_aggregate_backward_x_relation(*args))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        assert torch.equal(runs[0][0], other[0]) and torch.equal(runs[0][1], other[1])


def test_joint_backward_leaves_large_relation_tables_to_the_two_kernels():
    # Eight block copies of a table of more than 2M floats would take over 64 MiB: the two kernels run.
    num_relations, dim = 33_000, 64
    gen = torch.Generator().manual_seed(0)
    edge_index = torch.randint(0, 30, (2, 400), generator=gen)
    edge_type = torch.randint(0, 3, (400,), generator=gen)  # many edges per relation: sums that round
    graph = RelGraph(edge_index, edge_type, 30, num_relations)
    x = torch.randn(2, 30, dim, generator=gen)
    relation = torch.randn(num_relations, dim, generator=gen)
    args = _backward_args(graph, x, relation, None, None, "distmult", "sum", False)
    ops = torch.ops.gfmrag_fast
    grad_x, grad_relation = ops.rel_aggregate_backward_x_relation(*args)
    assert torch.equal(grad_x, ops.rel_aggregate_backward_x(*args))
    assert torch.equal(grad_relation, ops.rel_aggregate_backward_relation(*args))


def test_joint_backward_rejects_bad_input():
    graph, x, relation, weight, mask = skewed_inputs("cpu", torch.float32, False, True, True)
    args = list(_backward_args(graph, x, relation, weight, mask, "distmult", "sum", False))
    args[0] = args[0][:, :-1]
    with pytest.raises(ValueError, match="grad_out must have shape"):
        torch.ops.gfmrag_fast.rel_aggregate_backward_x_relation(*args)
