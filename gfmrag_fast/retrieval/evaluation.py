"""Evaluating a retriever on a dataset's labelled questions: the fine-tune's metrics, plus predictions."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..data import QASplit
from ..metrics import retrieval_metrics
from .ranking import needs_question_embeddings
from .retriever import GFMRetriever

__all__ = ["ENTITY_SOURCES", "evaluate_split"]

ENTITY_SOURCES = ("annotated", "linked")


def evaluate_split(
    retriever: GFMRetriever,
    split: QASplit,
    metrics: Sequence[str],
    entities: str = "annotated",
    top_k: int = 10,
    limit: Optional[int] = None,
) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """(metrics row, predictions) for the first ``limit`` (default all) questions of ``split``.

    The row has the fine-tune's keys — ``dataset``, ``split``, ``questions``, ``ent_<metric>``
    and ``doc_<metric>`` averaged over the questions — plus ``entities`` (where the question
    entities came from) and, with ``entities="linked"``, ``link_precision`` / ``link_recall``
    of the linked entities against the annotated ones (micro-averaged) and ``no_entities``, the
    number of questions nothing was linked to (their metrics count as 0, except the document
    metrics of a hybrid ranker, which ranks them by dense similarity). Question embeddings are
    the stage-2 ones, so with annotated entities the numbers are the fine-tune's evaluation.
    Each prediction holds the question's id and text, the entities used, its ``top_k``
    documents with scores and its gold documents.
    """
    if entities not in ENTITY_SOURCES:
        raise ValueError(f"entities must be one of {ENTITY_SOURCES}, got {entities!r}")
    dataset = retriever.dataset
    count = len(split) if not limit else min(len(split), int(limit))
    names, docs = retriever.entity_names, dataset.doc_names
    values: Dict[str, List[float]] = {}
    predictions: List[Dict[str, Any]] = []
    found = linked_total = annotated_total = no_entities = 0
    for start in range(0, count, retriever.batch_size):
        items = [split[i] for i in range(start, min(start + retriever.batch_size, count))]
        batch = split.collate_fn(items)
        questions = split.questions[start:start + len(items)]
        annotated = [item["question_entities"].tolist() for item in items]
        if entities == "linked":
            used = [[e.id for e in links] for links in retriever.link(questions)]
            for mine, gold in zip(used, annotated):
                found += len(set(mine) & set(gold))
                linked_total += len(set(mine))
                annotated_total += len(set(gold))
        else:
            used = annotated
        ent_pred, doc_pred = retriever.score(batch["question_embeddings"], used)
        # A question with no entity has no entity ranking, and no document ranking unless a
        # dense part ranks: it scores 0 rather than whatever a tie-break of equal scores gives.
        empty = torch.tensor([not ids for ids in used])
        hybrid = needs_question_embeddings(retriever.doc_ranker)
        no_entities += int(empty.sum())
        for prefix, scores, target, blank in (("ent", ent_pred, batch["supporting_entities_masks"], empty),
                                              ("doc", doc_pred, batch["supporting_docs_masks"], empty & (not hybrid))):
            for name, per_query in retrieval_metrics(scores.cpu(), target, metrics).items():
                values.setdefault(f"{prefix}_{name}", []).extend(per_query.masked_fill(blank, 0.0).tolist())
        top = doc_pred.topk(min(int(top_k), doc_pred.shape[1]), dim=-1)
        for b, item in enumerate(items):
            prediction = {
                "id": item["id"],
                "question": questions[b],
                "question_entities": [names[i] for i in used[b]],
                "documents": [{"title": docs[d], "score": s} for s, d in zip(top.values[b].tolist(),
                                                                              top.indices[b].tolist())]
                if used[b] or hybrid else [],
                "gold_documents": [docs[d] for d in item["supporting_docs"].tolist()],
            }
            if entities == "linked":
                prediction["annotated_entities"] = [names[i] for i in annotated[b]]
            predictions.append(prediction)
    row: Dict[str, Any] = {"dataset": dataset.data_name, "split": split.name, "questions": count,
                           **{key: float(sum(v) / len(v)) for key, v in values.items() if v}, "entities": entities}
    if entities == "linked":
        row["link_precision"] = found / linked_total if linked_total else 0.0
        row["link_recall"] = found / annotated_total if annotated_total else 0.0
        row["no_entities"] = no_entities
    return row, predictions
