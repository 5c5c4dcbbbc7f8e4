"""dense_tail: the dense part of a GFM-RAG layer after message passing, fused, with autograd.

For x, update [..., d_in] (every leading index a row) and weight [d_out, 2 d_in]::

    h   = x @ W[:, :d_in]ᵀ + update @ W[:, d_in:]ᵀ + bias                  # = linear(cat[x, update])
    out = relu(layer_norm(h; ln_weight, ln_bias, eps))  (+ x when residual)

The two matrix products run in BLAS / cuBLAS (TF32 where ``torch.backends.cuda.matmul.allow_tf32``
allows it); ``cat[x, update]`` is never built. Everything after them is one pass of a fused kernel:
bias, LayerNorm (statistics in float32, float64 for float64 inputs), ReLU and the short cut. The
backward does the ReLU mask, LayerNorm's backward and the bias and LayerNorm parameter gradients in
one pass over the rows (writing the short cut's gradient, a copy of the output's, on the way), then
the four matrix products, the short cut's gradient entering the first as its accumulator.

Saved for the backward: x, update, weight, h (the products, before the bias) and each row's
LayerNorm mean and 1/std; the normalised values and the ReLU mask are recomputed. Unfused, autograd
also keeps the ReLU output: one node-sized tensor more per layer.

Deterministic: parameter gradients are summed per fixed chunk of rows and then over the chunks in
order (no atomics), and each row's sums follow one fixed order, so the CPU and CUDA kernels give
the same bits (checked by ``tools/cuda_emulator``). :func:`dense_tail_reference` is the readable
specification the op is tested against.

Under autocast, x, update and weight are cast to the autocast dtype (float16 / bfloat16) and the
output is in that dtype; bias and the LayerNorm parameters may stay float32 and get float32
gradients. (Plain PyTorch under autocast returns float32 here, since autocast runs layer_norm in
float32; the fused op keeps the float32 statistics but stores its output in the lower precision.)
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch.nn import functional as F

from . import _library

_ops = torch.ops.gfmrag_fast

# The CUDA kernels keep a row in registers: one warp holds up to this many channels.
CUDA_MAX_DIM = 1024


def dense_tail(
    x: torch.Tensor,  # [..., d_in], e.g. [M, d_in] or [B, N, d_in]
    update: torch.Tensor,  # [..., d_in], like x
    weight: torch.Tensor,  # [d_out, 2 d_in]: the x half, then the update half
    bias: Optional[torch.Tensor] = None,  # [d_out]
    ln_weight: Optional[torch.Tensor] = None,  # [d_out]
    ln_bias: Optional[torch.Tensor] = None,  # [d_out]
    eps: float = 1e-5,
    residual: bool = True,  # add x to the output; needs d_out == d_in
) -> torch.Tensor:  # [..., d_out]
    """``relu(layer_norm(x W[:, :d_in]ᵀ + update W[:, d_in:]ᵀ + bias)) (+ x)``; see the module docstring.

    Differentiable in every tensor argument. x, update and weight share one floating dtype
    (float32, float64, float16, bfloat16) and device; the three parameters have that dtype, or
    float32 for float16/bfloat16 x. On CUDA, d_out is at most :data:`CUDA_MAX_DIM`.
    """
    _check_call(x, update, weight, bias, ln_weight, ln_bias)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, update, weight = (_autocast(t, dtype) for t in (x, update, weight))
    out, _, _ = _ops.dense_tail(x, update, weight, bias, ln_weight, ln_bias, float(eps), bool(residual))
    return out


def dense_tail_supports(device: torch.device, d_out: int) -> bool:
    """Whether the compiled library has dense_tail kernels for `device` and this output width."""
    return _library.has_kernels_for(device) and (device.type != "cuda" or d_out <= CUDA_MAX_DIM)


def _autocast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What autocast does to a matmul input: float64 stays, other floating dtypes become `dtype`."""
    return t if t.dtype == torch.float64 else t.to(dtype)


