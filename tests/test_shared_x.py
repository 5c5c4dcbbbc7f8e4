"""x read by the aggregation and by the rest of its layer: on the CPU the aggregation's backward adds
the layer's gradient of x to its own (rel_aggregate_sharing_x), instead of autograd adding the two
in a pass of its own. Same values and same bits as the unshared layer, for the op and the models."""

import math

import pytest
import torch

from gfmrag_fast.models import layer as layer_module
from gfmrag_fast.models.aggregation import stored_update
from gfmrag_fast.ops import AGGREGATES, MESSAGES, rel_aggregate
from gfmrag_fast.ops.rel_aggregate import rel_aggregate_sharing_x

from helpers import make_graph
from test_node_major import build, kg_graph, run
from test_rel_aggregate import skewed_inputs


def _grads(share, graph, x, relation, weight, mask, message, aggregate, node_major, needs=(True, True, True)):
    """x feeds the aggregation and, through the alias, a product with the aggregation's result
    (as a layer's tail does); gradients of x, relation and the edge weight."""
    leaves = [t.detach().clone().requires_grad_(n) for t, n in zip((x, relation, weight), needs)]
    if share:
        out, x_other = rel_aggregate_sharing_x(leaves[0], leaves[1], graph, leaves[2], mask, message, aggregate,
                                               node_major=node_major)
    else:
        out = rel_aggregate(leaves[0], leaves[1], graph, leaves[2], mask, message, aggregate, node_major=node_major)
        x_other = leaves[0]
    gen = torch.Generator().manual_seed(9)
    w1 = torch.randn(out.shape, generator=gen).to(out.dtype)
    loss = (out * w1).sum() + (x_other * out.detach().flip(-1)).sum() + (x_other.square() * 0.5).sum()
    wanted = [t for t in leaves if t.requires_grad]
    return out.detach(), torch.autograd.grad(loss, wanted)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("message", MESSAGES)
@pytest.mark.parametrize("aggregate", AGGREGATES)
@pytest.mark.parametrize("node_major", [False, True])
def test_sharing_x_gives_the_same_bits(dtype, message, aggregate, node_major):
    graph, x, relation, weight, mask = skewed_inputs("cpu", dtype, False, True, True, num_nodes=80,
                                                     num_triples=600, num_relations=10, batch=4, dim=12)
    if node_major:
        x = x.transpose(0, 1).contiguous()
    shared = _grads(True, graph, x, relation, weight, mask, message, aggregate, node_major)
    plain = _grads(False, graph, x, relation, weight, mask, message, aggregate, node_major)
    assert torch.equal(shared[0], plain[0])
    for a, b in zip(shared[1], plain[1]):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, True), (True, False, True)])
def test_sharing_x_with_some_inputs_constant(needs):
    graph, x, relation, weight, mask = skewed_inputs("cpu", torch.float32, False, True, True)
    shared = _grads(True, graph, x, relation, weight, mask, "distmult", "sum", False, needs)
    plain = _grads(False, graph, x, relation, weight, mask, "distmult", "sum", False, needs)
    for a, b in zip(shared[1], plain[1]):
        assert torch.equal(a, b)


def test_sharing_x_gradcheck():
    graph, x, relation, weight, mask = skewed_inputs("cpu", torch.float64, False, True, True, chunk_size=3,
                                                     num_nodes=20, num_triples=60, num_relations=4, batch=2, dim=3,
                                                     unique=True)

    def fn(x, r, w):
        out, x_other = rel_aggregate_sharing_x(x, r, graph, w, mask)
        return out * x_other + x_other

    leaves = [t.requires_grad_(True) for t in (x, relation, weight)]
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)


def test_sharing_x_rejects_a_bad_init():
    graph, x, relation, _, _ = skewed_inputs("cpu", torch.float32, False, False, False)
    ops = torch.ops.gfmrag_fast
    out, aux = ops.rel_aggregate(x, relation, graph.arrays, None, None, "distmult", "sum", False)
    args = (torch.ones_like(out), x, relation, aux, graph.arrays, None, None, "distmult", "sum", False)
    with pytest.raises(ValueError, match="grad_x_init must be a contiguous tensor like x"):
        ops.rel_aggregate_backward_x_relation(*args, grad_x_init=torch.ones(1, *x.shape[1:]))
    with pytest.raises(ValueError, match="grad_x_init"):
        ops.rel_aggregate_backward_x_relation(*args, grad_x_init=torch.ones_like(x).double())
    with pytest.raises(ValueError, match="not contiguous"):
        ops.rel_aggregate_backward_x_relation(*args, grad_x_init=torch.ones_like(x).transpose(0, 1).contiguous()
                                              .transpose(0, 1))


def _unshared(x, relation, boundary, graph, message, aggregate, node_major):
    return stored_update(x, relation, boundary, graph, message, aggregate, node_major), x


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused_tail", "plain_tail"])
@pytest.mark.parametrize("node_major", [True, False], ids=["node_major", "batch_major"])
@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_models_give_the_unshared_bits(monkeypatch, kind, node_major, fused, dtype):
    model = build(kind, seed=21)
    for layer in model.entity_model.layers:
        layer.fused_dense = fused
    graph = kg_graph(seed=21) if kind == "pretrain" else make_graph(num_nodes=40, num_edges=160, seed=21)
    shared = run(model, kind, graph, node_major, dtype)
    monkeypatch.setattr(layer_module, "stored_update_sharing_x", _unshared)
    unshared = run(model, kind, graph, node_major, dtype)
    assert torch.equal(shared[0], unshared[0])
    for a, b in zip(shared[1], unshared[1]):
        assert torch.equal(a, b)
    assert shared[2].keys() == unshared[2].keys()
    for name in shared[2]:
        assert torch.equal(shared[2][name], unshared[2][name]), name


def test_the_layers_add_no_gradient_of_x():
    """With the states' two gradients added by the aggregation's backward, no node-sized add is
    left in the backward (profiled; before, one aten::add_ per layer)."""
    model = build("pretrain", seed=22, hidden_dims=[8, 8, 8, 8])
    graph = kg_graph(seed=22)
    counts = {}
    for share in (True, False):
        with pytest.MonkeyPatch.context() as patch:
            if not share:
                patch.setattr(layer_module, "stored_update_sharing_x", _unshared)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                        record_shapes=True) as prof:
                run(model, "pretrain", graph, True, "float32")
        counts[share] = sum(1 for e in prof.events() if e.name in ("aten::add", "aten::add_") and e.input_shapes
                            and len(e.input_shapes[0]) == 3 and math.prod(e.input_shapes[0]) >= 5 * 40 * 8
                            and e.input_shapes[0] == e.input_shapes[1])
    assert counts[True] + 4 <= counts[False], counts
