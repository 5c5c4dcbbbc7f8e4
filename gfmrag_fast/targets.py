"""Config ``_target_`` names, GFM-RAG's and this package's, resolved in one place; and building
objects from configs the way ``hydra.utils.instantiate`` does.

GFM-RAG's configs and released checkpoints name their classes by GFM-RAG's module paths
(``gfmrag.models.GNNRetriever``, ``gfmrag.ultra.models.QueryNBFNet``, ``gfmrag.losses.BCELoss``,
``gfmrag.doc_rankers.IDFWeightedTopKRanker``, ``gfmrag.text_emb_models.BaseTextEmbModel``).
GFM-RAG moved modules between versions while the class names stayed, so for the kinds below a
target resolves by its last component when it is a bare name or lies in the ``gfmrag`` or
``gfmrag_fast`` namespace: ``gfmrag.models.gfm_rag_v1.GNNRetriever`` is ``GNNRetriever`` too.

Only the listed objects can be built for the kinds ``model``, ``loss``, ``doc_ranker`` and
``text_emb_model``: a checkpoint's ``config.json`` may come from anywhere, and naming a module
must not make this package import or call it. Only ``optimizer`` targets are imported by their
dotted path (any ``torch.optim`` class or the user's own), as Hydra does for the user's config.

Nothing here imports torch or the models until a target is resolved.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["KINDS", "resolve", "instantiate", "gfmrag_target", "known_targets"]

# kind -> {name: (the object here, GFM-RAG's _target_ for it or None when GFM-RAG has none)}
KINDS: Dict[str, Dict[str, Tuple[str, Optional[str]]]] = {
    "model": {
        "GNNRetriever": ("gfmrag_fast.models.retriever.GNNRetriever", "gfmrag.models.GNNRetriever"),
        "QueryGNN": ("gfmrag_fast.models.retriever.QueryGNN", "gfmrag.models.QueryGNN"),
        "QueryNBFNet": ("gfmrag_fast.models.entity.QueryNBFNet", "gfmrag.ultra.models.QueryNBFNet"),
        "EntityNBFNet": ("gfmrag_fast.models.entity.EntityNBFNet", "gfmrag.ultra.models.EntityNBFNet"),
    },
    "loss": {
        "BCELoss": ("gfmrag_fast.losses.adversarial_bce", "gfmrag.losses.BCELoss"),
        "ListCELoss": ("gfmrag_fast.losses.list_ce", "gfmrag.losses.ListCELoss"),
        "adversarial_bce": ("gfmrag_fast.losses.adversarial_bce", None),
        "list_ce": ("gfmrag_fast.losses.list_ce", None),
    },
    "doc_ranker": {
        "SimpleRanker": ("gfmrag_fast.doc_rankers.SimpleRanker", "gfmrag.doc_rankers.SimpleRanker"),
        "IDFWeightedRanker": ("gfmrag_fast.doc_rankers.IDFWeightedRanker",
                              "gfmrag.doc_rankers.IDFWeightedRanker"),
        "IDFRanker": ("gfmrag_fast.doc_rankers.IDFWeightedRanker", None),
        "TopKRanker": ("gfmrag_fast.doc_rankers.TopKRanker", "gfmrag.doc_rankers.TopKRanker"),
        "IDFWeightedTopKRanker": ("gfmrag_fast.doc_rankers.IDFWeightedTopKRanker",
                                  "gfmrag.doc_rankers.IDFWeightedTopKRanker"),
        "HybridRanker": ("gfmrag_fast.doc_rankers.HybridRanker", None),
    },
    "text_emb_model": {
        "BaseTextEmbModel": ("gfmrag_fast.text_emb.TextEmbModel", "gfmrag.text_emb_models.BaseTextEmbModel"),
        "TextEmbModel": ("gfmrag_fast.text_emb.TextEmbModel", None),
    },
}
# Kinds whose targets are imported by dotted path; a bare name is looked up in the module given.
IMPORTED_KINDS = {"optimizer": "torch.optim"}
_NAMESPACES = ("gfmrag", "gfmrag_fast")


def _load(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def known_targets(kind: str) -> List[str]:
    """Every name a ``kind`` target may be given as: GFM-RAG's, then this package's."""
    table = _table(kind)
    ours = {path for path, _ in table.values()}
    return sorted({t for _, t in table.values() if t}) + sorted(ours)


def _table(kind: str) -> Dict[str, Tuple[str, Optional[str]]]:
    if kind not in KINDS:
        raise ValueError(f"unknown target kind {kind!r}; known: {sorted(KINDS) + sorted(IMPORTED_KINDS)}")
    return KINDS[kind]


def resolve(target: Any, kind: str) -> Any:
    """The class or function a ``_target_`` of ``kind`` names; ValueError naming the known ones
    (or, for an imported kind, why the import failed)."""
    target = str(target)
    if kind in IMPORTED_KINDS:
        path = target if "." in target else f"{IMPORTED_KINDS[kind]}.{target}"
        try:
            return _load(path)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ValueError(f"{kind} _target_ {target!r} cannot be imported: {exc}") from None
    table = _table(kind)
    namespace, _, name = target.rpartition(".")
    if (not namespace or namespace.split(".")[0] in _NAMESPACES) and name in table:
        return _load(table[name][0])
    for path, _ in table.values():  # this package's own full paths, e.g. gfmrag_fast.models.retriever.X
        if target == path:
            return _load(path)
    raise ValueError(
        f"unknown {kind} _target_ {target!r}: known targets are {known_targets(kind)} "
        f"(or any gfmrag.* or gfmrag_fast.* path ending in one of {sorted(table)})"
    )


def gfmrag_target(kind: str, obj: Any) -> str:
    """GFM-RAG's ``_target_`` for ``obj`` (a class of ``kind``): what configs written here say, so
    that GFM-RAG's own code can read them."""
    for path, original in _table(kind).values():
        if original and _load(path) is obj:
            return original
    raise ValueError(f"{getattr(obj, '__name__', obj)!r} has no GFM-RAG {kind} _target_")


def instantiate(config: Mapping, kind: str, *args: Any, **kwargs: Any) -> Any:
    """Builds ``config`` as ``hydra.utils.instantiate`` would, with targets resolved by :func:`resolve`.

    ``config``: a mapping with ``_target_``; its other keys are keyword arguments, overridden by
    ``kwargs``; ``args`` come first among the positional arguments, then ``_args_``; other keys
    starting with ``_`` are Hydra's instructions, never arguments. Nested
    mappings (also inside lists) that have a ``_target_`` are built first, as the same kind,
    unless ``_recursive_`` is false. ``_partial_: true`` returns ``functools.partial`` of the
    target instead of calling it. ``_convert_`` is accepted and ignored (values are plain here).
    """
    if not isinstance(config, Mapping) or "_target_" not in config:
        raise ValueError(f"{kind} config has no _target_: {config!r}")
    target = resolve(config["_target_"], kind)
    recursive = bool(config.get("_recursive_", True))

    def build(value: Any) -> Any:
        if not recursive:
            return value
        if isinstance(value, Mapping) and "_target_" in value:
            return instantiate(value, kind)
        if isinstance(value, (list, tuple)):
            return type(value)(build(v) for v in value)
        return value

    # Underscore keys besides Hydra's (none are written by GFM-RAG) are not arguments either.
    options = {key: build(value) for key, value in config.items() if not str(key).startswith("_")}
    positional = [*args, *(build(v) for v in config.get("_args_") or ())]
    options.update(kwargs)
    if config.get("_partial_", False):
        return functools.partial(target, *positional, **options)
    return target(*positional, **options)
