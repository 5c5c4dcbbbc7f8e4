"""Atomic writes, used by every part that writes files (stage-2 caches, checkpoints, metrics):
a file is either its old version or its complete new one, never half-written."""

import json
import os
import tempfile
from typing import Any, Dict

import torch


def atomic_write(path: str, write) -> None:
    """Calls ``write(binary file)`` on a temporary file beside ``path``, then renames it over
    ``path``; on any error the temporary file goes and ``path`` is untouched."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a written file should be readable as usual
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj: Any, path: str) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_json(obj: Any, path: str, **dumps_kwargs: Any) -> None:
    dumps_kwargs.setdefault("indent", 2)
    atomic_write(path, lambda f: f.write(json.dumps(obj, **dumps_kwargs).encode("utf-8")))


def append_jsonl(row: Dict[str, Any], path: str) -> None:
    """Appends one JSON object as a line, rewriting the file atomically."""
    old = open(path, "rb").read() if os.path.exists(path) else b""
    atomic_write(path, lambda f: f.write(old + (json.dumps(row) + "\n").encode()))


def atomic_jsonl(rows, path: str) -> None:
    """Writes the rows as JSON lines, replacing the file atomically."""
    atomic_write(path, lambda f: f.write("".join(json.dumps(row) + "\n" for row in rows).encode()))


def read_jsonl(path: str):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
