"""Batching QA items into the dict ``GNNRetriever.forward(graph, batch)`` consumes.

Targets are stored as id lists and become dense [B, N] masks only here, one batch at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["QACollate", "collate_qa", "index_mask", "entities_weight"]


def index_mask(lists: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """[B, size] float32 mask with 1 at ``lists[b]``'s ids in row b, 0 elsewhere."""
    mask = torch.zeros(len(lists), size)
    if lists:
        lengths = torch.tensor([x.numel() for x in lists])
        rows = torch.repeat_interleave(torch.arange(len(lists)), lengths)
        cols = torch.cat([x.reshape(-1).long() for x in lists])
        if cols.numel() and (cols.min() < 0 or cols.max() >= size):
            raise IndexError(f"index_mask: ids must lie in [0, {size}), got [{int(cols.min())}, {int(cols.max())}]")
        mask[rows, cols] = 1.0
    return mask


def collate_qa(items: Sequence[dict[str, Any]], num_entities: int, num_docs: int) -> dict[str, Any]:
    """Stack :class:`~gfmrag_fast.data.QASplit` items.

    Returns:
        ``question_embeddings`` [B, D] float32, ``question_entities_masks`` [B, N],
        ``supporting_entities_masks`` [B, N], ``supporting_docs_masks`` [B, num_docs] (float32
        0/1 masks) and ``ids`` (list of B question ids).
    """
    if not items:
        raise ValueError("collate_qa: empty batch")
    return {
        "question_embeddings": torch.stack([it["question_embeddings"] for it in items]).float(),
        "question_entities_masks": index_mask([it["question_entities"] for it in items], num_entities),
        "supporting_entities_masks": index_mask([it["supporting_entities"] for it in items], num_entities),
        "supporting_docs_masks": index_mask([it["supporting_docs"] for it in items], num_docs),
        "ids": [it["id"] for it in items],
    }


class QACollate:
    """``collate_fn`` for a DataLoader over a QA split: :func:`collate_qa` with the sizes bound.

    A class rather than a closure so that DataLoader worker processes can pickle it.
    """

    def __init__(self, num_entities: int, num_docs: int):
        self.num_entities = int(num_entities)
        self.num_docs = int(num_docs)

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return collate_qa(items, self.num_entities, self.num_docs)

    def __repr__(self) -> str:
        return f"QACollate(num_entities={self.num_entities}, num_docs={self.num_docs})"


def entities_weight(ent2doc: torch.Tensor) -> torch.Tensor:
    """[N] float32 GFM-RAG's ``init_entities_weight``: 1 / (number of documents with the entity).

    ``ent2doc`` is [N, num_docs], sparse or dense, nonzero where an entity occurs in a document.
    An entity in no document gets weight 0, as GFM-RAG's current code does (its first release
    divided by zero): it can point to no document, so it should carry no document score.
    """
    if ent2doc.is_sparse:
        ent2doc = ent2doc.coalesce()
        counts = torch.zeros(ent2doc.shape[0])
        counts.index_add_(0, ent2doc.indices()[0], (ent2doc.values() != 0).float())
    else:
        counts = (ent2doc != 0).sum(dim=1).float()
    weight = torch.zeros_like(counts)
    nonzero = counts > 0
    weight[nonzero] = 1.0 / counts[nonzero]
    return weight
