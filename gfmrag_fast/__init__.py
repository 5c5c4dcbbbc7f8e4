"""gfmrag_fast: fast training of GFM-RAG graph retrievers."""

__version__ = "0.1.0"


def __getattr__(name):  # lazy: `import gfmrag_fast` must not load torch or the models
    if name == "load_pretrained":
        from .checkpoints import load_pretrained

        return load_pretrained
    if name == "GFMRetriever":
        from .retrieval import GFMRetriever

        return GFMRetriever
    raise AttributeError(f"module 'gfmrag_fast' has no attribute {name!r}")
