"""Document rankers: document scores from entity scores through the entity → document map, as GFM-RAG.

Notation: ``A = ent2doc`` [N, D] (A[e, d] = 1 when entity e occurs in document d; any non-negative
values work, sparse or dense), ``s = ent_pred`` [B, N], ``df[e] = Σ_d A[e, d]`` (the entity's
document frequency) and ``idf[e] = 1 / df[e]`` (0 when df[e] = 0), ``top_k(s_b)`` the k
highest-scoring entities of query b (``torch.topk``; ties broken as it breaks them; k is capped
at N). Every ranker maps [B, N] → [B, D]; :class:`HybridRanker` also takes the question embeddings.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch.nn import functional as F


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


def _min_max(scores: torch.Tensor) -> torch.Tensor:  # [B, D] -> [B, D] in [0, 1]
    """Each row mapped linearly onto [0, 1]; a constant row becomes 0."""
    low = scores.min(dim=-1, keepdim=True).values
    span = scores.max(dim=-1, keepdim=True).values - low
    return torch.where(span > 0, (scores - low) / span.clamp(min=torch.finfo(scores.dtype).tiny), 0.0)


class HybridRanker(DocRanker):
    """GNN document scores fused with dense question–document similarity.

    ``gnn = gnn_ranker(s)`` [B, D] (default :class:`IDFWeightedTopKRanker`, k = 20) and
    ``dense[b, d] = cos(q_b, doc_emb_d)``, each min-max normalised per question to [0, 1], then
    ``doc = (1 - dense_weight) · gnn + dense_weight · dense``. The GNN ranker scores only the
    documents of the entities the graph reaches (often none beyond a few dozen); the dense part
    ranks the rest, and ranks everything for a question with no linked entity.

    ``doc_embeddings`` [D, Dm] and the question embeddings [B, Dm] must come from one text model
    (``QADataset.document_embeddings()`` and the dataset's question embeddings).
    """

    def __init__(
        self,
        ent2doc: torch.Tensor,  # [N, D]
        doc_embeddings: torch.Tensor,  # [D, Dm]
        dense_weight: float = 0.5,
        gnn_ranker: Optional[DocRanker] = None,
    ):
        super().__init__(ent2doc)
        if doc_embeddings.dim() != 2 or doc_embeddings.shape[0] != ent2doc.shape[1]:
            raise ValueError(f"doc_embeddings must have shape [num_docs = {ent2doc.shape[1]}, dim], "
                             f"got {tuple(doc_embeddings.shape)}")
        if not 0.0 <= float(dense_weight) <= 1.0:
            raise ValueError(f"dense_weight must lie in [0, 1], got {dense_weight}")
        self.doc_embeddings = F.normalize(doc_embeddings.float(), dim=-1)
        self.dense_weight = float(dense_weight)
        self.gnn_ranker = gnn_ranker if gnn_ranker is not None else IDFWeightedTopKRanker(ent2doc)

    def dense_scores(self, question_embeddings: torch.Tensor) -> torch.Tensor:  # [B, Dm] -> [B, D]
        """Cosine similarity of each question with each document."""
        docs = self.doc_embeddings.to(question_embeddings.device)
        return F.normalize(question_embeddings.float(), dim=-1) @ docs.t()

    def __call__(
        self,
        ent_pred: torch.Tensor,  # [B, N]
        question_embeddings: Optional[torch.Tensor] = None,  # [B, Dm]
        has_entities: Optional[torch.Tensor] = None,  # [B] bool
    ) -> torch.Tensor:  # [B, D]
        """``has_entities[b]`` False: question b had no question entity, so its entity scores
        carry no information and the dense similarity alone ranks its documents."""
        if question_embeddings is None:
            raise ValueError("HybridRanker needs the question embeddings: ranker(ent_pred, question_embeddings)")
        self._check(ent_pred)
        if question_embeddings.shape != (ent_pred.shape[0], self.doc_embeddings.shape[1]):
            raise ValueError(f"question_embeddings must have shape [B = {ent_pred.shape[0]}, "
                             f"{self.doc_embeddings.shape[1]}], got {tuple(question_embeddings.shape)}")
        gnn = _min_max(self.gnn_ranker(ent_pred).float())
        dense = _min_max(self.dense_scores(question_embeddings))
        fused = (1 - self.dense_weight) * gnn + self.dense_weight * dense
        if has_entities is None:
            return fused
        return torch.where(has_entities.to(fused.device).bool()[:, None], fused, dense)
