"""No noise a user cannot act on: torch_geometric's import-time TorchScript warning, and every
warning once per torchrun process instead of once."""

import logging
import subprocess
import sys
import warnings

from gfmrag_fast.training.distributed import ALL_RANKS, DistEnv, log_on_main_only


def test_importing_the_workflows_warns_nothing_about_torchscript():
    code = "import gfmrag_fast.workflow.finetune, gfmrag_fast.workflow.pretrain, gfmrag_fast.retrieval"
    result = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "torch.jit.script" not in result.stderr, result.stderr


def _capture_root(env):
    """Quietens a root logger with a console-like and a file handler for ``env``, then logs.

    Returns (what the console shows, what the file gets, the root's handlers, caught warnings)."""
    shown, filed = [], []

    class ListHandler(logging.Handler):
        def emit(self, record):
            shown.append(self.format(record))

    class ListFileHandler(logging.FileHandler):
        def __init__(self):  # no file opened
            logging.Handler.__init__(self)
            self.stream = None

        def emit(self, record):
            filed.append(self.format(record))

    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    root.handlers[:] = [ListHandler(), ListFileHandler()]
    root.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings():
            log_on_main_only(env)
            log = logging.getLogger("gfmrag_fast.test")
            log.info("info")
            log.warning("shared warning")
            log.warning("about my shard", extra=ALL_RANKS)
            log.error("an error")
            with warnings.catch_warnings(record=True) as caught:
                warnings.warn("a python warning", UserWarning)
        return shown, filed, root.handlers[:], caught
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


def test_other_ranks_show_errors_and_rank_specific_messages_only():
    shown, filed, handlers, caught = _capture_root(DistEnv(rank=1, world_size=2))
    assert shown == ["[rank 1] about my shard", "an error"]
    assert filed == [] and not any(isinstance(h, logging.FileHandler) for h in handlers)  # rank 0 writes the log
    assert caught == []  # Python warnings ignored: rank 0 shows the same ones


def test_rank_zero_shows_everything():
    shown, filed, handlers, caught = _capture_root(DistEnv(rank=0, world_size=2))
    assert shown == filed == ["info", "shared warning", "about my shard", "an error"]
    assert len(handlers) == 2 and len(caught) == 1


def test_torchrun_prints_each_dataset_warning_as_often_as_one_process(tmp_path):
    import os
    import shutil
    from pathlib import Path

    data = tmp_path / "data"
    shutil.copytree(Path(__file__).parent / "data" / "tiny_qa", data / "tiny_qa")  # 2 of 4 questions skipped
    args = [f"datasets.root={data}", "datasets.train_names=[tiny_qa]", "datasets.valid_names=[tiny_qa]",
            "model.entity_model.input_dim=8", "model.entity_model.hidden_dims=[8,8]", "train.batch_size=2",
            "train.num_epoch=1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    counts = []
    for launcher in ([sys.executable], [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                        "--nproc_per_node=2"]):
        run_dir = tmp_path / f"run{len(counts)}"
        result = subprocess.run([*launcher, "-m", "gfmrag_fast.workflow.finetune", *args, f"hydra.run.dir={run_dir}"],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        counts.append((result.stdout + result.stderr).count("tiny_qa/train: skipped 2 of 4 questions"))
    assert counts[0] >= 1 and counts[1] == counts[0], counts
