"""Entity models: ``EntityNBFNet`` (KG completion, pre-training) and ``QueryNBFNet`` (retrieval).

Both stack :class:`GeneralizedRelationalConv` layers over the same graph with the same relation
features, add the short cut, and score nodes with an MLP over ``cat[x, query]``. Module names and
parameter shapes are GFM-RAG's (``layers.{l}.*``, ``mlp.{0,2}.*``), so its checkpoints load as they are.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Callable, List, Optional, Union

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from .aggregation import Boundary, OuterBoundary, PreparedGraph, RowBoundary, is_node_major, node_major_copy
from .graph_input import num_relations_of, rel_graph_of
from .layer import GeneralizedRelationalConv
from .partition import partition_of

# Accepted for compatibility with GFM-RAG/ULTRA configs; they change nothing here (see NBFNet).
_IGNORED = ("num_relation", "dependent", "num_beam", "path_topk")


class NBFNet(nn.Module):
    """Shared body of the entity models.

    Args (GFM-RAG/ULTRA ``BaseNBFNet`` names and defaults):
        input_dim: d0, width of the boundary, the query and the relation features.
        hidden_dims: output width of each layer (an int means one layer). Every layer but the last
            must be d0 wide, since the relation features given to every layer are d0 wide.
        message_func: "distmult" | "transe" | "rotate".
        aggregate_func: "sum" | "mean" | "max" | "min" | "pna" (see ``models.aggregation``).
        short_cut: add each layer's input to its output when the shapes match.
        layer_norm: LayerNorm after each layer's linear.
        activation: name of a ``torch.nn.functional`` function, a callable, or None.
        concat_hidden: score from all layers' outputs instead of the last one.
        num_mlp_layer: layers of the scoring MLP.
        remove_one_hop: kept for configs; easy-edge removal is the caller's ``edge_mask``.
        checkpoint_layers: recompute each layer in backward instead of storing its activations
            (``torch.utils.checkpoint``, non-reentrant); gradients are unchanged.
        node_major: store the node states node major (each [B, N, d] state a ``transpose(0, 1)``
            view of a contiguous [N, B, d] tensor), so that the aggregation gathers one contiguous
            block of B·d values per edge. None (default): node major on the CPU, where it is
            faster (README, Measured), batch major elsewhere (not yet measured on a GPU: set True
            to try).
            Every layer's output is the same bits either way (but for the retrieval boundary with
            entity weights other than 0/1, see ``models.aggregation.OuterBoundary``); scores and
            parameter gradients agree to float rounding, since sums over rows then add the rows in
            another order. A partitioned graph always runs batch major. Also the attribute
            ``node_major``, which may be changed on a built model; not part of ``config`` (a
            checkpoint does not carry it).
        num_relation, dependent, num_beam, path_topk: accepted and ignored (the original's
            EntityNBFNet built every layer with dependent=False and projected relations; beam
            search is for path visualisation, not implemented here).
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Union[int, Sequence],
        message_func: str = "distmult",
        aggregate_func: str = "sum",
        short_cut: bool = False,
        layer_norm: bool = False,
        activation: Union[str, Callable, None] = "relu",
        concat_hidden: bool = False,
        num_mlp_layer: int = 2,
        remove_one_hop: bool = False,
        checkpoint_layers: bool = False,
        node_major: Optional[bool] = None,
        **kwargs,
    ):
        super().__init__()
        unknown = sorted(set(kwargs) - set(_IGNORED))
        if unknown:
            warnings.warn(f"{type(self).__name__}: ignoring unknown arguments {unknown}", stacklevel=2)
        hidden_dims = [hidden_dims] if not isinstance(hidden_dims, Sequence) else list(hidden_dims)
        self.dims = [input_dim] + hidden_dims
        if any(dim != input_dim for dim in self.dims[:-1]):
            raise ValueError(
                f"every layer's input must be input_dim = {input_dim} wide (the relation features are), "
                f"got dims {self.dims}"
            )
        if num_mlp_layer < 1:
            raise ValueError(f"num_mlp_layer must be >= 1, got {num_mlp_layer}")
        self.short_cut = short_cut
        self.concat_hidden = concat_hidden
        self.remove_one_hop = remove_one_hop
        self.checkpoint_layers = checkpoint_layers
        self.node_major = node_major
        self.config = dict(
            input_dim=input_dim, hidden_dims=hidden_dims, message_func=message_func,
            aggregate_func=aggregate_func, short_cut=short_cut, layer_norm=layer_norm,
            activation=activation, concat_hidden=concat_hidden, num_mlp_layer=num_mlp_layer,
            remove_one_hop=remove_one_hop,
        )
        self.layers = nn.ModuleList(
            GeneralizedRelationalConv(dim_in, dim_out, message_func, aggregate_func, layer_norm, activation)
            for dim_in, dim_out in zip(self.dims[:-1], self.dims[1:])
        )
        self.feature_dims = (hidden_dims if concat_hidden else hidden_dims[-1:]) + [input_dim]
        feature_dim = sum(self.feature_dims)
        mlp: List[nn.Module] = []
        for _ in range(num_mlp_layer - 1):
            mlp += [nn.Linear(feature_dim, feature_dim), nn.ReLU()]
        mlp.append(nn.Linear(feature_dim, 1))
        self.mlp = nn.Sequential(*mlp)

    def stores_node_major(self, device: torch.device, partitioned: bool = False) -> bool:
        """Whether the node states of a call on ``device`` are stored node major (see ``node_major``)."""
        if partitioned:
            return False
        return device.type == "cpu" if self.node_major is None else bool(self.node_major)

    def propagate(
        self,
        graph: PreparedGraph,
        x: torch.Tensor,  # [B, N, d0], the first layer's input
        boundary: Boundary,  # [B, N, d0], or its nonzero rows
        relation: torch.Tensor,  # [2R, d0] | [B, 2R, d0]
    ) -> List[torch.Tensor]:  # one [B, N, d_l] per layer
        """All layers with the short cut; returns every layer's output."""
        hiddens = []
        for layer in self.layers:
            residual = self.short_cut and layer.output_dim == layer.input_dim
            if self.checkpoint_layers and torch.is_grad_enabled():
                hidden = checkpoint(layer, x, boundary, relation, graph, residual, use_reentrant=False)
            else:
                hidden = layer(x, boundary, relation, graph, residual)
            hiddens.append(hidden)
            x = hidden
        return hiddens

    def score(
        self,
        hiddens: List[torch.Tensor],  # [B, N, d_l] per layer
        query: torch.Tensor,  # [B, d0]
        index: Optional[torch.Tensor] = None,  # [B, M] node ids, or None for all nodes
    ) -> torch.Tensor:  # [B, M] or [B, N]
        """``mlp(cat[features, query broadcast])`` without building the cat.

        The first Linear's weight is split by input columns: the node-feature blocks multiply the
        [B, M, d_l] features, the query block multiplies the [B, d0] query once per query and is
        broadcast over the nodes. Node-major features are read in their [N, B, d_l] storage order
        (a [B, N, d_l] view of them would be copied by every product and its gradient).
        """
        features = hiddens if self.concat_hidden else hiddens[-1:]
        node_major = all(is_node_major(f) for f in features)
        node_dim = 0 if node_major else 1
        if node_major:
            features = [f.transpose(0, 1) for f in features]  # [N, B, d_l]
            index = None if index is None else index.t()  # [M, B]
        if index is not None:
            features = [f.gather(node_dim, index.unsqueeze(-1).expand(-1, -1, f.shape[-1])) for f in features]
        first = self.mlp[0]
        blocks = first.weight.split(self.feature_dims, dim=1)
        out = F.linear(query, blocks[-1], first.bias).unsqueeze(node_dim)  # [B, 1, F] | [1, B, F]
        for feature, block in zip(features, blocks[:-1]):
            out = out + F.linear(feature, block)
        for module in self.mlp[1:]:
            out = module(out)
        out = out.squeeze(-1)
        # Node major, the [M, B] scores are turned around once: a [B, M] copy, 1/d of a state.
        return out.t().contiguous() if node_major else out

    def prepare(self, graph, device, edge_mask=None, edge_weight=None) -> PreparedGraph:
        """The graph's cached RelGraph on ``device`` with this call's mask [E] and weight [E]; on a
        partitioned graph, this rank's local graph with the mask and weight cut to its edges."""
        partition = partition_of(graph)
        if partition is not None:
            return partition.to(device).prepare(edge_weight, edge_mask)
        return PreparedGraph(rel_graph_of(graph, device), edge_weight, edge_mask)


