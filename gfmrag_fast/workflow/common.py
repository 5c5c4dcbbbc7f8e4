"""What both workflows do the same way: process setup, datasets, optimizer, initial weights."""

from __future__ import annotations

import functools
import logging
import os
import random
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from .. import targets
from ..data import KGDataset, LazyDataset, QADataset, resolve_text_emb_model
from ..checkpoints import (
    CheckpointError, build_model, load_checkpoint_file, load_pretrained, looks_like_local_path,
)
from ..training import DistEnv, Trainer, TrainOptions, init_distributed
from ..training.distributed import log_on_main_only
from ..training.state import check_training_state, is_training_state
from .startup import datasets_root, log_overrides

log = logging.getLogger("gfmrag_fast")

TEXT_EMB_TARGET = "gfmrag.text_emb_models.BaseTextEmbModel"


def setup(cfg: DictConfig) -> tuple[DistEnv, str]:
    """Distributed environment (torchrun or single process), seeds, and the run folder."""
    from hydra.core.hydra_config import HydraConfig

    env = init_distributed(str(cfg.train.get("device", "auto")), float(cfg.get("timeout", 60)))
    # Data-parallel ranks draw different random numbers; graph-partitioned ranks run one replica,
    # so they must draw the same ones (the pre-training negatives).
    seed = int(cfg.get("seed", 1024)) + (0 if graph_partition(cfg) != "none" else env.rank)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if env.device.type == "cuda" and cfg.train.get("tf32", True):
        # Documented default (train.tf32): TF32 matmuls for float32 training.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    output_dir = HydraConfig.get().runtime.output_dir
    log_on_main_only(env)
    log.info("run folder %s; %d process(es) on %s", output_dir, env.world_size, env.device)
    if env.is_main:
        log_overrides(cfg)
    return env, output_dir


def graph_partition(cfg: DictConfig) -> str:
    """``train.graph_partition``: none (null too), contiguous or metis."""
    value = cfg.train.get("graph_partition")
    return "none" if value is None else str(value)


def text_emb_config(cfg: DictConfig) -> Dict[str, Any]:
    conf = OmegaConf.to_container(cfg.text_emb_model, resolve=True)
    conf.setdefault("_target_", TEXT_EMB_TARGET)
    return conf


def dataset_loader(cfg: DictConfig, kind: str) -> Callable[[str], Any]:
    """name -> the dataset of that name under ``datasets.root`` ("qa" or "kg"), its stage-2 cache
    built when missing; one text model serves them all (loaded only to build a cache)."""
    text_model = resolve_text_emb_model({k: v for k, v in text_emb_config(cfg).items() if k != "_target_"})
    options = OmegaConf.to_container(cfg.datasets.get("cfgs") or {}, resolve=True)
    cls = {"qa": QADataset, "kg": KGDataset}[kind]
    return lambda name: cls(cfg.datasets.root, name, text_emb_model=text_model, **options)


def scan_datasets(cfg: DictConfig, kind: str, env: DistEnv,
                  describe: Callable[..., Dict[str, Any]]) -> Tuple[List[LazyDataset], List[LazyDataset]]:
    """``datasets.train_names`` and ``datasets.valid_names`` as :class:`LazyDataset` lists, each
    loaded again only while resident in the task.

    Rank 0 builds (or loads and verifies) the stage-2 cache of each dataset in turn and describes
    it (``describe(ds, train=...)``: its sizes, raising for a dataset that cannot be used), holding
    one dataset at a time; the other ranks receive the descriptions, so they never build a cache."""
    if not cfg.datasets.train_names:
        verb = "fine-tune" if kind == "qa" else "pre-train"
        raise ValueError(f"datasets.train_names is empty: nothing to {verb} on")
    training = set(cfg.datasets.train_names)
    names = list(dict.fromkeys([*cfg.datasets.train_names, *cfg.datasets.valid_names]))
    datasets_root(cfg, names)
    load = dataset_loader(cfg, kind)
    infos = [describe(load(name), train=name in training) for name in names] if env.is_main else None
    infos = env.gather_objects(infos)[0]
    datasets = {name: LazyDataset(name, functools.partial(load, name), info) for name, info in zip(names, infos)}
    return ([datasets[name] for name in cfg.datasets.train_names],
            [datasets[name] for name in cfg.datasets.valid_names])


