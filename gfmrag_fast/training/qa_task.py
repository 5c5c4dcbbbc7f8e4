"""Fine-tuning task: questions -> supporting entities (and documents), GFM-RAG's losses and metrics."""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..data.resident import PreparedDataset, ResidentDatasets, prepare_dataset
from ..metrics import retrieval_metrics
from ..models.checkpoint import save_pretrained
from .distributed import DistEnv
from .epoch_plan import EpochPlan, walk_datasets, walk_steps
from .tasks_common import GraphPartitions, dataset_info, gather_mean, resolve_loss, shard


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


def describe_qa_dataset(ds, train: bool) -> Dict[str, Any]:
    """What the task needs to know of a loaded QA dataset to plan without it: its number of
    ``train`` questions, of ``test`` questions (None: no test split) and ``feat_dim``. A training
    dataset without a usable question is a ValueError (:func:`check_training_questions`)."""
    if train:
        check_training_questions(ds)
    return {"train": len(ds.split("train")) if "train" in ds.splits else 0,
            "test": len(ds.split("test")) if "test" in ds.splits else None, "feat_dim": ds.feat_dim}


class QAFinetuneTask:
    """Trains ``GNNRetriever`` on the train splits of ``train_sets`` and evaluates entity and
    document retrieval on the test split of every ``valid_sets`` dataset.

    Datasets are loaded objects or :class:`~gfmrag_fast.data.LazyDataset` (described by
    :func:`describe_qa_dataset`); at most ``max_datasets_in_memory`` of them are resident at a
    time (:class:`~gfmrag_fast.data.ResidentDatasets`, ``data_loading_workers`` loading ahead),
    and an epoch walks the training datasets in groups of that many (:class:`.EpochPlan`).
    With ``graph_partition`` contiguous / metis the ranks split each graph's nodes
    (:class:`.GraphPartitions`).
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
        max_datasets_in_memory: Optional[int] = None,
        data_loading_workers: int = 0,
        graph_partition: str = "none",
    ):
        self.train_names = [ds.data_name for ds in train_sets]
        self.train_sizes = [dataset_info(ds, "train", functools.partial(describe_qa_dataset, train=True))
                            for ds in train_sets]
        describe_valid = functools.partial(describe_qa_dataset, train=False)
        # Only datasets with a test split are evaluated.
        self.valid_names = [ds.data_name for ds in valid_sets if dataset_info(ds, "test", describe_valid) is not None]
        self.losses = [LossTerm(spec) for spec in losses]
        if not self.losses:
            raise ValueError("task.losses is empty: nothing to train")
        self.metrics = list(metrics)
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.fast_test, self.text_emb_conf, self.device, self.seed = fast_test, text_emb_conf, device, seed
        self._init_entities_weight = init_entities_weight
        # "contiguous" / "metis": each graph's nodes split over the ranks (models.partition), in
        # the training loop's thread when a dataset is first used, kept while it is resident.
        self.graph_partition = graph_partition
        self.partitions = GraphPartitions(graph_partition)
        self._make_ranker = make_ranker
        self.max_datasets_in_memory = max_datasets_in_memory
        # The one owner of the datasets' tensors and their device state.
        self.datasets = ResidentDatasets([*train_sets, *valid_sets], self._prepare, max_datasets_in_memory,
                                         data_loading_workers)

    def _prepare(self, ds) -> PreparedDataset:
        """Graph, entity weights, ent2doc (and the document ranker) on the device."""
        prepared = prepare_dataset(ds, self.device, with_entities_weight=self._init_entities_weight, with_ent2doc=True)
        prepared.extras["ranker"] = self._make_ranker(prepared.ent2doc)
        return prepared

    def _to_device(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    # --- training ------------------------------------------------------------------------
    def train_batches(self, epoch: int, env: DistEnv, start: int = 0, max_steps: Optional[int] = None):
        """(dataset index, batch) of steps ``start``... of ``epoch`` (at most ``max_steps``)."""
        plan = EpochPlan(self.train_sizes, self.batch_size, epoch, self.seed, env.rank, env.world_size,
                         self.max_datasets_in_memory, max_steps)
        for i, items in walk_steps(plan, self.train_names, self.datasets, start):
            yield i, self._batch(self.train_names[i], "train", items.tolist())

    def _batch(self, name: str, split: str, items: List[int]) -> Dict[str, Any]:
        """The collated questions ``items`` of a resident dataset's split, on the device (no
        reference to the dataset outlives the call: the walk may free it next)."""
        questions = self.datasets.get(name).dataset.split(split)
        return self._to_device(questions.collate_fn([questions[j] for j in items]))

    def queries(self, item) -> int:
        """Questions in a training batch."""
        return len(item[1]["ids"])

    def loss(self, model, item) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        index, batch = item
        state = self.datasets.get(self.train_names[index])
        graph = self.partitions.graph(self.train_names[index], state)  # this rank's share when partitioned
        pred = model(graph, batch, entities_weight=state.entities_weight).float()  # [B, N]
        total = pred.new_zeros(())
        logs = {}
        for term in self.losses:
            if term.is_doc_loss:
                doc_pred = torch.sparse.mm(state.ent2doc.t(), pred.t()).t()  # [B, num_docs]
                value = term.fn(doc_pred, batch["supporting_docs_masks"])
            else:
                value = term.fn(pred, batch["supporting_entities_masks"])
            total = total + term.weight * value
            logs[term.name] = value.detach()
        return total, logs

    # --- evaluation ----------------------------------------------------------------------
    def evaluate(self, model, env: DistEnv) -> List[Dict[str, Any]]:
        return [self._evaluate_dataset(model, name, env) for name in walk_datasets(self.valid_names, self.datasets)]

    def _evaluate_dataset(self, model, name: str, env: DistEnv) -> Dict[str, Any]:
        state = self.datasets.get(name)
        count = len(state.dataset.split("test"))
        count = count if not self.fast_test else min(count, int(self.fast_test))
        mine = list(shard(count, env))
        graph = self.partitions.graph(name, state)
        values: Dict[str, List[float]] = {}
        for start in range(0, len(mine), self.eval_batch_size):
            batch = self._batch(name, "test", mine[start:start + self.eval_batch_size])
            pred = model(graph, batch, entities_weight=state.entities_weight).float()
            for prefix, scores, target in (
                ("ent", pred, batch["supporting_entities_masks"]),
                ("doc", state.extras["ranker"](pred), batch["supporting_docs_masks"]),
            ):
                for metric, per_query in retrieval_metrics(scores, target, self.metrics).items():
                    values.setdefault(f"{prefix}_{metric}", []).extend(per_query.tolist())
        return {"dataset": name, "split": "test", "questions": count, **gather_mean(values, env)}

    def save_pretrained(self, model, folder: str) -> None:
        save_pretrained(model, self.text_emb_conf, folder)
