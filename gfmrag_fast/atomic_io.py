"""Atomic writes, used by every part that writes files (stage-2 caches, checkpoints, metrics):
a file is either its old version or its complete new one, never half-written.

A write goes to ``.tmp-<pid>-<random><name>`` beside the file, is flushed to disk, and is renamed
over the file; the folder is then synced, so the rename itself survives a crash and two files
written one after the other reach the disk in that order. A process killed mid-write leaves its
temporary behind: :func:`remove_stale_temporaries` clears those of processes no longer alive.
"""

import json
import logging
import os
import re
import tempfile
import time
from typing import Any, Dict, List

import torch

log = logging.getLogger(__name__)

TEMP_PREFIX = ".tmp-"
_TEMP_PID = re.compile(r"^\.tmp-(\d+)-")


def atomic_write(path: str, write) -> None:
    """Calls ``write(binary file)`` on a temporary file beside ``path``, then renames it over
    ``path``; on any error the temporary file goes and ``path`` is untouched."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=os.path.basename(path), dir=folder)
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
    _fsync_folder(folder)


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible everywhere (Windows); the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def remove_stale_temporaries(folder: str, max_age_s: float = 24 * 3600) -> List[str]:
    """Deletes the temporary files (``.tmp-*``, not folders) that killed writers left in
    ``folder``: those of a process that no longer runs on this machine, of this very process (none
    of its writes is in flight when it calls this), without a process id, or older than
    ``max_age_s`` (a writer on another machine sharing the folder). Returns their paths."""
    removed = []
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return removed
    now = time.time()
    for name in names:
        path = os.path.join(folder, name)
        if not name.startswith(TEMP_PREFIX) or not os.path.isfile(path) or os.path.islink(path):
            continue
        match = _TEMP_PID.match(name)
        pid = int(match.group(1)) if match else None
        try:
            stale = (pid is None or pid == os.getpid() or not _process_alive(pid)
                     or now - os.path.getmtime(path) > max_age_s)
            if stale:
                os.unlink(path)
                removed.append(path)
        except FileNotFoundError:  # its writer finished (renamed it) meanwhile
            continue
    if removed:
        log.info("removed %d temporary file(s) left by interrupted writes in %s", len(removed), folder)
    return removed


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
