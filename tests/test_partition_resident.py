"""Graph-partitioned training (train.graph_partition) together with bounded memory
(max_datasets_in_memory below the number of datasets, background loading threads) and step
checkpoints: 2 gloo processes split every graph, walk 4 small datasets 2 at a time, and

* match the single-process run (weights, metrics);
* partition each graph in the training loop's thread only (never in a loading thread, where the
  collective could interleave with the layers' halo exchanges), once per dataset for the whole run
  (a dataset loaded again reuses its node owners: no METIS, no communication), and free the
  partition with its dataset;
* killed mid-epoch and resumed from the step checkpoint, end bit-identical to the uninterrupted
  partitioned run.
"""

import functools
import os
import random
import threading
import weakref

import numpy as np
import pytest
import torch
import torch.distributed as dist

from gfmrag_fast.atomic_io import read_jsonl
from gfmrag_fast.training import DistEnv, Trainer, TrainOptions
from gfmrag_fast.training.epoch_plan import EpochPlan

from helpers import HAS_METIS, METRIC, Census, describe_for, make_task, small_model, spawn

KINDS = {"qa": "contiguous", "kg": "metis" if HAS_METIS else "contiguous"}
NUM_DATASETS, IN_MEMORY, SAVE_INTERVAL = 4, 2, 3


class Killed(BaseException):
    """What a SIGKILL looks like to the code after it: nothing more runs."""


def trainer_for(kind, root, folder, env, partition):
    random.seed(0)  # every rank the same: graph-partitioned ranks draw the same negatives
    np.random.seed(0)
    torch.manual_seed(0)
    census = Census(root, kind)
    names = [f"{kind}{k:02d}" for k in range(NUM_DATASETS)]
    sets = census.lazy(names, functools.partial(describe_for(kind), train=True))
    task = make_task(kind, sets, sets[:2], max_datasets_in_memory=IN_MEMORY, data_loading_workers=1,
                     graph_partition=partition)
    model = small_model(kind)
    options = TrainOptions(num_epoch=2, metric=METRIC[kind], metric_split="valid" if kind == "kg" else None,
                           save_interval=SAVE_INTERVAL, log_interval=4, graph_partition=partition,
                           save_pretrained=False)  # (an export loads the best epoch into rank 0's model only)
    trainer = Trainer(model, torch.optim.AdamW(model.parameters(), lr=0.01), task, options, str(folder), env)
    return trainer, task, census


