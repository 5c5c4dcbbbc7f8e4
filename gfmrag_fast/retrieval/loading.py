"""Loading a trained retriever: its weights from any form of checkpoint, and its text model.

Checkpoint files are read only through :mod:`gfmrag_fast.checkpoints`
(``torch.load(weights_only=True)``). The text model comes from the checkpoint's
``text_emb_model_config``, which a downloaded checkpoint controls: it can never switch on
``trust_remote_code`` (the key is dropped, at the top level and inside ``model_kwargs``); only
the caller's own argument can.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any, Dict, Optional, Tuple

from torch import nn

from ..checkpoints import (
    CONFIG_NAME, CheckpointError, build_model, load_checkpoint_file, load_pretrained, looks_like_local_path,
)
from ..text_emb import TextEmbModel

__all__ = ["load_checkpoint", "text_model_from_config"]

log = logging.getLogger(__name__)

PRETRAINED_FOLDER = "pretrained"
RUN_CHECKPOINTS = ("model_best.pth", "model_last.pth")
_TEXT_KEYS = ("text_emb_model_name", "normalize", "batch_size", "query_instruct", "passage_instruct", "model_kwargs")


def load_checkpoint(spec: str, map_location: Any = "cpu") -> Tuple[nn.Module, Optional[Dict[str, Any]]]:
    """``(model in eval mode, text_emb_model config or None)`` from what ``train.checkpoint`` takes:

    * a GFM-RAG pre-trained folder (``config.json`` + ``model.pth``) or Hugging Face repo id;
    * a fine-tune run folder: its ``pretrained/`` when there is one, else its ``model_best.pth``
      (then ``model_last.pth``) with the model and text model of the run's ``.hydra/config.yaml``;
    * a training checkpoint file of a run folder (``.../model_best.pth``), likewise.
    """
    path = os.path.expanduser(str(spec))
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, CONFIG_NAME)):
            return _pretrained(path, map_location)
        if os.path.isfile(os.path.join(path, PRETRAINED_FOLDER, CONFIG_NAME)):
            return _pretrained(os.path.join(path, PRETRAINED_FOLDER), map_location)
        for name in RUN_CHECKPOINTS:
            if os.path.isfile(os.path.join(path, name)):
                return _run_checkpoint(os.path.join(path, name), map_location)
        raise FileNotFoundError(f"{path}: neither a pre-trained folder ({CONFIG_NAME}) nor a run folder "
                                f"({PRETRAINED_FOLDER}/ or {' / '.join(RUN_CHECKPOINTS)})")
    if os.path.isfile(path):
        return _run_checkpoint(path, map_location)
    if looks_like_local_path(path):
        raise FileNotFoundError(f"checkpoint {path!r}: not found (no such file or folder)")
    return _pretrained(str(spec), map_location)  # a Hugging Face repo id


def _pretrained(spec: str, map_location: Any) -> Tuple[nn.Module, Optional[Dict[str, Any]]]:
    model, config = load_pretrained(spec, map_location=map_location)
    text = config.get("text_emb_model_config")
    return model, (dict(text) if isinstance(text, Mapping) else None)


def _run_checkpoint(path: str, map_location: Any) -> Tuple[nn.Module, Optional[Dict[str, Any]]]:
    """A training checkpoint; the model is rebuilt from the run's saved Hydra config."""
    from omegaconf import OmegaConf

    run_config = os.path.join(os.path.dirname(os.path.abspath(path)), ".hydra", "config.yaml")
    if not os.path.isfile(run_config):
        raise FileNotFoundError(f"checkpoint {path}: a training checkpoint needs its run's {run_config} to "
                                "rebuild the model; give the run's pretrained/ folder instead")
    cfg = OmegaConf.to_container(OmegaConf.load(run_config), resolve=False)
    state = load_checkpoint_file(path, map_location)
    weights = state.get("model") if isinstance(state, Mapping) else None
    if not isinstance(weights, Mapping) or "rel_mlp.weight" not in weights:
        raise CheckpointError(f"checkpoint {path}: no retriever state dict under 'model'")
    model_cfg = dict(cfg.get("model") or {})
    model_cfg["rel_emb_dim"] = model_cfg.get("rel_emb_dim") or int(weights["rel_mlp.weight"].shape[1])
    model = build_model(model_cfg)
    model.load_state_dict(weights, strict=True)
    text = cfg.get("text_emb_model")
    return model.to(map_location).eval(), (dict(text) if isinstance(text, Mapping) else None)


def text_model_from_config(
    config: Optional[Mapping[str, Any]], trust_remote_code: bool = False, device: Any = None
) -> TextEmbModel:
    """The :class:`TextEmbModel` a checkpoint was trained with.

    ``config`` is its ``text_emb_model_config`` (None: the default model). ``trust_remote_code``
    and any other unknown key in it are dropped with a warning, also inside ``model_kwargs``:
    only this function's ``trust_remote_code`` argument, the caller's decision, enables it.
    """
    config = dict(config or {})
    if config.pop("trust_remote_code", None):
        log.warning("the checkpoint's text model config asks for trust_remote_code: ignored (pass "
                    "trust_remote_code=True yourself if you trust %s)", config.get("text_emb_model_name"))
    kwargs = config.get("model_kwargs")
    if isinstance(kwargs, Mapping) and "trust_remote_code" in kwargs:
        log.warning("the checkpoint's text model config sets model_kwargs.trust_remote_code: ignored")
        config["model_kwargs"] = {k: v for k, v in kwargs.items() if k != "trust_remote_code"} or None
    unknown = sorted(set(config) - set(_TEXT_KEYS) - {"_target_"})
    if unknown:
        log.warning("the checkpoint's text model config has unknown keys %s: ignored", unknown)
    kept = {k: config[k] for k in ("_target_", *_TEXT_KEYS) if k in config}
    return TextEmbModel.from_config({**kept, "trust_remote_code": bool(trust_remote_code)}, device=device)
