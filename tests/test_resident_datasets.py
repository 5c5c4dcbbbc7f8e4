"""Many datasets in bounded memory (issue 13, item 1): the owner of the resident datasets, the epoch
plan over groups of them, and both tasks training and evaluating 12 datasets with 3 in memory."""

import functools
import math
import os
import re
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DistributedSampler

import gfmrag_fast
from gfmrag_fast.atomic_io import read_jsonl
from gfmrag_fast.data import LazyDataset, ResidentDatasets
from gfmrag_fast.training import DistEnv, Trainer, TrainOptions
from gfmrag_fast.training.epoch_plan import EpochPlan, shard_indices

from conftest import METRIC, Census, describe_for, make_task, small_model

pytestmark = pytest.mark.usefixtures("one_thread")

# --- the owner: ResidentDatasets ------------------------------------------------------------
def gated(names, gates=None, broken=()):
    """LazyDatasets whose loads wait for their gate (if any); those in ``broken`` fail."""
    def load(name):
        if gates:
            assert gates[name].wait(10)
        if name in broken:
            raise ValueError(f"{name} is broken")
        return SimpleNamespace(data_name=name)

    return [LazyDataset(name, functools.partial(load, name)) for name in names]


def test_background_loads_take_free_slots_only():
    gates = {name: threading.Event() for name in "abcdef"}
    pool = ResidentDatasets(gated("abcdef", gates), lambda ds: ds, max_resident=3, workers=2)
    pool.plan(list("abcdef"))
    assert pool.resident == ["a", "b", "c"]  # three slots: d waits, although a thread is free soon
    for gate in gates.values():
        gate.set()
    assert [pool.hold(name).data_name for name in "abc"] == ["a", "b", "c"]
    assert pool.resident == ["a", "b", "c"]  # every slot held: still nothing more
    pool.release("a")  # a's slot goes to d, the next planned
    assert pool.resident == ["b", "c", "d"] and pool.events[-2:] == [("evict", "a"), ("load", "d")]
    pool.release("b")
    pool.release("c")
    assert sorted(pool.resident) == ["d", "e", "f"]
    assert [pool.hold(name).data_name for name in "def"] == ["d", "e", "f"]
    assert pool.peak_resident == 3 and pool.stats()["loads"] == 6
    pool.close()


def test_released_dataset_stays_until_its_slot_is_needed():
    loads = []
    sources = [LazyDataset(name, functools.partial(lambda n: loads.append(n) or SimpleNamespace(data_name=n), name))
               for name in "abc"]
    pool = ResidentDatasets(sources, lambda ds: ds, max_resident=2, workers=0)
    for name in "aba":  # a is still resident the second time: not loaded again
        pool.hold(name)
        pool.release(name)
    assert loads == ["a", "b"]
    pool.get("c")  # needs a slot: b, the least recently used, goes
    assert pool.resident == ["a", "c"] and ("evict", "b") in pool.events and pool.peak_resident == 2


def test_more_datasets_in_use_than_the_limit_is_an_error():
    pool = ResidentDatasets(gated("abc"), lambda ds: ds, max_resident=2)
    pool.hold("a")
    pool.hold("b")
    with pytest.raises(RuntimeError, match=r"dataset 'c' is needed while 2 others are in use \(a, b\): more than "
                                           r"max_datasets_in_memory = 2"):
        pool.hold("c")


@pytest.mark.parametrize("workers", [0, 1])
def test_a_failed_load_reaches_the_caller_and_frees_its_slot(workers):
    pool = ResidentDatasets(gated(["ok", "bad"], broken=["bad"]), lambda ds: ds, max_resident=1, workers=workers)
    pool.plan(["bad", "ok"])
    with pytest.raises(ValueError, match="bad is broken"):
        pool.hold("bad")
    assert pool.hold("ok").data_name == "ok" and pool.resident == ["ok"]
    pool.close()


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_resident=0), r"datasets.max_datasets_in_memory must be at least 1 \(or null: all\), got 0"),
    (dict(workers=-1), "datasets.data_loading_workers must be 0 or more, got -1"),
])
def test_limits_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ResidentDatasets(gated("ab"), lambda ds: ds, **kwargs)


