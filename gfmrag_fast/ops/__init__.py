"""Custom ops of gfmrag_fast (C++/CUDA kernels with autograd) and their pure-PyTorch references."""

from . import _library  # noqa: F401  (loads the compiled library first)
from ._library import output_cache_info, set_output_cache
from .dense_tail import dense_tail, dense_tail_reference
from .graph import RelGraph
from .rel_aggregate import AGGREGATES, MESSAGES, rel_aggregate, rel_aggregate_reference
from .sampling_reference import easy_edge_mask_reference, negative_sampling_reference
from .triple_index import TripleIndex, easy_edge_mask, negative_sampling, triple_index

__all__ = [
    "RelGraph",
    "rel_aggregate",
    "rel_aggregate_reference",
    "MESSAGES",
    "AGGREGATES",
    "TripleIndex",
    "triple_index",
    "negative_sampling",
    "negative_sampling_reference",
    "easy_edge_mask",
    "easy_edge_mask_reference",
    "dense_tail",
    "dense_tail_reference",
    "set_output_cache",
    "output_cache_info",
]
