"""rel_aggregate: fused relation-conditioned message passing (GFM-RAG's rspmm), with autograd.

For every node v, query b and channel c::

    out[b, v, c] = AGG_{e: dst(e) = v, not edge_mask[e]}  w[e] * MSG(x[b, src(e), c], rel[(b,) type(e), c])

MSG is ``x * rel`` (distmult) or ``x + rel`` (transe); AGG is sum, mean (sum / number of
unmasked in-edges), max or min. ``src(e) = edge_index[1, e]`` and ``dst(e) = edge_index[0, e]``.
A node without an unmasked in-edge gets 0. The per-edge message tensor [B, E, d] is never
materialised by the kernels; :func:`rel_aggregate_reference` does materialise it and is the
readable specification the kernels are tested against.

max/min send the gradient to one edge per (b, v, c): the first in edge order among those that
reach the extremum (ties only arise between identical messages, e.g. parallel edges).

Layouts: x and the result are [B, N, d], or [N, B, d] with ``node_major=True``. Node major suits
the kernels better where B > 1 (on the CPU above all): an edge then gathers one contiguous
block of B * d values instead of B rows that lie N * d apart.

Long edge lists (hub nodes, a synonym relation holding half of the edges) are cut into pieces by
the graph's plan (:class:`RelGraph`, ``chunk_size``); results are deterministic and the same on
the CPU and the GPU for a given plan, with one exception: where the backward needs both x's and a
shared relation table's gradient (sum or mean), the CPU computes them in one walk of the edges
(``rel_aggregate_backward_x_relation``), and its relation gradient sums in another fixed order
(equal to the GPU's to rounding; still independent of the thread count).

First derivatives only: differentiating a gradient of rel_aggregate again (``create_graph=True``
followed by another backward, ``gradgradcheck``, Hessians) raises NotImplementedError rather
than returning a wrong or partial second derivative.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from . import _library
from .graph import RelGraph

MESSAGES = ("distmult", "transe")
AGGREGATES = ("sum", "mean", "max", "min")

_ops = torch.ops.gfmrag_fast


def rel_aggregate(
    x: torch.Tensor,  # [B, N, d], or [N, B, d] with node_major
    relation: torch.Tensor,  # [R, d] shared by the batch, or [B, R, d] per query
    graph: RelGraph,
    edge_weight: Optional[torch.Tensor] = None,  # [E], differentiable
    edge_mask: Optional[torch.Tensor] = None,  # [E] bool, True = edge removed
    message: str = "distmult",
    aggregate: str = "sum",
    node_major: bool = False,
) -> torch.Tensor:  # like x
    """Aggregates relation-conditioned messages into every node; see the module docstring.

    Differentiable in ``x``, ``relation`` and ``edge_weight``. Backward is deterministic.
    All tensors must share x's device and floating dtype (float32, float64, bfloat16, float16;
    the low-precision ones accumulate in float32); ``graph`` must be on x's device
    (``graph.to(x.device)``).
    """
    _check_call(x, relation, graph, edge_weight, edge_mask, message, aggregate)
    out, _ = _ops.rel_aggregate(
        x.contiguous(),
        relation.contiguous(),
        graph.arrays,
        None if edge_weight is None else edge_weight.contiguous(),
        None if edge_mask is None else edge_mask.contiguous(),
        message,
        aggregate,
        bool(node_major),
    )
    return out


def _check_call(x, relation, graph, edge_weight, edge_mask, message, aggregate) -> None:
    """Errors a user can act on, raised before anything reaches the dispatcher."""
    if not isinstance(graph, RelGraph):
        raise TypeError(f"rel_aggregate: graph must be a RelGraph, got {type(graph).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"rel_aggregate: x must be a tensor, got {type(x).__name__}")
    if not isinstance(relation, torch.Tensor):
        raise TypeError(f"rel_aggregate: relation must be a tensor, got {type(relation).__name__}")
    if message not in MESSAGES:
        raise ValueError(f"rel_aggregate: message must be one of {MESSAGES}, got {message!r}")
    if aggregate not in AGGREGATES:
        raise ValueError(f"rel_aggregate: aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    if graph.device != x.device:
        raise ValueError(
            f"rel_aggregate: graph is on {graph.device} but x is on {x.device}; use graph.to(x.device)"
        )
    _library.check_device_supported(x.device)


@torch.library.register_fake("gfmrag_fast::rel_aggregate")
def _rel_aggregate_fake(x, relation, graph, edge_weight, edge_mask, message, aggregate, node_major=False):
    torch._check(x.dim() == 3, lambda: f"rel_aggregate: x must have shape [B, N, d] or [N, B, d], got {x.shape}")
    torch._check(relation.dim() in (2, 3), lambda: "rel_aggregate: relation must be [R, d] or [B, R, d]")
    if aggregate in ("max", "min"):
        aux = x.new_empty(x.shape, dtype=torch.int32)
    elif aggregate == "mean":
        aux = x.new_empty((x.shape[0 if node_major else 1],), dtype=torch.int32)
    else:
        aux = x.new_empty((0,), dtype=torch.int32)
    return torch.empty_like(x), aux


def _register_backward_fake(name: str, like):
    @torch.library.register_fake(f"gfmrag_fast::{name}")
    def _fake(grad_out, x, relation, aux, graph, edge_weight, edge_mask, message, aggregate, node_major=False):
        return like(x, relation, graph)


_register_backward_fake("rel_aggregate_backward_x", lambda x, relation, graph: torch.empty_like(x))
_register_backward_fake("rel_aggregate_backward_relation", lambda x, relation, graph: torch.empty_like(relation))
_register_backward_fake(
    "rel_aggregate_backward_edge_weight", lambda x, relation, graph: x.new_empty((graph[1].shape[0],))
)


@torch.library.register_fake("gfmrag_fast::rel_aggregate_backward_x_relation")
def _joint_backward_fake(grad_out, x, relation, aux, graph, edge_weight, edge_mask, message, aggregate,
                         node_major=False, grad_x_init=None):
    return torch.empty_like(x), torch.empty_like(relation)


def _setup_context(ctx, inputs, output):
    x, relation, graph, edge_weight, edge_mask, message, aggregate, node_major = inputs
    _, aux = output
    ctx.message, ctx.aggregate, ctx.node_major = message, aggregate, node_major
    ctx.num_graph = len(graph)
    ctx.has_weight = edge_weight is not None
    ctx.save_for_backward(x, relation, aux, edge_weight, edge_mask, *graph)


def _backward(ctx, grad_out, _grad_aux):
    x, relation, aux, edge_weight, edge_mask, *graph = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    args = (grad_out, x, relation, aux, graph, edge_weight, edge_mask, ctx.message, ctx.aggregate, ctx.node_major)
    grad_x, grad_relation, grad_weight = _gradients(
        args, ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_weight and ctx.needs_input_grad[3])
    return grad_x, grad_relation, [None] * ctx.num_graph, grad_weight, None, None, None, None


def _gradients(args, want_x: bool, want_relation: bool, want_weight: bool, grad_x_init=None):
    """The backward ops for the gradients asked for, args as they take them. On the CPU x's and the
    relation's come from one walk of the graph (the kernel gathers grad_out once instead of twice),
    which also adds grad_x_init (x's gradient from its other reader) as it writes x's."""
    grad_x = grad_relation = grad_weight = None
    if want_x and want_relation and args[1].device.type == "cpu":
        grad_x, grad_relation = _ops.rel_aggregate_backward_x_relation(*args, grad_x_init=grad_x_init)
    else:
        if want_x:
            grad_x = _ops.rel_aggregate_backward_x(*args)
            if grad_x_init is not None:
                grad_x = grad_x_init + grad_x
        if want_relation:
            grad_relation = _ops.rel_aggregate_backward_relation(*args)
    if want_weight:
        grad_weight = _ops.rel_aggregate_backward_edge_weight(*args)
    return grad_x, grad_relation, grad_weight


torch.library.register_autograd("gfmrag_fast::rel_aggregate", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(
        "rel_aggregate: double backward is not supported: a gradient of rel_aggregate (taken with "
        "create_graph=True) cannot be differentiated again, with respect to x, relation or "
        "edge_weight. GFM-RAG training needs first derivatives only; for second derivatives use "
        "rel_aggregate_reference (pure PyTorch)."
    )


# Without these, autograd would treat the backward ops as constants (or warn and return None),
# and a second derivative through rel_aggregate would come back silently wrong or partial. With
# them, every path through a first gradient raises. First derivatives record no node (grad mode
# is off inside a backward without create_graph); the Python autograd layer costs ~5 us per
# backward op call in eager mode, nothing once compiled.
for _name in ("rel_aggregate_backward_x", "rel_aggregate_backward_relation", "rel_aggregate_backward_edge_weight",
              "rel_aggregate_backward_x_relation"):
    torch.library.register_autograd(f"gfmrag_fast::{_name}", _no_double_backward)


def rel_aggregate_sharing_x(
    x: torch.Tensor,  # [B, N, d], or [N, B, d] with node_major
    relation: torch.Tensor,  # [R, d] | [B, R, d]
    graph: RelGraph,
    edge_weight: Optional[torch.Tensor] = None,
    edge_mask: Optional[torch.Tensor] = None,
    message: str = "distmult",
    aggregate: str = "sum",
    node_major: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:  # (result like x, x)
    """:func:`rel_aggregate`, also returning x (an alias) for x's other consumer, on the CPU.

    A layer reads x twice, in the aggregation and in its dense tail; autograd then adds x's two
    gradients in a separate pass over [B, N, d]. Given the tail the returned alias instead of x,
    the tail's gradient of x comes back to this op's backward, and the CPU's joint backward
    (``rel_aggregate_backward_x_relation``) adds it while it writes its own: same values, same
    bits, one pass less. Elsewhere (not the CPU, or x or relation without gradient) this is
    ``(rel_aggregate(...), x)``.
    """
    _check_call(x, relation, graph, edge_weight, edge_mask, message, aggregate)
    if not (x.device.type == "cpu" and torch.is_grad_enabled() and x.requires_grad and relation.requires_grad):
        return rel_aggregate(x, relation, graph, edge_weight, edge_mask, message, aggregate, node_major), x
    out, x_alias = _SharedX.apply(x.contiguous(), relation.contiguous(), edge_weight, graph,
                                  None if edge_mask is None else edge_mask.contiguous(), message, aggregate,
                                  bool(node_major))
    return out, x_alias


class _SharedX(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, relation, edge_weight, graph, edge_mask, message, aggregate, node_major):
        weight = None if edge_weight is None else edge_weight.contiguous()
        out, aux = _ops.rel_aggregate(x, relation, graph.arrays, weight, edge_mask, message, aggregate, node_major)
        ctx.graph, ctx.message, ctx.aggregate, ctx.node_major = graph, message, aggregate, node_major
        ctx.save_for_backward(x, relation, aux, weight, edge_mask)
        return out, x.view_as(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_x_alias):
        x, relation, aux, weight, edge_mask = ctx.saved_tensors
        if grad_x_alias is not None:
            grad_x_alias = grad_x_alias.contiguous()
        if grad_out is None:  # the result was not used
            return grad_x_alias, None, None, None, None, None, None, None
        args = (grad_out.contiguous(), x, relation, aux, ctx.graph.arrays, weight, edge_mask, ctx.message,
                ctx.aggregate, ctx.node_major)
        grads = _gradients(args, *ctx.needs_input_grad[:3], grad_x_init=grad_x_alias)
        return (*grads, None, None, None, None, None)


def rel_aggregate_reference(
    x: torch.Tensor,  # [B, N, d] | [N, B, d] (node_major)
    relation: torch.Tensor,  # [R, d] | [B, R, d]
    graph: RelGraph,
    edge_weight: Optional[torch.Tensor] = None,  # [E]
    edge_mask: Optional[torch.Tensor] = None,  # [E] bool
    message: str = "distmult",
    aggregate: str = "sum",
    node_major: bool = False,
) -> torch.Tensor:  # like x
    """Pure-PyTorch scatter implementation of :func:`rel_aggregate` (same signature, same result).

    Materialises the [B, E, d] messages; this is the specification the kernels are tested against
    and the baseline they are measured against, not something to train with.
    """
    if node_major:
        out = rel_aggregate_reference(x.transpose(0, 1), relation, graph, edge_weight, edge_mask, message, aggregate)
        return out.transpose(0, 1)
    if message not in MESSAGES:
        raise ValueError(f"rel_aggregate_reference: message must be one of {MESSAGES}, got {message!r}")
    if aggregate not in AGGREGATES:
        raise ValueError(f"rel_aggregate_reference: aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    batch, num_nodes, dim = x.shape
    dst, src, etype = graph.edge_index[0], graph.edge_index[1], graph.edge_type
    eid = torch.arange(graph.num_edges, device=x.device)
    weight = edge_weight
    if edge_mask is not None:
        keep = ~edge_mask
        dst, src, etype, eid = dst[keep], src[keep], etype[keep], eid[keep]
        weight = None if weight is None else weight[keep]

    rel = relation[etype] if relation.dim() == 2 else relation[:, etype]  # [E', d] | [B, E', d]
    msg = x[:, src] * rel if message == "distmult" else x[:, src] + rel  # [B, E', d]
    if weight is not None:
        msg = msg * weight[None, :, None]

    out = x.new_zeros(batch, num_nodes, dim)
    if aggregate in ("sum", "mean"):
        out = out.index_add(1, dst, msg)
        if aggregate == "mean":
            degree = torch.bincount(dst, minlength=num_nodes).clamp(min=1)
            out = out / degree[None, :, None].to(out.dtype)
        return out

    # max/min: pick, per (b, v, c), the first edge whose message reaches the extremum, then sum
    # the picked messages so that autograd routes the gradient to that edge alone.
    reduce = "amax" if aggregate == "max" else "amin"
    index = dst[None, :, None].expand_as(msg)
    extremum = out.scatter_reduce(1, index, msg.detach(), reduce, include_self=False)
    reaches = msg.detach() == extremum.gather(1, index)
    candidate = torch.where(reaches, eid[None, :, None].expand_as(msg), graph.num_edges)
    first = torch.full_like(out, graph.num_edges, dtype=torch.long).scatter_reduce(
        1, index, candidate, "amin", include_self=True
    )
    picked = (candidate == first.gather(1, index)).to(msg.dtype)
    return out.index_add(1, dst, msg * picked)
