"""What every workflow does before its work: the command line's overrides logged, ``datasets.root``
checked, and the run folder Hydra created removed again when the run fails before it wrote
anything of its own (a bad dataset path, an empty training set, a checkpoint that does not
fit): such a folder holds only Hydra's config copies and a log, and would pile up unread.

A folder is removed only when everything in it is what Hydra writes for every run (``.hydra/``
with its config copies, ``<job>.log``) and the log was empty when the run started, so a folder
that held anything before (a user's checkpoints, an earlier run's outputs or log) is never
deleted, whatever the run's failure.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from typing import Iterator, List, Optional

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("gfmrag_fast")

_HYDRA_FILES = {"config.yaml", "hydra.yaml", "overrides.yaml"}


def log_overrides(cfg: DictConfig) -> None:
    """The command line's overrides: the rest of the config is the defaults, saved in full in the
    run folder's ``.hydra/config.yaml`` (logged in full only when Hydra saves no copy)."""
    from hydra.core.hydra_config import HydraConfig

    hydra = HydraConfig.get()
    overrides = list(hydra.overrides.task)
    if hydra.output_subdir is None:
        log.info("config:\n%s", OmegaConf.to_yaml(cfg))
        return
    saved = os.path.join(hydra.runtime.output_dir, hydra.output_subdir, "config.yaml")
    log.info("overrides: %s (the defaults of %s.yaml otherwise; full config in %s)",
             " ".join(overrides) if overrides else "none", hydra.job.config_name, saved)


def datasets_root(cfg: DictConfig, names: List[str]) -> str:
    """``datasets.root`` as an absolute path, checked before any dataset is read: FileNotFoundError
    saying where it looked and how to set it when the folder, or one of ``names`` in it, is missing."""
    given = str(cfg.datasets.root)
    root = os.path.abspath(os.path.expanduser(given))
    how = ("set datasets.root=/path/to/data, the folder that holds one folder per dataset "
           "(<root>/<name>/processed/stage1/kg.txt)")
    if not os.path.isdir(root):
        where = "" if os.path.isabs(os.path.expanduser(given)) else f", relative to the current folder {os.getcwd()}"
        raise FileNotFoundError(f"datasets.root={given!r}: no such folder (looked for {root}{where}); {how}")
    missing = [name for name in dict.fromkeys(names) if not os.path.isdir(os.path.join(root, name))]
    if missing:
        found = sorted(name for name in os.listdir(root) if os.path.isdir(os.path.join(root, name)))
        raise FileNotFoundError(f"dataset(s) {missing} not found in datasets.root={given!r} (looked in {root}); "
                                f"datasets there: {found}; or {how}")
    return root


class RunFolder:
    """``path``: the run folder; ``log_name``: Hydra's log file in it (``<job name>.log``);
    ``hydra_subdir``: where Hydra saved the config (``hydra.output_subdir``; None: nowhere)."""

    def __init__(self, path: str, log_name: str, hydra_subdir: Optional[str] = ".hydra"):
        self.path, self.log_name, self.hydra_subdir = path, log_name, hydra_subdir
        self.used = False
        log_file = os.path.join(path, log_name)
        # Judged now, before this run logs anything: a non-empty log was written by an earlier run.
        self.fresh = self._only_hydra_files() and (not os.path.exists(log_file) or os.path.getsize(log_file) == 0)

    def _only_hydra_files(self) -> bool:
        if not os.path.isdir(self.path):
            return False
        for name in os.listdir(self.path):
            inner = os.path.join(self.path, name)
            if name == self.log_name and os.path.isfile(inner):
                continue
            if name == self.hydra_subdir and os.path.isdir(inner) and set(os.listdir(inner)) <= _HYDRA_FILES:
                continue
            return False
        return True

    def mark_used(self) -> None:
        """From now on the run writes its outputs (checkpoints, metrics): the folder stays, whatever happens."""
        self.used = True

    def discard(self) -> bool:
        """Removes the folder if the run has not used it and it holds only Hydra's files of this
        run; closes the log handlers writing into it first. Returns whether it was removed."""
        if self.used or not self.fresh or not self._only_hydra_files():
            return False
        root = logging.getLogger()
        for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
            if os.path.dirname(os.path.abspath(handler.baseFilename)) == os.path.abspath(self.path):
                root.removeHandler(handler)
                handler.close()
        shutil.rmtree(self.path, ignore_errors=True)
        log.warning("removed the run folder %s: the run failed before writing anything to it", self.path)
        return True


@contextlib.contextmanager
def run_folder() -> Iterator[RunFolder]:
    """Hydra's run folder for this run, discarded (:meth:`RunFolder.discard`) when the body raises
    before calling :meth:`RunFolder.mark_used`. Under torchrun only rank 0 removes it."""
    from hydra.core.hydra_config import HydraConfig

    hydra = HydraConfig.get()
    folder = RunFolder(hydra.runtime.output_dir, f"{hydra.job.name}.log", hydra.output_subdir)
    try:
        yield folder
    except BaseException:
        if int(os.environ.get("RANK", "0")) == 0:
            folder.discard()
        raise
