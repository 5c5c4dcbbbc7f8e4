"""The training loop, written once: both workflows plug a task into it.

A task provides the batches, the loss and the evaluation; the trainer owns the epochs, mixed
precision, DDP, logging, checkpoints and curves. Rank 0 alone writes; every write is atomic.

Checkpoints and a kill at any instant: after an epoch, ``model_last.pth`` is written first, then
(when the epoch improved) ``model_best.pth`` with the same state. ``model_last.pth`` records the
best epoch and the run it belongs to, so a resume checks that ``model_best.pth`` holds that epoch
of that run; killed between the two writes, the best epoch *is* the last one, and the resume
rewrites ``model_best.pth`` from it. The export to ``pretrained/`` checks the same before using it.

Step checkpoints (``train.save_interval``): every that many steps of an epoch, ``model_last.pth``
is also written with the position in the epoch (``step``), the sum of the epoch's losses so far
and every rank's random generators. A resume from it continues at the next step with the batches
an uninterrupted run would have had: the task computes the epoch's batch order from the seed and
starts at that step without loading or iterating the ones before (``train_batches(..., start=)``),
so on a CPU the weights are bit-identical to an uninterrupted run's. A mid-epoch checkpoint is
never a best one: ``model_best.pth`` is only written at an epoch's end.

Model selection: the best epoch is the one with the highest mean ``metric`` over the evaluation
rows of ``metric_split`` ("valid" by default: questions held out of training, or a KG's valid
triples). Each evaluation prints a table of those rows; every row (test included) goes to
``metrics.jsonl``; at the end the summary gives the best epoch's rows of every split. Only when
no row has that split is the best chosen on all rows, with a warning: a number picked on the
split it is reported on is optimistic.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Protocol, Tuple

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from .distributed import DistEnv, broadcast_parameters, sum_gradients
from .state import capture_rng, load_training_state, restore_rng
from ..atomic_io import (
    append_jsonl, atomic_jsonl, atomic_torch_save, atomic_write, read_jsonl, remove_stale_temporaries,
)
from ..checkpoints import CheckpointError
from ..models.partition import PARTITION_METHODS
from .curves import plot_curves
from .report import format_duration, format_table, summary

LAST, BEST = "model_last.pth", "model_best.pth"

log = logging.getLogger(__name__)


class Task(Protocol):
    def train_batches(self, epoch: int, env: DistEnv, start: int = 0, max_steps: Optional[int] = None) -> Iterable[Any]:
        """This rank's training batches of `epoch`, from step `start` on, at most `max_steps` steps
        in all. The trainer passes `start` only when it resumes mid-epoch and `max_steps` only
        when `train.batch_per_epoch` is set: a task that yields whole epochs needs neither."""

    def loss(self, model: torch.nn.Module, batch: Any) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(loss to minimise, detached scalars to log) of one batch; the trainer reads the logged
        values only at log intervals, so a step needs no host synchronisation."""

    def evaluate(self, model: torch.nn.Module, env: DistEnv) -> List[Dict[str, Any]]:
        """Rows {"dataset", "split", <metric>: value}, identical on every rank."""

    def save_pretrained(self, model: torch.nn.Module, folder: str) -> None:
        """Writes the model in GFM-RAG's release format."""

    # Optional: ``queries(batch) -> int``, the queries in a training batch (logged as queries/s);
    # ``num_batches(epoch, env) -> int``, the batches train_batches yields for a whole epoch (for
    # progress and ETA; the trainer applies train.batch_per_epoch itself).


@dataclass
class TrainOptions:
    num_epoch: int = 10
    batch_per_epoch: Optional[int] = None  # cap on batches per epoch (per rank)
    log_interval: int = 100
    do_eval: bool = True
    save_best_only: bool = True
    save_pretrained: bool = True
    metric: Optional[str] = None  # key averaged over evaluation rows to pick the best epoch
    metric_split: Optional[str] = "valid"  # average only rows of this split, when there are any (None: all rows)
    dtype: str = "float32"  # or "bfloat16": autocast for forward and loss
    max_grad_norm: Optional[float] = None
    compile: bool = False  # torch.compile the training forward (fuses the dense per-node work)
    save_interval: Optional[int] = None  # steps: also write model_last.pth every that many steps of an epoch
    graph_partition: str = "none"  # or contiguous / metis: the ranks split each graph's nodes (models.partition)


