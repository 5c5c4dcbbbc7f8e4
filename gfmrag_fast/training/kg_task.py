"""KG-completion pre-training task: GFM-RAG's stage-2 pre-training of ``QueryGNN``.

Training: batches of training triples (h, t, r) of every dataset, interleaved; each triple gets
``num_negative`` strict negatives (half the batch corrupts tails, half heads), the batch's own edges
and their inverses are masked out of message passing ("easy edges"), and the loss is BCE with
self-adversarial negative weights.

Evaluation: filtered link prediction over heads and tails, every entity scored, on the training
graph with nothing removed; the filter holds every known triple (train + valid + test, with
inverses). Held-out ``valid_triples`` / ``test_triples`` are evaluated when a dataset has them;
otherwise a fixed seeded sample of training triples (split "train", as the original's
``fast_test``: their own edges are then visible, so the numbers are optimistic).
"""

from __future__ import annotations

import functools
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..data.resident import PreparedDataset, ResidentDatasets, device_guard, prepare_dataset
from ..losses import adversarial_bce
from ..metrics import check_link_prediction_metrics, link_prediction_metrics, link_prediction_ranks
from ..checkpoints import save_pretrained
from ..models.graph_input import num_relations_of
from ..ops import TripleIndex, easy_edge_mask, negative_sampling
from .distributed import DistEnv
from .epoch_plan import PlannedEpochs, walk_datasets, walk_steps
from .tasks_common import GraphPartitions, dataset_info, shard

HELD_OUT_SPLITS = ("valid", "test")


def training_triples(graph) -> torch.Tensor:  # [T, 3] rows (h, t, r)
    """The graph's training triples as (h, t, r) rows, from ``target_edge_index`` / ``target_edge_type``."""
    return torch.cat([graph.target_edge_index.t(), graph.target_edge_type.unsqueeze(1)], dim=1).long().contiguous()


def describe_kg_dataset(ds, train: bool) -> Dict[str, Any]:
    """What the task needs to know of a loaded KG dataset to plan without it: its number of
    ``train`` triples and ``feat_dim``. A training dataset without triples is a ValueError."""
    num_triples = int(ds.graph.target_edge_type.numel())
    if train and not num_triples:
        stats = getattr(ds, "stats", None) or {}
        why = f" ({stats['skipped_lines']} line(s) of kg.txt skipped)" if stats.get("skipped_lines") else ""
        raise ValueError(f"training dataset {ds.data_name!r} has no training triple{why}: nothing to pre-train on")
    return {"train": num_triples, "feat_dim": int(ds.graph.rel_emb.shape[1])}


