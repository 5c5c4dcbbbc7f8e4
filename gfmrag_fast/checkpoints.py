"""Checkpoints in GFM-RAG's format: a folder (or Hugging Face repo) with ``config.json`` and ``model.pth``.

``config.json``::

    {"text_emb_model_config": {...},
     "model_config": {"_target_": "gfmrag.models.GNNRetriever",
                      "entity_model": {"_target_": "gfmrag.ultra.models.QueryNBFNet", "input_dim": 512,
                                       "hidden_dims": [512, ...], "message_func": "distmult",
                                       "aggregate_func": "sum", "short_cut": true, "layer_norm": true},
                      "rel_emb_dim": 768}}

``model.pth`` = ``torch.save({"model": state_dict})``. Targets are resolved by
:mod:`gfmrag_fast.targets` (kind ``model``): any ``gfmrag.…`` or ``gfmrag_fast.…`` path ending in
one of the four model class names (GFM-RAG 1.x wrote ``gfmrag.models.GNNRetriever`` /
``gfmrag.ultra.models.QueryNBFNet``; later versions moved the modules, the class names stayed).
Other keys starting with ``_`` (Hydra's ``_recursive_``, ``_convert_``) are not arguments.

Every checkpoint file is read by :func:`load_checkpoint_file`: ``torch.load(weights_only=True)``,
so a file can hold tensors and plain Python values only and loading it never runs code; a file
that holds anything else, or is truncated or corrupt, raises :class:`CheckpointError` naming it.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from typing import Any, Dict, Mapping, Tuple

import torch
from torch import nn

from . import targets
from .atomic_io import atomic_json, atomic_torch_save
from .models.entity import EntityNBFNet, QueryNBFNet
from .models.retriever import GNNRetriever, QueryGNN

# What save_pretrained writes: the original's names, so GFM-RAG's own code can load the folder.
ORIGINAL_TARGETS = {cls: targets.gfmrag_target("model", cls) for cls in (GNNRetriever, QueryGNN, QueryNBFNet,
                                                                          EntityNBFNet)}

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.pth"
_TRUE = {"1", "ON", "YES", "TRUE"}
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# What torch's weights-only unpickler says when a file asks for a function or class to be called.
_UNSAFE = re.compile(r"GLOBAL|allowlisted|add_safe_globals")
_UNREADABLE = "cannot be read as a PyTorch checkpoint (truncated, corrupt, or not written by torch.save)"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded: it holds objects other than tensors and plain
    Python values (loading those could run code), or it is truncated or corrupt."""


def load_checkpoint_file(path: str, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name ``path``.

    FileNotFoundError when it does not exist; :class:`CheckpointError` when it holds anything but
    tensors and plain values (a pickled object whose loading would call a function) or cannot be
    read at all (truncated, corrupt, not a PyTorch file)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path}: not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n|$)", str(exc).strip())
        reason = found.group(1).split(" Please use")[0].strip() if found else str(exc)
        if not _UNSAFE.search(reason):  # an unknown opcode, a broken stream: not a PyTorch checkpoint
            raise CheckpointError(f"checkpoint {path}: {_UNREADABLE}: {reason}") from None
        # Torch's message suggests weights_only=False; that is exactly what must not happen here.
        raise CheckpointError(
            f"checkpoint {path}: refused: it holds objects other than tensors and plain Python values, "
            f"and loading them could run code ({reason}). Checkpoints written by gfmrag_fast and GFM-RAG "
            f"hold none (training checkpoints of earlier gfmrag_fast versions, with numpy RNG state, did)."
        ) from None
    except (OSError, EOFError, RuntimeError, KeyError, ValueError, IndexError, TypeError, MemoryError) as exc:
        raise CheckpointError(f"checkpoint {path}: {_UNREADABLE}: {type(exc).__name__}: {exc}") from exc


def looks_like_local_path(spec: str) -> bool:
    """Whether ``spec`` is meant as a local file or folder rather than a Hugging Face repo id
    (``name`` or ``namespace/name``): absolute, ``.``/``~``-relative, more than one separator, a
    Windows separator, a checkpoint file suffix, or a parent folder that exists here."""
    spec = str(spec)
    if os.path.isabs(spec) or spec.startswith((".", "~")) or spec.count("/") > 1 or "\\" in spec:
        return True
    if spec.lower().endswith(CHECKPOINT_SUFFIXES + (".json",)):
        return True
    parent = os.path.dirname(spec)
    return bool(parent) and os.path.isdir(parent)


def resolve_target(target: str) -> type:
    """The class for a model config ``_target_``; ValueError naming the known ones otherwise."""
    return targets.resolve(target, "model")


