"""Atomic writes: a crash while writing leaves the previous file whole and no temporary behind."""

import os
import subprocess
import sys
import time

import pytest
import torch

from gfmrag_fast.atomic_io import (
    append_jsonl, atomic_json, atomic_jsonl, atomic_torch_save, read_jsonl, remove_stale_temporaries,
)


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("simulated crash while writing")


def test_failed_checkpoint_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "model_last.pth"
    atomic_torch_save({"epoch": 1, "w": torch.ones(3)}, str(path))
    with pytest.raises(RuntimeError, match="simulated crash"):
        atomic_torch_save({"epoch": 2, "w": torch.zeros(1000), "bad": Unpicklable()}, str(path))
    state = torch.load(path, weights_only=True)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["model_last.pth"]
    assert os.stat(path).st_mode & 0o777 == 0o644  # not mkstemp's owner-only 0600


def test_jsonl_and_json_round_trip(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    append_jsonl({"epoch": 0, "mrr": 0.5}, path)
    append_jsonl({"epoch": 1, "mrr": 0.6}, path)
    assert read_jsonl(path) == [{"epoch": 0, "mrr": 0.5}, {"epoch": 1, "mrr": 0.6}]
    atomic_jsonl(read_jsonl(path)[:1], path)
    assert read_jsonl(path) == [{"epoch": 0, "mrr": 0.5}]
    atomic_json({"a": [1, 2]}, str(tmp_path / "sub" / "config.json"))
    assert (tmp_path / "sub" / "config.json").read_text().startswith("{")


def test_temporary_names_carry_the_writer_pid(tmp_path):
    from gfmrag_fast.atomic_io import atomic_write

    seen = []
    atomic_write(str(tmp_path / "model_last.pth"), lambda f: seen.extend(os.listdir(tmp_path)))
    assert len(seen) == 1 and seen[0].startswith(f".tmp-{os.getpid()}-") and seen[0].endswith("model_last.pth")


def test_remove_stale_temporaries_keeps_live_writers(tmp_path):
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout.strip()
    live_pid = os.getppid()
    names = {
        f".tmp-{dead_pid}-abcmodel_last.pth": True,  # its writer is gone
        ".tmp-k2j3h4g5model_best.pth": True,  # written before names carried a pid
        f".tmp-{os.getpid()}-xyzmetrics.jsonl": True,  # this process writes nothing while it cleans
        f".tmp-{live_pid}-oldmodel.pth": True,  # a live pid, but a day untouched (another machine's pid)
        f".tmp-{live_pid}-newmodel.pth": False,  # a live writer, just now
        "model_last.pth": False,
    }
    for name in names:
        (tmp_path / name).write_bytes(b"partial")
    old = time.time() - 2 * 24 * 3600
    os.utime(tmp_path / f".tmp-{live_pid}-oldmodel.pth", (old, old))
    (tmp_path / ".tmp-dataset-123-abc").mkdir()  # a staged cache folder: not a file, kept
    removed = remove_stale_temporaries(str(tmp_path))
    assert sorted(os.path.basename(p) for p in removed) == sorted(n for n, stale in names.items() if stale)
    kept = [name for name, stale in names.items() if not stale] + [".tmp-dataset-123-abc"]
    assert sorted(os.listdir(tmp_path)) == sorted(kept)
    assert remove_stale_temporaries(str(tmp_path / "missing")) == []
