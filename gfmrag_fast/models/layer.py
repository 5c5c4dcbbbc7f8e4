"""GFM-RAG's relational message-passing layer (ULTRA's ``GeneralizedRelationalConv`` with projected relations)."""

from __future__ import annotations

from typing import Callable, Union

import torch
from torch import nn
from torch.nn import functional as F

from .aggregation import AGGREGATES, MESSAGES, Boundary, PreparedGraph, compute_dtype, stored_layout, stored_update_sharing_x
from .dense import fusable, layer_tail


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
    With LayerNorm and ReLU (GFM-RAG's configuration) everything after ``linear`` is the fused
    ``dense_tail`` op (see ``models.dense``).
    The relation projection runs once per call on the shared [2R, d_in] table, not once per query.

    The output is stored like x: batch major, or node major when x is a ``transpose(0, 1)`` view
    of a contiguous [N, B, d_in] tensor (``models.aggregation.is_node_major``; the entity models
    choose). Node major, the aggregation runs on the [N, B, d_in] storage and the tail on its rows
    (every step of the tail is per row), so no state is copied in either direction, and the
    output is the same bits as batch major (the parameter gradients, sums over the rows, add them
    in another order: equal to rounding). A partitioned graph runs batch major.
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
        # The fused dense tail (models.dense: the dense_tail op) for GFM-RAG's configuration; off
        # only to compare against the plain PyTorch tail.
        self.fused_dense = True

    def forward(
        self,
        x: torch.Tensor,  # [B, N, d_in]
        boundary: Boundary,  # [B, N, d_in], or a RowBoundary (its nonzero rows)
        relation: torch.Tensor,  # [2R, d_in] | [B, 2R, d_in]
        graph: PreparedGraph,
        residual: bool = False,  # add x to the output (the entity model's short cut)
    ) -> torch.Tensor:  # [B, N, d_out]
        if residual and self.output_dim != self.input_dim:
            raise ValueError(f"a short cut needs d_out == d_in, got {self.output_dim} and {self.input_dim}")
        node_major = stored_layout(x, graph)
        boundary_is_x = boundary is x
        if node_major:
            # The storage order [N, B, d]: one transpose view per layer, shared by the aggregation and
            # the tail, so that autograd sums x's two gradients in place (two views of x would each
            # pass a view back, and the sum would be a fresh tensor).
            x = x.transpose(0, 1)
            if boundary_is_x:
                boundary = x
            elif isinstance(boundary, torch.Tensor):
                boundary = boundary.transpose(0, 1)
        fused = self.fused_dense and fusable(x, self.linear, self.layer_norm, self.activation)
        if fused:
            # Under autocast the fused tail computes in the low precision: one low-precision copy of
            # x (and of the boundary) then serves the aggregation, the update and the tail's products.
            cast = x.to(compute_dtype(x))
            boundary = cast if boundary_is_x else boundary.to(cast.dtype)
            x = cast
        relation = self.relation_projection(relation)
        # The tail reads x through the alias the aggregation returns (on the CPU, for sum): the
        # aggregation's backward then adds the tail's gradient of x to its own as it writes it.
        update, x_tail = stored_update_sharing_x(x, relation, boundary, graph, self.message_func,
                                                 self.aggregate_func, node_major)
        out = layer_tail(x_tail, update, self.linear, self.layer_norm, self.activation, residual, fused=fused)
        return out.transpose(0, 1) if node_major else out

    def extra_repr(self) -> str:
        return (
            f"{self.input_dim}, {self.output_dim}, message_func={self.message_func!r}, "
            f"aggregate_func={self.aggregate_func!r}"
        )
