"""The stage-2 cache: fingerprints and all-or-nothing writes.

A stage-2 folder is ``<root>/<data_name>/processed/stage2/<fingerprint>/``. The fingerprint
hashes everything the output depends on — the text model's settings, the bytes of every input
file, the processing options and :data:`PROCESSING_VERSION` — so an edited ``kg.txt`` or another
embedding model can never be served a stale cache, and unchanged inputs always are.

A build writes into a hidden staging folder beside the target and renames it into place when
it is complete, so a crash or Ctrl-C leaves either the old cache or none, never half of one
(leftover ``.tmp-*`` folders are from interrupted builds and safe to delete).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ..atomic_io import atomic_json, atomic_torch_save

__all__ = ["PROCESSING_VERSION", "file_digest", "fingerprint", "staged_dir", "save_json", "load_json", "is_complete"]

# Bump when the stage-2 output for the same inputs changes (numbering, file layout, ...).
PROCESSING_VERSION = 1
META_FILE = "meta.json"
_FINGERPRINT_CHARS = 16
_CHUNK = 1 << 20


def file_digest(path: str | os.PathLike) -> dict[str, Any]:
    """{"size", "sha256"} of a file's bytes."""
    sha = hashlib.sha256()
    with open(path, "rb") as fin:
        for chunk in iter(lambda: fin.read(_CHUNK), b""):
            sha.update(chunk)
    return {"size": os.path.getsize(path), "sha256": sha.hexdigest()}


def fingerprint(
    kind: str, text_emb_config: Mapping[str, Any], inputs: Mapping[str, Any], options: Mapping[str, Any]
) -> str:
    """Short hex hash naming a stage-2 folder.

    Args:
        kind: "kg" or "qa" (different outputs from the same files).
        text_emb_config: the text model's ``config_dict()``. ``batch_size`` is left out, as
            GFM-RAG does: it changes speed, not the vectors.
        inputs: file name → :func:`file_digest` (or ``None`` for an optional file that is absent).
        options: processing options that change the output.
    """
    emb = {k: v for k, v in text_emb_config.items() if k != "batch_size"}
    blob = json.dumps(
        {"version": PROCESSING_VERSION, "kind": kind, "text_emb_model": emb, "inputs": inputs, "options": options},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:_FINGERPRINT_CHARS]


def is_complete(folder: str | os.PathLike, expected_fingerprint: str) -> bool:
    """True when ``folder`` holds a finished build with this fingerprint and processing version."""
    meta_path = os.path.join(folder, META_FILE)
    if not os.path.isfile(meta_path):
        return False
    try:
        meta = load_json(meta_path)
    except (OSError, ValueError):
        return False
    return meta.get("fingerprint") == expected_fingerprint and meta.get("version") == PROCESSING_VERSION


@contextlib.contextmanager
def staged_dir(final: str | os.PathLike) -> Iterator[str]:
    """Yield an empty staging folder; on success it atomically becomes ``final``.

    On an exception the staging folder is removed and ``final`` is untouched. An existing
    ``final`` (a forced rebuild) is swapped out only after the new one is complete.
    """
    final = os.fspath(final)
    parent, name = os.path.split(final)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(final):
        # rename() cannot replace a non-empty folder: move the old one aside first.
        old = f"{tmp}-old"
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except OSError:
        # Another process (another rank of the same run) finished the same build first; its
        # result is identical by construction of the fingerprint.
        if not os.path.isdir(final):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_json(obj, path, ensure_ascii=False, indent=None)


def save_tensors(path: str | os.PathLike, obj: Any) -> None:
    atomic_torch_save(obj, path)


def load_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as fin:
        return json.load(fin)


def load_tensors(path: str | os.PathLike) -> Any:
    # weights_only: a cache folder is data, and must never run code when loaded.
    return torch.load(path, map_location="cpu", weights_only=True)
