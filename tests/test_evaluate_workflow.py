"""The evaluate workflow and GFM-RAG's command names, end to end (subprocesses, CPU, tiny data)."""

import os
import shutil
import subprocess
import sys

import pytest

from gfmrag_fast.atomic_io import read_jsonl

HERE = os.path.dirname(os.path.abspath(__file__))
SMALL = ["model.entity_model.input_dim=8", "model.entity_model.hidden_dims=[8,8]", "train.batch_size=2"]


def run(module, args, cwd, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", f"gfmrag_fast.workflow.{module}", *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for name in ("tiny_qa", "tiny_kg"):
        shutil.copytree(os.path.join(HERE, "data", name), root / name)
    return root


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    """One epoch of fine-tuning through GFM-RAG's command name."""
    out = tmp_path_factory.mktemp("ft")
    run("stage2_qa_finetune", [f"datasets.root={data_root}", "datasets.train_names=[tiny_qa]",
                               "datasets.valid_names=[tiny_qa]", f"hydra.run.dir={out}", *SMALL, "train.num_epoch=1"],
        cwd=out)
    return out


def test_evaluate_reproduces_the_fine_tune_metrics(trained, data_root, tmp_path):
    """Evaluating the run's exported model gives the fine-tune's own evaluation of that epoch."""
    run("evaluate", [f"train.checkpoint={trained}", f"datasets.root={data_root}", "datasets.valid_names=[tiny_qa]",
                     f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    (fine_tune,) = read_jsonl(trained / "metrics.jsonl")
    (row,) = read_jsonl(tmp_path / "metrics.jsonl")
    for key, value in fine_tune.items():
        if key != "epoch":
            assert row[key] == pytest.approx(value), key
    assert row["entities"] == "annotated" and row["doc_ranker"]["_target_"].endswith("IDFWeightedTopKRanker")
    (prediction,) = read_jsonl(tmp_path / "predictions.jsonl")
    assert prediction["dataset"] == "tiny_qa" and prediction["id"] == "t1"
    assert prediction["question"] == "Which town is Acme in?" and prediction["question_entities"] == ["acme"]
    assert prediction["gold_documents"] == ["Doc C", "Doc A"]
    scores = [d["score"] for d in prediction["documents"]]
    assert len(scores) == 4 and scores == sorted(scores, reverse=True)


def test_evaluate_linked_entities_and_hybrid_ranker(trained, data_root, tmp_path):
    run("evaluate", [f"train.checkpoint={trained / 'pretrained'}", f"datasets.root={data_root}",
                     "datasets.valid_names=[tiny_qa]", f"hydra.run.dir={tmp_path}", "retrieval.entities=linked",
                     "doc_ranker=hybrid", "retrieval.top_k=2"], cwd=tmp_path)
    (row,) = read_jsonl(tmp_path / "metrics.jsonl")
    assert row["link_precision"] == 1.0 and row["link_recall"] == 1.0 and row["no_entities"] == 0
    assert row["doc_ranker"]["_target_"].endswith("HybridRanker") and 0 <= row["doc_recall@2"] <= 1
    (prediction,) = read_jsonl(tmp_path / "predictions.jsonl")
    assert prediction["annotated_entities"] == ["acme"] and len(prediction["documents"]) == 2


def test_evaluate_refuses_a_training_run_folder_and_fine_tune_refuses_hybrid(trained, data_root, tmp_path):
    result = run("evaluate", [f"train.checkpoint={trained}", f"datasets.root={data_root}",
                              "datasets.valid_names=[tiny_qa]", f"hydra.run.dir={trained}"], cwd=tmp_path, check=False)
    assert result.returncode != 0 and "is a training run folder" in result.stderr
    result = run("finetune", [f"datasets.root={data_root}", "datasets.train_names=[tiny_qa]",
                              "datasets.valid_names=[tiny_qa]", f"hydra.run.dir={tmp_path}", *SMALL, "doc_ranker=hybrid"],
                 cwd=tmp_path, check=False)
    assert result.returncode != 0 and "use them with python -m gfmrag_fast.workflow.evaluate" in result.stderr


@pytest.mark.slow
def test_gfm_rag_pretrain_command_and_config_names(data_root, tmp_path):
    run("stage2_kg_pretrain", [f"datasets.root={data_root}", "datasets.train_names=[tiny_kg]",
                               "datasets.valid_names=[tiny_kg]", f"hydra.run.dir={tmp_path / 'pt'}", *SMALL,
                               "train.num_epoch=1", "task.num_negative=4"], cwd=tmp_path)
    assert read_jsonl(tmp_path / "pt" / "metrics.jsonl")[0]["dataset"] == "tiny_kg"
    # the config name works with the new command names as well
    run("finetune", ["--config-name", "stage2_qa_finetune", f"datasets.root={data_root}",
                     "datasets.train_names=[tiny_qa]", "datasets.valid_names=[]", f"hydra.run.dir={tmp_path / 'ft'}",
                     *SMALL, "train.num_epoch=1"], cwd=tmp_path)
    assert os.path.exists(tmp_path / "ft" / "pretrained" / "model.pth")
