"""Step checkpoints and exact mid-epoch resume (issue 13, item 2): a run killed mid-epoch and resumed
from its last step checkpoint ends with bit-identical weights, without loading or iterating the
steps before the checkpoint; a mid-epoch checkpoint is never taken for the best one."""

import functools
import os
import random
import re
import shutil

import numpy as np
import pytest
import torch

from gfmrag_fast.atomic_io import read_jsonl
from gfmrag_fast.checkpoints import CheckpointError
from gfmrag_fast.training import DistEnv, Trainer, TrainOptions
from gfmrag_fast.training.epoch_plan import EpochPlan
from gfmrag_fast.training.state import load_training_state
from gfmrag_fast.workflow.common import apply_checkpoint

from helpers import METRIC, Census, Killed, ScriptedTask, describe_for, make_task, small_model

pytestmark = pytest.mark.usefixtures("one_thread")


def seed_all():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


# --- a real run: 6 datasets, 2 in memory, killed in the second epoch ----------------------------
SAVE_INTERVAL = 3


def trainer_for(kind, root, folder):
    census = Census(root, kind)
    names = [f"{kind}{k:02d}" for k in range(6)]
    sets = census.lazy(names, functools.partial(describe_for(kind), train=True))
    task = make_task(kind, sets, sets[:2], max_datasets_in_memory=2, data_loading_workers=1)
    seed_all()
    model = small_model(kind)
    options = TrainOptions(num_epoch=2, metric=METRIC[kind], metric_split="valid" if kind == "kg" else None,
                           save_interval=SAVE_INTERVAL, log_interval=4)
    trainer = Trainer(model, torch.optim.AdamW(model.parameters(), lr=0.01), task, options, str(folder), DistEnv())
    return trainer, task, census, names


def epoch_plan(task, epoch):
    return EpochPlan(task.train_sizes, task.batch_size, epoch, task.seed, group_size=task.max_datasets_in_memory)


@pytest.mark.parametrize("kind", ["kg", "qa"])
def test_killed_mid_epoch_and_resumed_equals_the_uninterrupted_run(many_datasets_root, tmp_path, kind):
    reference, _, _, _ = trainer_for(kind, many_datasets_root, tmp_path / "reference")
    expected = reference.fit()

    trainer, task, _, names = trainer_for(kind, many_datasets_root, tmp_path / "run")
    first, second = epoch_plan(task, 0), epoch_plan(task, 1)
    kill = len(second) - 2  # in the last group of epoch 1, after a step checkpoint
    resume_at = kill // SAVE_INTERVAL * SAVE_INTERVAL
    assert second.first_use_order(resume_at) != second.first_use_order(0)  # some datasets lie before
    steps, loss = [], task.loss

    def dying_loss(model, item):
        if len(steps) == len(first) + kill:
            raise Killed
        steps.append(item[0])
        return loss(model, item)

    task.loss = dying_loss
    with pytest.raises(Killed):
        trainer.fit()
    task.datasets.close()
    last = tmp_path / "run" / "model_last.pth"
    state = load_training_state(str(last))  # weights_only=True, as every load
    assert (state["epoch"], state["step"]) == (1, resume_at) and state["best_epoch"] == 0
    assert state["epoch_loss"].shape == (1,) and state["run_id"] == load_training_state(
        str(tmp_path / "run" / "model_best.pth"))["run_id"]

    resumed, task, census, _ = trainer_for(kind, many_datasets_root, tmp_path / "run")
    apply_checkpoint(resumed, str(last), DistEnv())
    assert (resumed.start_epoch, resumed.start_step) == (1, resume_at)
    batches, loaded_before_eval = [], []
    train_batches, evaluate = task.train_batches, task.evaluate

    def counted_batches(epoch, env, **where):
        for batch in train_batches(epoch, env, **where):
            batches.append(epoch)
            yield batch

    def evaluate_once(model, env):
        loaded_before_eval.append(list(census.loaded))
        return evaluate(model, env)

    task.train_batches, task.evaluate = counted_batches, evaluate_once
    result = resumed.fit()

    weights, ref_weights = resumed.raw_model.state_dict(), reference.raw_model.state_dict()
    for key in ref_weights:
        assert torch.equal(weights[key], ref_weights[key]), key
    assert result["history"] == expected["history"]  # the same epoch losses, to the last bit
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl") == read_jsonl(tmp_path / "reference" / "metrics.jsonl")
    exported = torch.load(tmp_path / "run" / "pretrained" / "model.pth", weights_only=True)["model"]
    ref_exported = torch.load(tmp_path / "reference" / "pretrained" / "model.pth", weights_only=True)["model"]
    assert all(torch.equal(exported[key], ref_exported[key]) for key in ref_exported)
    # Nothing before the checkpoint was iterated, nor loaded: the datasets of the steps after it only.
    assert batches == [1] * (len(second) - resume_at)
    assert loaded_before_eval[0] == [names[i] for i in second.first_use_order(resume_at)]
    task.datasets.close()


