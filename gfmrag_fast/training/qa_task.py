"""Fine-tuning task: questions -> supporting entities (and documents), GFM-RAG's losses and metrics."""

from __future__ import annotations

import functools
import logging
import math
import os
import random
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..data.resident import PreparedDataset, ResidentDatasets, prepare_dataset
from ..metrics import retrieval_metrics
from ..checkpoints import save_pretrained
from .distributed import DistEnv
from .epoch_plan import PlannedEpochs, walk_datasets, walk_steps
from .tasks_common import GraphPartitions, dataset_info, gather_mean, resolve_loss, shard

log = logging.getLogger(__name__)

# Defaults of train.valid_fraction and train.min_valid_questions: 7 of the bundled MuSiQue
# data's 70 training questions.
VALID_FRACTION = 0.1
MIN_VALID_QUESTIONS = 5


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
    ``train`` questions, of ``valid`` and ``test`` questions (None: no such split) and
    ``feat_dim``. A training dataset without a usable question is a ValueError
    (:func:`check_training_questions`)."""
    if train:
        check_training_questions(ds)
    return {"train": len(ds.split("train")) if "train" in ds.splits else 0,
            "valid": len(ds.split("valid")) if "valid" in ds.splits else None,
            "test": len(ds.split("test")) if "test" in ds.splits else None, "feat_dim": ds.feat_dim}


def check_valid_options(fraction: Any, minimum: Any) -> Tuple[float, int]:
    """(train.valid_fraction, train.min_valid_questions) as numbers; ValueError naming the key."""
    try:
        fraction = float(fraction)
    except (TypeError, ValueError):
        raise ValueError(f"train.valid_fraction must be a number in [0, 0.5], got {fraction!r}") from None
    if not 0 <= fraction <= 0.5:
        raise ValueError(f"train.valid_fraction must be in [0, 0.5] (0: hold out nothing), got {fraction}")
    if isinstance(minimum, bool) or not isinstance(minimum, int) and not (
            isinstance(minimum, float) and minimum.is_integer()):
        raise ValueError(f"train.min_valid_questions must be a whole number at least 1, got {minimum!r}")
    if int(minimum) < 1:
        raise ValueError(f"train.min_valid_questions must be at least 1, got {minimum}")
    return fraction, int(minimum)


def hold_out(num_questions: int, fraction: float, minimum: int, seed: int, name: str
             ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """(validation, training) question indices [k], [n - k] of a dataset's ``num_questions``
    training questions, both sorted: k = max(``minimum``, ceil(``fraction`` * n)) questions
    drawn at random, seeded by ``seed`` and the dataset ``name`` (the same split in every run
    and on every rank). None when ``fraction`` is 0, or when the dataset is too small to give k
    questions and still train on at least as many (n < 2k)."""
    if fraction <= 0:
        return None
    count = max(int(minimum), math.ceil(fraction * num_questions))
    if num_questions - count < count:
        return None
    order = list(range(num_questions))
    random.Random(f"valid {seed} {name}").shuffle(order)
    return torch.tensor(sorted(order[:count]), dtype=torch.long), torch.tensor(sorted(order[count:]), dtype=torch.long)


def _is_main_process() -> bool:
    """Rank 0 of a torchrun job (or a single process): the one that logs what every rank decides alike."""
    return int(os.environ.get("RANK", "0")) == 0


class QAFinetuneTask(PlannedEpochs):
    """Trains ``GNNRetriever`` on the train splits of ``train_sets`` and evaluates entity and
    document retrieval on every ``valid_sets`` dataset: on its test split (rows with split
    "test") and on its validation questions (split "valid"), on which the best epoch is chosen.

    The validation questions of a dataset are its ``valid`` split when it has one; else, for a
    dataset that is also trained on, a seeded part of its training questions that is then not
    trained on (:func:`hold_out`: ``valid_fraction`` of them, at least ``min_valid_questions``).
    A dataset too small for that is trained on whole and has test rows only (logged).

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
        valid_fraction: float = VALID_FRACTION,
        min_valid_questions: int = MIN_VALID_QUESTIONS,
    ):
        self.valid_fraction, self.min_valid_questions = check_valid_options(valid_fraction, min_valid_questions)
        self.seed = seed
        self.train_names = [ds.data_name for ds in train_sets]
        describe_train = functools.partial(describe_qa_dataset, train=True)
        describe_valid = functools.partial(describe_qa_dataset, train=False)
        sizes = [dataset_info(ds, "train", describe_train) for ds in train_sets]
        evaluated = {ds.data_name for ds in valid_sets}
        # Per training dataset, the train-split questions trained on (None: all of them), and
        # the held-out ones of those that give their validation questions that way.
        self.train_items: List[Optional[torch.Tensor]] = []
        held_out: Dict[str, torch.Tensor] = {}
        for ds, size in zip(train_sets, sizes):
            parts = None
            if ds.data_name in evaluated and not dataset_info(ds, "valid", describe_train, optional=True):
                parts = self._hold_out(ds.data_name, size)
            if parts is not None:
                held_out[ds.data_name] = parts[0]
            self.train_items.append(None if parts is None else parts[1])
        self.train_sizes = [size if items is None else len(items) for size, items in zip(sizes, self.train_items)]
        # Per evaluated dataset: (row split, dataset split, question indices or None: all of it).
        self.eval_parts: Dict[str, List[Tuple[str, str, Optional[torch.Tensor]]]] = {}
        for ds in valid_sets:
            parts = []
            if dataset_info(ds, "valid", describe_valid, optional=True):
                parts.append(("valid", "valid", None))
            elif ds.data_name in held_out:
                parts.append(("valid", "train", held_out[ds.data_name]))
            if dataset_info(ds, "test", describe_valid) is not None:
                parts.append(("test", "test", None))
            if parts:
                self.eval_parts[ds.data_name] = parts
        self.valid_names = list(self.eval_parts)
        self.losses = [LossTerm(spec) for spec in losses]
        if not self.losses:
            raise ValueError("task.losses is empty: nothing to train")
        self.metrics = list(metrics)
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.fast_test, self.text_emb_conf, self.device = fast_test, text_emb_conf, device
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

    def _hold_out(self, name: str, size: int) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """:func:`hold_out` of training dataset ``name``, said in the log either way."""
        parts = hold_out(size, self.valid_fraction, self.min_valid_questions, self.seed, name)
        if not _is_main_process():
            return parts
        if parts is not None:
            log.info("%s: %d of its %d training questions are held out as validation questions (not trained on; "
                     "train.valid_fraction=%g, train.min_valid_questions=%d, seed %d): the best epoch is chosen on "
                     "them", name, len(parts[0]), size, self.valid_fraction, self.min_valid_questions, self.seed)
        elif self.valid_fraction > 0:
            need = 2 * max(self.min_valid_questions, math.ceil(self.valid_fraction * size))
            log.warning("%s: only %d training questions, fewer than the %d needed to hold out validation questions "
                        "and train on as many (train.valid_fraction=%g, train.min_valid_questions=%d): all of them "
                        "are trained on, and the dataset gives no validation rows", name, size, need,
                        self.valid_fraction, self.min_valid_questions)
        return parts

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
        for i, items in walk_steps(self._plan(epoch, env, max_steps), self.train_names, self.datasets, start):
            kept = self.train_items[i]  # the plan numbers the questions trained on; map to the split's
            yield i, self._batch(self.train_names[i], "train", (items if kept is None else kept[items]).tolist())

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
        """A row per evaluated dataset and split: "valid" (its validation questions), then "test"."""
        return [self._evaluate_part(model, name, row_split, split, items, env)
                for name in walk_datasets(self.valid_names, self.datasets)
                for row_split, split, items in self.eval_parts[name]]

    def _evaluate_part(self, model, name: str, row_split: str, split: str, items: Optional[torch.Tensor],
                       env: DistEnv) -> Dict[str, Any]:
        """Metrics of questions ``items`` (None: all) of ``split`` of a resident dataset."""
        state = self.datasets.get(name)
        count = len(state.dataset.split(split)) if items is None else len(items)
        count = count if not self.fast_test else min(count, int(self.fast_test))
        mine = list(shard(count, env))
        if items is not None:
            mine = items[mine].tolist()
        graph = self.partitions.graph(name, state)
        values: Dict[str, List[float]] = {}
        for start in range(0, len(mine), self.eval_batch_size):
            batch = self._batch(name, split, mine[start:start + self.eval_batch_size])
            pred = model(graph, batch, entities_weight=state.entities_weight).float()
            for prefix, scores, target in (
                ("ent", pred, batch["supporting_entities_masks"]),
                ("doc", state.extras["ranker"](pred), batch["supporting_docs_masks"]),
            ):
                for metric, per_query in retrieval_metrics(scores, target, self.metrics).items():
                    values.setdefault(f"{prefix}_{metric}", []).extend(per_query.tolist())
        return {"dataset": name, "split": row_split, "questions": count, **gather_mean(values, env)}

    def save_pretrained(self, model, folder: str) -> None:
        save_pretrained(model, self.text_emb_conf, folder)
