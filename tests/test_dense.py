"""The fused dense tail of a layer: gradients, equality with the unfused path, memory kept."""

import pytest
import torch
from torch import nn

from gfmrag_fast.models.dense import dense_update

from helpers import make_batch, make_graph, retriever


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(residual, bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    u = torch.randn(7, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    linear = nn.Linear(8, 4, bias=bias).double()
    norm = nn.LayerNorm(4).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.3, 0.3)
    params = [linear.weight, norm.weight, norm.bias] + ([linear.bias] if bias else [])

    def fn(x, u, *_):
        return dense_update(x, u, linear.weight, linear.bias, norm, residual)

    assert torch.autograd.gradcheck(fn, (x, u, *params))


def _saved_bytes(model, graph, batch):
    """Bytes of distinct storages autograd keeps for the backward of one forward, parameters left
    out (they are kept alive by the model whether saved or not)."""
    storages = {}
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in parameters:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(graph, batch)
    return sum(storages.values()), out


def test_fused_equals_unfused_and_keeps_less():
    graph = make_graph(num_nodes=400, num_edges=3000)
    batch = make_batch(graph, batch_size=4)
    results = {}
    for fused in (True, False):
        model, _ = retriever(input_dim=32, hidden_dims=[32] * 4)
        for layer in model.entity_model.layers:
            layer.fused_dense = fused
        saved, out = _saved_bytes(model, graph, batch)
        out.square().mean().backward()
        results[fused] = (saved, out.detach(), {k: p.grad for k, p in model.named_parameters()})
    (saved_f, out_f, grads_f), (saved_u, out_u, grads_u) = results[True], results[False]
    torch.testing.assert_close(out_f, out_u, rtol=1e-5, atol=1e-6)
    for key in grads_u:
        torch.testing.assert_close(grads_f[key], grads_u[key], rtol=1e-4, atol=1e-6, msg=key)
    node_tensor = 4 * 400 * 32 * 4  # one [B, N, d] float32 tensor
    # One node-sized tensor fewer per layer (the ReLU output), four layers.
    assert saved_u - saved_f >= 4 * node_tensor, (saved_u, saved_f)


def test_fused_under_autocast_is_as_accurate_as_unfused():
    """bfloat16 autocast: the fused tail computes in bfloat16 with float32 LayerNorm statistics, the
    plain tail runs LayerNorm in float32. Against the same model in float32, the fused path's
    outputs and gradients must be about as accurate as the plain path's."""
    graph = make_graph(num_nodes=300, num_edges=2000)
    batch = make_batch(graph, batch_size=3)
    results = {}
    for run in ("fused", "plain", "float32"):
        model, _ = retriever(input_dim=32, hidden_dims=[32] * 3)
        for layer in model.entity_model.layers:
            layer.fused_dense = run == "fused"
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=run != "float32"):
            out = model(graph, batch).float()
        out.square().mean().backward()
        results[run] = (out.detach(), {k: p.grad for k, p in model.named_parameters()})

    def errors(run):
        (out, grads), (out_ref, grads_ref) = results[run], results["float32"]
        assert all(g.dtype == torch.float32 for g in grads.values())
        grad_error = max(((grads[k] - grads_ref[k]).abs().max() / grads_ref[k].abs().max()).item() for k in grads)
        return ((out - out_ref).abs().max() / out_ref.abs().max()).item(), grad_error

    (out_fused, grad_fused), (out_plain, grad_plain) = errors("fused"), errors("plain")
    assert out_fused <= 1.5 * out_plain + 1e-3, (out_fused, out_plain)
    assert grad_fused <= 1.5 * grad_plain + 1e-3, (grad_fused, grad_plain)