def test_two_datasets_of_one_name_are_refused():
    with pytest.raises(ValueError, match="two different datasets are named 'a'"):
        ResidentDatasets(gated("aa"), lambda ds: ds)


# --- the epoch plan ---------------------------------------------------------------------------
@pytest.mark.parametrize("size, world_size", [(10, 1), (10, 3), (2, 5), (7, 2)])
def test_shards_are_distributed_samplers(size, world_size):
    for rank in range(world_size):
        sampler = DistributedSampler(range(size), num_replicas=world_size, rank=rank, shuffle=True, seed=7)
        sampler.set_epoch(3)
        assert shard_indices(size, epoch=3, seed=7, rank=rank, world_size=world_size).tolist() == list(sampler)


SIZES = [5, 7, 2, 9, 4, 3, 6]


def test_plan_walks_groups_covers_every_item_and_is_the_same_on_every_rank():
    plans = [EpochPlan(SIZES, batch_size=2, epoch=1, seed=3, rank=rank, world_size=2, group_size=3) for rank in (0, 1)]
    assert plans[0].dataset.tolist() == plans[1].dataset.tolist()  # every rank steps through the same datasets
    plan = plans[0]
    assert sorted(i for group in plan.groups for i in group) == list(range(7)) and [len(g) for g in plan.groups] == [3, 3, 1]
    # The steps are the groups one after the other: group g's datasets only in its own stretch.
    position = 0
    for group in plan.groups:
        count = sum(plan.num_batches[i] for i in group)
        assert set(plan.dataset[position:position + count].tolist()) == set(group)
        position += count
    assert position == len(plan)
    seen = {i: [] for i in range(7)}
    for rank_plan in plans:
        for step in range(len(rank_plan)):
            i, items = rank_plan.items(step)
            assert len(items) <= 2
            seen[i] += items.tolist()
    for i, size in enumerate(SIZES):
        per_rank = math.ceil(size / 2)
        assert sorted(set(seen[i])) == list(range(size)) and len(seen[i]) == 2 * per_rank  # padded as DDP pads
    orders = {tuple(EpochPlan(SIZES, 2, epoch, seed=3, group_size=3).dataset.tolist()) for epoch in range(4)}
    assert len(orders) > 1  # shuffled per epoch


def test_a_step_cap_leaves_later_datasets_unvisited():
    full = EpochPlan(SIZES, batch_size=2, epoch=0, seed=0, group_size=3)
    capped = EpochPlan(SIZES, batch_size=2, epoch=0, seed=0, group_size=3, max_steps=4)
    assert len(capped) == 4 and capped.dataset.tolist() == full.dataset[:4].tolist()
    assert set(capped.first_use_order()) == set(full.dataset[:4].tolist())
    assert capped.first_use_order(2) == list(dict.fromkeys(full.dataset[2:4].tolist()))


# --- 12 datasets, 3 in memory: both tasks ------------------------------------------------------
def run(kind, task, folder, record=None):
    model = small_model(kind)
    if record is not None:  # before every forward pass, training and evaluation
        model.register_forward_pre_hook(lambda module, args: record())
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    options = TrainOptions(num_epoch=2, metric=METRIC[kind], metric_split="valid" if kind == "kg" else None,
                           save_pretrained=False, log_interval=10)
    trainer = Trainer(model, optimizer, task, options, str(folder), DistEnv())
    trainer.fit()
    return model.state_dict(), read_jsonl(folder / "metrics.jsonl")


