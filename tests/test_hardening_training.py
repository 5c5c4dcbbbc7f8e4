"""Training checkpoints under hostile and broken conditions (issue 10): files that would run code
when loaded, a kill between the two checkpoint writes, corrupt files, missing paths, temporaries
left by killed runs, and training sets with nothing to train on."""

import json
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from gfmrag_fast.atomic_io import atomic_torch_save
from gfmrag_fast.checkpoints import CheckpointError, load_checkpoint_file, load_pretrained
from gfmrag_fast.training import DistEnv, Trainer, TrainOptions
from gfmrag_fast.training import trainer as trainer_module
from gfmrag_fast.training.state import capture_rng, load_training_state, restore_rng

from helpers import HashEmb

FIXTURES = Path(__file__).parent / "data"


class CodeOnLoad:
    """Unpickling this calls ``open(marker, "w")``: a file appears when its loading runs code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path, marker):
    torch.save({"model": {}, "optimizer": {}, "epoch": 1, "payload": CodeOnLoad(marker)}, str(path))


def assert_payload_is_live(path, marker):
    """The planted file does run code when loaded unsafely: the tests above it are not vacuous."""
    assert not os.path.exists(marker)
    torch.load(str(path), weights_only=False)
    assert os.path.exists(marker)


class ScriptedTask:
    """Fits a linear model to noisy targets drawn from torch, numpy and Python RNGs (so a resume is
    exact only if all three are restored); the evaluation score of each epoch is scripted."""

    def __init__(self, scores, batches=3):
        self.scores, self.batches, self.epoch = list(scores), batches, None

    def train_batches(self, epoch, env):
        self.epoch = epoch
        for _ in range(self.batches):
            x = torch.randn(4, 3)
            yield x, x.sum(1, keepdim=True) + float(np.random.rand()) + random.gauss(0, 1)

    def loss(self, model, batch):
        x, y = batch
        return ((model(x) - y) ** 2).mean(), {}

    def evaluate(self, model, env):
        return [{"dataset": "toy", "split": "test", "score": self.scores[self.epoch]}]

    def save_pretrained(self, model, folder):
        atomic_torch_save({"model": model.state_dict()}, os.path.join(folder, "model.pth"))


def seed_all(seed=0):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_trainer(folder, scores, num_epoch, **options):
    seed_all()
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    return Trainer(model, optimizer, ScriptedTask(scores), TrainOptions(num_epoch=num_epoch, metric="score", **options),
                   str(folder), DistEnv())


def resume(trainer, path):
    """As the workflows do with ``train.checkpoint=<path>``."""
    from gfmrag_fast.workflow.common import apply_checkpoint

    apply_checkpoint(trainer, str(path), DistEnv())


def exported(folder):
    return torch.load(os.path.join(folder, "pretrained", "model.pth"), weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


class Killed(BaseException):
    """What a SIGKILL looks like to the code after it: nothing more runs."""


SCORES = [0.1, 0.5, 0.3, 0.4]  # epoch 1 is the best; epochs 2 and 3 do not improve
# Checkpoint writes of the run below: epoch 0 last, best; epoch 1 last, best; epoch 2 last; epoch 3 last.
NUM_WRITES = 6


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    result = make_trainer(folder, SCORES, 4).fit()
    return folder, result


# --- 2. a kill between (or during) the checkpoint writes ------------------------------------
@pytest.mark.parametrize("kill_at", range(NUM_WRITES))
def test_kill_at_any_checkpoint_write_then_resume_exports_the_best(tmp_path, monkeypatch, reference, kill_at):
    ref_folder, ref_result = reference
    real_save, calls = trainer_module.atomic_torch_save, []

    def save_then_die(obj, path):
        if len(calls) == kill_at:
            raise Killed(path)  # killed before this file is renamed into place (the write is atomic)
        calls.append(os.path.basename(path))
        real_save(obj, path)

    monkeypatch.setattr(trainer_module, "atomic_torch_save", save_then_die)
    with pytest.raises(Killed):
        make_trainer(tmp_path, SCORES, 4).fit()
    monkeypatch.setattr(trainer_module, "atomic_torch_save", real_save)
    assert len(calls) == kill_at

    trainer = make_trainer(tmp_path, SCORES, 4)
    last = tmp_path / "model_last.pth"
    if last.exists():
        resume(trainer, last)
    result = trainer.fit()

    assert_same_weights(exported(tmp_path), exported(ref_folder))  # the model of epoch 1, the best
    assert result["best_score"] == ref_result["best_score"] == 0.5
    assert result["history"] == ref_result["history"]  # and the resume was exact (same losses)
    assert_same_weights(load_training_state(str(last))["model"],
                        load_training_state(str(ref_folder / "model_last.pth"))["model"])
    assert load_training_state(str(tmp_path / "model_best.pth"))["epoch"] == 2  # after epoch 1


def test_resume_into_a_new_folder_brings_the_best_along(tmp_path, reference):
    """model_last.pth of epoch 2 resumed elsewhere: the best (epoch 1) comes from beside it."""
    ref_folder, _ = reference
    first = tmp_path / "first"
    make_trainer(first, SCORES, 3).fit()
    second = tmp_path / "second"
    trainer = make_trainer(second, SCORES, 4)
    resume(trainer, first / "model_last.pth")
    trainer.fit()
    assert_same_weights(exported(second), exported(ref_folder))


def test_best_lost_is_said_and_chosen_anew(tmp_path, caplog):
    first = tmp_path / "first"
    make_trainer(first, SCORES, 3).fit()
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(first / "model_last.pth", lone / "model_last.pth")  # model_best.pth not copied
    trainer = make_trainer(tmp_path / "second", SCORES, 4)
    resume(trainer, lone / "model_last.pth")
    assert "the best model so far (epoch 1, score 0.5000) is in none of" in caplog.text
    assert trainer.best_epoch is None
    result = trainer.fit()
    assert result["best_score"] == 0.4  # epoch 3, the only one scored after the resume
    assert load_training_state(str(tmp_path / "second" / "model_best.pth"))["best_epoch"] == 3


def test_export_refuses_a_model_best_of_another_run(tmp_path, monkeypatch):
    """If model_best.pth does not hold this run's best epoch, nothing is exported from it."""
    other = tmp_path / "other"
    make_trainer(other, [0.9, 0.1], 2).fit()  # its model_best.pth: epoch 0 of another run
    trainer = make_trainer(tmp_path / "run", [0.1, 0.5], 2)
    real_save = trainer_module.atomic_torch_save

    def swap_best(obj, path):
        real_save(obj, path)
        if path.endswith("model_best.pth"):
            shutil.copy(other / "model_best.pth", path)

    monkeypatch.setattr(trainer_module, "atomic_torch_save", swap_best)
    with pytest.raises(CheckpointError,
                       match=r"model_best\.pth: holds epoch 0 of run [0-9a-f]+, but the best is epoch 1"):
        trainer.fit()


