"""The batches of one training epoch over many datasets, computed from the seed and the datasets'
sizes alone — so a run resumed at step k starts at step k without loading or iterating anything
before it.

An epoch (:class:`EpochPlan`):

1. shuffles the training datasets (seeded by ``seed`` and the epoch; the same on every rank) and
   cuts them into groups of at most ``group_size`` (``datasets.max_datasets_in_memory``);
2. shards each dataset over the ranks as ``torch.utils.data.DistributedSampler`` does (shuffled
   by ``seed + epoch``, padded to equal shards) and cuts this rank's shard into batches: every rank
   gets the same number of batches of every dataset, so DDP ranks step through the same graphs;
3. interleaves the batches of each group in a seeded random order, group after group;
4. stops after ``max_steps`` steps (``train.batch_per_epoch``), if given: datasets whose batches
   all lie beyond are not visited at all.

:func:`walk_steps` runs a plan from a step on, holding each dataset in a
:class:`~gfmrag_fast.data.ResidentDatasets` from its first step to its last.
"""

from __future__ import annotations

import logging
import math
import random
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

log = logging.getLogger(__name__)


def shard_indices(size: int, epoch: int, seed: int, rank: int, world_size: int) -> torch.Tensor:  # [ceil(size / W)]
    """This rank's item indices of a dataset of ``size`` items in ``epoch``: exactly the order of
    ``DistributedSampler(shuffle=True, seed=seed, drop_last=False)`` after ``set_epoch(epoch)``."""
    per_rank = math.ceil(size / world_size)
    total = per_rank * world_size
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    order = torch.randperm(size, generator=generator)
    if total > size:  # padded with the first indices again, as many times as needed
        order = torch.cat([order, order.repeat(math.ceil((total - size) / size))[: total - size]])
    return order[rank:total:world_size]


class EpochPlan:
    """Which dataset and which of its items every step of one epoch trains on (this rank's part).

    Args:
        sizes: training items (questions, triples) of each dataset.
        batch_size: items per step and rank.
        epoch, seed: the shuffles (every rank must pass the same).
        rank, world_size: this rank's shard.
        group_size: datasets trained together (None: all of them in one group).
        max_steps: cap on the steps of the epoch (None: every batch of every dataset).
    """

    def __init__(
        self,
        sizes: Sequence[int],
        batch_size: int,
        epoch: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        group_size: Optional[int] = None,
        max_steps: Optional[int] = None,
    ):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.sizes, self.batch_size = [int(size) for size in sizes], int(batch_size)
        self.epoch, self.seed, self.rank, self.world_size = int(epoch), int(seed), int(rank), int(world_size)
        group_size = max(1, len(self.sizes) if group_size is None else int(group_size))
        self.num_batches = [math.ceil(math.ceil(size / self.world_size) / self.batch_size) for size in self.sizes]
        order = list(range(len(self.sizes)))
        random.Random(f"groups {self.seed} {self.epoch}").shuffle(order)
        self.groups: List[List[int]] = [order[i:i + group_size] for i in range(0, len(order), group_size)]
        steps: List[int] = []
        for g, group in enumerate(self.groups):
            if max_steps is not None and len(steps) >= max_steps:
                break
            interleaved = [i for i in group for _ in range(self.num_batches[i])]
            random.Random(f"interleave {self.seed} {self.epoch} {g}").shuffle(interleaved)
            steps += interleaved
        if max_steps is not None:
            steps = steps[:max_steps]
        self.dataset = np.asarray(steps, dtype=np.int64)  # [S] dataset of each step
        self.batch = np.zeros(len(steps), dtype=np.int64)  # [S] which of that dataset's batches
        seen: Dict[int, int] = {}
        for step, i in enumerate(steps):
            self.batch[step] = seen[i] = seen.get(i, -1) + 1
        self.last_step = {i: step for step, i in enumerate(steps)}  # dataset -> its last step
        self._shards: Dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def first_use_order(self, start: int = 0) -> List[int]:
        """The datasets of steps ``start`` on, in the order of their first step."""
        return list(dict.fromkeys(self.dataset[start:].tolist()))

    def items(self, step: int) -> Tuple[int, torch.Tensor]:
        """(dataset, [b] item indices) of ``step``."""
        i, k = int(self.dataset[step]), int(self.batch[step])
        if i not in self._shards:
            self._shards[i] = shard_indices(self.sizes[i], self.epoch, self.seed, self.rank, self.world_size)
        return i, self._shards[i][k * self.batch_size:(k + 1) * self.batch_size]

    def forget(self, i: int) -> None:
        """Drops dataset ``i``'s shard (after its last step)."""
        self._shards.pop(i, None)


def walk_steps(plan: EpochPlan, names: Sequence[str], datasets, start: int = 0) -> Iterator[Tuple[int, torch.Tensor]]:
    """(dataset, item indices) of steps ``start``, ``start + 1``, ... of ``plan``; each dataset is
    held in ``datasets`` (a :class:`~gfmrag_fast.data.ResidentDatasets`) from its first step of
    the walk until the step after its last one has begun, and the datasets of the coming steps
    are planned (loaded ahead) in the order they are first needed."""
    datasets.plan([names[i] for i in plan.first_use_order(start)])
    before, held = datasets.stats(), set()
    try:
        for step in range(start, len(plan)):
            i, items = plan.items(step)
            if i not in held:
                datasets.hold(names[i])
                held.add(i)
            yield i, items
            if plan.last_step[i] == step:
                datasets.release(names[i])
                held.discard(i)
                plan.forget(i)
        after = datasets.stats()
        log.info("epoch %d: %d dataset load(s), %.2f s spent waiting for them; at most %d of %d resident",
                 plan.epoch, after["loads"] - before["loads"], after["wait_s"] - before["wait_s"],
                 after["peak_resident"], datasets.max_resident)
    finally:
        for i in held:
            datasets.release(names[i])


def walk_datasets(names: Sequence[str], datasets) -> Iterator[str]:
    """Each of ``names`` in order, held in ``datasets`` while the caller works on it: the
    evaluation walk (the next datasets load ahead as slots allow). The caller gets the state from
    ``datasets.get(name)`` and keeps no reference to it past its turn."""
    datasets.plan(list(names))
    for name in names:
        datasets.hold(name)
        try:
            yield name
        finally:
            datasets.release(name)


class PlannedEpochs:
    """For tasks whose epochs an :class:`EpochPlan` lays out from their ``train_sizes``,
    ``batch_size``, ``seed`` and ``max_datasets_in_memory``."""

    def _plan(self, epoch: int, env, max_steps: Optional[int] = None) -> EpochPlan:
        return EpochPlan(self.train_sizes, self.batch_size, epoch, self.seed, env.rank, env.world_size,
                         self.max_datasets_in_memory, max_steps)

    def num_batches(self, epoch: int, env) -> int:
        """This rank's steps in a whole ``epoch``."""
        return len(self._plan(epoch, env))
