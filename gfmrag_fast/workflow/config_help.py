"""``--help`` of the workflows: every setting with its current value and what it does, taken from
the comments of the config files.

Hydra's ``--help`` prints ``hydra.help.template``; the workflow configs set it to
``${gfmrag_fast_help:}``, the resolver registered here (so an entry module imports this one). It
reads the composed config (command-line overrides applied) and the comments of the files it came
from:

* a comment block directly above a key (no blank line between) and a comment after its value
  describe that key; a key in a config group's file (``text_emb_model/minilm.yaml``) is
  described under the group's name (``text_emb_model.batch_size``);
* a file's first comment block, when a blank line follows it, describes the whole file: the
  workflow, or one option of a config group;
* the comment after a group's entry in ``defaults`` describes the group.

The config files keep to the subset of YAML this reads: one key per line, two-space indents.
"""

from __future__ import annotations

import json
import os
import re
import textwrap
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import OmegaConf

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config")
RESOLVER = "gfmrag_fast_help"
WIDTH = 100

_KEY = re.compile(r"^(?P<indent>\s*)(?P<item>-\s+)?(?P<key>[A-Za-z_][\w@.\-]*)\s*:(?P<rest>.*)$")


def _split_comment(rest: str) -> Tuple[str, str]:
    """``value  # comment`` -> (value, comment); a ``#`` inside quotes or without a blank
    before it is part of the value."""
    quote = None
    for i, ch in enumerate(rest):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or rest[i - 1].isspace()):
            return rest[:i].strip(), rest[i + 1:].strip()
    return rest.strip(), ""