@pytest.mark.parametrize("kind", ["qa", "kg"])
def test_twelve_datasets_three_in_memory_train_and_evaluate_as_with_all_resident(many_datasets_root, tmp_path, kind):
    names = [f"{kind}{k:02d}" for k in range(12)]
    census = Census(many_datasets_root, kind)
    describe = functools.partial(describe_for(kind), train=True)
    sets = census.lazy(names, describe)
    task = make_task(kind, sets, sets, max_datasets_in_memory=3, data_loading_workers=2)
    counts = []
    trained = {}
    loss = task.loss

    def recording_loss(model, item):
        index, batch = item
        trained.setdefault(names[index], []).extend(batch["ids"] if kind == "qa" else map(tuple, batch.tolist()))
        return loss(model, item)

    task.loss = recording_loss
    weights, rows = run(kind, task, tmp_path / "bounded",
                        record=lambda: counts.append((census.alive(), len(task.datasets.resident))))

    # Never more than 3 datasets alive (loaded objects, counted by weak reference) nor resident.
    assert max(alive for alive, _ in counts) <= 3 and max(resident for _, resident in counts) <= 3
    assert task.datasets.peak_resident == 3
    # Each epoch trains and evaluates all 12, and only the last 3 of one walk can still be resident
    # for the next: the others were freed and loaded again.
    assert len(census.loaded) >= 12 + 3 * 9
    # Each epoch trains every question / triple of every dataset exactly once.
    loaded = {name: census.load(name) for name in names}
    for name, ds in loaded.items():
        if kind == "qa":
            expected = ds.split("train").ids
        else:
            g = ds.graph
            expected = list(map(tuple, torch.stack([g.target_edge_index[0], g.target_edge_index[1],
                                                    g.target_edge_type], 1).tolist()))
        assert sorted(trained[name]) == sorted(2 * expected), name
    for epoch in (0, 1):
        assert list(dict.fromkeys(row["dataset"] for row in rows if row["epoch"] == epoch)) == names

    # The same epochs (groups of 3) with all 12 datasets resident give the same weights and metrics.
    reference = make_task(kind, sets, sets, max_datasets_in_memory=3)
    reference.datasets = ResidentDatasets(list(loaded.values()), reference._prepare, max_resident=None)
    ref_weights, ref_rows = run(kind, reference, tmp_path / "resident")
    assert weights.keys() == ref_weights.keys()
    for key in weights:
        assert torch.equal(weights[key], ref_weights[key]), key
    assert rows == ref_rows
    task.datasets.close()


# --- the workflows --------------------------------------------------------------------------------
CONFIG_DIR = os.path.join(os.path.dirname(gfmrag_fast.__file__), "workflow", "config")


@pytest.mark.parametrize("workflow", ["finetune", "pretrain"])
def test_workflow_configs_carry_the_keys(workflow):
    from hydra import compose, initialize_config_dir

    from gfmrag_fast.workflow.common import dataset_options, train_options

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        default = compose(workflow)
        changed = compose(workflow, overrides=["datasets.max_datasets_in_memory=3", "datasets.data_loading_workers=0",
                                               "train.save_interval=50"])
    # Defaults keep a few datasets resident all run long, loading in the background; epoch-end checkpoints.
    assert dataset_options(default) == {"max_datasets_in_memory": 10, "data_loading_workers": 2}
    assert train_options(default, True).save_interval is None
    assert dataset_options(changed) == {"max_datasets_in_memory": 3, "data_loading_workers": 0}
    assert train_options(changed, True).save_interval == 50


@pytest.mark.slow
def test_pretrain_two_processes_three_datasets_two_in_memory(many_datasets_root, tmp_path):
    """torchrun with gloo: both ranks walk the same groups (DDP would hang otherwise); rank 0 logs
    the throughput and writes step checkpoints holding both ranks' generators."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    names = "[kg00,kg01,kg02]"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "gfmrag_fast.workflow.pretrain", f"datasets.root={many_datasets_root}", f"datasets.train_names={names}",
         f"datasets.valid_names={names}", "datasets.max_datasets_in_memory=2", "datasets.data_loading_workers=1",
         "model.entity_model.input_dim=8", "model.entity_model.hidden_dims=[8,8]", "train.batch_size=4",
         "train.num_epoch=1", "train.save_interval=2", "train.log_interval=1", "task.num_negative=4",
         f"hydra.run.dir={tmp_path}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(row["dataset"], row["split"]) for row in rows] == [(f"kg0{k}", split) for k in range(3)
                                                                  for split in ("valid", "test")]
    assert re.search(r"epoch 0 step 1/\d+ \(\d+%\) loss \S+ \| [\d.]+ steps/s, [\d.]+ queries/s", output)
    assert "at most 2 of 2 resident" in output
    state = torch.load(tmp_path / "model_last.pth", weights_only=True)
    assert (state["epoch"], state["step"], state["world_size"], len(state["rank_rng"])) == (1, 0, 2, 2)
    assert not torch.equal(state["rank_rng"][0]["torch"], state["rank_rng"][1]["torch"])  # seeded per rank