# --- exact resume through plain-value checkpoints ---------------------------------------------
def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    random.gauss(0, 1)
    np.random.randn()  # leaves a cached Gaussian in both generators: part of the state
    atomic_torch_save({"rng": capture_rng()}, str(tmp_path / "rng.pth"))
    def draw():
        return random.random(), random.gauss(0, 1), np.random.rand(), np.random.randn(), torch.rand(2).tolist()

    expected = draw()
    restore_rng(torch.load(tmp_path / "rng.pth", weights_only=True)["rng"])
    assert draw() == expected


def test_training_checkpoints_load_with_weights_only(reference):
    folder, _ = reference
    for name in ("model_last.pth", "model_best.pth"):
        state = torch.load(folder / name, weights_only=True)
        assert {"model", "optimizer", "epoch", "best_epoch", "run_id", "rng", "history"} <= set(state)


# --- 1. files that would run code when loaded ---------------------------------------------------
def test_code_in_train_checkpoint_is_refused_not_run(tmp_path):
    from gfmrag_fast.workflow.common import apply_checkpoint

    marker, evil = tmp_path / "ran", tmp_path / "model_last.pth"
    plant(evil, marker)
    trainer = make_trainer(tmp_path / "run", SCORES, 1)
    with pytest.raises(CheckpointError, match=rf"checkpoint {evil}: refused: .*could run code \(Unsupported global"):
        apply_checkpoint(trainer, str(evil), DistEnv())
    assert_payload_is_live(evil, marker)


