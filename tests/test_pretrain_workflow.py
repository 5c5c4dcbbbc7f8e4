"""KG-completion pre-training: the task in-process (batches, loss, filtered ranks) and end-to-end
workflow runs in subprocesses (CPU): outputs, overrides, resume, torchrun, malformed input."""

import math
import os
import random
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch_geometric.data import Data

import gfmrag_fast
from gfmrag_fast.models import to_tail_prediction
from gfmrag_fast.checkpoints import build_model
from gfmrag_fast.training import DistEnv
from gfmrag_fast.atomic_io import read_jsonl
from gfmrag_fast.training.kg_task import KGCompletionTask

from helpers import workflow_config

CONFIG_DIR = os.path.join(os.path.dirname(gfmrag_fast.__file__), "workflow", "config")
METRICS = ["mr", "mrr", "hits@1", "hits@3", "hits@10"]


# --- in-process: the task ------------------------------------------------------------------
def synthetic_dataset(name="syn", num_nodes=12, num_direct=3, num_train=40, held_out=True, dim=8, seed=0):
    """A GFM-RAG KG graph as KGDataset.graph holds it, with distinct triples split train / valid / test."""
    gen = torch.Generator().manual_seed(seed)
    hrt = torch.stack([torch.randint(0, num_nodes, (400,), generator=gen),
                       torch.randint(0, num_nodes, (400,), generator=gen),
                       torch.randint(0, num_direct, (400,), generator=gen)], dim=1)
    hrt = torch.unique(hrt, dim=0)
    hrt = hrt[torch.randperm(len(hrt), generator=gen)]
    train, valid, test = hrt[:num_train], hrt[num_train:num_train + 7], hrt[num_train + 7:num_train + 12]
    target = train[:, :2].t().contiguous()
    graph = Data(
        edge_index=torch.cat([target, target.flip(0)], 1), edge_type=torch.cat([train[:, 2], train[:, 2] + num_direct]),
        num_nodes=num_nodes, num_relations=2 * num_direct, rel_emb=torch.randn(2 * num_direct, dim, generator=gen),
        target_edge_index=target, target_edge_type=train[:, 2].clone(),
    )
    if held_out:
        graph.valid_triples, graph.test_triples = valid, test
    return SimpleNamespace(data_name=name, graph=graph, feat_dim=dim)


def small_model(dim=8, layers=2, rel_emb_dim=8):
    return build_model({
        "_target_": "gfmrag.models.QueryGNN", "rel_emb_dim": rel_emb_dim,
        "entity_model": {"_target_": "gfmrag.ultra.models.EntityNBFNet", "input_dim": dim,
                         "hidden_dims": [dim] * layers,
                         "message_func": "distmult", "aggregate_func": "sum", "short_cut": True, "layer_norm": True},
    })


def make_task(train_sets, valid_sets, **kwargs):
    args = dict(num_negative=5, strict_negative=True, adversarial_temperature=1.0, batch_size=6, eval_batch_size=4,
                metrics=METRICS, fast_test=10, text_emb_conf={}, device=torch.device("cpu"), seed=0)
    return KGCompletionTask(train_sets, valid_sets, **{**args, **kwargs})


