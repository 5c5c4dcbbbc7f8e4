"""Checkpoints in GFM-RAG's format: a folder (or Hugging Face repo) with ``config.json`` and ``model.pth``.

``config.json``::

    {"text_emb_model_config": {...},
     "model_config": {"_target_": "gfmrag.models.GNNRetriever",
                      "entity_model": {"_target_": "gfmrag.ultra.models.QueryNBFNet", "input_dim": 512,
                                       "hidden_dims": [512, ...], "message_func": "distmult",
                                       "aggregate_func": "sum", "short_cut": true, "layer_norm": true},
                      "rel_emb_dim": 768}}

``model.pth`` = ``torch.save({"model": state_dict})``. Targets are resolved by class name: any
``gfmrag.…`` or ``gfmrag_fast.…`` path ending in one of :data:`MODEL_CLASSES` (GFM-RAG 1.x wrote
``gfmrag.models.GNNRetriever`` / ``gfmrag.ultra.models.QueryNBFNet``; later versions moved the
modules, the class names stayed). Other keys starting with ``_`` (Hydra's ``_recursive_``,
``_convert_``) are ignored.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, Tuple

import torch
from torch import nn

from ..atomic_io import atomic_json, atomic_torch_save
from .entity import EntityNBFNet, QueryNBFNet
from .retriever import GNNRetriever, QueryGNN

MODEL_CLASSES = {cls.__name__: cls for cls in (GNNRetriever, QueryGNN, QueryNBFNet, EntityNBFNet)}

# What save_pretrained writes: the original's names, so GFM-RAG's own code can load the folder.
ORIGINAL_TARGETS = {
    GNNRetriever: "gfmrag.models.GNNRetriever",
    QueryGNN: "gfmrag.models.QueryGNN",
    QueryNBFNet: "gfmrag.ultra.models.QueryNBFNet",
    EntityNBFNet: "gfmrag.ultra.models.EntityNBFNet",
}

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.pth"
_TRUE = {"1", "ON", "YES", "TRUE"}


def resolve_target(target: str) -> type:
    """The class for a config ``_target_``; ValueError naming the known ones otherwise."""
    namespace, _, name = str(target).rpartition(".")
    if namespace.split(".")[0] in ("gfmrag", "gfmrag_fast") and name in MODEL_CLASSES:
        return MODEL_CLASSES[name]
    known = sorted(ORIGINAL_TARGETS.values()) + [f"gfmrag_fast.models.{n}" for n in sorted(MODEL_CLASSES)]
    raise ValueError(
        f"unknown model _target_ {target!r}: known targets are {known} "
        f"(any gfmrag.* or gfmrag_fast.* path ending in {sorted(MODEL_CLASSES)})"
    )


def build_model(config: Mapping[str, Any]) -> nn.Module:
    """Instantiates a ``model_config`` mapping (nested ``_target_`` mappings first)."""
    if "_target_" not in config:
        raise ValueError(f"model config has no _target_: {dict(config)}")
    cls = resolve_target(config["_target_"])
    kwargs = {}
    for key, value in config.items():
        if key.startswith("_"):
            continue
        kwargs[key] = build_model(value) if isinstance(value, Mapping) and "_target_" in value else value
    return cls(**kwargs)


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
        f"save_pretrained: cannot describe a {type(model).__name__}; expected one of {sorted(MODEL_CLASSES)}"
    )


def load_pretrained(path_or_repo_id: str, map_location="cpu", revision=None) -> Tuple[nn.Module, Dict[str, Any]]:
    """Loads a GFM-RAG checkpoint folder or Hugging Face repo; returns ``(model, config)``.

    ``path_or_repo_id``: an existing local folder, else a Hub repo id (e.g. ``rmanluo/GFM-RAG-8M``)
    fetched with ``huggingface_hub.snapshot_download``. ``HF_HUB_OFFLINE`` (cache only, no network),
    ``HF_HUB_CACHE`` and ``HF_HOME`` are read when this is called, not when huggingface_hub was
    imported. The state dict is loaded strictly (``weights_only=True``); ``config`` is the parsed
    ``config.json``; the model is in eval mode on ``map_location``.
    """
    folder = str(path_or_repo_id)
    if not os.path.isdir(folder):
        folder = _download(folder, revision)
    with open(os.path.join(folder, CONFIG_NAME), encoding="utf-8") as f:
        config = json.load(f)
    if "model_config" not in config:
        raise ValueError(f"{os.path.join(folder, CONFIG_NAME)} has no 'model_config'")
    model = build_model(config["model_config"])
    state = torch.load(os.path.join(folder, WEIGHTS_NAME), map_location=map_location, weights_only=True)
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
    return snapshot_download(
        repo_id, revision=revision, cache_dir=cache_dir or None, local_files_only=offline,
        allow_patterns=[CONFIG_NAME, WEIGHTS_NAME],
    )
