"""GFM-RAG's models (same math and state-dict keys).

Entity models score nodes by relational message passing over the knowledge graph
(:mod:`.layer`, :mod:`.aggregation`, :mod:`.entity`); query models turn text embeddings into their
inputs (:mod:`.retriever`); :mod:`.partition` splits a graph's nodes over ranks for graph-partitioned
training. Document rankers are in :mod:`gfmrag_fast.doc_rankers` and checkpoint folders are read and
written by :mod:`gfmrag_fast.checkpoints`.
"""

from .aggregation import AGGREGATES, MESSAGES, PreparedGraph, neighbourhood_update
from .entity import EntityNBFNet, NBFNet, QueryNBFNet, to_tail_prediction
from .graph_input import rel_graph_of
from .layer import GeneralizedRelationalConv
from .retriever import GNNRetriever, QueryGNN

__all__ = [
    "GNNRetriever", "QueryGNN", "QueryNBFNet", "EntityNBFNet", "NBFNet", "GeneralizedRelationalConv",
    "neighbourhood_update", "PreparedGraph", "MESSAGES", "AGGREGATES", "to_tail_prediction", "rel_graph_of",
]
