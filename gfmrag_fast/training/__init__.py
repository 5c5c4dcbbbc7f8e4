"""The training loop shared by pre-training and fine-tuning, with DDP and atomic checkpoints."""

from .distributed import DistEnv, init_distributed
from .io import atomic_json, atomic_torch_save, append_jsonl
from .trainer import Trainer, TrainOptions

__all__ = ["DistEnv", "init_distributed", "atomic_json", "atomic_torch_save", "append_jsonl", "Trainer", "TrainOptions"]
