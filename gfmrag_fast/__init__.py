"""gfmrag_fast: fast training of GFM-RAG graph retrievers."""

__version__ = "0.1.0"
