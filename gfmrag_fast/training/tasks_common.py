"""Pieces both training tasks share: loss configs, evaluation shards, dataset sizes, graph partitions."""

from __future__ import annotations

from typing import Any, Callable, Dict, List

import torch

from .. import targets
from ..data.resident import LazyDataset, PreparedDataset
from ..models.partition import PARTITION_METHODS, partition_graph, partition_of
from .distributed import DistEnv


def resolve_loss(spec: Dict[str, Any]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """{"_target_": "gfmrag.losses.BCELoss", "adversarial_temperature": 0.2} -> loss(pred, target)."""
    return targets.instantiate({**spec, "_partial_": True}, "loss")


def shard(n: int, env: DistEnv) -> range:
    """This rank's slice of n evaluation items (contiguous, sizes differ by at most one)."""
    per, extra = divmod(n, env.world_size)
    start = env.rank * per + min(env.rank, extra)
    return range(start, start + per + (1 if env.rank < extra else 0))


def gather_mean(values: Dict[str, List[float]], env: DistEnv) -> Dict[str, float]:
    """Mean over every rank's per-item values."""
    merged: Dict[str, List[float]] = {}
    for part in env.gather_objects(values):
        for key, vals in part.items():
            merged.setdefault(key, []).extend(vals)
    return {key: float(sum(vals) / len(vals)) for key, vals in merged.items() if vals}


def dataset_info(ds, key: str, describe: Callable[[Any], Dict[str, Any]], optional: bool = False) -> Any:
    """``ds.info[key]`` of a :class:`LazyDataset` (described when the workflow scanned it), else
    ``describe(ds)[key]`` of a loaded dataset; with ``optional``, None where the key is absent
    (a description made before the key existed)."""
    info = ds.info if isinstance(ds, LazyDataset) else describe(ds)
    return info.get(key) if optional else info[key]


class GraphPartitions:
    """The graph the model runs on for each resident dataset: its prepared graph, or with
    ``train.graph_partition`` = contiguous / metis this rank's share of it
    (:func:`~gfmrag_fast.models.partition.partition_graph`).

    Partitioning is a collective (rank 0 partitions, the others receive the owners) and so are
    the halo exchanges of every forward pass; the collectives of all ranks must come in the same
    order. So a graph is partitioned here, in the training loop's thread, when its dataset is first
    used by a step or an evaluation — every rank of a graph-partitioned run walks the same
    datasets with the same batches — and never in the loading threads of
    :class:`~gfmrag_fast.data.ResidentDatasets`, which only prepare the whole graph.

    The partitioned graph is kept in the dataset's prepared state (``extras``), so it lives and is
    freed with the dataset. The owner of every node (``partition.parts``, 2 bytes a node) is kept
    for the whole run: a dataset loaded again in a later group or epoch is split the same way
    without partitioning (METIS) or communicating again.
    """

    KEY = "partitioned_graph"

    def __init__(self, method: str | None):
        self.method = "none" if method is None else str(method)
        if self.method not in PARTITION_METHODS:
            raise ValueError(f"train.graph_partition must be one of {PARTITION_METHODS}, got {method!r}")
        self._parts: Dict[str, torch.Tensor] = {}  # dataset name -> [N] owner rank of each node

    def graph(self, name: str, state: PreparedDataset):
        """The graph of resident dataset ``name`` (prepared ``state``) for the model."""
        if self.method == "none":
            return state.graph
        graph = state.extras.get(self.KEY)
        if graph is None:
            graph = partition_graph(state.graph, self.method, parts=self._parts.get(name))
            partition = partition_of(graph)
            if partition is not None and partition.parts is not None:
                self._parts[name] = partition.parts
            state.extras[self.KEY] = graph
        return graph
