"""What the workflows share: train.checkpoint handling, the fine-tune task from its config, the
datasets.root check, run folders of failed runs, the OpenMP setting of the entry points."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import gfmrag_fast
from gfmrag_fast.models import EntityNBFNet, GNNRetriever, QueryGNN, QueryNBFNet
from gfmrag_fast.checkpoints import save_pretrained
from gfmrag_fast.training import DistEnv
from gfmrag_fast.workflow.common import apply_checkpoint

CONFIG_DIR = os.path.join(os.path.dirname(gfmrag_fast.__file__), "workflow", "config")
ENTITY = dict(input_dim=8, hidden_dims=[8, 8], message_func="distmult", aggregate_func="sum", short_cut=True,
              layer_norm=True)


def test_retriever_starts_from_a_kg_pretrained_model(tmp_path):
    torch.manual_seed(0)
    pretrained = QueryGNN(EntityNBFNet(**ENTITY), 12)
    save_pretrained(pretrained, {"text_emb_model_name": "x"}, str(tmp_path / "pt"))
    retriever = GNNRetriever(QueryNBFNet(**ENTITY), 12)
    fresh_question_mlp = retriever.question_mlp.weight.detach().clone()
    apply_checkpoint(SimpleNamespace(raw_model=retriever), str(tmp_path / "pt"), DistEnv())
    for key, value in pretrained.state_dict().items():
        assert torch.equal(retriever.state_dict()[key], value), key
    assert torch.equal(retriever.question_mlp.weight, fresh_question_mlp)


def test_checkpoint_of_another_shape_is_refused(tmp_path):
    save_pretrained(QueryGNN(EntityNBFNet(**{**ENTITY, "hidden_dims": [8, 8, 8]}), 12), {}, str(tmp_path / "pt"))
    with pytest.raises(ValueError, match="does not fit the configured model"):
        apply_checkpoint(SimpleNamespace(raw_model=GNNRetriever(QueryNBFNet(**ENTITY), 12)), str(tmp_path / "pt"),
                         DistEnv())


# --------------------------------------------------------------------------- the fine-tune task from its config
def test_qa_task_takes_every_setting_from_the_config():
    from hydra import compose, initialize_config_dir

    from gfmrag_fast.data import LazyDataset
    from gfmrag_fast.doc_rankers import TopKRanker
    from gfmrag_fast.workflow.finetune import build_task

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose("finetune", overrides=[
            "train.batch_size=3", "train.eval_batch_size=5", "train.fast_test=4", "train.init_entities_weight=false",
            "task.metric=[mrr]", "datasets.max_datasets_in_memory=1", "datasets.data_loading_workers=0", "seed=9",
            "doc_ranker=topk_ranker", "doc_ranker.top_k=3", "task.losses.1.cfg.weight=0.5",
            "train.valid_fraction=0.25", "train.min_valid_questions=2"])
    ds = LazyDataset("a", lambda: pytest.fail("the task must not load a dataset to be built"),
                     {"train": 5, "test": 2, "feat_dim": 8})
    task = build_task(cfg, [ds], [ds], torch.device("cpu"))
    try:
        assert (task.batch_size, task.eval_batch_size, task.fast_test, task.seed) == (3, 5, 4, 9)
        assert (task.valid_fraction, task.min_valid_questions) == (0.25, 2)
        assert task.metrics == ["mrr"] and task.max_datasets_in_memory == 1 and task._init_entities_weight is False
        assert [(loss.name, loss.weight) for loss in task.losses] == [("ent_bce_loss", 0.3), ("ent_pcr_loss", 0.5)]
        ranker = task._make_ranker(torch.eye(4))
        assert type(ranker) is TopKRanker and ranker.top_k == 3
        assert task.text_emb_conf["_target_"] == "gfmrag.text_emb_models.BaseTextEmbModel"
    finally:
        task.datasets.close()

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        hybrid = compose("finetune", overrides=["doc_ranker=hybrid"])
    with pytest.raises(ValueError, match="doc_ranker=hybrid and doc_ranker=dense rank by question-document"):
        build_task(hybrid, [ds], [ds], torch.device("cpu"))


# --------------------------------------------------------------------------- datasets.root
def test_missing_datasets_root_names_the_absolute_path_and_the_key(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from gfmrag_fast.workflow.startup import datasets_root

    monkeypatch.chdir(tmp_path)
    cfg = OmegaConf.create({"datasets": {"root": "data"}})
    with pytest.raises(FileNotFoundError) as info:
        datasets_root(cfg, ["musique_hippo"])
    message = str(info.value)
    assert f"looked for {tmp_path / 'data'}, relative to the current folder {tmp_path}" in message
    assert "datasets.root='data'" in message and "set datasets.root=/path/to/data" in message

    (tmp_path / "data" / "umls").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"dataset\(s\) \['musique_hippo'\] not found .* datasets there: \['umls'\]"):
        datasets_root(cfg, ["umls", "musique_hippo"])
    assert datasets_root(cfg, ["umls"]) == str(tmp_path / "data")


# --------------------------------------------------------------------------- run folders of failed runs
def hydra_files(folder, log_text=""):
    (folder / ".hydra").mkdir(parents=True)
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (folder / ".hydra" / name).write_text("x: 1\n")
    (folder / "finetune.log").write_text(log_text)


def test_run_folder_is_removed_only_when_it_holds_nothing_but_this_runs_hydra_files(tmp_path):
    from gfmrag_fast.workflow.startup import RunFolder

    fresh = tmp_path / "fresh"
    hydra_files(fresh)
    folder = RunFolder(str(fresh), "finetune.log")
    (fresh / "finetune.log").write_text("this run's log lines\n")
    assert folder.discard() and not fresh.exists()

    with_checkpoint = tmp_path / "checkpoint"
    hydra_files(with_checkpoint)
    (with_checkpoint / "model_last.pth").write_bytes(b"weights")
    assert not RunFolder(str(with_checkpoint), "finetune.log").discard()
    assert (with_checkpoint / "model_last.pth").exists()

    earlier_log = tmp_path / "earlier"  # a log written before this run started: another run's folder
    hydra_files(earlier_log, "an earlier run\n")
    assert not RunFolder(str(earlier_log), "finetune.log").discard() and earlier_log.exists()

    written_later = tmp_path / "later"  # fresh at the start, then the run wrote a file of its own
    hydra_files(written_later)
    folder = RunFolder(str(written_later), "finetune.log")
    (written_later / "metrics.jsonl").write_text("{}\n")
    assert not folder.discard() and (written_later / "metrics.jsonl").exists()

    used = tmp_path / "used"
    hydra_files(used)
    folder = RunFolder(str(used), "finetune.log")
    folder.mark_used()
    assert not folder.discard() and used.exists()

    extra_in_hydra = tmp_path / "extra"
    hydra_files(extra_in_hydra)
    (extra_in_hydra / ".hydra" / "notes.txt").write_text("mine")
    assert not RunFolder(str(extra_in_hydra), "finetune.log").discard() and extra_in_hydra.exists()


def run_finetune(args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "gfmrag_fast.workflow.finetune", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_failed_run_leaves_no_folder_but_never_deletes_a_users_files(tmp_path):
    out = tmp_path / "run"
    result = run_finetune(["datasets.root=nowhere", f"hydra.run.dir={out}", "train.batch_size=2"], cwd=tmp_path)
    assert result.returncode != 0
    assert f"looked for {tmp_path / 'nowhere'}" in result.stderr and "set datasets.root=" in result.stderr
    logged = result.stdout + result.stderr
    # The start logs the overrides, not the whole config.
    assert "overrides: datasets.root=nowhere train.batch_size=2 (the defaults of finetune.yaml" in logged
    assert "hidden_dims" not in logged
    assert "removed the run folder" in logged and not out.exists()

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "model_best.pth").write_bytes(b"a user's checkpoint")
    result = run_finetune(["datasets.root=nowhere", f"hydra.run.dir={mine}"], cwd=tmp_path)
    assert result.returncode != 0 and "looked for" in result.stderr
    assert (mine / "model_best.pth").read_bytes() == b"a user's checkpoint"


# --------------------------------------------------------------------------- OpenMP wait policy
def test_openmp_policy_is_set_by_the_entry_points_only():
    code = ("import os, runpy, sys\n"
            "import gfmrag_fast.workflow.common, gfmrag_fast.workflow.finetune, gfmrag_fast.workflow.evaluate\n"
            "assert 'OMP_WAIT_POLICY' not in os.environ, 'set by an import'\n"
            "sys.argv = ['stage2_kg_pretrain', '--help']\n"
            "try:\n"
            "    runpy.run_module('gfmrag_fast.workflow.stage2_kg_pretrain', run_name='__main__')\n"
            "except SystemExit:\n"
            "    pass\n"
            "print('policy', os.environ.get('OMP_WAIT_POLICY'))\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("policy PASSIVE")
