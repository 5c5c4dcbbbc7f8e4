"""rel_aggregate against its pure-PyTorch reference, gradients, op registration and bad input."""

import itertools

import pytest
import torch
from torch.library import opcheck

from gfmrag_fast.ops import AGGREGATES, MESSAGES, RelGraph, rel_aggregate, rel_aggregate_reference

from conftest import DEVICES, random_graph

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
    for name in ("rel_aggregate_backward_x", "rel_aggregate_backward_relation", "rel_aggregate_backward_edge_weight"):
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
    with pytest.raises(ValueError, match="graph must hold 13 prepared arrays"):
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
