"""The dense tail of a GFM-RAG layer: ``activation(layer_norm(linear(cat[x, update]))) (+ x)``.

``cat[x, update]`` is never built: the linear's weight [d_out, 2 d_in] is split into its x half and
its update half, ``h = x W[:, :d_in]ᵀ + update W[:, d_in:]ᵀ + b``.

GFM-RAG's configuration (LayerNorm, ReLU; with or without the short cut) runs the fused
:func:`gfmrag_fast.ops.dense_tail` op: the two products in BLAS / cuBLAS, then bias, LayerNorm,
ReLU and short cut in one pass, with a backward that recomputes the normalised values and the ReLU
mask instead of storing them (one node-sized tensor less per layer than autograd keeps), in
float32, float64, and under float16/bfloat16 autocast. Other configurations (no LayerNorm, another
activation) run the same math in plain PyTorch.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from torch.nn import functional as F

from ..ops import dense_tail
from ..ops.dense_tail import dense_tail_supports


def dense_update(
    x: torch.Tensor,  # [..., d_in]
    update: torch.Tensor,  # [..., d_in]
    weight: torch.Tensor,  # [d_out, 2 d_in]
    bias: Optional[torch.Tensor],  # [d_out]
    layer_norm: nn.LayerNorm,
    residual: bool,
) -> torch.Tensor:  # [..., d_out]
    """``relu(layer_norm(x @ W[:, :d_in]ᵀ + update @ W[:, d_in:]ᵀ + b)) (+ x)`` through the fused op."""
    return dense_tail(x, update, weight, bias, layer_norm.weight, layer_norm.bias, layer_norm.eps, residual)


def fusable(
    x: torch.Tensor,  # [..., d_in]
    linear: nn.Linear,
    layer_norm: Optional[nn.LayerNorm],
    activation: Optional[Callable],
) -> bool:
    """Whether :func:`dense_update` can compute this tail: LayerNorm over the last dimension and
    ReLU, an update as wide as x (not pna's 12 d), on a device with kernels, x in the weight's dtype
    (or autocast, which the op applies)."""
    if layer_norm is None or activation not in (F.relu, torch.relu):
        return False
    if tuple(layer_norm.normalized_shape) != (linear.out_features,) or linear.in_features != 2 * x.shape[-1]:
        return False
    if not dense_tail_supports(x.device, linear.out_features):
        return False
    return torch.is_autocast_enabled(x.device.type) or x.dtype == linear.weight.dtype


def plain_tail(
    x: torch.Tensor,  # [..., d_in]
    update: torch.Tensor,  # [..., d_in]
    linear: nn.Linear,
    layer_norm: Optional[nn.LayerNorm],
    activation: Optional[Callable],
    residual: bool,
) -> torch.Tensor:  # [..., d_out]
    """The same tail in plain PyTorch, for any LayerNorm / activation configuration."""
    d = x.shape[-1]
    weight = linear.weight
    # addmm accumulates the x half into the update half inside the GEMM (no extra pass).
    h = F.linear(update, weight[:, d:], linear.bias).flatten(0, -2)
    h = torch.addmm(h, x.flatten(0, -2).to(h.dtype), weight[:, :d].t().to(h.dtype))
    h = h.view(*x.shape[:-1], linear.out_features)
    if layer_norm is not None:
        h = layer_norm(h)
    if activation is not None:
        h = activation(h)
    return h + x if residual else h


def layer_tail(
    x: torch.Tensor,  # [..., d_in]
    update: torch.Tensor,  # [..., d_in]
    linear: nn.Linear,
    layer_norm: Optional[nn.LayerNorm],
    activation: Optional[Callable],
    residual: bool,
    fused: bool = True,
) -> torch.Tensor:  # [..., d_out]
    """The tail of a layer: fused where :func:`fusable` says so (and ``fused``), else plain."""
    if fused and fusable(x, linear, layer_norm, activation):
        if update.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            update = update.to(x.dtype)
        # The rows as they lie ([B, N, d] or node major [N, B, d]): no further view in the autograd
        # graph, so that autograd can accumulate x's gradient (from this op and from the
        # aggregation) in place.
        return dense_update(x, update, linear.weight, linear.bias, layer_norm, residual)
    return plain_tail(x, update, linear, layer_norm, activation, residual)