# --- the checkpoint's bookkeeping, on a toy task -----------------------------------------------
def toy_trainer(folder, scores, kill_at=None, **options):
    seed_all()
    model = torch.nn.Linear(3, 1)
    options = {"num_epoch": len(scores), "metric": "score", "save_interval": 1, "log_interval": 2, **options}
    return Trainer(model, torch.optim.AdamW(model.parameters(), lr=0.05), ScriptedTask(test=scores, kill_at=kill_at, with_num_batches=False),
                   TrainOptions(**options), str(folder), DistEnv())


def test_a_mid_epoch_checkpoint_is_never_taken_for_the_best(tmp_path, caplog):
    """Epoch 0 is the best; a run killed at step 2 of epoch 1 is resumed from its model_last.pth
    alone: model_best.pth cannot be rebuilt from it (its weights are not epoch 0's)."""
    first = tmp_path / "first"
    with pytest.raises(Killed):
        toy_trainer(first, [0.5, 0.1, 0.2], kill_at=(1, 2)).fit()
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(first / "model_last.pth", lone / "model_last.pth")
    state = load_training_state(str(lone / "model_last.pth"))
    assert (state["epoch"], state["step"], state["best_epoch"]) == (1, 2, 0)
    trainer = toy_trainer(tmp_path / "second", [0.5, 0.1, 0.2])
    apply_checkpoint(trainer, str(lone / "model_last.pth"), DistEnv())
    assert "the best model so far (epoch 0, score 0.5000) is in none of" in caplog.text
    assert trainer.best_epoch is None and not (tmp_path / "second" / "model_best.pth").exists()

    # With model_best.pth beside it, the resume keeps that best and exports it.
    resumed = toy_trainer(first, [0.5, 0.1, 0.2])
    apply_checkpoint(resumed, str(first / "model_last.pth"), DistEnv())
    assert resumed.best_epoch == 0 and resumed.fit()["best_score"] == 0.5
    uninterrupted = tmp_path / "uninterrupted"
    toy_trainer(uninterrupted, [0.5, 0.1, 0.2]).fit()
    for name in ("pretrained/model.pth", "model_last.pth"):
        ours, theirs = (torch.load(folder / name, weights_only=True)["model"] for folder in (first, uninterrupted))
        assert all(torch.equal(ours[key], theirs[key]) for key in theirs), name


def test_step_checkpoints_every_save_interval_and_throughput_logged(tmp_path, caplog, monkeypatch):
    from gfmrag_fast.training import trainer as trainer_module

    saved, real_save = [], trainer_module.atomic_torch_save

    def recording_save(obj, path):
        saved.append((os.path.basename(path), obj["epoch"], obj["step"]))
        real_save(obj, path)

    monkeypatch.setattr(trainer_module, "atomic_torch_save", recording_save)
    caplog.set_level("INFO", logger="gfmrag_fast.training.trainer")
    toy_trainer(tmp_path, [0.5, 0.1], save_interval=2).fit()
    # Steps 2 and 4 of each 5-step epoch, then the epoch's end (epoch 0 also the best).
    assert saved == [("model_last.pth", 0, 2), ("model_last.pth", 0, 4), ("model_last.pth", 1, 0),
                     ("model_best.pth", 1, 0), ("model_last.pth", 1, 2), ("model_last.pth", 1, 4),
                     ("model_last.pth", 2, 0)]
    logged = re.findall(r"epoch (\d) step (\d) loss \S+ \| ([\d.]+) steps/s, ([\d.]+) queries/s", caplog.text)
    # Steps counted from 1 (steps done): the first at once, then every log_interval.
    assert [(epoch, step) for epoch, step, _, _ in logged] == [("0", "1"), ("0", "2"), ("0", "4"), ("1", "1"),
                                                                ("1", "2"), ("1", "4")]
    assert all(float(queries) == pytest.approx(4 * float(steps), rel=0.05, abs=0.1)
               for _, _, steps, queries in logged)


def test_a_mid_epoch_checkpoint_without_its_epoch_loss_is_refused(tmp_path):
    with pytest.raises(Killed):
        toy_trainer(tmp_path / "run", [0.5, 0.1], kill_at=(0, 3)).fit()
    state = load_training_state(str(tmp_path / "run" / "model_last.pth"))
    del state["epoch_loss"]
    path = tmp_path / "model_last.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=rf"checkpoint {path}: written at step 3 of epoch 0 but without the "
                                              r"epoch's loss so far"):
        apply_checkpoint(toy_trainer(tmp_path / "again", [0.5, 0.1]), str(path), DistEnv())


def test_a_checkpoint_of_an_epoch_end_resumes_as_before(tmp_path):
    """No ``step`` (checkpoints written before step checkpoints existed) means an epoch's end."""
    toy_trainer(tmp_path / "run", [0.5], save_interval=None).fit()
    state = load_training_state(str(tmp_path / "run" / "model_last.pth"))
    del state["step"]
    torch.save(state, tmp_path / "old.pth")
    trainer = toy_trainer(tmp_path / "more", [0.5, 0.1], save_interval=None)
    apply_checkpoint(trainer, str(tmp_path / "old.pth"), DistEnv())
    assert (trainer.start_epoch, trainer.start_step) == (1, 0)