def test_code_in_model_best_of_a_resumed_run_is_refused_not_run(tmp_path):
    make_trainer(tmp_path, [0.5, 0.1], 2).fit()  # model_best.pth: epoch 0; model_last.pth: epoch 1
    marker, best = tmp_path / "ran", tmp_path / "model_best.pth"
    plant(best, marker)
    trainer = make_trainer(tmp_path, [0.5, 0.1, 0.2], 3)
    with pytest.raises(CheckpointError, match=rf"checkpoint {best}: refused"):
        resume(trainer, tmp_path / "model_last.pth")
    assert_payload_is_live(best, marker)


def test_code_in_model_best_at_export_is_refused_not_run(tmp_path, monkeypatch):
    """Planted while the run trains (after its last check): the export still never runs it."""
    marker = tmp_path / "ran"
    real_save = trainer_module.atomic_torch_save

    def plant_after(obj, path):
        real_save(obj, path)
        if path.endswith("model_best.pth"):
            plant(path, marker)

    monkeypatch.setattr(trainer_module, "atomic_torch_save", plant_after)
    with pytest.raises(CheckpointError, match=r"model_best\.pth: refused"):
        make_trainer(tmp_path / "run", [0.5], 1).fit()
    assert_payload_is_live(tmp_path / "run" / "model_best.pth", marker)


def test_code_in_a_pretrained_folder_is_refused_not_run(tmp_path):
    from gfmrag_fast.models import GNNRetriever, QueryNBFNet
    from gfmrag_fast.checkpoints import save_pretrained

    save_pretrained(GNNRetriever(QueryNBFNet(8, [8]), 12), {}, str(tmp_path / "pt"))
    marker = tmp_path / "ran"
    torch.save({"model": CodeOnLoad(marker)}, tmp_path / "pt" / "model.pth")
    with pytest.raises(CheckpointError, match=rf"checkpoint {tmp_path / 'pt' / 'model.pth'}: refused"):
        load_pretrained(str(tmp_path / "pt"))
    assert_payload_is_live(tmp_path / "pt" / "model.pth", marker)


@pytest.mark.parametrize("protocol, message", [(2, "refused"), (pickle.DEFAULT_PROTOCOL, "cannot be read")])
def test_plain_pickle_is_refused_not_run(tmp_path, protocol, message):
    marker, path = tmp_path / "ran", tmp_path / "weights.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": CodeOnLoad(marker)}, f, protocol=protocol)
    with pytest.raises(CheckpointError, match=rf"checkpoint {path}: {message}"):
        load_checkpoint_file(str(path))
    assert not marker.exists()
    with open(path, "rb") as f:
        pickle.load(f)
    assert marker.exists()


# --- corrupt files and missing paths --------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_corrupt_checkpoint_names_its_path(tmp_path, reference, damage):
    from gfmrag_fast.workflow.common import apply_checkpoint

    folder, _ = reference
    data = (folder / "model_last.pth").read_bytes()
    path = tmp_path / "model_last.pth"
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"not a checkpoint" * 10}[damage])
    message = rf"checkpoint {path}: cannot be read as a PyTorch checkpoint \(truncated, corrupt"
    with pytest.raises(CheckpointError, match=message):
        apply_checkpoint(make_trainer(tmp_path / "run", SCORES, 1), str(path), DistEnv())


