"""The neighbourhood update of one GFM-RAG layer: relational messages aggregated and joined with the boundary.

For node v of query b (``src(e) = edge_index[1, e]``, ``dst(e) = edge_index[0, e]``, masked edges
left out, ``w_e`` the edge weight or 1, ``deg(v)`` the number of unmasked edges into v)::

    msg_e     = x[b, src(e)] * rel[type(e)]            distmult
              = x[b, src(e)] + rel[type(e)]            transe
              = rotate(x[b, src(e)], rel[type(e)])     rotate (below)
    sum       = Σ_{dst(e)=v} w_e msg_e                   + boundary[b, v]
    mean      = (Σ_{dst(e)=v} w_e msg_e + boundary[b, v]) / (deg(v) + 1)
    max / min = max / min({w_e msg_e : dst(e)=v} ∪ {boundary[b, v]})   (= boundary[b, v] if deg(v) = 0)
    pna       = see :func:`_pna`, shape [B, N, 12 d]

This is GFM-RAG's layer (its rspmm kernel path) with the boundary treated as one extra message per
node, which is also how its PyG message/aggregate path writes it. distmult/transe with sum, mean,
max and min run on the fused :func:`rel_aggregate` op; the op returns 0 at nodes without an
unmasked in-edge, and max/min take the boundary there (GFM-RAG's kernel returned the lowest /
highest float there, so ``max(update, boundary)`` was the boundary).

``mean`` divides by the unmasked in-degree + 1. GFM-RAG's rspmm path counted degrees over
``edge_index[1]`` (the source side); on GFM-RAG graphs, where every edge has its inverse and easy
edges are removed with their inverses, the two counts are equal.

``rotate`` (not run by the op; plain PyTorch with the [B, E, d] messages materialised): x and rel
are complex vectors whose real part is the first d/2 channels and imaginary part the last d/2;
``msg = x ⊙ rel`` as complex numbers, i.e. ``(x_re r_re - x_im r_im, x_re r_im + x_im r_re)``.
The original ran rotate only through its PyG path, which gathers in the opposite direction
(from ``edge_index[0]`` into ``edge_index[1]``); here every message type gathers in the direction above.
Not checked against the original's numbers.

Layouts: states are [B, N, d] and stored either batch major (contiguous) or node major (a
``transpose(0, 1)`` view of a contiguous [N, B, d] tensor, see :func:`is_node_major`). On node-major
storage the op gathers, per edge, one contiguous block of B·d values instead of B rows N·d apart;
each output element (and each gradient element of x, relation and edge weight) is summed in the
same order, so both layouts give the same bits. The update comes back in x's layout.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Optional, Tuple, Union

import torch

from ..ops import RelGraph, rel_aggregate
from ..ops.rel_aggregate import rel_aggregate_sharing_x

MESSAGES = ("distmult", "transe", "rotate")
AGGREGATES = ("sum", "mean", "max", "min", "pna")
PNA_EPS = 1e-6


class PreparedGraph:
    """A graph ready for one forward pass: the RelGraph on the model's device, the optional edge
    weight [E] and edge mask [E] (bool, True = removed), and the unmasked in-degrees, computed at
    most once per pass and shared by all layers.

    On a partitioned graph (``halo``, a :class:`~gfmrag_fast.models.partition.GraphPartition`),
    ``graph`` is this rank's local graph: edges into its N owned nodes from the owned and halo
    nodes. The layers then work on the owned nodes' states [B, N, d] and reach the other ranks
    only through :meth:`source_states`, :meth:`owned` and :meth:`mean_over_nodes`; without a
    halo these are the identity, the states themselves and a plain mean.
    """

    def __init__(
        self,
        graph: RelGraph,
        edge_weight: Optional[torch.Tensor] = None,  # [E]
        edge_mask: Optional[torch.Tensor] = None,  # [E] bool
        halo=None,
    ):
        num_edges = graph.num_edges
        if edge_weight is not None and edge_weight.shape != (num_edges,):
            raise ValueError(f"edge_weight must have shape [E] = [{num_edges}], got {tuple(edge_weight.shape)}")
        if edge_mask is not None:
            if edge_mask.shape != (num_edges,) or edge_mask.dtype != torch.bool:
                raise ValueError(
                    f"edge_mask must be a bool tensor of shape [E] = [{num_edges}], "
                    f"got {edge_mask.dtype} {tuple(edge_mask.shape)}"
                )
            edge_mask = edge_mask.to(graph.device)
        self.graph = graph
        self.edge_weight = None if edge_weight is None else edge_weight.to(graph.device)
        self.edge_mask = edge_mask
        self.halo = halo
        self._in_degree: Optional[torch.Tensor] = None

    @property
    def num_nodes(self) -> int:
        """Nodes whose states the layers hold: all of them, or this rank's owned ones."""
        return self.graph.num_nodes if self.halo is None else self.halo.num_owned

    def in_degree(self) -> torch.Tensor:  # [N] int64
        """Number of unmasked edges into each node."""
        if self._in_degree is None:
            if self.edge_mask is None:
                degree = self.graph.in_degree.long()
            else:
                # Integer index_add: deterministic, and no boolean indexing (a host sync on CUDA).
                removed = torch.zeros(self.graph.num_nodes, dtype=torch.long, device=self.edge_mask.device)
                removed.index_add_(0, self.graph.edge_index[0], self.edge_mask.long())
                degree = self.graph.in_degree.long() - removed
            self._in_degree = degree[: self.num_nodes]
        return self._in_degree

    def source_states(self, x: torch.Tensor):  # context manager: [B, N, d] -> [B, N_local, d]
        """The states messages are gathered from: ``x``, followed on a partitioned graph by the
        halo nodes' states fetched from the ranks that own them."""
        return nullcontext(x) if self.halo is None else self.halo.source_states(x)

    def owned(self, t: torch.Tensor) -> torch.Tensor:  # [B, N_local, ...] -> [B, N, ...]
        """The rows of the nodes whose states the layers hold (an aggregation over the local graph
        has rows for the halo nodes too, empty ones)."""
        return t if self.halo is None else self.halo.owned_part(t)

    def mean_over_nodes(self, values: torch.Tensor) -> torch.Tensor:  # [N] -> scalar
        """The mean of a per-node quantity over every node of the graph, on every rank."""
        return values.mean() if self.halo is None else self.halo.mean_over_nodes(values)


