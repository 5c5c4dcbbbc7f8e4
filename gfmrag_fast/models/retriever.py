"""Query models: ``QueryGNN`` (KG-completion pre-training) and ``GNNRetriever`` (question → entity scores)."""

from __future__ import annotations

import warnings
from typing import Dict, Optional

import torch
from torch import nn

from .aggregation import OuterBoundary
from .entity import NBFNet, QueryNBFNet
from .partition import partition_of


class QueryGNN(nn.Module):
    """GFM-RAG's pre-training model: an entity model over relation features from text embeddings.

    ``rel_mlp = Linear(rel_emb_dim, d0)`` maps the graph's relation-name embeddings
    ``graph.rel_emb`` [2R, rel_emb_dim] to the relation features [2R, d0], computed once per call
    and shared by every query of the batch.

    ``forward(graph, batch [B, 1+K, 3], edge_mask=None) -> [B, 1+K]`` scores the rows (h, t, r)
    of each query with :class:`EntityNBFNet`. The original removed the batch's own edges inside
    forward; here the caller passes them as ``edge_mask`` (``gfmrag_fast.ops.easy_edge_mask``).
    """

    def __init__(self, entity_model: NBFNet, rel_emb_dim: int, *args, **kwargs):
        super().__init__()
        if args or kwargs:
            warnings.warn(f"{type(self).__name__}: ignoring extra arguments {args} {sorted(kwargs)}", stacklevel=2)
        self.rel_emb_dim = rel_emb_dim
        self.entity_model = entity_model
        self.rel_mlp = nn.Linear(rel_emb_dim, entity_model.dims[0])

    def forward(
        self,
        graph,
        batch: torch.Tensor,  # [B, 1+K, 3] rows (h, t, r)
        edge_mask: Optional[torch.Tensor] = None,  # [E] bool, True = removed
        *,
        edge_weight: Optional[torch.Tensor] = None,  # [E]
    ) -> torch.Tensor:  # [B, 1+K]
        relation = self.rel_mlp(graph.rel_emb)  # [2R, d0]
        return self.entity_model(graph, relation, batch, edge_mask=edge_mask, edge_weight=edge_weight)


class GNNRetriever(QueryGNN):
    """GFM-RAG's retriever: scores every entity of the graph for each question.

    ::

        q     = question_mlp(question_embeddings)            # [B, d0], Linear(rel_emb_dim, d0)
        rel   = rel_mlp(graph.rel_emb)                       # [2R, d0], once for the batch
        mask  = question_entities_masks * entities_weight    # [B, N] (weight [N] optional)
        x0    = mask[:, :, None] * q[:, None, :]             # [B, N, d0], also the boundary
        score = entity_model(graph, x0, rel, q)              # [B, N] logits

    ``entities_weight`` [N] rescales each entity's share of the question (the original's
    argument: it multiplies the 0/1 question-entity mask, so weighted entities start with a
    scaled copy of q). State-dict keys: ``question_mlp.*``, ``rel_mlp.*``, ``entity_model.*``.
    On a partitioned graph (``graph.partition``, :mod:`.partition`) x0 is built for this rank's
    nodes only and the returned [B, N] logits are the same on every rank.
    """

    def __init__(self, entity_model: QueryNBFNet, rel_emb_dim: int, *args, **kwargs):
        super().__init__(entity_model, rel_emb_dim, *args, **kwargs)
        self.question_mlp = nn.Linear(rel_emb_dim, entity_model.dims[0])

    def forward(
        self,
        graph,
        batch: Dict[str, torch.Tensor],  # question_embeddings [B, D], question_entities_masks [B, N]
        entities_weight: Optional[torch.Tensor] = None,  # [N]
        *,
        edge_mask: Optional[torch.Tensor] = None,  # [E] bool, True = removed
        edge_weight: Optional[torch.Tensor] = None,  # [E]
    ) -> torch.Tensor:  # [B, N]
        question = self.question_mlp(batch["question_embeddings"])  # [B, d0]
        relation = self.rel_mlp(graph.rel_emb)  # [2R, d0]
        mask = batch["question_entities_masks"]
        partition = partition_of(graph)
        if partition is not None:
            # Graph-partitioned: this rank builds the input of its own nodes only.
            mask = partition.owned_rows(mask)
            entities_weight = None if entities_weight is None else partition.owned_rows(entities_weight, dim=0)
        if entities_weight is not None:
            mask = mask * entities_weight.unsqueeze(0)
        boundary = OuterBoundary(mask, question)
        x0 = boundary.dense(node_major=self.entity_model.stores_node_major(question.device, partition is not None))
        return self.entity_model(graph, x0, relation, question, edge_mask=edge_mask,
                                 edge_weight=edge_weight, boundary=boundary)

