"""Fine-tuning task: questions -> supporting entities (and documents), GFM-RAG's losses and metrics."""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch

from ..metrics import retrieval_metrics
from ..models.checkpoint import save_pretrained
from ..models.partition import partition_graph
from .distributed import DistEnv
from .tasks_common import gather_mean, interleaved_batches, resolve_loss, shard


class LossTerm:
    """One weighted loss of the config: ``{name, loss: {_target_, ...}, cfg: {weight, is_doc_loss}}``."""

    def __init__(self, spec: Dict[str, Any]):
        self.name = spec.get("name", "loss")
        self.fn = resolve_loss(spec["loss"])
        cfg = spec.get("cfg") or {}
        self.weight = float(cfg.get("weight", 1.0))
        self.is_doc_loss = bool(cfg.get("is_doc_loss", False))


SKIP_REASONS = ("no_question_entities", "no_supporting_entities", "no_supporting_docs")


def check_training_questions(ds) -> None:
    """ValueError naming ``ds`` when it has no training question to learn from: no train split,
    or every question of it skipped in stage-2 processing (the counts per reason say why)."""
    train_file = os.path.join(ds.stage1_dir, "train.json") if hasattr(ds, "stage1_dir") else "its train.json"
    if "train" not in ds.splits:
        raise ValueError(f"training dataset {ds.data_name!r} has no train split ({train_file} does not exist)")
    if len(ds.split("train")):
        return
    counts = (getattr(ds, "stats", None) or {}).get("train") or {}
    total = counts.get("questions", 0)
    reasons = ", ".join(f"{reason.replace('_', ' ')}: {counts.get('skipped_' + reason, 0)}" for reason in SKIP_REASONS)
    why = f"all {total} questions were skipped ({reasons})" if total else "it holds no question"
    raise ValueError(
        f"training dataset {ds.data_name!r} has no usable training question: {why}; a question is kept when "
        f"some of its question entities, supporting entities and supporting documents are in the KG and "
        f"corpus (see {train_file})"
    )


class QAFinetuneTask:
    """Trains ``GNNRetriever`` on the train splits of ``train_sets`` and evaluates entity and
    document retrieval on the test split of every ``valid_sets`` dataset.

    Document scores for evaluation come from the configured ranker; document losses (if any)
    use the differentiable ``entity scores @ ent2doc``.
    """

    def __init__(
        self,
        train_sets: Sequence[Any],
        valid_sets: Sequence[Any],
        losses: Sequence[Dict[str, Any]],
        make_ranker: Callable[[torch.Tensor], Callable[[torch.Tensor], torch.Tensor]],
        metrics: Sequence[str],
        batch_size: int,
        eval_batch_size: int,
        init_entities_weight: bool,
        fast_test: int | None,
        text_emb_conf: Dict[str, Any],
        device: torch.device,
        seed: int = 0,
        graph_partition: str = "none",
    ):
        self.train_sets, self.valid_sets = list(train_sets), list(valid_sets)
        for ds in self.train_sets:
            check_training_questions(ds)
        self.losses = [LossTerm(spec) for spec in losses]
        if not self.losses:
            raise ValueError("task.losses is empty: nothing to train")
        self.metrics = list(metrics)
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.fast_test, self.text_emb_conf, self.device, self.seed = fast_test, text_emb_conf, device, seed
        # Per dataset, moved to the device once: graph, entity weights, ent2doc, ranker.
        self._prepared: Dict[int, Tuple[Any, Any, torch.Tensor, Any]] = {}
        self._init_entities_weight = init_entities_weight
        # "contiguous" / "metis": each graph's nodes split over the ranks (models.partition).
        self.graph_partition = graph_partition
        self._make_ranker = make_ranker

    def _prepare(self, ds) -> Tuple[Any, Any, torch.Tensor, Any]:
        key = id(ds)
        if key not in self._prepared:
            graph = partition_graph(ds.graph, self.graph_partition).to(self.device)
            weight = ds.entities_weight().to(self.device) if self._init_entities_weight else None
            ent2doc = ds.ent2doc.coalesce().to(self.device)
            self._prepared[key] = (graph, weight, ent2doc, self._make_ranker(ent2doc))
        return self._prepared[key]

    def _to_device(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    # --- training ------------------------------------------------------------------------
    def train_batches(self, epoch: int, env: DistEnv):
        splits = [ds.split("train") for ds in self.train_sets]
        for i, batch in interleaved_batches(splits, self.batch_size, epoch, env, [s.collate_fn for s in splits], self.seed):
            yield self.train_sets[i], self._to_device(batch)

    def loss(self, model, item) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        ds, batch = item
        graph, weight, ent2doc, _ = self._prepare(ds)
        pred = model(graph, batch, entities_weight=weight).float()  # [B, N]
        total = pred.new_zeros(())
        logs = {}
        for term in self.losses:
            if term.is_doc_loss:
                doc_pred = torch.sparse.mm(ent2doc.t(), pred.t()).t()  # [B, num_docs]
                value = term.fn(doc_pred, batch["supporting_docs_masks"])
            else:
                value = term.fn(pred, batch["supporting_entities_masks"])
            total = total + term.weight * value
            logs[term.name] = value.detach()
        return total, logs

    # --- evaluation ----------------------------------------------------------------------
    def evaluate(self, model, env: DistEnv) -> List[Dict[str, Any]]:
        rows = []
        for ds in self.valid_sets:
            if "test" not in ds.splits:
                continue
            split = ds.split("test")
            graph, weight, _, ranker = self._prepare(ds)
            count = len(split) if not self.fast_test else min(len(split), int(self.fast_test))
            mine = list(shard(count, env))
            values: Dict[str, List[float]] = {}
            for start in range(0, len(mine), self.eval_batch_size):
                batch = self._to_device(split.collate_fn([split[i] for i in mine[start:start + self.eval_batch_size]]))
                pred = model(graph, batch, entities_weight=weight).float()
                for prefix, scores, target in (
                    ("ent", pred, batch["supporting_entities_masks"]),
                    ("doc", ranker(pred), batch["supporting_docs_masks"]),
                ):
                    for name, per_query in retrieval_metrics(scores, target, self.metrics).items():
                        values.setdefault(f"{prefix}_{name}", []).extend(per_query.tolist())
            rows.append({"dataset": ds.data_name, "split": "test", "questions": count, **gather_mean(values, env)})
        return rows

    def save_pretrained(self, model, folder: str) -> None:
        save_pretrained(model, self.text_emb_conf, folder)
