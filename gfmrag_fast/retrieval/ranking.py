"""Choosing a document ranker by name or config, for retrieval and evaluation.

Names: ``idf_topk`` (GFM-RAG's evaluation ranker, the default), ``topk``, ``idf``, ``simple``,
``hybrid`` (GNN scores fused with dense question–document similarity) and ``dense`` (the dense
similarity alone, a baseline); the workflow config files' names (``idf_topk_ranker``, ...) and
GFM-RAG's class names work too. A config mapping is the ``doc_ranker`` group's form:
``{"_target_": "...HybridRanker", "dense_weight": 0.3, "gnn_ranker": {"_target_": ..., "top_k": 20}}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch

from .. import targets
from ..doc_rankers import DocRanker, HybridRanker

__all__ = ["DEFAULT_DENSE_WEIGHT", "make_doc_ranker", "needs_question_embeddings"]

# Chosen on the 70 bundled MuSiQue training questions (README, "Using a trained retriever").
DEFAULT_DENSE_WEIGHT = 0.5

_NAMES = {
    "idf_topk": "IDFWeightedTopKRanker", "topk": "TopKRanker", "idf": "IDFWeightedRanker", "simple": "SimpleRanker",
    "hybrid": "HybridRanker", "dense": "HybridRanker",
}


def needs_question_embeddings(ranker: Any) -> bool:
    """Whether ``ranker`` is called as ``ranker(ent_pred, question_embeddings, has_entities)``."""
    return isinstance(ranker, HybridRanker)


def make_doc_ranker(spec: Any, ent2doc: torch.Tensor, doc_embeddings: Callable[[], torch.Tensor]) -> DocRanker:
    """A ranker from a name, a config mapping, or a ready ranker (returned as is).

    ``doc_embeddings()`` gives the [num_docs, D] document embeddings; it is called only for the
    hybrid and dense rankers (building them may take minutes the first time).
    """
    if callable(spec) and not isinstance(spec, (str, Mapping)):
        return spec
    if isinstance(spec, str):
        name = spec.removesuffix("_ranker")
        if name in _NAMES:
            options = {"dense_weight": 1.0} if name == "dense" else {}
            return _build(_NAMES[name], options, ent2doc, doc_embeddings)
        return _build(spec, {}, ent2doc, doc_embeddings)
    if isinstance(spec, Mapping) or type(spec).__module__.startswith("omegaconf"):
        if not isinstance(spec, Mapping):
            from omegaconf import OmegaConf

            spec = OmegaConf.to_container(spec, resolve=True)
        options = dict(spec)
        target = str(options.pop("_target_", ""))
        return _build(target, options, ent2doc, doc_embeddings)
    raise TypeError(f"doc_ranker must be a name, a config mapping or a ranker, got {type(spec).__name__}")


def _build(target: str, options: dict, ent2doc: torch.Tensor, doc_embeddings: Callable[[], torch.Tensor]) -> DocRanker:
    try:
        cls = targets.resolve(target, "doc_ranker")
    except ValueError as exc:
        raise ValueError(f"{exc}; or one of the names {sorted(_NAMES)}") from None
    if cls is HybridRanker:
        gnn = options.pop("gnn_ranker", None)
        gnn_ranker = None if gnn is None else make_doc_ranker(gnn, ent2doc, doc_embeddings)
        if isinstance(gnn_ranker, HybridRanker):
            raise ValueError("HybridRanker: gnn_ranker must be a GNN ranker, not another hybrid one")
        options.setdefault("dense_weight", DEFAULT_DENSE_WEIGHT)
        return HybridRanker(ent2doc, doc_embeddings(), gnn_ranker=gnn_ranker, **options)
    return targets.instantiate({**options, "_target_": target}, "doc_ranker", ent2doc)