def parse_comments(text: str) -> Tuple[str, Dict[str, str]]:
    """(the file's description, {dotted key: description}) of a config file's text.

    Keys inside a list item are recorded under the list's key and the item's own keys
    (``task.losses.name``), which the help never asks for: list values are shown whole."""
    lines = text.splitlines()
    header: List[str] = []
    i = 0
    while i < len(lines) and lines[i].lstrip().startswith("#"):
        header.append(lines[i].lstrip()[1:].rstrip().removeprefix(" "))
        i += 1
    if not (i < len(lines) and not lines[i].strip()):  # no blank line after it: it describes the first key
        header, i = [], 0
    described: Dict[str, str] = {}
    stack: List[Tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    pending: List[str] = []
    for line in lines[i:]:
        stripped = line.strip()
        if not stripped:
            pending = []
            continue
        if stripped.startswith("#"):
            pending.append(stripped[1:].strip())
            continue
        match = _KEY.match(line)
        if not match:
            pending = []
            continue
        indent = len(match["indent"]) + len(match["item"] or "")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = ".".join([k for _, k in stack] + [match["key"]])
        comment = _split_comment(match["rest"])[1]
        description = " ".join(part for part in (*pending, comment) if part)
        if description:
            described[key] = description
        stack.append((indent, match["key"]))
        pending = []
    return "\n".join(header), described


def _read(path: str) -> Tuple[str, Dict[str, str]]:
    with open(path, encoding="utf-8") as f:
        return parse_comments(f.read())


def _config_dirs(root: Any) -> List[str]:
    """The folders Hydra composed from (``--config-dir`` first), then this package's."""
    dirs = []
    for source in OmegaConf.select(root, "hydra.runtime.config_sources", default=None) or []:
        if source.get("schema") == "file" and os.path.isdir(source.get("path", "")):
            dirs.append(source["path"])
    return dirs + [CONFIG_DIR]


def _find(dirs: List[str], name: str) -> Optional[str]:
    for folder in dirs:
        path = os.path.join(folder, f"{name}.yaml")
        if os.path.isfile(path):
            return path
    return None


def _primary_files(dirs: List[str], name: str, seen: Optional[set] = None) -> List[str]:
    """``name``'s file after the plain config names in its ``defaults`` (``stage2_qa_finetune``
    -> ``finetune``), in the order Hydra merges them, so later descriptions win."""
    seen = set() if seen is None else seen
    path = _find(dirs, name)
    if path is None or path in seen:
        return []
    seen.add(path)
    files: List[str] = []
    defaults = OmegaConf.load(path).get("defaults") or []
    for entry in defaults:
        if isinstance(entry, str) and entry != "_self_":
            files += _primary_files(dirs, entry, seen)
    return files + [path]


def _format(value: Any) -> str:
    """A value as it is written on the command line (``[a, b]``, ``null``, ``''``), cut at 80 characters."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        if not value.strip():
            return repr(value)
        if value == "???":  # OmegaConf's mark of a value that must be given
            return value
        return value if re.fullmatch(r"[\w@.:/${}%\-]+", value) else json.dumps(value)
    if isinstance(value, list):
        text = "[" + ", ".join(_format(v) for v in value) + "]"
    elif isinstance(value, dict):
        text = "{" + ", ".join(f"{k}: {_format(v)}" for k, v in value.items()) + "}"
    else:
        return str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _leaves(node: Any, prefix: str = "") -> List[Tuple[str, Any]]:
    """(dotted key, value) of every setting: mappings are walked, a list is one value."""
    if not (isinstance(node, dict) and node):
        return [(prefix, node)]
    out: List[Tuple[str, Any]] = []
    for key, value in node.items():
        out += _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    return out


def _wrap(text: str, indent: int = 4, hanging: int = 0) -> str:
    return textwrap.fill(text, WIDTH, initial_indent=" " * indent, subsequent_indent=" " * (indent + hanging))


def _descriptions(root: Any) -> Tuple[str, Dict[str, str], Dict[str, str], Dict[str, Dict[str, str]]]:
    """(the workflow's description, {dotted key: description}, {group: chosen option},
    {group: {option: its description}}) for the composed config ``root``."""
    job = OmegaConf.select(root, "hydra.job.name", default="") or ""
    config_name = OmegaConf.select(root, "hydra.job.config_name", default=job) or job
    dirs = _config_dirs(root)
    header, described = "", {}
    for path in _primary_files(dirs, config_name):
        file_header, keys = _read(path)
        header = file_header or header
        described.update(keys)
    choices = OmegaConf.select(root, "hydra.runtime.choices", default=None)
    choices = OmegaConf.to_container(choices) if choices is not None else {}
    groups = {group: choice for group, choice in choices.items() if not group.startswith("hydra/")}
    options: Dict[str, Dict[str, str]] = {}
    for group, choice in groups.items():
        group_dirs = [os.path.join(folder, group) for folder in dirs if os.path.isdir(os.path.join(folder, group))]
        options[group] = {}
        for folder in group_dirs:
            for name in sorted(os.listdir(folder)):
                if name.endswith(".yaml") and name[:-5] not in options[group]:
                    options[group][name[:-5]] = _read(os.path.join(folder, name))[0]
        path = _find(group_dirs, str(choice)) if choice else None
        if path:
            described.update({f"{group}.{key}": text for key, text in _read(path)[1].items()})
    return header, described, groups, options


def settings(root: Any, described: Optional[Dict[str, str]] = None) -> List[Tuple[str, Any, Optional[str]]]:
    """(dotted key, value, description or None) of every setting of the composed config ``root``."""
    described = _descriptions(root)[1] if described is None else described
    config = OmegaConf.to_container(root, resolve=False)
    config.pop("hydra", None)
    return [(key, value, described.get(key)) for key, value in _leaves(config)]


def render(root: Any) -> str:
    """The help text for the composed config ``root`` (``hydra`` node included)."""
    job = OmegaConf.select(root, "hydra.job.name", default="") or ""
    header, described, groups, options = _descriptions(root)
    out = [f"python -m gfmrag_fast.workflow.{job} [key=value ...] [group=option ...]", ""]
    if header:
        out += [header, ""]
    out += ["Each setting shows its value with the overrides given applied. The whole config: --cfg job;",
            "Hydra's own options: --hydra-help.", ""]
    if groups:
        out += ["== Config groups (group=option) ==", ""]
        for group, choice in sorted(groups.items()):
            out.append(f"{group}={_format(choice)}")
            if described.get(f"defaults.{group}"):
                out.append(_wrap(described[f"defaults.{group}"]))
            for option, text in options[group].items():
                text = " ".join(text.split())
                out.append(_wrap(f"{option}: {text}" if text else option, 6, hanging=2))
            out.append("")
    out += ["== Settings (key=value) ==", ""]
    section = None
    for key, value, text in settings(root, described):
        top = key.split(".")[0]
        if "." in key and top != section:
            section = top
            out += ["", f"-- {top}: {described[top]}" if described.get(top) else f"-- {top}"]
        out.append(f"{key}={_format(value)}")
        out.append(_wrap(text or "(no description)"))
    # Hydra substitutes $NAME in the template: a literal $ is $$.
    return "\n".join(out).replace("$", "$$")


OmegaConf.register_new_resolver(RESOLVER, lambda *, _root_: render(_root_), replace=True)