def dataset_options(cfg: DictConfig) -> Dict[str, Any]:
    """The tasks' ``max_datasets_in_memory`` and ``data_loading_workers`` (``datasets.*``)."""
    return {"max_datasets_in_memory": cfg.datasets.get("max_datasets_in_memory"),
            "data_loading_workers": int(cfg.datasets.get("data_loading_workers") or 0)}


def build_model_from_config(cfg: DictConfig, text_dim: int) -> torch.nn.Module:
    """``cfg.model`` (GFM-RAG's ``_target_`` form); ``rel_emb_dim`` null means the datasets'
    text embedding size, and ``train.grad_checkpointing`` reaches the entity model."""
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg["rel_emb_dim"] = model_cfg.get("rel_emb_dim") or text_dim
    model_cfg["entity_model"]["checkpoint_layers"] = bool(cfg.train.grad_checkpointing)
    return build_model(model_cfg)


def train_options(cfg: DictConfig, evaluate: bool, **overrides: Any) -> TrainOptions:
    """The trainer's options from ``train.*`` and ``task.best_metric``."""
    return TrainOptions(
        num_epoch=cfg.train.num_epoch, batch_per_epoch=cfg.train.batch_per_epoch,
        log_interval=cfg.train.log_interval, do_eval=bool(cfg.train.do_eval) and evaluate,
        save_best_only=cfg.train.save_best_only, save_pretrained=cfg.train.save_pretrained,
        metric=cfg.task.best_metric, dtype=cfg.train.dtype, compile=bool(cfg.train.get("compile", False)),
        save_interval=cfg.train.get("save_interval"), graph_partition=graph_partition(cfg), **overrides,
    )


def build_optimizer(spec: DictConfig, params) -> torch.optim.Optimizer:
    """``optimizer``: ``_target_`` (default torch.optim.AdamW) and its keyword arguments."""
    spec = {"_target_": "torch.optim.AdamW", **OmegaConf.to_container(spec, resolve=True)}
    return targets.instantiate(spec, "optimizer", params)


def apply_checkpoint(trainer: Trainer, spec: str | None, env: DistEnv) -> None:
    """``train.checkpoint``: a training checkpoint (.pth with an optimizer: resume model,
    optimizer, epoch and RNG state), a GFM-RAG pre-trained folder, or a Hugging Face repo id
    (load the weights, strictly). Files are loaded with ``weights_only=True``: one holding
    anything but tensors and plain values is refused (CheckpointError naming it), never run; a
    local-looking path that does not exist is FileNotFoundError, not a Hub lookup."""
    if not spec:
        return
    spec = os.path.expanduser(str(spec))
    if os.path.isfile(spec):
        state = load_checkpoint_file(spec, map_location=env.device)
        if is_training_state(state):
            trainer.resume(check_training_state(state, spec), source=spec)
            return
        if not isinstance(state, Mapping):
            raise CheckpointError(f"checkpoint {spec}: expected a state dict, got {type(state).__name__}")
        weights = state["model"] if "model" in state else state
    elif not os.path.isdir(spec) and looks_like_local_path(spec):
        raise FileNotFoundError(f"train.checkpoint={spec!r}: not found (no such file or folder)")
    else:
        pretrained, _ = load_pretrained(spec)
        weights = pretrained.state_dict()
    try:
        missing, unexpected = trainer.raw_model.load_state_dict(weights, strict=False)
        # A KG-completion model (QueryGNN) has everything a retriever needs but its question_mlp:
        # GFM-RAG's recipe fine-tunes from it, the question encoder starting fresh.
        if unexpected or any(not key.startswith("question_mlp.") for key in missing):
            raise RuntimeError(f"missing keys {missing}, unexpected keys {unexpected}")
    except RuntimeError as exc:
        raise ValueError(
            f"train.checkpoint={spec!r} does not fit the configured model (check model.* and the text "
            f"embedding size): {exc}"
        ) from exc
    if missing:
        log.info("initialised the model from %s (new: %s)", spec, ", ".join(missing))
    else:
        log.info("initialised the model from %s", spec)
