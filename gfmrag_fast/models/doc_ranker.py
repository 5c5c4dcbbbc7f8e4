"""Document rankers: document scores from entity scores through the entity → document map, as GFM-RAG.

Notation: ``A = ent2doc`` [N, D] (A[e, d] = 1 when entity e occurs in document d; any non-negative
values work, sparse or dense), ``s = ent_pred`` [B, N], ``df[e] = Σ_d A[e, d]`` (the entity's
document frequency) and ``idf[e] = 1 / df[e]`` (0 when df[e] = 0), ``top_k(s_b)`` the k
highest-scoring entities of query b (``torch.topk``; ties broken as it breaks them; k is capped
at N). Every ranker maps [B, N] → [B, D].
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch


class DocRanker:
    """Base class: holds ``ent2doc`` [N, D] (sparse COO/CSR or dense) and its per-entity IDF weights."""

    def __init__(self, ent2doc: torch.Tensor):  # [N, D]
        if ent2doc.dim() != 2:
            raise ValueError(f"ent2doc must have shape [N, num_docs], got {tuple(ent2doc.shape)}")
        if ent2doc.layout != torch.strided:  # every sparse layout is kept as coalesced COO
            ent2doc = ent2doc.to_sparse_coo().coalesce()
            frequency = torch.sparse.sum(ent2doc.to(torch.float64), dim=-1).to_dense()
        else:
            frequency = ent2doc.to(torch.float64).sum(dim=-1)
        self.ent2doc = ent2doc
        self.idf_weight = torch.where(frequency > 0, 1 / frequency.clamp(min=1e-300), 0.0).float()  # [N]
        self._copies: Dict[Tuple[torch.device, torch.dtype], Tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def num_entities(self) -> int:
        return self.ent2doc.shape[0]

    def _tensors(self, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(ent2doc, idf) on like's device and in its dtype, converted once and kept."""
        key = (like.device, like.dtype)
        if key not in self._copies:
            self._copies[key] = (self.ent2doc.to(like.device, like.dtype), self.idf_weight.to(like.device, like.dtype))
        return self._copies[key]

    def _check(self, ent_pred: torch.Tensor) -> None:
        if ent_pred.dim() != 2 or ent_pred.shape[1] != self.num_entities:
            raise ValueError(f"ent_pred must have shape [B, N = {self.num_entities}], got {tuple(ent_pred.shape)}")

    def __call__(self, ent_pred: torch.Tensor) -> torch.Tensor:  # [B, N] -> [B, D]
        raise NotImplementedError


class SimpleRanker(DocRanker):
    """``doc[b, d] = Σ_e s[b, e] · A[e, d]``."""

    def __call__(self, ent_pred: torch.Tensor) -> torch.Tensor:
        self._check(ent_pred)
        ent2doc, _ = self._tensors(ent_pred)
        return ent_pred @ ent2doc


class IDFWeightedRanker(DocRanker):
    """``doc[b, d] = Σ_e s[b, e] · idf[e] · A[e, d]``."""

    def __call__(self, ent_pred: torch.Tensor) -> torch.Tensor:
        self._check(ent_pred)
        ent2doc, idf = self._tensors(ent_pred)
        return (ent_pred * idf) @ ent2doc


IDFRanker = IDFWeightedRanker


class TopKRanker(DocRanker):
    """``doc[b, d] = Σ_{e ∈ top_k(s_b)} A[e, d]`` — scores only choose the entities."""

    def __init__(self, ent2doc: torch.Tensor, top_k: int = 20):
        super().__init__(ent2doc)
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.top_k = top_k

    def _top_k_weights(self, ent_pred: torch.Tensor, per_entity: torch.Tensor) -> torch.Tensor:  # [B, N]
        """per_entity[e] at the top-k entities of each row, 0 elsewhere."""
        top = ent_pred.topk(min(self.top_k, ent_pred.shape[1]), dim=-1).indices
        weights = per_entity.expand(ent_pred.shape[0], -1).gather(1, top)
        return torch.zeros_like(ent_pred).scatter_(1, top, weights)

    def __call__(self, ent_pred: torch.Tensor) -> torch.Tensor:
        self._check(ent_pred)
        ent2doc, idf = self._tensors(ent_pred)
        return self._top_k_weights(ent_pred, torch.ones_like(idf)) @ ent2doc


class IDFWeightedTopKRanker(TopKRanker):
    """``doc[b, d] = Σ_{e ∈ top_k(s_b)} idf[e] · A[e, d]`` (k = 20 by default, GFM-RAG's evaluation).

    Each of the k best entities spreads a total weight of 1 evenly over the documents it occurs
    in (for a 0/1 ``A``); its score only decides whether it is among the k, as in the original.
    """

    def __call__(self, ent_pred: torch.Tensor) -> torch.Tensor:
        self._check(ent_pred)
        ent2doc, idf = self._tensors(ent_pred)
        return self._top_k_weights(ent_pred, idf) @ ent2doc


# Config names (GFM-RAG's ``_target_`` class names) -> classes.
DOC_RANKERS = {
    cls.__name__: cls for cls in (SimpleRanker, IDFWeightedRanker, TopKRanker, IDFWeightedTopKRanker)
}
DOC_RANKERS["IDFRanker"] = IDFWeightedRanker
