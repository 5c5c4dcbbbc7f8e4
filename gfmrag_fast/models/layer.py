"""GFM-RAG's relational message-passing layer (ULTRA's ``GeneralizedRelationalConv`` with projected relations)."""

from __future__ import annotations

from typing import Callable, Union

import torch
from torch import nn
from torch.nn import functional as F

from .aggregation import AGGREGATES, MESSAGES, PreparedGraph, neighbourhood_update
from .dense import dense_update


class GeneralizedRelationalConv(nn.Module):
    """One layer of GFM-RAG's entity model.

    For node states x [B, N, d_in], boundary [B, N, d_in] and relation features rel [2R, d_in]
    (shared by the batch; [B, 2R, d_in] per query also works)::

        rel_l  = relation_projection(rel)          # Linear(d_in, d_in) → ReLU → Linear(d_in, d_in)
        update = neighbourhood_update(x, rel_l, boundary)   # see models.aggregation
        h      = linear(cat[x, update])            # Linear(2 d_in, d_out); 13 d_in for pna
        out    = activation(layer_norm(h))         # each when enabled

    With ``residual`` (the entity model's short cut) x is added to ``out``. ``cat`` is never
    built: linear's weight is split into its x half and its update half,
    ``h = x @ W[:, :d_in].T + update @ W[:, d_in:].T + b``, so the state-dict keys
    (``linear.{weight,bias}``, ``layer_norm.*``, ``relation_projection.{0,2}.*``) stay the original's.
    The relation projection runs once per call on the shared [2R, d_in] table, not once per query.
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        message_func: str = "distmult",
        aggregate_func: str = "sum",
        layer_norm: bool = False,
        activation: Union[str, Callable, None] = "relu",
    ):
        super().__init__()
        if message_func not in MESSAGES:
            raise ValueError(f"message_func must be one of {MESSAGES}, got {message_func!r}")
        if aggregate_func not in AGGREGATES:
            raise ValueError(f"aggregate_func must be one of {AGGREGATES}, got {aggregate_func!r}")
        if message_func == "rotate" and input_dim % 2:
            raise ValueError(f"rotate messages need an even input_dim (real and imaginary halves), got {input_dim}")
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.message_func = message_func
        self.aggregate_func = aggregate_func
        update_dim = input_dim * 12 if aggregate_func == "pna" else input_dim
        self.linear = nn.Linear(input_dim + update_dim, output_dim)
        self.layer_norm = nn.LayerNorm(output_dim) if layer_norm else None
        self.activation = getattr(F, activation) if isinstance(activation, str) else activation
        self.relation_projection = nn.Sequential(
            nn.Linear(input_dim, input_dim), nn.ReLU(), nn.Linear(input_dim, input_dim)
        )
        # The fused dense tail keeps three node-sized tensors per layer for the backward instead of
        # four (models.dense); off only to compare against the unfused path.
        self.fused_dense = True

    def forward(
        self,
        x: torch.Tensor,  # [B, N, d_in]
        boundary: torch.Tensor,  # [B, N, d_in]
        relation: torch.Tensor,  # [2R, d_in] | [B, 2R, d_in]
        graph: PreparedGraph,
        residual: bool = False,  # add x to the output (the entity model's short cut)
    ) -> torch.Tensor:  # [B, N, d_out]
        relation = self.relation_projection(relation)
        update = neighbourhood_update(x, relation, boundary, graph, self.message_func, self.aggregate_func)
        if residual and self.output_dim != self.input_dim:
            raise ValueError(f"a short cut needs d_out == d_in, got {self.output_dim} and {self.input_dim}")
        weight = self.linear.weight
        d = self.input_dim
        if self._fusable(x, update):
            out = dense_update(x.flatten(0, -2), update.flatten(0, -2), weight, self.linear.bias, self.layer_norm, residual)
            return out.view(*x.shape[:-1], self.output_dim)
        # addmm accumulates the x half into the update half inside the GEMM (no extra pass).
        h = F.linear(update, weight[:, d:], self.linear.bias).flatten(0, -2)
        h = torch.addmm(h, x.flatten(0, -2).to(h.dtype), weight[:, :d].t().to(h.dtype))
        h = h.view(*x.shape[:-1], self.output_dim)
        if self.layer_norm is not None:
            h = self.layer_norm(h)
        if self.activation is not None:
            h = self.activation(h)
        return h + x if residual else h

    def _fusable(self, x: torch.Tensor, update: torch.Tensor) -> bool:
        """GFM-RAG's configuration outside autocast: the fused dense tail applies (models.dense)."""
        return (
            self.fused_dense
            and self.layer_norm is not None
            and self.activation is F.relu
            and x.dtype in (torch.float32, torch.float64)
            and update.dtype == x.dtype == self.linear.weight.dtype
            and not torch.is_autocast_enabled(x.device.type)
        )

    def extra_repr(self) -> str:
        return (
            f"{self.input_dim}, {self.output_dim}, message_func={self.message_func!r}, "
            f"aggregate_func={self.aggregate_func!r}"
        )