def is_node_major(t: torch.Tensor) -> bool:
    """Whether a [B, N, ...] tensor is stored node major: a ``transpose(0, 1)`` view of a contiguous
    [N, B, ...] tensor. False for a contiguous tensor (B = 1 or N = 1: both layouts are one)."""
    return t.dim() >= 3 and not t.is_contiguous() and t.transpose(0, 1).is_contiguous()


def node_major_copy(t: torch.Tensor) -> torch.Tensor:  # [B, N, ...] -> [B, N, ...] stored node major
    """``t`` stored node major (a copy, unless it already is)."""
    return t if is_node_major(t) else t.transpose(0, 1).contiguous().transpose(0, 1)


def _per_node(values: torch.Tensor, node_major: bool) -> torch.Tensor:  # [N] -> broadcastable to the states
    """A per-node quantity shaped to broadcast over states stored [N, B, d] or [B, N, d]."""
    return values[:, None, None] if node_major else values[None, :, None]


class RowBoundary:
    """A boundary that is zero but at one node per query: ``values[b]`` at node ``nodes[b]`` of query
    b (duplicates add up), as in KG completion, where it is the query relation at the head entity.

    The sum aggregation adds it into its result in place (B rows touched) instead of adding a
    [B, N, d] tensor of zeros, and its gradient is gathered from those B rows: no node-sized pass
    in any layer, forward or backward. Other aggregations use :meth:`dense`.
    """

    def __init__(
        self,
        nodes: torch.Tensor,  # [B] node id of each query's boundary row
        values: torch.Tensor,  # [B, d]
        num_nodes: int,
    ):
        if nodes.dim() != 1 or values.dim() != 2 or values.shape[0] != nodes.shape[0]:
            raise ValueError(f"RowBoundary: nodes must be [B] and values [B, d], got {tuple(nodes.shape)} "
                             f"and {tuple(values.shape)}")
        self.nodes = nodes
        self.values = values
        self.num_nodes = num_nodes
        self._queries = torch.arange(len(nodes), device=nodes.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def to(self, dtype: torch.dtype) -> "RowBoundary":
        return self if dtype == self.values.dtype else RowBoundary(self.nodes, self.values.to(dtype), self.num_nodes)

    def dense(self, node_major: bool = False) -> torch.Tensor:  # [B, N, d]
        """The boundary as a [B, N, d] tensor, stored node major when ``node_major``."""
        batch, dim = self.values.shape
        if node_major:
            out = self.values.new_zeros(self.num_nodes, batch, dim)
            return out.index_put_((self.nodes, self._queries), self.values, accumulate=True).transpose(0, 1)
        out = self.values.new_zeros(batch, self.num_nodes, dim)
        return out.index_put_((self._queries, self.nodes), self.values, accumulate=True)

    def add_to(self, t: torch.Tensor, inplace: bool, node_major: bool = False) -> torch.Tensor:
        """``t + dense()``, writing into ``t`` when ``inplace``; t is [B, N, d], or [N, B, d] (and so
        the result) when ``node_major``."""
        index = (self.nodes, self._queries) if node_major else (self._queries, self.nodes)
        values = self.values.to(t.dtype)
        return t.index_put_(index, values, accumulate=True) if inplace else t.index_put(index, values, accumulate=True)


class OuterBoundary:
    """A boundary that is an outer product, ``boundary[b, v] = weights[b, v] * values[b]``, as in
    retrieval, where it is the question embedding scaled by the question-entity mask.

    The sum aggregation adds it into its result in place as a batched rank-1 product
    (``baddbmm_``), and the gradient of ``values`` is one batched product with the incoming
    gradient: no [B, N, d] boundary is read or added, and none of its gradient is accumulated, in
    any layer. Other aggregations use :meth:`dense`.
    """

    def __init__(
        self,
        weights: torch.Tensor,  # [B, N]
        values: torch.Tensor,  # [B, d]
    ):
        if weights.dim() != 2 or values.dim() != 2 or weights.shape[0] != values.shape[0]:
            raise ValueError(f"OuterBoundary: weights must be [B, N] and values [B, d], got {tuple(weights.shape)} "
                             f"and {tuple(values.shape)}")
        self.weights = weights
        self.values = values

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def to(self, dtype: torch.dtype) -> "OuterBoundary":
        return self if dtype == self.values.dtype else OuterBoundary(self.weights, self.values.to(dtype))

    def dense(self, node_major: bool = False) -> torch.Tensor:  # [B, N, d]
        """The boundary as a [B, N, d] tensor, stored node major when ``node_major``."""
        weights = self.weights.to(self.values.dtype)
        if node_major:
            # A contiguous [N, B] first factor, so that the product is laid out [N, B, d].
            return (weights.t().contiguous().unsqueeze(-1) * self.values.unsqueeze(0)).transpose(0, 1)
        return weights.unsqueeze(-1) * self.values.unsqueeze(1)

    def add_to(self, t: torch.Tensor, inplace: bool, node_major: bool = False) -> torch.Tensor:
        """``t + dense()``, writing into ``t`` when ``inplace``; t is [B, N, d], or [N, B, d] (and so
        the result) when ``node_major``."""
        # Explicit casts: autocast does not cover in-place products.
        weights, values = self.weights.to(t.dtype), self.values.to(t.dtype)
        if node_major:
            return _NodeMajorOuterAdd.apply(t, weights, values, inplace)
        weights, values = weights.unsqueeze(-1), values.unsqueeze(1)
        return t.baddbmm_(weights, values) if inplace else torch.baddbmm(t, weights, values)


class _NodeMajorOuterAdd(torch.autograd.Function):
    """``t[v, b] += weights[b, v] * values[b]`` for t stored [N, B, d].

    ``baddbmm_`` cannot write into a node-major t without copying it (its batches are B rows N·d
    apart there), so the forward is one in-place ``addcmul_`` pass. In float32 that is a fused
    multiply-add, one rounding where ``baddbmm_`` rounds the product first: the two layouts differ by
    at most one unit in the last place where a weight is neither 0 nor 1 (a question-entity mask is
    0/1, and then they agree bit for bit). The backward takes the batch-major products of
    ``baddbmm_``'s, on a transposed view of the gradient that BLAS reads as it lies.
    """

    @staticmethod
    def forward(ctx, t, weights, values, inplace: bool):  # [N, B, d], [B, N], [B, d]
        ctx.save_for_backward(weights, values)
        product = (weights.t().contiguous().unsqueeze(-1), values.unsqueeze(0))  # [N, B, 1], [1, B, d]
        if not inplace:
            return torch.addcmul(t, *product)
        ctx.mark_dirty(t)
        return t.addcmul_(*product)

    @staticmethod
    def backward(ctx, grad):  # [N, B, d]
        weights, values = ctx.saved_tensors
        by_query = grad.transpose(0, 1)  # [B, N, d], BLAS-readable per query (rows B·d apart)
        grad_weights = grad_values = None
        if ctx.needs_input_grad[1]:
            grad_weights = by_query.bmm(values.unsqueeze(-1)).squeeze(-1)
        if ctx.needs_input_grad[2]:
            grad_values = weights.unsqueeze(-1).transpose(1, 2).bmm(by_query).squeeze(1)
        return grad, grad_weights, grad_values, None


Boundary = Union[torch.Tensor, RowBoundary, OuterBoundary]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the aggregation runs in: autocast's lower precision when autocast is on, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def stored_layout(x: torch.Tensor, graph: PreparedGraph) -> bool:
    """Whether a layer runs node major on states x [B, N, d]: when x is stored so and the graph is
    not partitioned (the halo exchange works batch major)."""
    return graph.halo is None and is_node_major(x)


def neighbourhood_update(
    x: torch.Tensor,  # [B, N, d]
    relation: torch.Tensor,  # [R, d] shared, or [B, R, d] per query
    boundary: Boundary,  # [B, N, d] or its nonzero rows
    graph: PreparedGraph,
    message: str = "distmult",
    aggregate: str = "sum",
) -> torch.Tensor:  # [B, N, d], or [B, N, 12 d] for pna; stored like x
    """The aggregated messages joined with the boundary, as in the module docstring.

    The op needs x, relation and edge weight in one dtype: they are cast to :func:`compute_dtype`
    (so under autocast the aggregation reads bfloat16/float16 and accumulates in float32).
    The sum adds the boundary into the op's fresh result in place (no [B, N, d] temporary; the op
    does not keep its result for its backward). A node-major x (:func:`is_node_major`) runs node
    major (unless the graph is partitioned: the halo exchange joins the states batch major).
    """
    node_major = stored_layout(x, graph)
    if node_major:
        if isinstance(boundary, torch.Tensor):
            boundary = boundary.transpose(0, 1)
        return stored_update(x.transpose(0, 1), relation, boundary, graph, message, aggregate, True).transpose(0, 1)
    return stored_update(x, relation, boundary, graph, message, aggregate, False)


def stored_update(
    x: torch.Tensor,  # [B, N, d], or [N, B, d] when node_major
    relation: torch.Tensor,  # [R, d] shared, or [B, R, d] per query
    boundary: Boundary,  # like x, or its nonzero rows
    graph: PreparedGraph,
    message: str,
    aggregate: str,
    node_major: bool,
) -> torch.Tensor:  # like x ([..., 12 d] for pna)
    """:func:`neighbourhood_update` on states in their storage order: [N, B, d] when
    ``node_major``, else [B, N, d]."""
    if message not in MESSAGES:
        raise ValueError(f"message must be one of {MESSAGES}, got {message!r}")
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    if node_major and graph.halo is not None:
        raise ValueError("a partitioned graph runs batch major: states must be [B, N, d] (node_major=False)")
    dtype = compute_dtype(x)
    x, relation = x.to(dtype), relation.to(dtype)
    weight = None if graph.edge_weight is None else graph.edge_weight.to(dtype)
    reduce = _fused_reduce if message != "rotate" else _materialised_reduce

    with graph.source_states(x) as source:

        def reduced(kind: str) -> torch.Tensor:
            return graph.owned(reduce(source, relation, graph, weight, message, kind, node_major))

        if aggregate == "sum":
            return _sum_with_boundary(reduced("sum"), boundary, graph, node_major)
        if isinstance(boundary, (RowBoundary, OuterBoundary)):
            boundary = boundary.dense(node_major)
            if node_major:
                boundary = boundary.transpose(0, 1)
        degree = graph.in_degree()
        if aggregate == "mean":
            return (reduced("sum") + boundary) / _per_node(degree + 1, node_major).to(boundary.dtype)
        has_in_edge = _per_node(degree > 0, node_major)
        if aggregate in ("max", "min"):
            return _with_boundary(reduced(aggregate), boundary, has_in_edge, aggregate)
        return _pna(reduced, boundary, degree, has_in_edge, graph.mean_over_nodes, node_major)


def _with_boundary(extremum, boundary, has_in_edge, kind):
    """max/min of the messages and the boundary; the boundary alone where no message arrives."""
    joined = torch.maximum(extremum, boundary) if kind == "max" else torch.minimum(extremum, boundary)
    return torch.where(has_in_edge, joined, boundary.to(joined.dtype))


def _pna(reduced: Callable[[str], torch.Tensor], boundary, degree, has_in_edge, mean_over_nodes,
         node_major: bool) -> torch.Tensor:
    """PNA aggregation as GFM-RAG/ULTRA wrote it: 4 aggregators × 3 degree scalers.

    With n(v) = deg(v) + 1 (the boundary counts as one message) and M the messages into v plus the
    boundary::

        mean = Σ M / n;   sq_mean = Σ_e w_e msg_e² + boundary², divided by n
        max, min as the max/min aggregation;   std = sqrt(clamp(sq_mean - mean², min=1e-6))
        s(v) = log n(v) / mean_u log n(u)       (mean over all N nodes)
        scalers = (1, s, 1 / clamp(s, min=1e-2))
        out[..., (c * 4 + k) * 3 + j] = stat_k[..., c] * scaler_j    k: mean, max, min, std

    so ``out`` is [B, N, 12 d] ([N, B, 12 d] node major). Difference from the original: its rspmm
    path computed the second moment of transe messages as Σ w (x² + r²) instead of Σ w (x + r)²;
    here it is always the second moment of the messages (identical for distmult). Not checked
    against the original's numbers.
    """
    count = _per_node(degree + 1, node_major).to(boundary.dtype)
    mean = (reduced("sum") + boundary) / count
    sq_mean = (reduced("sq_sum") + boundary * boundary) / count
    maximum = _with_boundary(reduced("max"), boundary, has_in_edge, "max")
    minimum = _with_boundary(reduced("min"), boundary, has_in_edge, "min")
    std = (sq_mean - mean * mean).clamp(min=PNA_EPS).sqrt()
    features = torch.stack([mean, maximum.to(mean.dtype), minimum.to(mean.dtype), std], dim=-1).flatten(-2)
    scale = (degree + 1).to(mean.dtype).log()
    scale = scale / mean_over_nodes(scale)
    scalers = torch.stack([torch.ones_like(scale), scale, 1 / scale.clamp(min=1e-2)], dim=-1)  # [N, 3]
    scalers = scalers[:, None, None, :] if node_major else scalers[None, :, None, :]
    return (features.unsqueeze(-1) * scalers).flatten(-2)


def stored_update_sharing_x(
    x: torch.Tensor,  # [B, N, d], or [N, B, d] when node_major
    relation: torch.Tensor,  # [R, d] shared, or [B, R, d] per query
    boundary: Boundary,
    graph: PreparedGraph,
    message: str,
    aggregate: str,
    node_major: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:  # (update like x, x for the layer's other reader)
    """:func:`stored_update`, and x as the rest of the layer should read it.

    For the sum of distmult/transe messages on an unpartitioned graph on the CPU, that is an alias
    of x through which the rest of the layer's gradient of x reaches the aggregation's backward,
    which adds it while writing its own (:func:`gfmrag_fast.ops.rel_aggregate.rel_aggregate_sharing_x`):
    no separate pass of autograd adding x's two gradients. Everywhere else it is x itself.
    """
    # (x already in the aggregation's dtype: the alias must be the tensor the tail would read.)
    if (aggregate != "sum" or message not in ("distmult", "transe") or graph.halo is not None
            or x.dtype != compute_dtype(x)):
        return stored_update(x, relation, boundary, graph, message, aggregate, node_major), x
    weight = None if graph.edge_weight is None else graph.edge_weight.to(x.dtype)
    agg, x_alias = rel_aggregate_sharing_x(x, relation.to(x.dtype), graph.graph, weight, graph.edge_mask, message,
                                           "sum", node_major=node_major)
    return _sum_with_boundary(agg, boundary, graph, node_major), x_alias


def _sum_with_boundary(agg: torch.Tensor, boundary: Boundary, graph: PreparedGraph, node_major: bool) -> torch.Tensor:
    """The sum aggregation's result with the boundary added, in place where the result is the op's
    own fresh tensor."""
    if isinstance(boundary, (RowBoundary, OuterBoundary)):
        # Owned rows of a partitioned graph are a view of the op's result: not written into.
        return boundary.add_to(agg, inplace=graph.halo is None, node_major=node_major)
    if graph.halo is None and boundary.dtype == agg.dtype and boundary.shape == agg.shape:
        return agg.add_(boundary)
    return agg + boundary


def _fused_reduce(x, relation, graph: PreparedGraph, weight, message, kind, node_major=False):
    """distmult/transe aggregations through the fused op (no [B, E, d] tensor)."""
    g, mask = graph.graph, graph.edge_mask
    if kind != "sq_sum":
        return rel_aggregate(x, relation, g, weight, mask, message, kind, node_major=node_major)
    # Σ w msg²: (x r)² = x² r²;  (x + r)² = (x² + r²) + 2 x r
    squares = rel_aggregate(x * x, relation * relation, g, weight, mask, message, "sum", node_major=node_major)
    if message == "transe":
        squares = squares + 2 * rel_aggregate(x, relation, g, weight, mask, "distmult", "sum", node_major=node_major)
    return squares


def _materialised_reduce(x, relation, graph: PreparedGraph, weight, message, kind, node_major=False):
    """Aggregations of rotate messages in plain PyTorch (materialises [B, E', d] / [E', B, d])."""
    g = graph.graph
    dst, src, etype = g.edge_index[0], g.edge_index[1], g.edge_type
    if graph.edge_mask is not None:
        keep = ~graph.edge_mask
        dst, src, etype = dst[keep], src[keep], etype[keep]
        weight = None if weight is None else weight[keep]
    node_dim = 0 if node_major else 1
    if relation.dim() == 2:
        rel = relation[etype].unsqueeze(1) if node_major else relation[etype]  # [E', 1, d] | [E', d]
    else:
        rel = relation[:, etype].transpose(0, 1) if node_major else relation[:, etype]  # [E', B, d] | [B, E', d]
    msg = _rotate(x.index_select(node_dim, src), rel)
    if kind == "sq_sum":
        msg = msg * msg
    if weight is not None:
        msg = msg * _per_node(weight, node_major)
    out = x.new_zeros(x.shape)
    if kind in ("sum", "sq_sum"):
        return out.index_add(node_dim, dst, msg)
    index = _per_node(dst, node_major).expand_as(msg)
    return out.scatter_reduce(node_dim, index, msg, "amax" if kind == "max" else "amin", include_self=False)


def _rotate(x: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
    """Complex product, real parts in the first half of the channels, imaginary in the second."""
    x_re, x_im = x.chunk(2, dim=-1)
    r_re, r_im = rel.chunk(2, dim=-1)
    return torch.cat([x_re * r_re - x_im * r_im, x_re * r_im + x_im * r_re], dim=-1)
