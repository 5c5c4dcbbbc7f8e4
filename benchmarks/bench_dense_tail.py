"""dense_tail forward + backward against the plain PyTorch tail, in the same run.

    pytest benchmarks/bench_dense_tail.py       # CPU case; the CUDA ones too when a GPU is present

  kernel      gfmrag_fast.ops.dense_tail: two products, then one fused pass (forward), one fused pass
              then four products (backward)
  reference   the plain PyTorch tail the model runs without the op (models.dense.plain_tail): the
              split-weight products, LayerNorm, ReLU, short cut, each its own pass, autograd's backward
  matmuls     the six products alone (two forward, four backward): the floor of the tail

Both tails compute relu(layer_norm(x W[:, :d]ᵀ + u W[:, d:]ᵀ + b)) + x over M rows of width d.
CPU: M = 200,000, d = 64 (issue 12's size). CUDA: GFM-RAG's M = 8 x 82,157, d = 512, float32 (TF32)
and bfloat16 autocast.
"""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gfmrag_fast.models.dense import plain_tail
from gfmrag_fast.ops import dense_tail

CASES = {"cpu": {"M200k-d64": (200_000, 64)}, "cuda": {"hotpotqa-B8-d512": (8 * 82_157, 512)}}
DTYPES = {"cpu": ["float32"], "cuda": ["float32", "bfloat16"]}


def _params():
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [pytest.param(device, name, dtype, id=f"{name}-{device}-{dtype}")
            for device in devices for name in CASES[device] for dtype in DTYPES[device]]


def make_tail(impl, device, rows, dim, dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, dim, generator=gen).to(device).requires_grad_(True)
    update = torch.randn(rows, dim, generator=gen).to(device).requires_grad_(True)
    linear = nn.Linear(2 * dim, dim).to(device)
    norm = nn.LayerNorm(dim).to(device)
    grad_out = torch.randn(rows, dim, generator=gen).to(device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    weight = linear.weight

    def matmuls():
        with autocast:
            w = weight.detach().to(torch.bfloat16) if dtype == "bfloat16" else weight.detach()
            xs, us, g = (t.detach().to(w.dtype) for t in (x, update, grad_out))
            h = torch.mm(xs, w[:, :dim].t()).addmm_(us, w[:, dim:].t())
            torch.mm(h, w[:, :dim]), torch.mm(h, w[:, dim:]), torch.mm(g.t(), xs), torch.mm(g.t(), us)

    def tail():
        with autocast:
            if impl == "kernel":
                out = dense_tail(x, update, weight, linear.bias, norm.weight, norm.bias, norm.eps, residual=True)
            else:
                out = plain_tail(x, update, linear, norm, F.relu, residual=True)
        out.backward(grad_out.to(out.dtype))
        for p in (x, update, weight, linear.bias, norm.weight, norm.bias):
            p.grad = None

    return matmuls if impl == "matmuls" else tail


@pytest.mark.parametrize("impl", ["kernel", "reference", "matmuls"])
@pytest.mark.parametrize("device,name,dtype", _params())
def test_dense_tail_forward_backward(measure, device, name, dtype, impl):
    rows, dim = CASES[device][name]
    fn = make_tail(impl, device, rows, dim, dtype)
    measure(fn, f"dense_tail/{name}/{device}/{dtype}/forward_backward", impl, device,
            rounds=7 if device == "cpu" else 20, rows=rows, dim=dim, dtype=dtype)


@pytest.mark.parametrize("device,name,dtype", _params())
def test_dense_tail_taking_turns(request, device, name, dtype, rounds=15):
    """The three implementations call by call in turn (bench_train_step.take_turns), so that a change
    in the machine's load falls on all three alike; prints the median of each and the ratios. On a
    shared CPU this ratio is steadier than the three separate cases above."""
    from bench_train_step import take_turns

    rows, dim = CASES[device][name]
    fns = {impl: make_tail(impl, device, rows, dim, dtype) for impl in ("kernel", "reference", "matmuls")}
    med = {impl: t["step_ms"] for impl, t in take_turns(fns, device, rounds).items()}
    line = (f"dense_tail {name} {device} {dtype}, taking turns, median of {rounds}: kernel {med['kernel']:.1f} ms, "
            f"reference {med['reference']:.1f} ms, matmuls {med['matmuls']:.1f} ms; reference / kernel = "
            f"{med['reference'] / med['kernel']:.2f}x; above the products: kernel "
            f"{med['kernel'] - med['matmuls']:.1f} ms, reference {med['reference'] - med['matmuls']:.1f} ms")
    with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        print("\n" + line, flush=True)
    assert all(t > 0 for t in med.values())
