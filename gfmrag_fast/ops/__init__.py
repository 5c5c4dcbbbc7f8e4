"""Custom ops of gfmrag_fast (C++/CUDA kernels with autograd) and their pure-PyTorch references."""

from . import _library  # noqa: F401  (loads the compiled library first)
from .graph import RelGraph
from .rel_aggregate import AGGREGATES, MESSAGES, rel_aggregate, rel_aggregate_reference

__all__ = ["RelGraph", "rel_aggregate", "rel_aggregate_reference", "MESSAGES", "AGGREGATES"]
