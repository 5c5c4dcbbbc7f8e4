"""GFM-RAG datasets: stage-1 files in, cached stage-2 tensors out.

::

    from gfmrag_fast.data import QADataset, load_datasets
    from torch.utils.data import DataLoader

    ds = QADataset("data", "musique_hippo")            # default text model: all-MiniLM-L6-v2
    train = ds.split("train")
    loader = DataLoader(train, batch_size=8, shuffle=True, collate_fn=train.collate_fn)
    for batch in loader:
        logits = model(ds.graph, batch)                # GNNRetriever.forward(graph, batch)

Layout read: ``<root>/<name>/processed/stage1/{kg.txt, valid.txt, test.txt,
document2entities.json, train.json, test.json}`` and ``<root>/<name>/raw/dataset_corpus.json``;
written: ``<root>/<name>/processed/stage2/<fingerprint>/`` (safe to build and load from several
processes at once; files verified on load: see :mod:`gfmrag_fast.data.cache`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

# torch_geometric 2.x applies torch.jit.script to a few classes when it is imported, and torch
# >= 2.10 answers each with a FutureWarning that TorchScript is deprecated: noise on every run of
# every workflow. Nothing here uses TorchScript, so that one warning is silenced for that one
# import. Only modules of this subpackage import torch_geometric, and Python runs this file first.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    import torch_geometric.data  # noqa: F401

from .batch import QACollate, collate_qa, entities_weight, index_mask
from .cache import PROCESSING_VERSION, CacheError
from .kg_dataset import KGDataset, resolve_text_emb_model
from .qa_dataset import IndexLists, QADataset, QASplit
from .readers import read_json, read_triples
from .resident import LazyDataset, PreparedDataset, ResidentDatasets, prepare_dataset, prepare_graph

__all__ = [
    "PROCESSING_VERSION",
    "CacheError",
    "IndexLists",
    "KGDataset",
    "LazyDataset",
    "PreparedDataset",
    "QACollate",
    "QADataset",
    "QASplit",
    "ResidentDatasets",
    "collate_qa",
    "entities_weight",
    "index_mask",
    "load_datasets",
    "prepare_dataset",
    "prepare_graph",
    "read_json",
    "read_triples",
]

_KINDS = {"kg": KGDataset, "qa": QADataset}


def load_datasets(
    root: str | os.PathLike, names: str | Sequence[str], kind: str = "qa", text_emb_model: Any = None, **kwargs: Any
) -> list[KGDataset]:
    """Build or load several datasets of one kind ("qa" or "kg") under ``root``, in order.

    One text model is shared by all of them (loaded at most once, and only if some dataset has
    to be built). ``kwargs`` go to each constructor (``force_rebuild``, ``on_error``).
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {sorted(_KINDS)}, got {kind!r}")
    if isinstance(names, str):
        names = [names]
    model = resolve_text_emb_model(text_emb_model)
    return [_KINDS[kind](root, name, text_emb_model=model, **kwargs) for name in names]