class Trainer:
    def __init__(self, model, optimizer, task: Task, options: TrainOptions, output_dir: str, env: DistEnv):
        self.raw_model = model.to(env.device)
        if options.graph_partition not in PARTITION_METHODS:
            raise ValueError(f"train.graph_partition must be one of {PARTITION_METHODS}, got {options.graph_partition!r}")
        # Graph-partitioned: the ranks are one data-parallel replica that splits the graph's nodes.
        # The task sees a one-rank data environment (every rank gets the same batches), and the
        # gradients are summed over ranks, not averaged as DDP would (models.partition).
        self.partitioned = env.distributed and options.graph_partition != "none"
        self.data_env = DistEnv(device=env.device) if self.partitioned else env
        if self.partitioned:
            broadcast_parameters(self.raw_model)
        self.model = (
            DistributedDataParallel(self.raw_model, device_ids=[env.device] if env.device.type == "cuda" else None)
            if env.distributed and not self.partitioned
            else self.raw_model
        )
        if options.compile:
            # Training steps run compiled; evaluation and checkpoints use the plain module.
            self.model = torch.compile(self.model)
        self.optimizer, self.task, self.options, self.env = optimizer, task, options, env
        self.output_dir = output_dir
        self.start_epoch = 0
        self.start_step = 0  # > 0: resumed mid-epoch, with that many steps of start_epoch done
        self._resumed_loss: Optional[torch.Tensor] = None  # the sum of those steps' losses
        self.best_score = -math.inf
        self.best_epoch: Optional[int] = None  # the epoch whose model model_best.pth holds
        self.run_id = uuid.uuid4().hex  # ties model_best.pth to the model_last.pth of the same run
        self.history: List[Dict[str, Any]] = []
        # This process's loss of every step of the current epoch (detached, on the device: read
        # once at the epoch's end, so a step needs no host synchronisation).
        self._step_losses: List[torch.Tensor] = []
        self._warned_selection = False
        if options.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"train.dtype must be float32 or bfloat16, got {options.dtype!r}")
        if int(options.num_epoch) < 1:
            raise ValueError(f"train.num_epoch must be at least 1, got {options.num_epoch}")
        if options.batch_per_epoch is not None and int(options.batch_per_epoch) < 1:
            raise ValueError(
                f"train.batch_per_epoch must be at least 1 (or null: no cap), got {options.batch_per_epoch}"
            )
        if options.save_interval is not None and int(options.save_interval) < 0:
            raise ValueError(f"train.save_interval must be a number of steps (0 or null: epoch ends only), "
                             f"got {options.save_interval}")

    # --- checkpoints -----------------------------------------------------------------------
    def state(self, next_epoch: int, step: int = 0, epoch_loss: Optional[torch.Tensor] = None,
              rngs: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
        """The training checkpoint after epoch ``next_epoch - 1`` or, with ``step`` > 0, after
        ``step`` steps of epoch ``next_epoch`` whose losses sum to ``epoch_loss`` [world size]
        on each rank (see :mod:`.state`); ``rngs``: every rank's generators (default: this
        process's)."""
        rngs = rngs or [capture_rng()]
        state = {
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": next_epoch,
            "step": step,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "run_id": self.run_id,
            "history": self.history,
            "rng": rngs[0],
            "world_size": self.env.world_size,
            "data_world_size": self.data_env.world_size,
        }
        if len(rngs) > 1:
            state["rank_rng"] = rngs
        if step:
            state["epoch_loss"] = epoch_loss
            state["step_losses"] = self._stacked_step_losses().cpu()
        return state

    def _stacked_step_losses(self) -> torch.Tensor:  # [steps of the epoch so far]
        if not self._step_losses:
            return torch.zeros(0)
        return torch.stack([loss.to(self.env.device) for loss in self._step_losses])

    def resume(self, state: Dict[str, Any], source: Optional[str] = None) -> None:
        """Continues a run from a training checkpoint (loaded from the file ``source``): model,
        optimizer, epoch, RNG state, and the best epoch so far, whose model must be in
        ``model_best.pth`` of the run folder or beside ``source`` (else the best is chosen anew)."""
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.start_epoch = int(state["epoch"])
        self.start_step = int(state.get("step", 0))
        epoch_loss = state.get("epoch_loss")
        if self.start_step and (epoch_loss is None or epoch_loss.dim() != 1 or not len(epoch_loss)):
            raise CheckpointError(f"checkpoint {source}: written at step {self.start_step} of epoch {self.start_epoch} "
                                  "but without the epoch's loss so far (epoch_loss, one value per rank)")
        if self.start_step:
            # This rank's sum, to the bit; the mean of them after a change of the number of processes.
            self._resumed_loss = (epoch_loss[self.env.rank] if len(epoch_loss) == self.env.world_size
                                  else epoch_loss.float().mean())
            # Only the curves use them: a checkpoint written before they were kept has none.
            self._step_losses = list(state.get("step_losses", torch.zeros(0)).float().unbind())
        self.best_score = float(state.get("best_score", -math.inf))
        best_epoch = state.get("best_epoch")
        self.best_epoch = None if best_epoch is None else int(best_epoch)
        self.run_id = str(state.get("run_id") or self.run_id)
        self.history = list(state.get("history", []))
        rank_rng = state.get("rank_rng")
        writers = int(state.get("world_size", len(rank_rng) if rank_rng else 1))
        if rank_rng and len(rank_rng) == self.env.world_size:
            restore_rng(rank_rng[self.env.rank])
        else:
            restore_rng(state.get("rng") or {})
        # The epoch's batches are sharded over the data-parallel ranks: all of them, or one when
        # graph-partitioned (every rank trains on the same batches, whatever the number of ranks).
        shards = int(state.get("data_world_size", writers))
        if self.start_step and shards != self.data_env.world_size and self.env.is_main:
            log.warning("resuming step %d of epoch %d with the batches sharded %d way(s), but they were sharded %d "
                        "way(s) when the checkpoint was written: the rest of the epoch is sharded anew, so it is "
                        "not the run that was interrupted", self.start_step, self.start_epoch,
                        self.data_env.world_size, shards)
        if self.env.is_main:
            self._restore_best(state, source)
            log.info("resumed at epoch %d%s (best %s so far: %.4f)", self.start_epoch,
                     f" step {self.start_step}" if self.start_step else "", self.options.metric, self.best_score)

    def _path(self, name: str) -> str:
        return os.path.join(self.output_dir, name)

    def _holds_best(self, path: str) -> bool:
        """Whether ``path`` is this run's checkpoint of epoch ``best_epoch``; CheckpointError
        when it exists but is unsafe or unreadable."""
        if not os.path.isfile(path):
            return False
        best = load_training_state(path, map_location="cpu")
        return (best.get("run_id") == self.run_id and int(best.get("step", 0)) == 0
                and int(best["epoch"]) - 1 == self.best_epoch)

    def _restore_best(self, state: Dict[str, Any], source: Optional[str]) -> None:
        """Makes the run folder's model_best.pth hold the recorded best epoch."""
        if self.best_epoch is None:
            return
        target = self._path(BEST)
        if self._holds_best(target):
            return
        if int(state.get("step", 0)) == 0 and int(state["epoch"]) - 1 == self.best_epoch:
            # The checkpoint is the best itself: model_last.pth of a run killed before it wrote
            # model_best.pth, or a model_best.pth resumed into a new folder.
            log.info("%s: written from the resumed checkpoint (epoch %d, the best)", target, self.best_epoch)
            atomic_torch_save(state, target)
            return
        folders = dict.fromkeys(os.path.abspath(folder) for folder in
                                [self.output_dir, *([os.path.dirname(source)] if source else [])])
        candidates = [os.path.join(folder, name) for folder in folders
                      for name in (BEST, f"model_epoch_{self.best_epoch}.pth")]
        for path in candidates:
            if os.path.abspath(path) != os.path.abspath(target) and self._holds_best(path):
                log.info("%s: copied from %s (epoch %d, the best)", target, path, self.best_epoch)
                with open(path, "rb") as source_file:
                    atomic_write(target, lambda f: shutil.copyfileobj(source_file, f))
                return
        log.warning(
            "the best model so far (epoch %d, %s %.4f) is in none of %s: the best is chosen among the epochs "
            "trained from now on", self.best_epoch, self.options.metric, self.best_score, ", ".join(candidates),
        )
        self.best_epoch, self.best_score = None, -math.inf

    # --- the loop --------------------------------------------------------------------------
    def _autocast(self):
        if self.options.dtype == "bfloat16":
            return torch.autocast(self.env.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.env.device.type, enabled=False)

    def num_batches(self, epoch: int) -> Optional[int]:
        """This rank's training steps in ``epoch`` (None: unknown, the task does not say and
        ``train.batch_per_epoch`` is not set)."""
        count = getattr(self.task, "num_batches", None)
        total = int(count(epoch, self.data_env)) if count is not None else None
        cap = self.options.batch_per_epoch
        if cap is not None:
            total = int(cap) if total is None else min(total, int(cap))
        return total

    def train_epoch(self, epoch: int, start: int = 0) -> float:
        """Trains steps ``start``... of ``epoch`` (``start`` > 0: resumed mid-epoch); returns the
        epoch's mean loss, over every rank."""
        self.model.train()
        total, count = torch.zeros((), device=self.env.device), start
        if start:
            total += self._resumed_loss.to(self.env.device)
        else:
            self._step_losses = []
        where: Dict[str, int] = {"start": start} if start else {}
        if self.options.batch_per_epoch is not None:
            where["max_steps"] = int(self.options.batch_per_epoch)
        num_steps = self.num_batches(epoch)
        if self.env.is_main:
            log.info("epoch %d of %d: %s batches per epoch%s", epoch, self.options.num_epoch,
                     num_steps if num_steps is not None else "an unknown number of",
                     f", resuming after step {start}" if start else "")
        # data_env: the task's view of the ranks (one rank when graph-partitioned: same batches everywhere)
        batches = self.task.train_batches(epoch, self.data_env, **where)
        progress = None
        if self.env.is_main:
            from tqdm import tqdm

            # In a log file a progress bar is thousands of lines: only draw it on a terminal.
            progress = tqdm(desc=f"epoch {epoch}", total=num_steps, initial=start, leave=False,
                            dynamic_ncols=True, disable=not sys.stderr.isatty())
        began = time.perf_counter()
        queries_of = getattr(self.task, "queries", None)
        window = _Throughput(self.data_env.world_size)  # graph-partitioned ranks share their queries
        interval = max(int(self.options.log_interval), 1)
        for step, batch in enumerate(batches, start=start):
            if self.options.batch_per_epoch is not None and step >= self.options.batch_per_epoch:
                break
            with self._autocast():
                loss, logs = self.task.loss(self.model, batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.partitioned:
                sum_gradients(self.raw_model)
            if self.options.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.options.max_grad_norm)
            self.optimizer.step()
            total += loss.detach().float()
            self._step_losses.append(loss.detach().float())
            count += 1
            window.add(queries_of(batch) if queries_of is not None else 0)
            if progress is not None:
                progress.update(1)
            # The first step of this process is logged at once (it says the run is alive and
            # how fast it goes), then every log_interval steps and the epoch's last one.
            if self.env.is_main and (count == start + 1 or count % interval == 0 or count == num_steps):
                values = {"loss": loss.item(), **{k: float(v) for k, v in logs.items()}}
                if progress is not None:
                    progress.set_postfix({k: f"{v:.4f}" for k, v in values.items()})
                log.info("epoch %d step %s %s | %s | %s", epoch, _fraction(count, num_steps),
                         " ".join(f"{k} {v:.4f}" for k, v in values.items()),
                         window.report(with_queries=queries_of is not None),
                         self._eta(epoch, count - start, count, num_steps, time.perf_counter() - began))
            if self.options.save_interval and (step + 1) % int(self.options.save_interval) == 0:
                self._save_step(epoch, step + 1, total)
        if progress is not None:
            progress.close()
        if count == 0:
            raise RuntimeError(f"epoch {epoch}: the task gave no training batch; nothing would be trained")
        total = total.item()
        mean_loss = self.env.mean(total / max(count, 1))
        if self.env.is_main:
            elapsed = time.perf_counter() - began
            log.info("epoch %d: %d batches, mean loss %.4f, %s (%.2f steps/s)", epoch, count, mean_loss,
                     format_duration(elapsed), (count - start) / max(elapsed, 1e-9))
        return mean_loss

    def _eta(self, epoch: int, trained: int, done: int, num_steps: Optional[int], elapsed: float) -> str:
        """Time left in this epoch and in the run's training steps, at the epoch's mean speed so far."""
        if num_steps is None or trained <= 0:
            return "ETA unknown (the number of batches is not known)"
        per_step = elapsed / trained
        left = max(num_steps - done, 0) * per_step
        later = (self.options.num_epoch - epoch - 1) * num_steps * per_step
        return f"ETA epoch {format_duration(left)}, run {format_duration(left + later)} (+ evaluations)"

    def _save_step(self, epoch: int, done: int, epoch_loss: torch.Tensor) -> None:
        """model_last.pth after ``done`` steps of ``epoch`` (every rank takes part: their
        generators and loss sums are gathered)."""
        parts = self.env.gather_objects((capture_rng(), epoch_loss.detach().cpu()))
        if self.env.is_main:
            rngs, losses = zip(*parts)
            atomic_torch_save(self.state(epoch, step=done, epoch_loss=torch.stack(losses), rngs=list(rngs)),
                              self._path(LAST))

    def evaluate(self, epoch: int) -> List[Dict[str, Any]]:
        self.model.eval()
        with torch.no_grad(), self._autocast():
            rows = self.task.evaluate(self.raw_model, self.data_env)
        rows = [{"epoch": epoch, **row} for row in rows]
        if self.env.is_main:
            for row in rows:
                append_jsonl(row, self._path("metrics.jsonl"))
            shown = self.selection_rows(rows)
            hidden = sorted({str(row.get("split")) for row in rows} - {str(row.get("split")) for row in shown})
            note = (f" ({', '.join(hidden)} rows in metrics.jsonl; reported for the best epoch at the end)"
                    if hidden else "")
            log.info("epoch %d evaluation%s:\n%s", epoch, note, format_table(shown))
        return rows

    def selection_rows(self, rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """The rows the best epoch is chosen on: those of ``metric_split``, or all of them (said
        once) when none has it."""
        split = self.options.metric_split
        chosen = [row for row in rows if row.get("split") == split] if split is not None else rows
        if chosen or not rows:
            return chosen
        if not self._warned_selection and self.env.is_main:
            splits = ", ".join(sorted({str(row.get("split")) for row in rows}))
            log.warning("no evaluation row of split %r: the best epoch is chosen on the %s rows, so their numbers "
                        "for it are optimistic (hold out validation data to avoid this)", split, splits)
        self._warned_selection = True
        return rows

    def score(self, rows: List[Dict[str, Any]]) -> float:
        values = [row[self.options.metric] for row in self.selection_rows(rows) if self.options.metric in row]
        return float(np.mean(values)) if values else -math.inf

    def _drop_stale_metrics(self) -> None:
        """Rows of epochs this run will redo (all of them on a fresh run into an old folder, the
        ones after the checkpoint on a resume) would be duplicated: keep only earlier epochs."""
        path = self._path("metrics.jsonl")
        if self.env.is_main and os.path.exists(path):
            keep = [row for row in read_jsonl(path) if row.get("epoch", -1) < self.start_epoch]
            atomic_jsonl(keep, path)

    def fit(self) -> Dict[str, Any]:
        if self.env.is_main:
            for folder in (self.output_dir, self._path("pretrained")):
                remove_stale_temporaries(folder)
        self._drop_stale_metrics()
        for epoch in range(self.start_epoch, self.options.num_epoch):
            loss = self.train_epoch(epoch, self.start_step if epoch == self.start_epoch else 0)
            rows = self.evaluate(epoch) if self.options.do_eval else []
            score = self.score(rows)
            improved = score > self.best_score or not rows
            if improved:
                self.best_score = max(score, self.best_score) if rows else self.best_score
                self.best_epoch = epoch
            if rows and self.env.is_main:
                log.info("epoch %d: %s %s %.4f%s", epoch, self.options.metric_split or "mean", self.options.metric,
                         score, " (best so far)" if improved else
                         f" (best: epoch {self.best_epoch}, {self.best_score:.4f})")
            step_loss = self._stacked_step_losses().cpu().tolist()  # this process's
            self.history.append({"epoch": epoch, "loss": loss, **({self.options.metric: score} if rows else {}),
                                 "step_loss": step_loss, "rows": rows})
            rngs = self.env.gather_objects(capture_rng())
            if self.env.is_main:
                state = self.state(epoch + 1, rngs=rngs)
                # model_last.pth first: it names the best epoch, and when that is this epoch a
                # resume can rebuild model_best.pth from it (see the module docstring).
                atomic_torch_save(state, self._path(LAST))
                if improved:
                    atomic_torch_save(state, self._path(BEST))
                if not self.options.save_best_only:
                    atomic_torch_save(state, self._path(f"model_epoch_{epoch}.pth"))
                self.plot()
            self.env.barrier()
        if self.options.save_pretrained and self.env.is_main:
            self._load_best()
            self.task.save_pretrained(self.raw_model, self._path("pretrained"))
        self.env.barrier()
        best_rows = next((h.get("rows") or [] for h in self.history if h["epoch"] == self.best_epoch), [])
        if self.env.is_main:
            saved = [self._path(name) for name in (BEST, "pretrained", "metrics.jsonl", "training_curves.png")
                     if os.path.exists(self._path(name))]
            log.info("training done: %s", summary(self.history, self.best_epoch, self.options.metric,
                                                  self.options.metric_split if any(
                                                      row.get("split") == self.options.metric_split
                                                      for row in best_rows) else None,
                                                  self.best_score, saved))
        return {"best_score": self.best_score, "best_epoch": self.best_epoch, "best_rows": best_rows,
                "history": self.history}

    def _load_best(self) -> None:
        """Puts the best epoch's weights into the model, checking model_best.pth holds them."""
        if self.best_epoch is None:
            log.warning("no epoch scored on %s: exporting the model of the last epoch", self.options.metric)
            return
        path = self._path(BEST)
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint {path}: not found, but epoch {self.best_epoch} was the best")
        best = load_training_state(path, map_location=self.env.device)
        if best.get("run_id") != self.run_id or int(best["epoch"]) - 1 != self.best_epoch:
            raise CheckpointError(
                f"checkpoint {path}: holds epoch {int(best['epoch']) - 1} of run {best.get('run_id')}, but the best "
                f"is epoch {self.best_epoch} of run {self.run_id}: another process wrote into this run folder?"
            )
        self.raw_model.load_state_dict(best["model"])

    def plot(self) -> None:
        """training_curves.png: the loss of every step, every evaluated metric, the best epoch."""
        folder = os.path.abspath(self.output_dir)
        run = "/".join(folder.split(os.sep)[-3:])
        plot_curves(self._path("training_curves.png"), self.history, f"{type(self.task).__name__}: {run}",
                    self.options.metric, self.options.metric_split, self.best_epoch)


class _Throughput:
    """Steps and queries per second since the last report (queries of every rank)."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.since, self.steps, self.queries = time.perf_counter(), 0, 0

    def add(self, queries: int) -> None:
        self.steps += 1
        self.queries += queries

    def report(self, with_queries: bool) -> str:
        now = time.perf_counter()
        elapsed = max(now - self.since, 1e-9)
        text = f"{self.steps / elapsed:.2f} steps/s"
        if with_queries:
            text += f", {self.queries * self.world_size / elapsed:.1f} queries/s"
        self.since, self.steps, self.queries = now, 0, 0
        return text


def _fraction(done: int, total: Optional[int]) -> str:
    """"12/63 (19%)", or "12" when the total is not known."""
    if not total:
        return str(done)
    return f"{done}/{total} ({100 * done // total}%)"
