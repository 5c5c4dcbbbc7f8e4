"""Atomic writes: a crash while writing leaves the previous file whole and no temporary behind."""

import os

import pytest
import torch

from gfmrag_fast.atomic_io import append_jsonl, atomic_json, atomic_jsonl, atomic_torch_save, read_jsonl


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("simulated crash while writing")


def test_failed_checkpoint_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "model_last.pth"
    atomic_torch_save({"epoch": 1, "w": torch.ones(3)}, str(path))
    with pytest.raises(RuntimeError, match="simulated crash"):
        atomic_torch_save({"epoch": 2, "w": torch.zeros(1000), "bad": Unpicklable()}, str(path))
    state = torch.load(path, weights_only=False)
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
