"""The stage-2 cache: fingerprints, verified files, and publication that is safe under concurrency.

A stage-2 folder is ``<root>/<data_name>/processed/stage2/<fingerprint>/``. The fingerprint
hashes everything the output depends on — the text model's settings, the bytes of every input
file, the processing options and :data:`PROCESSING_VERSION` — so an edited ``kg.txt`` or another
embedding model can never be served a stale cache, and unchanged inputs always are.

What :func:`load_or_build` guarantees, with any number of processes (ranks, jobs) building and
loading the same dataset at once:

* A published folder is complete: a build writes into a staging folder
  ``.tmp-<fingerprint>-<host>-<pid>-<random>`` beside it and becomes the folder by one
  ``rename``. ``meta.json`` records the size and sha256 of every file, and every file is
  verified as it is read, so a truncated or altered file (or a folder without ``meta.json``)
  is detected; it is then rebuilt and replaced, with a warning naming the file (or, where it
  cannot be rebuilt, e.g. a read-only folder, :class:`CacheError` names it).
* A complete folder is never replaced, except by ``force_rebuild`` or because it is damaged.
  Builders of one fingerprint take turns through a lock file ``.lock-<fingerprint>``
  (``flock``: released by the kernel if the holder dies); the one that comes second finds the
  first one's folder and loads it instead of building. Even without working locks (file
  systems without ``flock``), publication is a ``rename`` onto a name that does not exist,
  which fails for the loser: it discards its staging folder and loads the winner's.
* Readers never fail because of a concurrent build. A reader takes no lock: it opens the
  folder once and reads every file through that handle, so it reads one build even if the
  folder is replaced meanwhile. A replacement (``force_rebuild``, damage) renames the old
  folder aside (``.old-...``), renames the new one in, then deletes the old one: a reader
  that was reading the old folder and finds a file gone, or a reader that comes in the
  instant between the two renames and finds no folder, goes on to take the lock, which the
  replacing process holds throughout, and then loads the new folder. So every load returns
  either the old or the new build, in full. (Without working locks such a reader builds the
  dataset itself and publishes or loads as above, trying again a few times if the folder keeps
  being replaced under it: slower, still without failing.)
* Staging and aside folders left by killed builders are removed at the next build in the same
  ``stage2`` folder when they are clearly dead: their fingerprint's lock is free (or held by
  this process), or, where locks do not work, their process is gone from this host. Failing
  both tests (no locks and another host), they are removed once untouched for a day. A live
  builder's folder is otherwise never touched. Lock files stay: deleting one would race with
  the processes waiting on it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch

from ..atomic_io import atomic_json, atomic_torch_save

__all__ = [
    "PROCESSING_VERSION",
    "CacheError",
    "CacheReader",
    "file_digest",
    "fingerprint",
    "load_or_build",
    "save_json",
    "save_tensors",
]

log = logging.getLogger(__name__)

# Bump when the stage-2 output for the same inputs changes (numbering, file layout, ...).
# 2: meta.json records every file's size and sha256; inverse relation names made unique.
# 3: names in the JSON files also match kg.txt's / the corpus's ignoring case, spacing, punctuation.
PROCESSING_VERSION = 3
META_FILE = "meta.json"
STAGING_PREFIX = ".tmp-"
ASIDE_PREFIX = ".old-"
LOCK_PREFIX = ".lock-"
# Leftovers whose liveness cannot be told (another host, no locks) are removed after this long.
STALE_AGE_S = 24 * 3600
_FINGERPRINT_CHARS = 16
_CHUNK = 1 << 20
_HOST = re.sub(r"[^A-Za-z0-9._]", "_", socket.gethostname()) or "host"
_LEFTOVER = re.compile(
    rf"^(?:{re.escape(STAGING_PREFIX)}|{re.escape(ASIDE_PREFIX)})"
    r"(?P<fp>[0-9a-f]+)-(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-[0-9a-f]+$"
)

T = TypeVar("T")


class CacheError(RuntimeError):
    """A stage-2 folder that is incomplete, damaged or from another build; the message names
    the folder or file."""


def file_digest(path: str | os.PathLike) -> dict[str, Any]:
    """{"size", "sha256"} of a file's bytes."""
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as fin:
        for chunk in iter(lambda: fin.read(_CHUNK), b""):
            sha.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": sha.hexdigest()}


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