class QueryNBFNet(NBFNet):
    """GFM-RAG's retrieval entity model: scores every node for a batch of questions.

    ``forward(graph, input [B, N, d0], relation_representations [2R, d0] | [B, 2R, d0],
    query [B, d0], edge_mask=None, edge_weight=None) -> [B, N]``: ``input`` is both the first
    layer's input and every layer's boundary; score = mlp(cat[x_L, query]).

    On a partitioned graph (:mod:`.partition`) the layers hold this rank's owned nodes only:
    ``input`` may be [B, N, d0] or the owned rows alone (cheaper), and the owned scores of all
    ranks are combined, so every rank returns the same [B, N].

    The states are stored as :meth:`stores_node_major` says: an ``input`` stored otherwise is
    copied once into that layout.

    ``boundary``, when given, is ``input`` as an :class:`~.aggregation.OuterBoundary`
    (``weights[b, v] * values[b]``): the sum aggregation then adds it without a [B, N, d0] pass
    (see :mod:`.aggregation`); ``input`` must still be given, it is the first layer's input.
    """

    def forward(
        self,
        graph,
        input: torch.Tensor,  # [B, N, d0]
        relation_representations: torch.Tensor,  # [2R, d0] | [B, 2R, d0]
        query: torch.Tensor,  # [B, d0]
        edge_mask: Optional[torch.Tensor] = None,  # [E] bool, True = removed
        edge_weight: Optional[torch.Tensor] = None,  # [E]
        boundary: Optional[OuterBoundary] = None,  # input, as weights [B, N] x values [B, d0]
    ) -> torch.Tensor:  # [B, N]
        prepared = self.prepare(graph, input.device, edge_mask, edge_weight)
        partition = prepared.halo
        if partition is not None:
            input = partition.owned_rows(input)
            if boundary is not None:
                boundary = OuterBoundary(partition.owned_rows(boundary.weights), boundary.values)
        if self.stores_node_major(input.device, partition is not None):
            input = node_major_copy(input)  # GNNRetriever builds it node major: no copy
        elif is_node_major(input):
            input = input.contiguous()
        if boundary is None or self.config["aggregate_func"] != "sum":
            boundary = input
        hiddens = self.propagate(prepared, input, boundary, relation_representations)
        scores = self.score(hiddens, query)
        return scores if partition is None else partition.gather_scores(scores)


