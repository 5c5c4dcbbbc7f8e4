"""Using a trained GFM-RAG retriever: retrieval, entity linking, path explanations, document ranking.

Built on :mod:`gfmrag_fast.models` and :mod:`gfmrag_fast.data`; used by the evaluate workflow.
"""

from .entity_linking import EntityLinker, LinkedEntity, normalize_name
from .loading import load_checkpoint, text_model_from_config
from .paths import beam_search_paths, edge_importance
from .ranking import make_doc_ranker
from .retriever import NO_ENTITY_MESSAGE, GFMRetriever

__all__ = [
    "GFMRetriever", "NO_ENTITY_MESSAGE", "EntityLinker", "LinkedEntity", "normalize_name", "load_checkpoint",
    "text_model_from_config", "beam_search_paths", "edge_importance", "make_doc_ranker",
]