def save_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_json(obj, path, ensure_ascii=False, indent=None)


def save_tensors(path: str | os.PathLike, obj: Any) -> None:
    atomic_torch_save(obj, path)


# --------------------------------------------------------------------------- reading
class _Absent(Exception):
    """No published folder at all (as opposed to a damaged one)."""


class CacheReader:
    """The files of one published stage-2 folder, each verified against ``meta.json`` on read.

    The folder is opened once (where the OS supports it) and every file is read through that
    handle, so all files come from the same build even if the folder is renamed or replaced
    while they are read. Raises :class:`CacheError` naming the path for a missing or
    unreadable ``meta.json``, another fingerprint or processing version, and (on read) a
    missing file or one whose size or sha256 differs from ``meta.json``.
    """

    def __init__(self, folder: str | os.PathLike, expected_fingerprint: str):
        self.folder = os.fspath(folder)
        self._dir_fd = None
        if os.open in os.supports_dir_fd:
            try:
                self._dir_fd = os.open(self.folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            except FileNotFoundError:
                raise _Absent(self.folder) from None
            except NotADirectoryError:
                raise CacheError(f"{self.folder}: not a folder") from None
        elif not os.path.isdir(self.folder):
            raise _Absent(self.folder)
        try:
            raw = self._read(META_FILE)
        except FileNotFoundError:
            self.close()
            raise CacheError(f"{self.folder}: no {META_FILE} (an incomplete or interrupted build)") from None
        try:
            meta = json.loads(raw)
            files = meta["files"]
            if not isinstance(files, dict):
                raise TypeError("'files' is not an object")
        except (ValueError, KeyError, TypeError, RecursionError) as err:
            self.close()
            raise CacheError(f"{self._path(META_FILE)}: unreadable ({type(err).__name__}: {err})") from None
        found = (meta.get("fingerprint"), meta.get("version"))
        if found != (expected_fingerprint, PROCESSING_VERSION):
            self.close()
            raise CacheError(
                f"{self._path(META_FILE)}: fingerprint {found[0]!r} version {found[1]!r}, expected "
                f"{expected_fingerprint!r} version {PROCESSING_VERSION}"
            )
        self.meta: dict[str, Any] = meta

    def _path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def _read(self, name: str) -> bytes:
        if self._dir_fd is None:
            with open(self._path(name), "rb") as fin:
                return fin.read()
        fd = os.open(name, os.O_RDONLY, dir_fd=self._dir_fd)
        with os.fdopen(fd, "rb") as fin:
            return fin.read()

    def has(self, name: str) -> bool:
        """Whether the build wrote ``name`` (per ``meta.json``)."""
        return name in self.meta["files"]

    def read_bytes(self, name: str) -> bytes:
        """The verified bytes of one file of the folder."""
        expected = self.meta["files"].get(name)
        if expected is None:
            raise CacheError(f"{self._path(name)}: not listed in {META_FILE}")
        try:
            data = self._read(name)
        except FileNotFoundError:
            raise CacheError(f"{self._path(name)}: missing") from None
        if len(data) != expected["size"]:
            raise CacheError(f"{self._path(name)}: size {len(data)} bytes, expected {expected['size']} (truncated?)")
        if hashlib.sha256(data).hexdigest() != expected["sha256"]:
            raise CacheError(f"{self._path(name)}: sha256 mismatch (file altered or damaged)")
        return data

    def json(self, name: str) -> Any:
        return json.loads(self.read_bytes(name))

    def tensors(self, name: str) -> Any:
        # weights_only: a cache folder is data, and must never run code when loaded.
        return torch.load(io.BytesIO(self.read_bytes(name)), map_location="cpu", weights_only=True)

    def close(self) -> None:
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None

    def __enter__(self) -> CacheReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _load_published(folder: str, expected_fingerprint: str, load: Callable[[CacheReader], T]) -> T:
    with CacheReader(folder, expected_fingerprint) as reader:
        return load(reader)


# --------------------------------------------------------------------------- building
def _write_meta(staging: str, fields: Mapping[str, Any]) -> None:
    """meta.json last: the sizes and hashes of every file the build wrote."""
    files = {}
    for name in sorted(os.listdir(staging)):
        path = os.path.join(staging, name)
        if name == META_FILE or not os.path.isfile(path):
            continue
        files[name] = file_digest(path)
    save_json(os.path.join(staging, META_FILE), {**fields, "files": files})


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _unique_name(parent: str, prefix: str, fingerprint_: str) -> str:
    return os.path.join(parent, f"{prefix}{fingerprint_}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _publish(staging: str, final: str, replace: bool) -> bool:
    """Rename ``staging`` to ``final``; True if it was published, False if another process had
    published ``final`` first (``staging`` is then deleted). With ``replace``, an existing
    ``final`` is renamed aside first and deleted after."""
    aside = None
    if replace and os.path.lexists(final):
        aside = _unique_name(os.path.dirname(final), ASIDE_PREFIX, os.path.basename(final))
        try:
            os.rename(final, aside)
        except FileNotFoundError:  # someone else moved it already (only without locks)
            aside = None
    try:
        try:
            os.rename(staging, final)
        except OSError as err:
            # rename() onto an existing non-empty folder fails: another process won.
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not os.path.isdir(final):
                raise
            log.info("%s was published by another process first; using it", final)
            _remove(staging)
            return False
        return True
    finally:
        if aside is not None:
            _remove(aside)


class _BuildLock:
    """An exclusive ``flock`` on ``<stage2>/.lock-<fingerprint>``, or nothing where the file
    system has no locks (``held`` stays False). The kernel drops it when its holder dies."""

    def __init__(self, final: str):
        parent, name = os.path.split(final)
        self.path = os.path.join(parent, LOCK_PREFIX + name)
        self.fd: int | None = None
        self.held = False

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # Windows: publication by rename still keeps the cache consistent
            return
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(self.fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
                log.info("waiting for %s, which is building %s", holder, os.path.dirname(self.path))
                fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError as err:
            self.release()
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            log.warning("%s: no file locking here (%s); concurrent builders may duplicate work", self.path, err)
            return
        self.held = True
        with contextlib.suppress(OSError):  # who holds it, for the message of those who wait
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"pid {os.getpid()} on {_HOST}".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the flock
            self.fd = None
        self.held = False


def _lock_is_free(parent: str, fingerprint_: str) -> bool | None:
    """Whether nobody holds the build lock of ``fingerprint_``; None when that cannot be told."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fd = os.open(os.path.join(parent, LOCK_PREFIX + fingerprint_), os.O_RDWR)
    except OSError:
        return None  # no lock file: a builder that did not use locks
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    finally:
        os.close(fd)
    return True


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) there would send CTRL_C_EVENT
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _is_dead_leftover(parent: str, entry: str, own_fingerprint: str, locks_work: bool) -> bool:
    match = _LEFTOVER.match(entry)
    if match is not None:
        if locks_work and match["fp"] == own_fingerprint:
            return True  # every builder of this fingerprint holds its lock, which is ours now
        free = _lock_is_free(parent, match["fp"]) if locks_work else None
        if free is not None:
            return free
        if match["host"] == _HOST and not _pid_alive(int(match["pid"])):
            return True
    try:
        age = time.time() - os.lstat(os.path.join(parent, entry)).st_mtime
    except FileNotFoundError:
        return False
    return age > STALE_AGE_S


def _remove_dead_leftovers(parent: str, own_fingerprint: str, locks_work: bool) -> None:
    """Delete staging / aside folders of builders that were killed (see the module docstring).

    Called with ``own_fingerprint``'s build lock held when ``locks_work``."""
    for entry in os.listdir(parent):
        if entry.startswith((STAGING_PREFIX, ASIDE_PREFIX)) and _is_dead_leftover(
            parent, entry, own_fingerprint, locks_work
        ):
            log.info("%s: removed %s, left by an interrupted build", parent, entry)
            _remove(os.path.join(parent, entry))


def load_or_build(
    folder: str | os.PathLike,
    expected_fingerprint: str,
    build: Callable[[str], Mapping[str, Any]],
    load: Callable[[CacheReader], T],
    force_rebuild: bool = False,
) -> T:
    """Load the published stage-2 ``folder``, building it first if it is absent or damaged.

    Args:
        folder: ``.../stage2/<fingerprint>``.
        expected_fingerprint: what ``meta.json`` must say.
        build: ``build(staging_folder) -> meta fields``: writes the cache files into the empty
            staging folder and returns what ``meta.json`` records besides the file digests
            (it should include ``fingerprint`` and ``version``).
        load: ``load(reader) -> result``, reading files through the :class:`CacheReader`.
        force_rebuild: build and replace even when a complete folder exists.

    See the module docstring for what holds under concurrent builders and readers.
    """
    folder = os.fspath(folder)
    for _ in range(_UNLOCKED_ATTEMPTS - 1):
        try:
            return _load_or_build_once(folder, expected_fingerprint, build, load, force_rebuild)
        except _Raced as err:
            log.info("%s; trying again", err)
            force_rebuild = False  # built once already: what is published now is as new
    return _load_or_build_once(folder, expected_fingerprint, build, load, force_rebuild, last_attempt=True)


class _Raced(Exception):
    """Without build locks, the folder was replaced again between publishing and loading it."""


# Without locks, a process can publish and then find the folder replaced by another's force
# rebuild before it has read it; it tries again this many times in all.
_UNLOCKED_ATTEMPTS = 5


def _load_or_build_once(
    folder: str,
    expected_fingerprint: str,
    build: Callable[[str], Mapping[str, Any]],
    load: Callable[[CacheReader], T],
    force_rebuild: bool,
    last_attempt: bool = False,
) -> T:
    damage = None
    if not force_rebuild:
        try:
            return _load_published(folder, expected_fingerprint, load)
        except _Absent:
            pass
        except CacheError as err:
            # Damaged, or replaced while being read: decided below, under the lock.
            log.debug("%s; retrying under the build lock", err)
    parent = os.path.dirname(folder)
    lock = _BuildLock(folder)
    try:
        os.makedirs(parent, exist_ok=True)
        lock.acquire()
        replace = force_rebuild
        if not force_rebuild:
            try:
                return _load_published(folder, expected_fingerprint, load)
            except _Absent:
                pass
            except CacheError as err:
                log.warning("%s; rebuilding %s", err, folder)
                damage, replace = err, True
        _remove_dead_leftovers(parent, os.path.basename(folder), lock.held)
        staging = _unique_name(parent, STAGING_PREFIX, os.path.basename(folder))
        os.makedirs(staging)
        try:
            _write_meta(staging, build(staging))
            _publish(staging, folder, replace)
        except BaseException:
            _remove(staging)
            raise
        try:
            return _load_published(folder, expected_fingerprint, load)
        except (_Absent, CacheError) as err:
            problem = str(err) if isinstance(err, CacheError) else f"{folder}: gone"
            # Under the lock nobody else replaces the folder: then this is real damage.
            if lock.held or last_attempt:
                raise CacheError(f"{problem} (just after publishing it)") from None
            raise _Raced(problem) from None
    except OSError as err:
        if damage is None:
            raise
        raise CacheError(f"{damage}, and it could not be rebuilt: {err}") from err
    finally:
        lock.release()