def hashed_scores(graph, batch, edge_mask=None):
    """A stand-in model: a fixed score per (h, t, r) after the model's own head-to-tail rewrite."""
    h, t, r = to_tail_prediction(*batch.unbind(-1), graph.num_relations // 2)
    return torch.sin(h * 12.9898 + t * 78.233 + r * 37.719).double()


def brute_force_ranks(score_fn, graph, triples, known):
    """Filtered ranks of tails then heads, one query at a time, filters from Python sets."""
    n = graph.num_nodes
    tails, heads = [], []
    for h, t, r in triples.tolist():
        scores = score_fn(graph, torch.tensor([[[h, c, r] for c in range(n)]]))[0]
        others = [c for c in range(n) if (h, c, r) not in known]
        tails.append(1 + sum(bool(scores[c] >= scores[t]) for c in others))
        scores = score_fn(graph, torch.tensor([[[c, t, r] for c in range(n)]]))[0]
        others = [c for c in range(n) if (c, t, r) not in known]
        heads.append(1 + sum(bool(scores[c] >= scores[h]) for c in others))
    return torch.tensor(tails + heads, dtype=torch.float64)


def expected_row(ranks):
    return {"mr": ranks.mean().item(), "mrr": (1 / ranks).mean().item(),
            **{f"hits@{k}": (ranks <= k).double().mean().item() for k in (1, 3, 10)}}


def triple_set(*parts):
    return {tuple(row) for part in parts for row in part.tolist()}


def test_evaluate_matches_brute_force_filtered_ranks():
    ds = synthetic_dataset()
    g = ds.graph
    train = torch.stack([g.target_edge_index[0], g.target_edge_index[1], g.target_edge_type], 1)
    known = triple_set(train, g.valid_triples, g.test_triples)
    rows = make_task([ds], [ds]).evaluate(hashed_scores, DistEnv())
    assert [(row["dataset"], row["split"]) for row in rows] == [("syn", "valid"), ("syn", "test")]
    for row, triples in zip(rows, (g.valid_triples, g.test_triples)):
        expected = expected_row(brute_force_ranks(hashed_scores, g, triples, known))
        assert set(row) == {"dataset", "split", *METRICS}
        for key in METRICS:
            assert row[key] == pytest.approx(expected[key]), key


def test_evaluate_shards_over_ranks():
    """Three ranks each rank their slice; gathered, the rows equal the single-process ones."""
    ds = synthetic_dataset()
    single = make_task([ds], [ds]).evaluate(hashed_scores, DistEnv())
    shards = []  # per rank: the ranks it contributed to each gather (one per split)
    for rank in range(3):
        env, mine = DistEnv(rank=rank, world_size=3), []
        env.gather_objects = lambda obj, mine=mine: mine.append(obj) or [obj]
        make_task([ds], [ds]).evaluate(hashed_scores, env)
        shards.append(mine)
    for split, triples in enumerate((ds.graph.valid_triples, ds.graph.test_triples)):
        sizes = [len(shards[rank][split]) for rank in range(3)]
        assert sum(sizes) == 2 * len(triples) and max(sizes) - min(sizes) <= 2
    gathered = iter(zip(*shards))
    env = DistEnv(rank=0, world_size=3)
    env.gather_objects = lambda obj: list(next(gathered))
    rows = make_task([ds], [ds]).evaluate(hashed_scores, env)
    assert [(r["split"], r["mrr"]) for r in rows] == [(r["split"], pytest.approx(r["mrr"])) for r in single]
    assert [r["mr"] for r in rows] == pytest.approx([r["mr"] for r in single])


def test_evaluate_real_model_on_training_sample_without_held_out():
    ds = synthetic_dataset(held_out=False)
    model = small_model().eval()
    task = make_task([ds], [ds], fast_test=10)
    with torch.no_grad():
        rows = task.evaluate(model, DistEnv())
    assert [(row["dataset"], row["split"]) for row in rows] == [("syn", "train")]
    assert 1 <= rows[0]["mr"] <= ds.graph.num_nodes and 0 < rows[0]["mrr"] <= 1
    assert rows[0]["hits@1"] <= rows[0]["hits@3"] <= rows[0]["hits@10"] <= 1
    # The sample is fixed by the seed: the same rows every epoch.
    with torch.no_grad():
        assert task.evaluate(model, DistEnv()) == rows


def test_loss_uses_strict_negatives_and_masks_easy_edges():
    ds = synthetic_dataset()
    seen = {}
    model = small_model()

    def recording_model(graph, batch, edge_mask=None):
        seen.update(batch=batch, edge_mask=edge_mask)
        return model(graph, batch, edge_mask=edge_mask)

    task = make_task([ds], [], num_negative=7)
    index, triples = next(iter(task.train_batches(0, DistEnv())))
    loss, _ = task.loss(recording_model, (index, triples))
    loss.backward()
    assert loss.ndim == 0 and math.isfinite(loss.item())
    assert all(p.grad is not None for p in model.parameters())
    batch, edge_mask = seen["batch"], seen["edge_mask"]
    assert batch.shape == (len(triples), 8, 3) and torch.equal(batch[:, 0], triples)
    true = triple_set(torch.stack([ds.graph.target_edge_index[0], ds.graph.target_edge_index[1],
                                   ds.graph.target_edge_type], 1))
    assert not any(tuple(row) in true for row in batch[:, 1:].reshape(-1, 3).tolist())  # strict
    g = ds.graph
    batch_edges = {(h, t, r) for h, t, r in triples.tolist()}
    removed = {(h, t, r) for (h, t), r in zip(g.edge_index[:, edge_mask].t().tolist(), g.edge_type[edge_mask].tolist())}
    inverse = {(t, h, r + g.num_relations // 2) for h, t, r in batch_edges}
    assert removed == batch_edges | inverse


def test_train_batches_shard_every_triple_over_ranks():
    a, b = synthetic_dataset("a", num_train=40), synthetic_dataset("b", num_train=30, seed=1)
    task = make_task([a, b], [])
    seen = {0: [], 1: []}
    counts = []
    for rank in range(2):
        batches = list(task.train_batches(epoch=3, env=DistEnv(rank=rank, world_size=2)))
        counts.append(len(batches))
        for index, triples in batches:
            assert triples.dtype == torch.long and triples.shape[1] == 3 and len(triples) <= 6
            seen[index] += triples.tolist()
    assert counts[0] == counts[1]  # DDP ranks take the same number of steps
    for index, ds in enumerate((a, b)):
        g = ds.graph
        expected = torch.stack([g.target_edge_index[0], g.target_edge_index[1], g.target_edge_type], 1)
        assert {tuple(t) for t in seen[index]} == triple_set(expected)


def test_unknown_metric_is_rejected():
    with pytest.raises(ValueError, match="unknown link-prediction metric 'auroc'"):
        make_task([synthetic_dataset()], [], metrics=["mrr", "auroc"])


def test_best_epoch_is_picked_on_the_valid_split(tmp_path):
    from gfmrag_fast.training import Trainer, TrainOptions

    model = torch.nn.Linear(1, 1)
    trainer = Trainer(model, torch.optim.AdamW(model.parameters()), None,
                      TrainOptions(metric="mrr", metric_split="valid"), str(tmp_path), DistEnv())
    rows = [{"split": "valid", "mrr": 0.5}, {"split": "test", "mrr": 0.9}, {"split": "valid", "mrr": 0.7}]
    assert trainer.score(rows) == pytest.approx(0.6)
    assert trainer.score([{"split": "train", "mrr": 0.8}]) == pytest.approx(0.8)  # no valid rows: all rows


def test_config_overrides_reach_the_task():
    from hydra import compose, initialize_config_dir

    from gfmrag_fast.workflow.pretrain import build_task

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        default = compose("pretrain")
        cfg = compose("pretrain", overrides=["task.num_negative=7", "task.strict_negative=false",
                                             "task.adversarial_temperature=0.5", "train.batch_size=3",
                                             "train.eval_batch_size=2", "train.fast_test=5"])
    # GFM-RAG's pre-training recipe.
    task_cfg = default.task
    assert (task_cfg.num_negative, task_cfg.strict_negative, task_cfg.adversarial_temperature) == (256, True, 1)
    assert list(default.task.metric) == METRICS and default.task.best_metric == "mrr"
    assert default.model.entity_model._target_ == "gfmrag.ultra.models.EntityNBFNet"
    ds = synthetic_dataset()
    task = build_task(cfg, [ds], [ds], torch.device("cpu"))
    assert (task.num_negative, task.strict_negative, task.adversarial_temperature) == (7, False, 0.5)
    assert (task.batch_size, task.eval_batch_size, task.fast_test) == (3, 2, 5)
    assert task.text_emb_conf["text_emb_model_name"] == "sentence-transformers/all-MiniLM-L6-v2"


# --- end-to-end: the workflow in subprocesses ------------------------------------------------
SMALL = [
    "datasets.train_names=[tiny]",
    "datasets.valid_names=[tiny]",
    "model.entity_model.input_dim=8",
    "model.entity_model.hidden_dims=[8,8]",
    "train.batch_size=8",
    "train.log_interval=1",
]


def run(args, cwd, torchrun=0, check=True, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
    result = subprocess.run([*launcher, "-m", "gfmrag_fast.workflow.pretrain", *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def write_kg(folder, lines_by_file):
    stage1 = folder / "processed" / "stage1"
    stage1.mkdir(parents=True)
    for name, lines in lines_by_file.items():
        (stage1 / name).write_text("".join(line + "\n" for line in lines))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """``tiny``: 20 entities, 4 relations, 60 / 8 / 8 train / valid / test triples; ``broken``: a bad line 3."""
    root = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    relations = ["part of", "treats", "causes", "located in"]
    triples = sorted({(f"e{rng.randrange(20)}", rng.choice(relations), f"e{rng.randrange(20)}") for _ in range(120)})
    rng.shuffle(triples)
    lines = [",".join(t) for t in triples]
    write_kg(root / "tiny", {"kg.txt": lines[:60], "valid.txt": lines[60:68], "test.txt": lines[68:76]})
    write_kg(root / "broken", {"kg.txt": ["a,part of,b", "b,causes,c", "c,treats", "d,part of,a"]})
    return root


@pytest.fixture(scope="module")
def first_run(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    result = run([f"datasets.root={data_root}", f"hydra.run.dir={out}", *SMALL, "train.num_epoch=1",
                  "train.save_best_only=false", "task.num_negative=5"], cwd=out)
    return out, result


def test_run_writes_outputs(first_run):
    out, result = first_run
    for name in ("model_best.pth", "model_last.pth", "model_epoch_0.pth", "metrics.jsonl", "training_curves.png",
                 "pretrained/config.json", "pretrained/model.pth"):
        assert os.path.exists(out / name), name
    rows = read_jsonl(out / "metrics.jsonl")
    assert [(r["epoch"], r["dataset"], r["split"]) for r in rows] == [(0, "tiny", "valid"), (0, "tiny", "test")]
    for row in rows:
        assert set(row) == {"epoch", "dataset", "split", *METRICS}
        assert 1 <= row["mr"] <= 20 and 0 < row["mrr"] <= 1 and row["hits@1"] <= row["hits@3"] <= row["hits@10"] <= 1
    model, config = gfmrag_fast.load_pretrained(str(out / "pretrained"))
    assert config["model_config"]["_target_"] == "gfmrag.models.QueryGNN"
    assert config["model_config"]["entity_model"]["_target_"] == "gfmrag.ultra.models.EntityNBFNet"
    assert config["model_config"]["entity_model"]["hidden_dims"] == [8, 8]
    assert config["model_config"]["rel_emb_dim"] == 384  # from the MiniLM relation embeddings
    assert config["text_emb_model_config"]["text_emb_model_name"] == "sentence-transformers/all-MiniLM-L6-v2"
    state = torch.load(out / "model_last.pth", weights_only=True)
    assert state["epoch"] == 1 and {"model", "optimizer", "rng"} <= set(state)
    assert "final {'epoch': 0, 'dataset': 'tiny', 'split': 'test'" in result.stdout + result.stderr
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]


def test_overrides_reach_the_run(first_run):
    """The overrides change what ran, not only Hydra's record of the config: the model's size in
    the saved weights, the epochs and the optimizer steps taken (task.num_negative reaching the
    task is test_config_overrides_reach_the_task's)."""
    out, _ = first_run
    defaults = workflow_config("pretrain")
    assert list(defaults.model.entity_model.hidden_dims) != [8, 8] and defaults.model.entity_model.input_dim != 8
    assert defaults.train.num_epoch != 1 and defaults.train.batch_size != 8
    expected_layers = {f"entity_model.layers.{i}.linear.weight": (8, 16) for i in range(2)}  # Linear(2d, d), d = 8
    for weights in (torch.load(out / "model_last.pth", weights_only=True)["model"],
                    torch.load(out / "pretrained" / "model.pth", weights_only=True)["model"]):
        assert {k: tuple(v.shape) for k, v in weights.items() if k.endswith("linear.weight")} == expected_layers
        assert weights["rel_mlp.weight"].shape == (8, 384)  # input_dim x MiniLM's width
    state = torch.load(out / "model_last.pth", weights_only=True)
    assert state["epoch"] == 1 and [h["epoch"] for h in state["history"]] == [0]
    assert not os.path.exists(out / "model_epoch_1.pth")
    # 60 training triples in batches of 8 (the default, 32, would be 2 steps)
    assert {int(p["step"]) for p in state["optimizer"]["state"].values()} == {8}


def test_resume_continues_at_the_next_epoch(first_run, data_root):
    out, _ = first_run
    run([f"datasets.root={data_root}", f"hydra.run.dir={out}", *SMALL, "train.num_epoch=2",
         "train.save_best_only=false", "task.num_negative=5", f"train.checkpoint={out / 'model_last.pth'}"], cwd=out)
    rows = read_jsonl(out / "metrics.jsonl")
    assert [(r["epoch"], r["split"]) for r in rows] == [(0, "valid"), (0, "test"), (1, "valid"), (1, "test")]
    assert torch.load(out / "model_last.pth", weights_only=True)["epoch"] == 2
    assert os.path.exists(out / "model_epoch_1.pth")


def test_torchrun_two_processes_rank0_writes(data_root, tmp_path):
    out = run([f"datasets.root={data_root}", f"hydra.run.dir={tmp_path}", *SMALL, "train.num_epoch=1",
               "task.num_negative=5"], cwd=tmp_path, torchrun=2)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["epoch"], r["split"]) for r in rows] == [(0, "valid"), (0, "test")]  # not one row per rank
    assert os.path.exists(tmp_path / "pretrained" / "model.pth")
    assert "2 process(es)" in out.stderr + out.stdout


def test_malformed_dataset_names_file_and_line(data_root, tmp_path):
    result = run([f"datasets.root={data_root}", f"hydra.run.dir={tmp_path}", "datasets.train_names=[broken]",
                  "datasets.valid_names=[]"], cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert f"{data_root / 'broken' / 'processed' / 'stage1' / 'kg.txt'}:3" in result.stderr


@pytest.mark.slow
def test_torchrun_graph_partitioned_run_matches_one_process(first_run, data_root, tmp_path):
    """train.graph_partition=contiguous: the ranks draw the same negatives and masks, so the epoch's
    weights are the single-process run's (first_run's epoch 0)."""
    out = run([f"datasets.root={data_root}", f"hydra.run.dir={tmp_path}", *SMALL, "train.num_epoch=1",
               "task.num_negative=5", "train.graph_partition=contiguous"], cwd=tmp_path, torchrun=2)
    assert "graph partition (contiguous)" in out.stderr + out.stdout
    expected = torch.load(first_run[0] / "model_epoch_0.pth", weights_only=True)["model"]
    actual = torch.load(tmp_path / "model_last.pth", weights_only=True)["model"]
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["epoch"], r["split"]) for r in rows] == [(0, "valid"), (0, "test")]
    for row, ref in zip(rows, read_jsonl(first_run[0] / "metrics.jsonl")):
        assert row["mrr"] == pytest.approx(ref["mrr"], abs=1e-6)
