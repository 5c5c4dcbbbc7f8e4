"""What a training checkpoint holds, in types that ``torch.load(weights_only=True)`` accepts.

A training checkpoint (``model_last.pth``, ``model_best.pth``, ``model_epoch_<e>.pth``) is a dict::

    {"model": state_dict, "optimizer": state_dict, "epoch": epoch to train next, "step": its next step,
     "best_score": float, "best_epoch": int or None, "run_id": str,
     "history": [{"epoch", "loss", <metric>, "step_loss": [loss of each step (rank 0's)],
                  "rows": [the epoch's evaluation rows]}] (older checkpoints: the first three only),
     "rng": {"torch", "cuda", "python", "numpy"},
     "rank_rng": [rng of every rank] (several processes), "world_size": int,
     "data_world_size": int (the data-parallel shards of an epoch's batches: world_size, or 1 when
     graph-partitioned),
     "epoch_loss": tensor [world size] (mid-epoch only: each rank's sum of the epoch's losses so far),
     "step_losses": tensor [steps done] (mid-epoch only: rank 0's loss of each of them, for the curves)}

``step`` is 0 at an epoch's end (the checkpoint after epoch ``epoch - 1``; older checkpoints have no
``step``) and k > 0 in a checkpoint written mid-epoch (``train.save_interval``) after k steps of
epoch ``epoch``; ``model_best.pth`` is always an epoch's end.

Only tensors and plain Python values: the RNG states of Python and numpy are stored as lists and
tensors, not as the tuples and numpy arrays their ``getstate`` functions return, so loading a
checkpoint never needs a pickle that could run code. ``best_epoch`` and ``run_id`` tie
``model_last.pth`` to the ``model_best.pth`` it expects (see :class:`~.trainer.Trainer`).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any, Dict

import numpy as np
import torch

from ..checkpoints import CheckpointError, load_checkpoint_file

TRAINING_KEYS = ("model", "optimizer", "epoch")
_TYPES = {"model": Mapping, "optimizer": Mapping, "epoch": int, "step": int, "best_score": (int, float),
          "best_epoch": (int, type(None)), "run_id": str, "history": list, "rng": (Mapping, type(None)),
          "rank_rng": (list, type(None)), "world_size": int, "data_world_size": int,
          "epoch_loss": torch.Tensor, "step_losses": torch.Tensor}


def capture_rng() -> Dict[str, Any]:
    """Every random generator training touches (torch CPU and CUDA, Python, numpy) as tensors and
    plain values."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else None,
        "python": {"version": int(version), "state": [int(x) for x in internal], "gauss_next": gauss_next},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
    }


def restore_rng(rng: Mapping[str, Any]) -> None:
    """The inverse of :func:`capture_rng`; entries that are None or absent are left as they are."""
    if rng.get("torch") is not None:
        torch.set_rng_state(rng["torch"].cpu())
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.cpu() for state in rng["cuda"]])
    python = rng.get("python")
    if python is not None:
        random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
    state = rng.get("numpy")
    if state is not None:
        keys = state["keys"].cpu().numpy().astype(np.uint32)
        np.random.set_state((state["kind"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"]))


def is_training_state(obj: Any) -> bool:
    """Whether a loaded checkpoint is a training checkpoint (resumable), not bare weights."""
    return isinstance(obj, Mapping) and all(key in obj for key in TRAINING_KEYS)


def check_training_state(state: Any, path: str) -> Dict[str, Any]:
    """``state`` itself when it is a training checkpoint with the types the trainer reads;
    :class:`CheckpointError` naming ``path`` otherwise."""
    if not is_training_state(state):
        found = sorted(map(str, state)) if isinstance(state, Mapping) else type(state).__name__
        raise CheckpointError(f"checkpoint {path}: not a training checkpoint (expected keys {list(TRAINING_KEYS)}, "
                              f"found {found})")
    wrong = [key for key, types in _TYPES.items() if key in state and not isinstance(state[key], types)]
    if wrong:
        raise CheckpointError(f"checkpoint {path}: malformed training checkpoint ({', '.join(wrong)} of the wrong "
                              f"type: {', '.join(type(state[key]).__name__ for key in wrong)})")
    return state


def load_training_state(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """A training checkpoint, loaded safely (:func:`~gfmrag_fast.checkpoints.load_checkpoint_file`);
    :class:`CheckpointError` naming ``path`` when it is unsafe, unreadable or not a training checkpoint."""
    return check_training_state(load_checkpoint_file(path, map_location), path)
