"""The dense tail of a GFM-RAG layer, ``relu(layer_norm(x W1ᵀ + u W2ᵀ + b)) + x``, as one autograd
function that stores less for the backward.

Unfused, autograd keeps four node-sized tensors per layer for the backward:

* the update ``u``, for ``W2``'s gradient;
* the linear output ``h``, LayerNorm's input;
* the ReLU output;
* the layer output, which is the next layer's input.

The fused function drops the ReLU output. It keeps ``u`` and ``h`` with LayerNorm's per-row mean
and 1/std, and recomputes the ReLU mask in the backward in one elementwise pass. That is a quarter
less activation memory, for the same matrix products, and the ReLU and the short cut run in place
in the forward. Gradients are the same up to rounding.

Used in float32/float64 training with LayerNorm, ReLU and the short cut, which is GFM-RAG's
configuration. Other cases (autocast, no LayerNorm, other activations) take the unfused path.
"""

from __future__ import annotations

from typing import Optional

import torch


class _DenseUpdate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, update, weight, bias, ln_weight, ln_bias, eps: float, residual: bool):
        # x, update: [M, d_in]; weight: [d_out, 2 d_in] (x half, update half); bias: [d_out] or None
        d_in = x.shape[-1]
        h = torch.addmm(bias, update, weight[:, d_in:].t()) if bias is not None else update @ weight[:, d_in:].t()
        h = torch.addmm(h, x, weight[:, :d_in].t())
        y, mean, rstd = torch.native_layer_norm(h, (h.shape[-1],), ln_weight, ln_bias, eps)
        out = y.relu_()
        if residual:
            out = out.add_(x)
        ctx.residual, ctx.has_bias = residual, bias is not None
        ctx.save_for_backward(x, update, weight, h, mean, rstd, ln_weight, ln_bias)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, update, weight, h, mean, rstd, ln_weight, ln_bias = ctx.saved_tensors
        d_in = x.shape[-1]
        # ReLU passed where the LayerNorm output was positive: recompute its sign from h.
        normed = (h - mean) * rstd
        if ln_weight is not None:
            normed = torch.addcmul(ln_bias, normed, ln_weight) if ln_bias is not None else normed * ln_weight
        grad_y = grad_out * (normed > 0)
        del normed
        grad_h, grad_ln_weight, grad_ln_bias = torch.ops.aten.native_layer_norm_backward(
            grad_y, h, [h.shape[-1]], mean, rstd, ln_weight, ln_bias,
            [True, ln_weight is not None, ln_bias is not None],
        )
        grad_x = grad_update = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_h @ weight[:, :d_in]
            if ctx.residual:
                grad_x = grad_x.add_(grad_out)
        if ctx.needs_input_grad[1]:
            grad_update = grad_h @ weight[:, d_in:]
        if ctx.needs_input_grad[2]:
            grad_weight = torch.cat([grad_h.t() @ x, grad_h.t() @ update], dim=1)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_h.sum(0)
        return grad_x, grad_update, grad_weight, grad_bias, grad_ln_weight, grad_ln_bias, None, None


def dense_update(
    x: torch.Tensor,  # [M, d_in]
    update: torch.Tensor,  # [M, d_in]
    weight: torch.Tensor,  # [d_out, 2 d_in]
    bias: Optional[torch.Tensor],  # [d_out]
    layer_norm: torch.nn.LayerNorm,
    residual: bool,
) -> torch.Tensor:  # [M, d_out]
    """``relu(layer_norm(x @ W[:, :d_in]ᵀ + update @ W[:, d_in:]ᵀ + b)) (+ x)``, storing u and h."""
    return _DenseUpdate.apply(
        x, update, weight, bias, layer_norm.weight, layer_norm.bias, layer_norm.eps, residual
    )
