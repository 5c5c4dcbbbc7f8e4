"""End-to-end fine-tuning runs (subprocesses, CPU): outputs, resume, overrides, torchrun."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import gfmrag_fast
from gfmrag_fast.atomic_io import read_jsonl

from helpers import workflow_config

HERE = os.path.dirname(os.path.abspath(__file__))
SMALL = [
    "datasets.train_names=[tiny_qa]",
    "datasets.valid_names=[tiny_qa]",
    "model.entity_model.input_dim=8",
    "model.entity_model.hidden_dims=[8,8]",
    "train.batch_size=2",
    "train.log_interval=1",
]


def run(args, cwd, torchrun=0, timeout=600, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] if torchrun else [sys.executable]
    result = subprocess.run([*launcher, "-m", "gfmrag_fast.workflow.finetune", *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    shutil.copytree(os.path.join(HERE, "data", "tiny_qa"), root / "tiny_qa")
    return root


@pytest.fixture(scope="module")
def first_run(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run([f"datasets.root={data_root}", f"hydra.run.dir={out}", *SMALL, "train.num_epoch=1",
         "train.save_best_only=false"], cwd=out)
    return out


def test_run_writes_outputs(first_run):
    for name in ("model_best.pth", "model_last.pth", "model_epoch_0.pth", "metrics.jsonl", "training_curves.png",
                 "pretrained/config.json", "pretrained/model.pth"):
        assert os.path.exists(first_run / name), name
    rows = read_jsonl(first_run / "metrics.jsonl")
    assert [(r["epoch"], r["dataset"], r["split"]) for r in rows] == [(0, "tiny_qa", "test")]
    for key in ("ent_mrr", "ent_hits@10", "doc_recall@2", "doc_recall@5"):
        assert 0.0 <= rows[0][key] <= 1.0
    model, config = gfmrag_fast.load_pretrained(str(first_run / "pretrained"))
    assert config["model_config"]["_target_"] == "gfmrag.models.GNNRetriever"
    assert config["model_config"]["entity_model"]["hidden_dims"] == [8, 8]
    assert config["text_emb_model_config"]["text_emb_model_name"] == "sentence-transformers/all-MiniLM-L6-v2"
    state = torch.load(first_run / "model_last.pth", weights_only=True)
    assert state["epoch"] == 1 and {"model", "optimizer", "rng"} <= set(state)
    # No temporary files are left behind by the atomic writes.
    assert not [f for f in os.listdir(first_run) if f.startswith(".tmp-")]


def test_overrides_reach_the_run(first_run):
    """The overrides change what ran, not only Hydra's record of the config: the model's size in
    the saved weights, the epochs and steps taken, the per-epoch checkpoint."""
    defaults = workflow_config("finetune")
    assert list(defaults.model.entity_model.hidden_dims) != [8, 8] and defaults.model.entity_model.input_dim != 8
    assert defaults.train.num_epoch != 1 and defaults.train.save_best_only
    expected_layers = {f"entity_model.layers.{i}.linear.weight": (8, 16) for i in range(2)}  # Linear(2d, d), d = 8
    for weights in (torch.load(first_run / "model_last.pth", weights_only=True)["model"],
                    torch.load(first_run / "pretrained" / "model.pth", weights_only=True)["model"]):
        assert {k: tuple(v.shape) for k, v in weights.items() if k.endswith("linear.weight")} == expected_layers
        assert weights["question_mlp.weight"].shape == (8, 384)  # input_dim x MiniLM's width
    state = torch.load(first_run / "model_last.pth", weights_only=True)
    assert state["epoch"] == 1 and [h["epoch"] for h in state["history"]] == [0]
    # tiny_qa keeps 2 training questions: batch size 2 is one optimizer step in the one epoch
    assert {int(p["step"]) for p in state["optimizer"]["state"].values()} == {1}
    assert os.path.exists(first_run / "model_epoch_0.pth")  # train.save_best_only=false


def test_resume_continues_from_checkpoint(first_run, data_root):
    run([f"datasets.root={data_root}", f"hydra.run.dir={first_run}", *SMALL, "train.num_epoch=2",
         f"train.checkpoint={first_run / 'model_last.pth'}"], cwd=first_run)
    rows = read_jsonl(first_run / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [0, 1]
    assert torch.load(first_run / "model_last.pth", weights_only=True)["epoch"] == 2


def test_pretrained_folder_as_starting_point(first_run, data_root, tmp_path):
    out = run([f"datasets.root={data_root}", f"hydra.run.dir={tmp_path}", *SMALL, "train.num_epoch=1",
               "train.do_eval=false", f"train.checkpoint={first_run / 'pretrained'}"], cwd=tmp_path)
    assert "initialised the model from" in out.stderr + out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "gfmrag_fast.workflow.finetune", f"datasets.root={data_root}", f"hydra.run.dir={tmp_path}",
         *SMALL, "model.entity_model.hidden_dims=[8,8,8]", f"train.checkpoint={first_run / 'pretrained'}"],
        cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert bad.returncode != 0 and "does not fit the configured model" in bad.stderr


def test_torchrun_two_processes_rank0_writes(data_root, tmp_path):
    out = run([f"datasets.root={data_root}", f"hydra.run.dir={tmp_path}", *SMALL, "train.num_epoch=2",
               "train.dtype=bfloat16"], cwd=tmp_path, torchrun=2)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [0, 1]  # one row per evaluation, not one per rank
    assert os.path.exists(tmp_path / "pretrained" / "model.pth")
    assert "2 process(es)" in out.stderr + out.stdout


@pytest.mark.slow  # torch.compile's C++ code generation: about a minute on a 2-core machine
def test_compiled_training_runs_and_saves_plain_keys(data_root, tmp_path):
    run([f"datasets.root={data_root}", f"hydra.run.dir={tmp_path}", *SMALL, "train.num_epoch=1", "train.compile=true"],
        cwd=tmp_path)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [0]
    state = torch.load(tmp_path / "model_last.pth", weights_only=True)
    assert not any(k.startswith("_orig_mod") for k in state["model"])  # plain keys, loadable anywhere


def test_empty_training_set_fails_naming_the_dataset(tmp_path):
    """train.json = []: an error, not a successful run exporting an untrained model."""
    root = tmp_path / "data"
    shutil.copytree(os.path.join(HERE, "data", "tiny_qa"), root / "tiny_qa")
    (root / "tiny_qa" / "processed" / "stage1" / "train.json").write_text("[]")
    out = tmp_path / "run"
    result = run([f"datasets.root={root}", f"hydra.run.dir={out}", *SMALL, "train.num_epoch=1"], cwd=tmp_path,
                 check=False)
    assert result.returncode != 0
    assert "training dataset 'tiny_qa' has no usable training question: it holds no question" in result.stderr
    assert not (out / "pretrained").exists() and not (out / "model_last.pth").exists()



def test_torchrun_graph_partitioned_run_matches_one_process(data_root, tmp_path):
    """train.graph_partition=contiguous under torchrun: both ranks train on the same batches over
    half of the graph each; weights and metrics are the single-process run's."""
    one, split = tmp_path / "one", tmp_path / "split"
    args = [f"datasets.root={data_root}", *SMALL, "train.num_epoch=2"]
    run([*args, f"hydra.run.dir={one}"], cwd=tmp_path)
    out = run([*args, f"hydra.run.dir={split}", "train.graph_partition=contiguous"], cwd=tmp_path, torchrun=2)
    assert "graph partition (contiguous)" in out.stderr + out.stdout
    weights = [torch.load(folder / "model_last.pth", weights_only=True)["model"] for folder in (one, split)]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], rtol=1e-4, atol=1e-5, msg=key)
    rows = [read_jsonl(folder / "metrics.jsonl") for folder in (one, split)]
    assert [r["epoch"] for r in rows[1]] == [0, 1]  # rank 0 alone writes
    for expected, actual in zip(*rows):
        assert actual["questions"] == expected["questions"]
        for key in ("ent_mrr", "ent_hits@10", "doc_recall@2", "doc_recall@5"):
            assert actual[key] == pytest.approx(expected[key], abs=1e-6), key
