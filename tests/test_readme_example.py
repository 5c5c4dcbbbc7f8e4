"""README's "Your own data": its example dataset is read from README itself, built, and trained on.

Each example file in README sits in a fenced block after a ``<!-- example: <path> -->`` line; the
command after ``<!-- example: command -->`` is run as written, plus overrides for a small model.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from gfmrag_fast.atomic_io import read_jsonl
from gfmrag_fast.data import QADataset
from gfmrag_fast.data.qa_dataset import _REQUIRED

from helpers import HashEmb

README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLE = re.compile(r"<!-- example: (\S+) -->\n```[a-z]*\n(.*?)```", re.S)


def readme_examples() -> dict[str, str]:
    blocks = dict(EXAMPLE.findall(README.read_text(encoding="utf-8")))
    assert blocks, "README has no <!-- example: ... --> blocks"
    return blocks


@pytest.fixture
def my_data(tmp_path):
    root = tmp_path / "my_data"
    for path, text in readme_examples().items():
        if path == "command":
            continue
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    return root


def test_example_is_complete_valid_json():
    blocks = readme_examples()
    expected = {"mini/processed/stage1/kg.txt", "mini/raw/dataset_corpus.json",
                "mini/processed/stage1/document2entities.json", "mini/processed/stage1/train.json",
                "mini/processed/stage1/test.json", "command"}
    assert set(blocks) == expected
    for path, text in blocks.items():
        if path.endswith(".json"):
            json.loads(text)


def test_schema_table_matches_the_code():
    text = README.read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `(\w+)`[^|]*\| (yes|no) \|", text, re.M))
    assert {name for name, required in rows.items() if required == "yes"} == set(_REQUIRED)
    assert rows.get("id") == "no"


def test_example_builds_with_every_question_kept(my_data, caplog):
    with caplog.at_level("INFO", logger="gfmrag_fast.data.qa_dataset"):
        ds = QADataset(str(my_data), "mini", text_emb_model=HashEmb())
    assert ds.stats["train"]["kept"] == 3 and ds.stats["test"]["kept"] == 2
    # "Marie Curie", "Paris", "Pierre Curie", "Marie-Curie", "Nobel Prize in Physics" need normalising
    assert ds.stats["names"] == {"exact": ds.stats["names"]["exact"], "normalized": 5, "unknown": 0}
    lines = [r.getMessage() for r in caplog.records if "only after normalising" in r.getMessage()]
    assert len(lines) == 1 and "5 name(s) matched" in lines[0] and "0 name(s) not found" in lines[0]
    test = ds.split("test")
    second = test[1]
    assert second["question_entities"].tolist() == [ds.ent2id["marie curie"]]
    assert second["supporting_entities"].tolist() == [ds.ent2id["pierre curie"], ds.ent2id["nobel prize in physics"]]
    assert second["supporting_docs"].tolist() == [ds.doc2id["Marie Curie"], ds.doc2id["Pierre Curie"]]
    assert ds.split("train").ids == ["train-1", "train-2", "2"]  # no id: its position in the file


def test_readme_command_fine_tunes_and_evaluates(my_data, tmp_path):
    command = shlex.split(readme_examples()["command"])
    assert command[:3] == ["python", "-m", "gfmrag_fast.workflow.finetune"]
    args = [a for a in command[3:] if not a.startswith(("datasets.root=", "hydra.run.dir="))]
    run_dir = tmp_path / "runs" / "mini"
    small = ["model.entity_model.input_dim=8", "model.entity_model.hidden_dims=[8,8]"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "gfmrag_fast.workflow.finetune", f"datasets.root={my_data}", *args, *small,
         f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert {(r["dataset"], r["split"]) for r in rows} >= {("mini", "test")}
    assert all(0.0 <= r["doc_recall@2"] <= 1.0 for r in rows)
    assert (run_dir / "pretrained" / "model.pth").exists()