def _worker(rank, root, out):
    import gfmrag_fast.training.tasks_common as tasks_common
    from gfmrag_fast.workflow.common import apply_checkpoint

    env = DistEnv(rank=rank, world_size=dist.get_world_size())
    calls, partitions = [], []
    partition_graph = tasks_common.partition_graph

    def recording_partition_graph(graph, method, *args, **kwargs):
        calls.append({"main_thread": threading.current_thread() is threading.main_thread(),
                      "fresh": kwargs.get("parts") is None})
        split = partition_graph(graph, method, *args, **kwargs)
        partitions.append(weakref.ref(split.partition))
        return split

    tasks_common.partition_graph = recording_partition_graph
    report = {}
    for kind, method in KINDS.items():
        calls.clear()
        partitions.clear()
        # 1. The uninterrupted partitioned run, measuring what is alive at every step.
        trainer, task, census = trainer_for(kind, root, os.path.join(out, kind, "full"), env, method)
        counts, loss = [], task.loss

        def counting_loss(model, item):
            result = loss(model, item)
            counts.append((census.alive(), len(task.datasets.resident),
                           sum(ref() is not None for ref in partitions)))
            return result

        task.loss = counting_loss
        trainer.fit()
        task.datasets.close()
        full = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
        report[kind] = {"calls": list(calls), "counts": counts, "peak_resident": task.datasets.peak_resident,
                        "owners_kept": len(task.partitions._parts), "weights": full}

        # 2. Killed in the second epoch after a step checkpoint, then resumed from it.
        trainer, task, _ = trainer_for(kind, root, os.path.join(out, kind, "run"), env, method)
        first = EpochPlan(task.train_sizes, task.batch_size, 0, task.seed, group_size=IN_MEMORY)
        second = EpochPlan(task.train_sizes, task.batch_size, 1, task.seed, group_size=IN_MEMORY)
        kill = len(second) - 2
        steps, loss = [], task.loss

        def dying_loss(model, item):
            if len(steps) == len(first) + kill:
                raise Killed  # on both ranks at the same step, before its first collective
            steps.append(item[0])
            return loss(model, item)

        task.loss = dying_loss
        try:
            trainer.fit()
            raise AssertionError("the run was not killed")
        except Killed:
            pass
        task.datasets.close()
        dist.barrier()  # rank 0 has written the step checkpoint
        last = os.path.join(out, kind, "run", "model_last.pth")
        resumed, task, _ = trainer_for(kind, root, os.path.join(out, kind, "run"), env, method)
        apply_checkpoint(resumed, last, env)
        report[kind]["resumed_at"] = (resumed.start_epoch, resumed.start_step, kill // SAVE_INTERVAL * SAVE_INTERVAL)
        resumed.fit()
        task.datasets.close()
        weights = resumed.raw_model.state_dict()
        report[kind]["resumed_identical"] = all(torch.equal(weights[k], full[k]) for k in full)
    torch.save(report, os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.slow
def test_partitioned_training_with_fewer_datasets_in_memory_and_a_resume(many_datasets_root, tmp_path):
    spawn(_worker, 2, str(many_datasets_root), str(tmp_path))
    reports = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for kind, method in KINDS.items():
            for rank, report in enumerate(reports):
                what = f"{kind} ({method}), rank {rank}"
                mine = report[kind]
                # Partitioned in the training loop's thread only; once per dataset for the whole run
                # (4 training datasets, 2 of them evaluated too), the owners reused on every reload.
                assert mine["calls"] and all(call["main_thread"] for call in mine["calls"]), what
                assert sum(call["fresh"] for call in mine["calls"]) == NUM_DATASETS == mine["owners_kept"], what
                assert sum(not call["fresh"] for call in mine["calls"]) > 0, what  # datasets were loaded again
                # Never more than 2 datasets loaded, resident or partitioned at once.
                assert mine["peak_resident"] == IN_MEMORY, what
                assert max(max(c) for c in mine["counts"]) <= IN_MEMORY, (what, mine["counts"])
                # The kill and the resume.
                epoch, step, expected_step = mine["resumed_at"]
                assert (epoch, step) == (1, expected_step) and step > 0, what
                assert mine["resumed_identical"], what
            for key in reports[0][kind]["weights"]:  # every rank holds the same model
                assert torch.equal(reports[0][kind]["weights"][key], reports[1][kind]["weights"][key]), key

            # The same run in one process, without partitioning: the same weights and metrics.
            trainer, task, _ = trainer_for(kind, many_datasets_root, tmp_path / kind / "single", DistEnv(), "none")
            trainer.fit()
            task.datasets.close()
            single = trainer.raw_model.state_dict()
            for key, value in reports[0][kind]["weights"].items():
                torch.testing.assert_close(value, single[key], rtol=1e-4, atol=1e-5, msg=f"{kind}: {key}")
            rows = [read_jsonl(tmp_path / kind / folder / "metrics.jsonl") for folder in ("full", "single", "run")]
            assert [(r["epoch"], r["dataset"], r["split"]) for r in rows[0]] == [
                (r["epoch"], r["dataset"], r["split"]) for r in rows[1]]
            assert rows[2] == rows[0]  # the resumed run wrote the uninterrupted run's metrics
            for partitioned, one in zip(rows[0], rows[1]):
                assert partitioned.keys() == one.keys()
                for key, value in one.items():
                    if isinstance(value, float):
                        assert partitioned[key] == pytest.approx(value, abs=1e-5), (kind, key)
                    else:
                        assert partitioned[key] == value, (kind, key)
    finally:
        torch.set_num_threads(before)
