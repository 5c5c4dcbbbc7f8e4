"""The trainer alone, on a scripted task: the best epoch chosen on valid rows (never test), the
history and metrics rows it keeps, resumes, progress lines, tables and curves."""

import json
import logging
import random
import re

import numpy as np
import pytest
import torch

from gfmrag_fast.atomic_io import read_jsonl
from gfmrag_fast.training import DistEnv, Trainer, TrainOptions
from gfmrag_fast.training.curves import metric_groups, plot_curves
from gfmrag_fast.training.report import format_duration, format_table, format_value
from gfmrag_fast.training.state import load_training_state

from helpers import Killed, ScriptedTask

LOGGER = "gfmrag_fast.training.trainer"


def make_trainer(folder, task, **options):
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    options = {"num_epoch": len(task.valid or task.test), "metric": "score", "log_interval": 2, **options}
    return Trainer(model, torch.optim.AdamW(model.parameters(), lr=0.05), task, TrainOptions(**options), str(folder),
                   DistEnv())


@pytest.fixture(autouse=True)
def no_curves_unless_tested(request, monkeypatch):
    """Drawing the figure after every epoch takes a second on a loaded 2-core machine: only the
    tests about the curves draw it."""
    if "curves" not in request.node.name and "plots" not in request.node.name:
        monkeypatch.setattr(Trainer, "plot", lambda self: None)


VALID, TEST = [0.1, 0.5, 0.3], [0.9, 0.2, 0.8]  # valid picks epoch 1; test would pick epoch 0


