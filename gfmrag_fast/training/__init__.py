"""The training loop shared by pre-training and fine-tuning, with DDP and atomic checkpoints."""

from .distributed import DistEnv, init_distributed
from .trainer import Trainer, TrainOptions

__all__ = ["DistEnv", "init_distributed", "Trainer", "TrainOptions"]
