"""Pieces both training tasks share: per-rank batching over several datasets, loss configs."""

from __future__ import annotations

import random
from typing import Any, Callable, Dict, Iterator, List, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..losses import adversarial_bce, list_ce
from .distributed import DistEnv

# GFM-RAG's loss targets (and ours) -> function; keyword arguments come from the config.
LOSS_TARGETS: Dict[str, Callable[..., torch.Tensor]] = {
    "BCELoss": adversarial_bce,
    "ListCELoss": list_ce,
    "adversarial_bce": adversarial_bce,
    "list_ce": list_ce,
}


def resolve_loss(spec: Dict[str, Any]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """{"_target_": "gfmrag.losses.BCELoss", "adversarial_temperature": 0.2} -> loss(pred, target)."""
    spec = dict(spec)
    target = str(spec.pop("_target_", ""))
    name = target.rsplit(".", 1)[-1]
    if name not in LOSS_TARGETS:
        raise ValueError(f"unknown loss _target_ {target!r}; known: {sorted(LOSS_TARGETS)}")
    fn = LOSS_TARGETS[name]
    return lambda pred, tgt: fn(pred, tgt, **spec)


def interleaved_batches(
    datasets: Sequence[Dataset],
    batch_size: int,
    epoch: int,
    env: DistEnv,
    collate_fns: Sequence[Callable | None],
    seed: int = 0,
) -> Iterator[tuple[int, Any]]:
    """(dataset index, batch) pairs of one epoch: each dataset shuffled and sharded over ranks by a
    DistributedSampler, the datasets' batches interleaved in a random order that is the same on
    every rank (so DDP ranks step through the same graphs together)."""
    loaders = []
    for ds, collate in zip(datasets, collate_fns):
        # Padded to equal shards (drop_last=False): every rank must take the same number of steps.
        sampler = DistributedSampler(ds, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        loaders.append(DataLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=collate))
    order: List[int] = [i for i, loader in enumerate(loaders) for _ in range(len(loader))]
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    iterators = [iter(loader) for loader in loaders]
    for i in order:
        yield i, next(iterators[i])


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
