"""torchrun / DDP plumbing: one process per device, rank 0 alone logs and writes."""

import datetime
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def gather_objects(self, obj: Any) -> List[Any]:
        """Every rank's `obj`, in rank order (on every rank)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def mean(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return t.item() / self.world_size


def init_distributed(device: str = "auto", timeout_minutes: float = 60) -> DistEnv:
    """Reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK): NCCL on GPUs, gloo on CPUs.
    Without torchrun, a single process on `device` ("auto": CUDA when available)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes)
        )
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


# ``log.warning(..., extra=ALL_RANKS)`` marks a message that says something about the rank that
# logs it (its own data, its own device): every rank shows it, prefixed with the rank.
ALL_RANKS = {"all_ranks": True}


class _MainRankFilter(logging.Filter):
    """On a rank other than 0: passes errors and records marked :data:`ALL_RANKS` only."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "all_ranks", False):
            if not getattr(record, "rank_prefixed", False):
                record.msg = f"[rank {self.rank}] {record.msg}"
                record.rank_prefixed = True
            return True
        return record.levelno >= logging.ERROR


def log_on_main_only(env: DistEnv) -> None:
    """Rank 0 alone logs; the other ranks keep errors and messages marked :data:`ALL_RANKS`.

    Under torchrun every rank runs the same code on the same configuration, so a warning about a
    dataset or the configuration would otherwise be printed once per process. On ranks other than
    0 this drops their file handlers (rank 0 writes the run's log), filters the remaining root
    handlers, and ignores Python ``warnings`` (rank 0 shows the same ones). Rank 0 is unchanged.
    Call it after logging is configured (Hydra does that before the task function runs).
    """
    if env.is_main:
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
        elif not any(isinstance(f, _MainRankFilter) for f in handler.filters):
            handler.addFilter(_MainRankFilter(env.rank))
    warnings.simplefilter("ignore")


def shutdown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_parameters(module: torch.nn.Module, src: int = 0) -> None:
    """Rank ``src``'s parameters and buffers on every rank (what DDP does when it wraps a model)."""
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=src)


def sum_gradients(module: torch.nn.Module) -> None:
    """Replaces every parameter's gradient by its sum over ranks, in one all-reduce per dtype.

    For graph-partitioned training: every rank back-propagates the same loss through its own
    nodes, so the loss's gradient is the sum of the ranks' gradients (DDP would average them).
    Every rank must hold gradients for the same parameters."""
    groups: dict = {}
    for param in module.parameters():
        if param.grad is not None:
            groups.setdefault((param.grad.device, param.grad.dtype), []).append(param.grad)
    for grads in groups.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        for grad, summed in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(summed.view_as(grad))