def test_truncated_model_best_at_resume_names_its_path(tmp_path):
    make_trainer(tmp_path, [0.5, 0.1], 2).fit()
    best = tmp_path / "model_best.pth"
    best.write_bytes(best.read_bytes()[:1000])
    trainer = make_trainer(tmp_path, [0.5, 0.1, 0.2], 3)
    with pytest.raises(CheckpointError, match=rf"checkpoint {best}: cannot be read"):
        resume(trainer, tmp_path / "model_last.pth")


@pytest.mark.parametrize("spec", ["{tmp}/runs/model_last.pth", "{tmp}/gone", "./runs/model_last.pth", "model_last.pth",
                                  "outputs/2024-01-01/model_last.pth", "~/no-such-gfmrag-run/model_last.pth",
                                  "existing_parent/run"])
def test_missing_local_checkpoint_is_not_found_not_a_hub_lookup(tmp_path, monkeypatch, spec):
    from gfmrag_fast import checkpoints as checkpoint
    from gfmrag_fast.workflow.common import apply_checkpoint

    def no_hub(repo_id, revision):
        raise AssertionError(f"{repo_id} was looked up on the Hugging Face Hub")

    monkeypatch.setattr(checkpoint, "_download", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "existing_parent").mkdir()
    spec = spec.format(tmp=tmp_path)
    trainer = make_trainer(tmp_path / "run", SCORES, 1)
    with pytest.raises(FileNotFoundError, match=r"train\.checkpoint=.*: not found"):
        apply_checkpoint(trainer, spec, DistEnv())
    with pytest.raises(FileNotFoundError, match="not found"):
        load_pretrained(spec)


