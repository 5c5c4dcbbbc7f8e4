"""Readers for GFM-RAG's stage-1 files: ``kg.txt``-style triple files and JSON.

Every error names the file and, where there is one, the 1-based line: a broken line in a
30,000-line OpenIE dump should take seconds to find, not a debugger.
"""

from __future__ import annotations

import json
import logging
import os
import re
import unicodedata
from typing import Any

from tqdm.auto import tqdm

__all__ = ["KG_DELIMITER", "read_triples", "read_json", "clean_name", "normalize_name", "NameIndex", "json_type"]

log = logging.getLogger(__name__)

KG_DELIMITER = ","
# Files above this size get a progress bar while they are read.
_PROGRESS_BYTES = 16 << 20


def clean_name(name: str) -> str:
    """Entity / relation / document names are compared after stripping outer whitespace.

    Applied to kg.txt fields and to every name in the JSON files alike, so that "paris " in
    kg.txt and "paris" in document2entities.json are the same entity.
    """
    return name.strip()


_NOT_WORD = re.compile(r"[\W_]+")  # any run of characters that are not letters or digits


def normalize_name(name: str) -> str:
    """The form in which two spellings of one name compare equal: Unicode NFKC, case folded, every
    run of punctuation, symbols and whitespace made one space, no outer spaces.

    "New-York", " new york " and "NEW YORK!" all become "new york". GFM-RAG's own KG construction
    writes entity names lower-cased with punctuation replaced by spaces, while questions are
    labelled by hand or by another tool, so their names often differ from kg.txt's in just these
    ways.
    """
    return " ".join(_NOT_WORD.sub(" ", unicodedata.normalize("NFKC", name).casefold()).split())


class NameIndex:
    """Looks names up in a ``{name: id}`` table (names as :func:`clean_name` left them).

    A name is looked up as written (outer whitespace stripped) first; failing that, by its
    :func:`normalize_name` form, which must then belong to exactly one name of the table: when
    "Paris" and "paris" are two entities of kg.txt, "PARIS" matches neither. Counts what it
    found: ``exact``, ``normalized`` (found only by the normalised form) and ``unknown``.
    """

    def __init__(self, table: dict[str, int]):
        self.table = table
        owners: dict[str, set[int]] = {}
        for name, idx in table.items():
            owners.setdefault(normalize_name(name), set()).add(idx)
        self._normalized = {key: next(iter(ids)) for key, ids in owners.items() if key and len(ids) == 1}
        self.counts = {"exact": 0, "normalized": 0, "unknown": 0}

    def get(self, name: str) -> int | None:
        idx = self.table.get(clean_name(name))
        if idx is not None:
            self.counts["exact"] += 1
            return idx
        idx = self._normalized.get(normalize_name(name))
        self.counts["normalized" if idx is not None else "unknown"] += 1
        return idx


def _check_exists(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    return path


def read_triples(
    path: str | os.PathLike, delimiter: str = KG_DELIMITER, on_error: str = "raise"
) -> tuple[list[tuple[str, str, str]], int]:
    """Read "head,relation,tail" lines.

    Lines are split on ``delimiter`` (as GFM-RAG does: a name containing the delimiter makes the
    line malformed), fields are stripped, empty lines skipped. A line that does not have exactly
    three non-empty fields, is not UTF-8 or holds a NUL byte, is malformed (a byte-order mark
    at the start of a line is dropped): ``on_error="raise"`` raises
    ``ValueError("<path>:<line>: ...")``, ``on_error="skip"`` drops it and counts it.

    Returns:
        (triples, num_skipped): triples as (head, relation, tail) name tuples in file order.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = _check_exists(path)
    size = os.path.getsize(path)
    triples: list[tuple[str, str, str]] = []
    skipped = 0
    with open(path, "rb") as fin, tqdm(
        total=size, unit="B", unit_scale=True, desc=f"reading {os.path.basename(path)}",
        disable=True if size < _PROGRESS_BYTES else None, leave=False,  # None: bar on a terminal only
    ) as bar:
        for lineno, raw in enumerate(fin, 1):
            bar.update(len(raw))
            problem = None
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                line, problem = "", f"not UTF-8 ({err.reason} at byte {err.start})"
            # Editors on Windows start a file with a byte-order mark; files joined with `cat`
            # carry it to the start of a later line.
            line = line.removeprefix("\ufeff")
            nul = line.find("\0")
            if nul >= 0:
                problem = f"NUL byte at column {nul + 1} (binary data?)"
            if problem is None:
                if not line.strip():
                    continue
                fields = [clean_name(f) for f in line.rstrip("\r\n").split(delimiter)]
                if len(fields) != 3:
                    problem = f"expected 3 fields separated by {delimiter!r}, got {len(fields)}: {line.strip()[:200]!r}"
                elif not all(fields):
                    problem = f"empty field: {line.strip()[:200]!r}"
                else:
                    triples.append((fields[0], fields[1], fields[2]))
                    continue
            if on_error == "raise":
                raise ValueError(f"{path}:{lineno}: malformed triple: {problem}")
            skipped += 1
    if skipped:
        log.warning("%s: skipped %d malformed line(s)", path, skipped)
    return triples, skipped


def read_json(path: str | os.PathLike) -> Any:
    """``json.load`` whose errors name the file and line; a missing file names the path."""
    path = _check_exists(path)
    try:
        with open(path, encoding="utf-8-sig") as fin:
            return json.load(fin)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: invalid JSON: {err.msg} (column {err.colno})") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 ({err.reason} at byte {err.start})") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply to read (Python's recursion limit)") from None


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type (``null``, ``array``, ...), for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__