class KGCompletionTask(PlannedEpochs):
    """Pre-trains ``QueryGNN`` on the training triples of ``train_sets`` and evaluates filtered
    link prediction on ``valid_sets`` (objects with ``data_name`` and a GFM-RAG ``graph``, e.g.
    :class:`gfmrag_fast.data.KGDataset`).

    Args:
        num_negative, strict_negative: negatives per training triple and whether they avoid true
            answers (see :func:`gfmrag_fast.ops.negative_sampling`).
        adversarial_temperature: self-adversarial temperature of the BCE (0: uniform weights).
        batch_size: training triples per step (per rank).
        eval_batch_size: link-prediction queries per forward pass in evaluation; each scores all
            N entities, so memory grows as ``eval_batch_size * N * hidden dim``.
        metrics: names among ``mr``, ``mrr``, ``hits@k``.
        fast_test: size of the sample of training triples evaluated for datasets without held-out
            triples (None: all of them).
        text_emb_conf: the text model config written into ``config.json`` by save_pretrained.
        seed: shuffling of the training triples (the same on every rank) and the fast_test sample.
        max_datasets_in_memory, data_loading_workers: at most that many datasets resident at a
            time (:class:`~gfmrag_fast.data.ResidentDatasets`), loaded ahead by that many threads;
            an epoch walks the training datasets in groups of that many (:class:`.EpochPlan`).
            Datasets are loaded objects or :class:`~gfmrag_fast.data.LazyDataset` described by
            :func:`describe_kg_dataset`.
        graph_partition: "none", or "contiguous" / "metis" to split each graph's nodes over the
            ranks (:func:`gfmrag_fast.models.partition.partition_graph`), done in the training
            loop's thread when a dataset is first used and kept while it is resident
            (:class:`.GraphPartitions`).
    """

    def __init__(
        self,
        train_sets: Sequence[Any],
        valid_sets: Sequence[Any],
        num_negative: int,
        strict_negative: bool,
        adversarial_temperature: float,
        batch_size: int,
        eval_batch_size: int,
        metrics: Sequence[str],
        fast_test: Optional[int],
        text_emb_conf: Dict[str, Any],
        device: torch.device,
        seed: int = 0,
        max_datasets_in_memory: Optional[int] = None,
        data_loading_workers: int = 0,
        graph_partition: str = "none",
    ):
        if int(num_negative) <= 0:
            raise ValueError(f"task.num_negative must be a positive integer, got {num_negative}")
        if int(batch_size) <= 0 or int(eval_batch_size) <= 0:
            raise ValueError(
                f"batch sizes must be positive, got batch_size={batch_size}, eval_batch_size={eval_batch_size}"
            )
        self.train_names = [ds.data_name for ds in train_sets]
        self.valid_names = [ds.data_name for ds in valid_sets]
        self.train_sizes = [dataset_info(ds, "train", functools.partial(describe_kg_dataset, train=True))
                            for ds in train_sets]
        self.num_negative, self.strict_negative = int(num_negative), bool(strict_negative)
        self.adversarial_temperature = float(adversarial_temperature)
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.metrics = check_link_prediction_metrics(metrics)
        self.fast_test = None if fast_test is None else int(fast_test)
        self.text_emb_conf, self.device, self.seed = text_emb_conf, device, int(seed)
        self.max_datasets_in_memory = max_datasets_in_memory
        self.graph_partition = graph_partition
        self.partitions = GraphPartitions(graph_partition)  # the models' graphs, split in this thread
        # The one owner of the datasets' tensors and their device state.
        self.datasets = ResidentDatasets([*train_sets, *valid_sets], self._prepare, max_datasets_in_memory,
                                         data_loading_workers)

    def _prepare(self, ds) -> PreparedDataset:
        """The graph on the device; for training, its TripleIndex (negatives, easy edges) and the
        triples [T, 3] (host); for evaluation, the filter index and the evaluated triples."""
        train = ds.data_name in self.train_names
        prepared = prepare_dataset(ds, self.device, with_triple_index=train)
        if train:
            prepared.extras["triples"] = training_triples(ds.graph)
        if ds.data_name in self.valid_names:
            with device_guard(self.device):
                prepared.extras["filter_index"], prepared.extras["splits"] = self._eval_parts(ds)
        return prepared

    # --- training ------------------------------------------------------------------------
    def train_batches(self, epoch: int, env: DistEnv, start: int = 0, max_steps: Optional[int] = None):
        """(dataset index, triples [b, 3]) of steps ``start``... of ``epoch`` (at most ``max_steps``)."""
        for i, items in walk_steps(self._plan(epoch, env, max_steps), self.train_names, self.datasets, start):
            yield i, self.datasets.get(self.train_names[i]).extras["triples"][items]

    def queries(self, item) -> int:
        """Training triples in a batch."""
        return len(item[1])

    def loss(self, model, item: Tuple[int, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        index, triples = item  # triples [B, 3] (h, t, r)
        state = self.datasets.get(self.train_names[index])
        rel_graph = state.rel_graph
        triples = triples.to(rel_graph.device, non_blocking=True)
        # Triples come from the graph itself: no range check (it would sync the device).
        batch = negative_sampling(rel_graph, triples, self.num_negative, strict=self.strict_negative,
                                  check_values=False)  # [B, 1 + K, 3]
        edge_mask = easy_edge_mask(rel_graph, batch, check_values=False)  # [E]
        graph = self.partitions.graph(self.train_names[index], state)  # this rank's share when partitioned
        pred = model(graph, batch, edge_mask=edge_mask)  # [B, 1 + K]
        target = torch.zeros_like(pred)
        target[:, 0] = 1
        return adversarial_bce(pred, target, self.adversarial_temperature), {}

    # --- evaluation ----------------------------------------------------------------------
    def _eval_parts(self, ds) -> Tuple[TripleIndex, List[Tuple[str, torch.Tensor]]]:
        """(filter index, [(split, triples [n, 3])]) of one evaluation dataset."""
        graph = ds.graph
        train = training_triples(graph)
        held_out = [(split, getattr(graph, f"{split}_triples", None)) for split in HELD_OUT_SPLITS]
        splits = [(split, triples.long()) for split, triples in held_out if triples is not None and len(triples)]
        if not splits:
            sample = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed))
            splits = [("train", train[sample[: self.fast_test] if self.fast_test is not None else sample])]
        known = torch.cat([train] + [triples for split, triples in splits if split != "train"])
        num_direct = num_relations_of(graph) // 2
        edge_index = torch.cat([known[:, :2].t(), known[:, :2].t().flip(0)], dim=1)
        edge_type = torch.cat([known[:, 2], known[:, 2] + num_direct])
        filter_index = TripleIndex(edge_index.to(self.device), edge_type.to(self.device),
                                   int(graph.num_nodes), 2 * num_direct)
        return filter_index, splits

    def evaluate(self, model, env: DistEnv) -> List[Dict[str, Any]]:
        return [row for name in walk_datasets(self.valid_names, self.datasets)
                for row in self._evaluate_dataset(model, name, env)]

    def _evaluate_dataset(self, model, name: str, env: DistEnv) -> List[Dict[str, Any]]:
        state, rows = self.datasets.get(name), []
        for split, triples in state.extras["splits"]:
            mine = shard(len(triples), env)
            ranks = self._ranks(model, self.partitions.graph(name, state), state.extras["filter_index"],
                                triples[mine.start:mine.stop].to(self.device))
            ranks = torch.cat([part for part in env.gather_objects(ranks.cpu())])
            rows.append({"dataset": name, "split": split, **link_prediction_metrics(ranks, self.metrics)})
        return rows

    def _ranks(self, model, graph, filter_index: TripleIndex, triples: torch.Tensor) -> torch.Tensor:
        """Filtered ranks [2n] of the tails, then the heads, of ``triples`` [n, 3] (h, t, r).

        Head prediction (?, r, t) is asked as tail prediction (t, r + R, ?) over the inverse
        edges, as the model would rewrite it anyway."""
        num_nodes, num_direct = int(graph.num_nodes), num_relations_of(graph) // 2
        h, t, r = triples.unbind(1)
        sources, relations, answers = torch.cat([h, t]), torch.cat([r, r + num_direct]), torch.cat([t, h])
        candidates = torch.arange(num_nodes, device=triples.device)
        ranks = []
        for start in range(0, len(sources), self.eval_batch_size):
            src = sources[start:start + self.eval_batch_size]
            rel = relations[start:start + self.eval_batch_size]
            ans = answers[start:start + self.eval_batch_size]
            q = len(src)
            batch = torch.stack([src[:, None].expand(q, num_nodes), candidates.expand(q, num_nodes),
                                 rel[:, None].expand(q, num_nodes)], dim=-1)  # [q, N, 3]
            scores = model(graph, batch)  # [q, N]
            ranks.append(link_prediction_ranks(scores, ans, filter_index.answer_mask(src, rel)))
        return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long, device=triples.device)

    def save_pretrained(self, model, folder: str) -> None:
        save_pretrained(model, self.text_emb_conf, folder)