def _check_call(x, update, weight, bias, ln_weight, ln_bias) -> None:
    """Errors a user can act on, raised before anything reaches the dispatcher (shapes, dtypes
    and devices are checked by the op itself, naming the argument)."""
    for name, t in (("x", x), ("update", update), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"dense_tail: {name} must be a tensor, got {type(t).__name__}")
    for name, t in (("bias", bias), ("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"dense_tail: {name} must be a tensor or None, got {type(t).__name__}")
    _library.check_device_supported(x.device)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(t: torch.Tensor):
    """Rows of a [..., d] tensor: the product of its leading dimensions."""
    return math.prod(t.shape[:-1])


def _param_dtype(like: torch.Tensor, *params: Optional[torch.Tensor]) -> torch.dtype:
    return next((p.dtype for p in params if p is not None), like.dtype)


@torch.library.register_fake("gfmrag_fast::dense_tail")
def _dense_tail_fake(x, update, weight, bias, ln_weight, ln_bias, eps, residual):
    torch._check(x.dim() >= 1, lambda: f"dense_tail: x must have shape [..., d_in], got {tuple(x.shape)}")
    torch._check(weight.dim() == 2, lambda: f"dense_tail: weight must have shape [d_out, 2 d_in], got {tuple(weight.shape)}")
    shape = (*x.shape[:-1], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape), x.new_empty(_rows(x), 2, dtype=_stats_dtype(x.dtype))


@torch.library.register_fake("gfmrag_fast::dense_tail_backward")
def _dense_tail_backward_fake(grad_out, x, update, weight, h, stats, bias, ln_weight, ln_bias, residual, output_mask):
    def maybe(t, wanted):
        return t.new_empty(t.shape) if wanted else t.new_empty(0)

    grad_params = x.new_empty(3, weight.shape[0], dtype=_param_dtype(x, bias, ln_weight, ln_bias))
    return maybe(x, output_mask[0]), maybe(update, output_mask[1]), maybe(weight, output_mask[2]), grad_params


@torch.library.register_fake("gfmrag_fast::dense_tail_norm")
def _dense_tail_norm_fake(h, x, bias, ln_weight, ln_bias, eps):
    return h.new_empty(h.shape), h.new_empty(_rows(h), 2, dtype=_stats_dtype(h.dtype))


@torch.library.register_fake("gfmrag_fast::dense_tail_norm_backward")
def _dense_tail_norm_backward_fake(grad_out, h, stats, bias, ln_weight, ln_bias, copy_grad_out=False):
    grad_params = h.new_empty(3, h.shape[-1], dtype=_param_dtype(h, bias, ln_weight, ln_bias))
    return h.new_empty(h.shape), grad_params, h.new_empty(h.shape if copy_grad_out else (0,))


def _setup_context(ctx, inputs, output):
    x, update, weight, bias, ln_weight, ln_bias, _eps, residual = inputs
    _, h, stats = output
    ctx.residual = residual
    # h and stats are outputs only so that the backward can have them: no gradient flows into them,
    # and none is materialised as zeros.
    ctx.mark_non_differentiable(h, stats)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, update, weight, h, stats, bias, ln_weight, ln_bias)


def _backward(ctx, grad_out, _grad_h, _grad_stats):
    if grad_out is None:
        return (None,) * 8
    x, update, weight, h, stats, bias, ln_weight, ln_bias = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_x, grad_update, grad_weight, grad_params = _ops.dense_tail_backward(
        grad_out, x, update, weight, h, stats, bias, ln_weight, ln_bias, ctx.residual, list(needs[:3])
    )
    grad_bias, grad_ln_weight, grad_ln_bias = (
        grad if param is not None and need else None
        for grad, param, need in zip(grad_params, (bias, ln_weight, ln_bias), needs[3:6])
    )
    return (
        grad_x if needs[0] else None,
        grad_update if needs[1] else None,
        grad_weight if needs[2] else None,
        grad_bias,
        grad_ln_weight,
        grad_ln_bias,
        None,
        None,
    )


torch.library.register_autograd("gfmrag_fast::dense_tail", _backward, setup_context=_setup_context)


def dense_tail_reference(
    x: torch.Tensor,  # [..., d_in]
    update: torch.Tensor,  # [..., d_in]
    weight: torch.Tensor,  # [d_out, 2 d_in]
    bias: Optional[torch.Tensor] = None,  # [d_out]
    ln_weight: Optional[torch.Tensor] = None,  # [d_out]
    ln_bias: Optional[torch.Tensor] = None,  # [d_out]
    eps: float = 1e-5,
    residual: bool = True,
) -> torch.Tensor:  # [..., d_out]
    """Plain PyTorch :func:`dense_tail` (same signature, same result up to rounding), written as
    GFM-RAG's layer writes it: a Linear over ``cat[x, update]``, LayerNorm, ReLU, short cut."""
    h = F.linear(torch.cat([x, update], dim=-1), weight, bias)
    out = F.relu(F.layer_norm(h, (h.shape[-1],), ln_weight, ln_bias, eps))
    return out + x if residual else out