def build_model(config: Mapping[str, Any]) -> nn.Module:
    """Instantiates a ``model_config`` mapping (nested ``_target_`` mappings first)."""
    return targets.instantiate(config, "model")


def model_config(model: nn.Module) -> Dict[str, Any]:
    """The ``model_config`` that rebuilds ``model``, with the original ``_target_`` names."""
    if isinstance(model, QueryGNN):
        return {
            "_target_": ORIGINAL_TARGETS[type(model)],
            "entity_model": model_config(model.entity_model),
            "rel_emb_dim": model.rel_emb_dim,
        }
    if type(model) in ORIGINAL_TARGETS:
        config = dict(model.config)
        if not (config["activation"] is None or isinstance(config["activation"], str)):
            raise ValueError("save_pretrained: activation must be given by name to be saved in config.json")
        return {"_target_": ORIGINAL_TARGETS[type(model)], **config}
    raise ValueError(
        f"save_pretrained: cannot describe a {type(model).__name__}; expected one of "
        f"{sorted(cls.__name__ for cls in ORIGINAL_TARGETS)}"
    )


def load_pretrained(path_or_repo_id: str, map_location="cpu", revision=None) -> Tuple[nn.Module, Dict[str, Any]]:
    """Loads a GFM-RAG checkpoint folder or Hugging Face repo; returns ``(model, config)``.

    ``path_or_repo_id``: an existing local folder, else a Hub repo id (e.g. ``rmanluo/GFM-RAG-8M``)
    fetched with ``huggingface_hub.snapshot_download``; something that looks like a local path
    (:func:`looks_like_local_path`) but is not a folder raises FileNotFoundError instead.
    ``HF_HUB_OFFLINE`` (cache only, no network), ``HF_HUB_CACHE`` and ``HF_HOME`` are read when this
    is called, not when huggingface_hub was imported. The state dict is loaded strictly by
    :func:`load_checkpoint_file`; ``config`` is the parsed ``config.json``; the model is in eval
    mode on ``map_location``.
    """
    folder = os.path.expanduser(str(path_or_repo_id))
    if not os.path.isdir(folder):
        if os.path.exists(folder):
            raise ValueError(f"{folder}: is a file; a pre-trained checkpoint is a folder with {CONFIG_NAME} "
                             f"and {WEIGHTS_NAME}")
        if looks_like_local_path(folder):
            raise FileNotFoundError(f"{folder}: not found (no such checkpoint folder)")
        folder = _download(folder, revision)
    config_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path}: not found ({folder} is not a GFM-RAG checkpoint folder)")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{config_path}: not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or "model_config" not in config:
        raise ValueError(f"{config_path} has no 'model_config'")
    model = build_model(config["model_config"])
    state = load_checkpoint_file(os.path.join(folder, WEIGHTS_NAME), map_location)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"checkpoint {os.path.join(folder, WEIGHTS_NAME)}: expected a state dict, "
                              f"got {type(state).__name__}")
    model.load_state_dict(state["model"] if "model" in state else state, strict=True)
    return model.to(map_location).eval(), config


def save_pretrained(model: nn.Module, text_emb_config: Mapping[str, Any], folder: str) -> None:
    """Writes ``folder/config.json`` and ``folder/model.pth`` in GFM-RAG's format, each atomically
    (written to a temporary file in ``folder``, then ``os.replace``), tensors moved to the CPU."""
    os.makedirs(folder, exist_ok=True)
    config = {"text_emb_model_config": _plain(text_emb_config), "model_config": model_config(model)}
    state = {"model": {key: value.detach().cpu() for key, value in model.state_dict().items()}}
    atomic_json(config, os.path.join(folder, CONFIG_NAME))
    atomic_torch_save(state, os.path.join(folder, WEIGHTS_NAME))


def _plain(config: Mapping[str, Any]) -> Dict[str, Any]:
    if type(config).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(config, resolve=True)
    return dict(config)


def _download(repo_id: str, revision) -> str:
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE
    cache_dir = os.environ.get("HF_HUB_CACHE")
    if not cache_dir and os.environ.get("HF_HOME"):
        cache_dir = os.path.join(os.environ["HF_HOME"], "hub")
    try:
        return snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir or None, local_files_only=offline,
            allow_patterns=[CONFIG_NAME, WEIGHTS_NAME],
        )
    except Exception as exc:
        where = "the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "the Hugging Face Hub"
        raise FileNotFoundError(
            f"{repo_id!r}: no such local folder, and not fetched from {where}: {type(exc).__name__}: {exc}"
        ) from exc