def test_repo_id_still_goes_to_the_hub(tmp_path, monkeypatch):
    from gfmrag_fast import checkpoints as checkpoint

    asked = []
    monkeypatch.setattr(checkpoint, "_download", lambda repo_id, revision: asked.append(repo_id) or str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json: not found"):
        load_pretrained("rmanluo/GFM-RAG-8M")
    assert asked == ["rmanluo/GFM-RAG-8M"]


def test_hub_failure_says_neither_local_nor_fetched(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'someone/not-cached': no such local folder, and not fetched from "
                                                r"the local Hugging Face cache"):
        load_pretrained("someone/not-cached")


# --- temporaries left by killed runs --------------------------------------------------------
def test_temporaries_of_killed_runs_are_cleaned_at_the_next_start(tmp_path):
    import subprocess
    import sys

    (tmp_path / "pretrained").mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = [tmp_path / f".tmp-{dead.stdout.strip()}-k3j2model_last.pth", tmp_path / ".tmp-ab12cd34model_best.pth",
             tmp_path / "pretrained" / f".tmp-{dead.stdout.strip()}-x9model.pth"]
    live = tmp_path / f".tmp-{os.getppid()}-q1model_last.pth"  # a writer still running: left alone
    for path in [*stale, live]:
        path.write_bytes(b"half a checkpoint")
    (tmp_path / ".tmp-cache-folder").mkdir()  # folders are not this cleaner's business
    make_trainer(tmp_path, [0.5], 1).fit()
    assert not any(path.exists() for path in stale)
    assert live.exists() and (tmp_path / ".tmp-cache-folder").is_dir()
    assert (tmp_path / "model_last.pth").exists()


# --- 3. nothing to train on -------------------------------------------------------------------
class EmptyTask(ScriptedTask):
    def train_batches(self, epoch, env):
        self.epoch = epoch
        return iter(())


def test_an_epoch_without_batches_is_an_error_not_an_untrained_export(tmp_path):
    seed_all()
    model = torch.nn.Linear(3, 1)
    trainer = Trainer(model, torch.optim.AdamW(model.parameters()), EmptyTask([0.5]),
                      TrainOptions(num_epoch=1, metric="score"), str(tmp_path), DistEnv())
    with pytest.raises(RuntimeError, match="epoch 0: the task gave no training batch"):
        trainer.fit()
    assert not (tmp_path / "pretrained").exists()


@pytest.mark.parametrize("options, message", [
    (dict(num_epoch=0), "train.num_epoch must be at least 1, got 0"),
    (dict(num_epoch=2, batch_per_epoch=0), "train.batch_per_epoch must be at least 1"),
])
def test_options_that_train_nothing_are_refused(tmp_path, options, message):
    model = torch.nn.Linear(3, 1)
    with pytest.raises(ValueError, match=message):
        Trainer(model, torch.optim.AdamW(model.parameters()), ScriptedTask([0.5]), TrainOptions(**options),
                str(tmp_path), DistEnv())


def qa_task(train_sets):
    from gfmrag_fast.training.qa_task import QAFinetuneTask

    losses = [{"name": "bce", "loss": {"_target_": "gfmrag.losses.BCELoss", "adversarial_temperature": 0.2}}]
    return QAFinetuneTask(train_sets, [], losses, lambda ent2doc: None, ["mrr"], 2, 2, False, None, {},
                          torch.device("cpu"))


@pytest.mark.parametrize("keep, message", [
    ([], r"training dataset 'tiny_qa' has no usable training question: it holds no question"),
    # The fixture's q3 (no known question entity) and q4 (no known supporting entity nor document).
    (["q3", "q4"], r"training dataset 'tiny_qa' has no usable training question: all 2 questions were skipped "
                   r"\(no question entities: 1, no supporting entities: 1, no supporting docs: 1\)"),
    (None, r"training dataset 'tiny_qa' has no train split \(.*train\.json does not exist\)"),
])
def test_qa_training_set_without_usable_question_is_an_error(tmp_path, keep, message):
    from gfmrag_fast.data import QADataset

    shutil.copytree(FIXTURES / "tiny_qa", tmp_path / "tiny_qa")
    train = tmp_path / "tiny_qa" / "processed" / "stage1" / "train.json"
    if keep is None:
        train.unlink()
    else:
        train.write_text(json.dumps([q for q in json.loads(train.read_text()) if q["id"] in keep]))
    ds = QADataset(str(tmp_path), "tiny_qa", text_emb_model=HashEmb())
    with pytest.raises(ValueError, match=message):
        qa_task([ds])


def test_kg_training_set_without_triples_is_an_error():
    from types import SimpleNamespace

    from torch_geometric.data import Data

    from gfmrag_fast.training.kg_task import KGCompletionTask

    empty = torch.zeros(2, 0, dtype=torch.long)
    graph = Data(edge_index=empty, edge_type=torch.zeros(0, dtype=torch.long), num_nodes=3, num_relations=2,
                 rel_emb=torch.randn(2, 8), target_edge_index=empty, target_edge_type=torch.zeros(0, dtype=torch.long))
    ds = SimpleNamespace(data_name="hollow", graph=graph, stats={"triples": 0, "skipped_lines": 4})
    with pytest.raises(ValueError, match=r"training dataset 'hollow' has no training triple \(4 line\(s\) of kg\.txt "
                                         r"skipped\): nothing to pre-train on"):
        KGCompletionTask([ds], [], num_negative=2, strict_negative=True, adversarial_temperature=1.0, batch_size=2,
                         eval_batch_size=2, metrics=["mrr"], fast_test=None, text_emb_conf={},
                         device=torch.device("cpu"))


@pytest.mark.parametrize("change", [{"epoch": "two"}, {"model": [1, 2]}, {"run_id": 7}])
def test_malformed_training_checkpoint_names_its_path(tmp_path, reference, change):
    folder, _ = reference
    state = torch.load(folder / "model_last.pth", weights_only=True)
    path = tmp_path / "model_last.pth"
    torch.save({**state, **change}, path)
    key = next(iter(change))
    with pytest.raises(CheckpointError, match=rf"checkpoint {path}: malformed training checkpoint \({key} of the wrong"):
        resume(make_trainer(tmp_path / "run", SCORES, 1), path)