def test_best_epoch_is_chosen_on_valid_rows_not_test(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    result = make_trainer(tmp_path, ScriptedTask(VALID, TEST)).fit()
    assert (result["best_epoch"], result["best_score"]) == (1, 0.5)
    assert [(row["split"], row["score"]) for row in result["best_rows"]] == [("valid", 0.5), ("test", 0.2)]
    best = load_training_state(str(tmp_path / "model_best.pth"))
    assert (best["epoch"], best["best_epoch"]) == (2, 1)  # written after epoch 1
    exported = torch.load(tmp_path / "pretrained" / "model.pth", weights_only=True)["model"]
    assert all(torch.equal(exported[key], best["model"][key]) for key in exported)
    # Each epoch's table shows the valid rows; test numbers appear only in the final summary.
    tables = [record.getMessage() for record in caplog.records if re.match(r"epoch \d+ evaluation", record.getMessage())]
    assert len(tables) == 3 and all("valid" in t and "toy" in t and "test rows in metrics.jsonl" in t for t in tables)
    assert not any("0.9000" in t or "0.8000" in t for t in tables)
    done = next(record.getMessage() for record in caplog.records if record.getMessage().startswith("training done"))
    assert "best epoch 1 of 3 (mean valid score = 0.5000)" in done
    assert re.search(r"toy\s+test\s+3\s+0\.2000\s+0\.1000\s+0\.0667", done)
    assert f"saved: {tmp_path / 'model_best.pth'}" in done and f"saved: {tmp_path / 'pretrained'}" in done
    assert "{" not in "".join(tables)  # a table, not a dict


def test_metrics_rows_and_history(tmp_path):
    result = make_trainer(tmp_path, ScriptedTask(VALID, TEST)).fit()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(row["epoch"], row["split"], row["score"]) for row in rows] == [
        (0, "valid", 0.1), (0, "test", 0.9), (1, "valid", 0.5), (1, "test", 0.2), (2, "valid", 0.3), (2, "test", 0.8)]
    history = result["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert [h["score"] for h in history] == VALID  # the selection score: valid only
    for h in history:
        assert len(h["step_loss"]) == 5
        assert h["loss"] == pytest.approx(sum(h["step_loss"]) / 5, rel=1e-6)
        assert h["rows"] == [row for row in rows if row["epoch"] == h["epoch"]]
    # The checkpoint carries the same history (weights_only loading).
    assert load_training_state(str(tmp_path / "model_last.pth"))["history"] == history


def test_without_valid_rows_the_best_is_chosen_on_all_and_that_is_said_once(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    result = make_trainer(tmp_path, ScriptedTask(None, TEST)).fit()
    assert result["best_epoch"] == 0 and result["best_score"] == 0.9
    assert caplog.text.count("no evaluation row of split 'valid': the best epoch is chosen on the test rows") == 1


def test_metric_split_none_averages_every_row(tmp_path):
    # Means over valid and test: 0.5, 0.35, 0.55.
    result = make_trainer(tmp_path, ScriptedTask(VALID, TEST), metric_split=None).fit()
    assert result["best_epoch"] == 2 and result["best_score"] == pytest.approx(0.55)


@pytest.mark.parametrize("kill_at", [(2, 0), (1, 3)], ids=["epoch-end", "mid-epoch"])
def test_resume_continues_history_and_selection(tmp_path, kill_at):
    expected = make_trainer(tmp_path / "reference", ScriptedTask(VALID, TEST)).fit()
    with pytest.raises(Killed):
        make_trainer(tmp_path / "run", ScriptedTask(VALID, TEST, kill_at=kill_at), save_interval=1).fit()
    state = load_training_state(str(tmp_path / "run" / "model_last.pth"))
    assert (state["epoch"], state["step"]) == kill_at
    if kill_at[1]:
        assert state["step_losses"].shape == (kill_at[1],)
    trainer = make_trainer(tmp_path / "run", ScriptedTask(VALID, TEST), save_interval=1)
    trainer.resume(state, source=str(tmp_path / "run" / "model_last.pth"))
    result = trainer.fit()
    assert result["history"] == expected["history"]  # losses of every step included, to the bit
    assert (result["best_epoch"], result["best_score"]) == (1, 0.5)
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl") == read_jsonl(tmp_path / "reference" / "metrics.jsonl")


def progress_lines(caplog):
    return [record.getMessage() for record in caplog.records if " step " in record.getMessage()]


def test_progress_lines_from_the_first_step_with_batches_rate_and_eta(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    make_trainer(tmp_path, ScriptedTask(VALID[:2], TEST[:2])).fit()
    assert "epoch 0 of 2: 5 batches per epoch" in caplog.text
    lines = progress_lines(caplog)
    steps = [re.search(r"epoch (\d) step (\S+) ", line).groups() for line in lines]
    assert steps == [("0", "1/5"), ("0", "2/5"), ("0", "4/5"), ("0", "5/5"), ("1", "1/5"), ("1", "2/5"), ("1", "4/5"),
                     ("1", "5/5")]
    assert all(re.search(r"\| [\d.]+ steps/s, [\d.]+ queries/s \| ETA epoch \S+, run \S+", line) for line in lines)
    assert re.search(r"epoch 1 step 5/5 \(100%\) .* ETA epoch 0s, run 0s", lines[-1])


def test_progress_with_a_cap_and_with_an_unknown_number_of_batches(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    make_trainer(tmp_path / "cap", ScriptedTask([0.1], [0.2]), batch_per_epoch=3).fit()
    assert "epoch 0 of 1: 3 batches per epoch" in caplog.text
    assert [re.search(r"step (\S+) ", line).group(1) for line in progress_lines(caplog)] == ["1/3", "2/3", "3/3"]
    caplog.clear()
    make_trainer(tmp_path / "unknown", ScriptedTask([0.1], [0.2], with_num_batches=False)).fit()
    assert "epoch 0 of 1: an unknown number of batches per epoch" in caplog.text
    lines = progress_lines(caplog)
    assert [re.search(r"step (\S+) ", line).group(1) for line in lines] == ["1", "2", "4"]
    assert "ETA unknown" in lines[0]


def test_format_table_and_values():
    rows = [{"epoch": 0, "dataset": "musique", "split": "valid", "questions": 7, "ent_mrr": 0.123456, "mr": 12.3456},
            {"epoch": 0, "dataset": "hotpot", "split": "test", "questions": 1000, "ent_mrr": 1.0, "mr": 150.25}]
    lines = format_table(rows).splitlines()
    assert lines[0].split() == ["dataset", "split", "questions", "ent_mrr", "mr"]
    assert lines[2].split() == ["musique", "valid", "7", "0.1235", "12.35"]
    assert lines[3].split() == ["hotpot", "test", "1000", "1.0000", "150.2"]
    assert len({len(line) for line in lines}) == 1  # aligned columns
    assert format_value(float("nan")) == "nan" and format_table([]) == "(no evaluation rows)"
    assert [format_duration(s) for s in (4.4, 185, 3720, None, -1)] == ["4s", "3m05s", "1h02m", "?", "?"]


def test_metric_groups_separate_entities_documents_and_ranks():
    assert metric_groups(["ent_mrr", "doc_mrr", "ent_hits@1", "doc_recall@5"]) == [
        ("entities", ["ent_mrr", "ent_hits@1"]), ("documents", ["doc_mrr", "doc_recall@5"])]
    assert metric_groups(["mr", "mrr", "hits@10"]) == [("mean rank", ["mr"]), ("evaluation", ["mrr", "hits@10"])]


def test_training_curves_are_drawn_for_one_epoch_and_many(tmp_path):
    pytest.importorskip("matplotlib")
    make_trainer(tmp_path / "one", ScriptedTask([0.1], [0.2])).fit()
    make_trainer(tmp_path / "three", ScriptedTask(VALID, TEST)).fit()
    for folder in ("one", "three"):
        with open(tmp_path / folder / "training_curves.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # A history without evaluation rows (do_eval off) still draws the loss.
    history = [{"epoch": 0, "loss": 1.0, "step_loss": [1.2, 0.8]}]
    assert plot_curves(str(tmp_path / "loss_only.png"), history, "t") and (tmp_path / "loss_only.png").stat().st_size


def test_history_of_an_old_checkpoint_without_rows_still_plots(tmp_path):
    """Histories written before rows and step losses were kept have epoch, loss and the score only."""
    pytest.importorskip("matplotlib")
    trainer = make_trainer(tmp_path, ScriptedTask(VALID, TEST))
    trainer.history = [{"epoch": 0, "loss": 0.5, "score": 0.1}]
    trainer.best_epoch = 0
    trainer.plot()
    assert (tmp_path / "training_curves.png").stat().st_size > 0
    assert json.dumps(trainer.history)  # plain values only
