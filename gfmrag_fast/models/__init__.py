"""GFM-RAG's models (same math, state-dict keys and checkpoint format), document rankers and checkpoints.

Entity models score nodes by relational message passing over the knowledge graph
(:mod:`.layer`, :mod:`.aggregation`, :mod:`.entity`); query models turn text embeddings into their
inputs (:mod:`.retriever`); :mod:`.doc_ranker` turns entity scores into document scores;
:mod:`.checkpoint` reads and writes GFM-RAG checkpoint folders.
"""

from .aggregation import AGGREGATES, MESSAGES, PreparedGraph, neighbourhood_update
from .checkpoint import build_model, load_pretrained, model_config, resolve_target, save_pretrained
from .doc_ranker import (
    DocRanker,
    HybridRanker,
    IDFRanker,
    IDFWeightedRanker,
    IDFWeightedTopKRanker,
    SimpleRanker,
    TopKRanker,
)
from .entity import EntityNBFNet, NBFNet, QueryNBFNet, to_tail_prediction
from .graph_input import rel_graph_of
from .layer import GeneralizedRelationalConv
from .retriever import GNNRetriever, QueryGNN

__all__ = [
    "GNNRetriever", "QueryGNN", "QueryNBFNet", "EntityNBFNet", "NBFNet", "GeneralizedRelationalConv",
    "neighbourhood_update", "PreparedGraph", "MESSAGES", "AGGREGATES", "to_tail_prediction", "rel_graph_of",
    "DocRanker", "HybridRanker", "SimpleRanker", "IDFWeightedRanker", "IDFRanker", "TopKRanker", "IDFWeightedTopKRanker",
    "load_pretrained", "save_pretrained", "build_model", "model_config", "resolve_target",
]