class EntityNBFNet(NBFNet):
    """GFM-RAG/ULTRA's KG-completion entity model: scores candidate tails of (h, r, ?) queries.

    ``forward(graph, relation_representations [2R, d0] | [B, 2R, d0], batch [B, 1+K, 3],
    edge_mask=None, edge_weight=None) -> [B, 1+K]``. Rows of ``batch`` are (h, t, r). A query
    whose rows do not all share h (a head-corruption batch (h_i, t, r)) is turned into tail
    prediction first, as the original does: rows become (t, h_i, r + R) with R = num_relations / 2.
    After that every row of query b must share h_b and r_b (the first row's are used; not checked,
    to avoid a host synchronisation). Then::

        query    = relation_representations[r_b]                    # [B, d0]
        boundary = query at node h_b, 0 elsewhere                   # [B, N, d0]
        x_L      = layers(boundary), every layer's boundary being ``boundary``
        score    = mlp(cat[x_L[b, t_i], query_b])                   # [B, 1+K]

    On a partitioned graph (:mod:`.partition`) each rank holds its owned nodes' states, scores
    the candidates it owns, and the ranks' scores are summed, so every rank returns the same
    [B, 1+K].
    """

    def forward(
        self,
        graph,
        relation_representations: torch.Tensor,  # [2R, d0] | [B, 2R, d0]
        batch: torch.Tensor,  # [B, 1+K, 3] rows (h, t, r)
        edge_mask: Optional[torch.Tensor] = None,  # [E] bool, True = removed
        edge_weight: Optional[torch.Tensor] = None,  # [E]
    ) -> torch.Tensor:  # [B, 1+K]
        if batch.dim() != 3 or batch.shape[-1] != 3:
            raise ValueError(f"batch must have shape [B, 1+K, 3] with rows (h, t, r), got {tuple(batch.shape)}")
        h_index, t_index, r_index = to_tail_prediction(*batch.unbind(-1), num_relations_of(graph) // 2)
        head, rel_index = h_index[:, 0], r_index[:, 0]
        if relation_representations.dim() == 2:
            query = relation_representations[rel_index]
        else:
            query = relation_representations[torch.arange(len(rel_index), device=rel_index.device), rel_index]
        prepared = self.prepare(graph, query.device, edge_mask, edge_weight)
        partition = prepared.halo
        source = query
        if partition is not None:
            head, owns_head = partition.local_ids(head)
            source = query * owns_head.unsqueeze(-1).to(query.dtype)  # heads of other ranks add 0
        rows = RowBoundary(head, source, prepared.num_nodes)
        x0 = rows.dense(node_major=self.stores_node_major(query.device, partition is not None))
        # The sum aggregation adds the boundary's B nonzero rows in place; the others need it dense.
        boundary = rows if self.config["aggregate_func"] == "sum" else x0
        hiddens = self.propagate(prepared, x0, boundary, relation_representations)
        if partition is None:
            return self.score(hiddens, query, index=t_index)
        local, owned = partition.local_ids(t_index)
        if local.shape[1] >= prepared.num_nodes:
            # As many candidates as owned nodes (evaluation: all N): score the owned nodes once.
            scores = self.score(hiddens, query).gather(1, local)
        else:
            scores = self.score(hiddens, query, index=local)
        return partition.sum_over_ranks(torch.where(owned, scores, torch.zeros_like(scores)))


def to_tail_prediction(h_index, t_index, r_index, num_direct_relations: int):
    """Rewrites head-corruption queries as tail prediction: p(h | t, r) = p(h' | t' = t, r + R).

    Tensors [B, 1+K]. A query (row of the batch) is a tail batch when all its h are equal; the
    others get (h, t, r) → (t, h, r + num_direct_relations). Returns (h, t, r) of the same shape.
    """
    is_tail_batch = (h_index == h_index[:, :1]).all(dim=-1, keepdim=True)
    new_h = torch.where(is_tail_batch, h_index, t_index)
    new_t = torch.where(is_tail_batch, t_index, h_index)
    new_r = torch.where(is_tail_batch, r_index, r_index + num_direct_relations)
    return new_h, new_t, new_r
