"""Pieces both training tasks share: loss configs, evaluation shards, dataset sizes."""

from __future__ import annotations

from typing import Any, Callable, Dict, List

import torch

from ..data.resident import LazyDataset
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


def dataset_info(ds, key: str, describe: Callable[[Any], Dict[str, Any]]) -> Any:
    """``ds.info[key]`` of a :class:`LazyDataset` (described when the workflow scanned it), else
    ``describe(ds)[key]`` of a loaded dataset."""
    return ds.info[key] if isinstance(ds, LazyDataset) else describe(ds)[key]

