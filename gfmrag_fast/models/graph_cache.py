"""One prepared :class:`RelGraph` per graph: built on first use, reused while the graph is unchanged.

Models receive GFM-RAG's ``torch_geometric.data.Data`` (``edge_index`` [2, E], ``edge_type`` [E],
``num_nodes``, ``num_relations``) on every call. Preparing a RelGraph sorts the edges, so it must
happen once per graph, not once per call: :func:`rel_graph_of` keeps the prepared graph in a
weak-keyed cache.

Cache key and validity (the rule, so that an edited graph never reuses a stale preparation):

* the entry is keyed by the identity of the ``edge_index`` tensor object (weakly: dropping the
  graph drops the entry);
* it is reused only while ``edge_type`` is the same tensor object, neither tensor was modified
  in place (their autograd version counters, ``tensor._version``, are unchanged), neither points
  at other memory (``data_ptr``), and ``num_nodes`` / ``num_relations`` are unchanged.

Assigning a new ``edge_index`` or ``edge_type`` to the Data, editing either in place, or
``data.to(device)`` (new tensors) therefore prepares the graph again; anything else hits the cache.
Copies for other devices are cached by the RelGraph itself (:meth:`RelGraph.to`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from ..ops import RelGraph


@dataclass
class _Entry:
    edge_type: "weakref.ref[torch.Tensor]"
    state: Tuple[int, ...]
    graph: RelGraph


_CACHE = WeakTensorKeyDictionary()


def _state(edge_index: torch.Tensor, edge_type: torch.Tensor, num_nodes: int, num_relations: int) -> Tuple[int, ...]:
    return (
        edge_index._version, edge_index.data_ptr(), edge_type._version, edge_type.data_ptr(),
        num_nodes, num_relations,
    )


def num_relations_of(graph) -> int:
    """2R, the number of relation types of a GFM-RAG graph (inverses included).

    ``graph.num_relations`` when present, else the number of rows of ``graph.rel_emb``.
    """
    num_relations = getattr(graph, "num_relations", None)
    if num_relations is None:
        rel_emb = getattr(graph, "rel_emb", None)
        if rel_emb is None:
            raise ValueError("graph has neither num_relations nor rel_emb: cannot tell how many relation types it has")
        num_relations = rel_emb.shape[0]
    return int(num_relations)


def rel_graph_of(graph, device: Optional[torch.device] = None) -> RelGraph:
    """The prepared RelGraph of a PyG ``Data`` graph, from the cache when still valid.

    Args:
        graph: ``Data`` with ``edge_index`` [2, E] (rows: destination, source), ``edge_type`` [E],
            ``num_nodes`` and ``num_relations`` (2R); a RelGraph is returned as it is.
        device: where the result must live (default: where ``edge_index`` is).
    """
    if isinstance(graph, RelGraph):
        return graph if device is None else graph.to(device)
    edge_index, edge_type = graph.edge_index, graph.edge_type
    num_nodes, num_relations = int(graph.num_nodes), num_relations_of(graph)
    state = _state(edge_index, edge_type, num_nodes, num_relations)
    entry = _CACHE.get(edge_index)
    if entry is None or entry.edge_type() is not edge_type or entry.state != state:
        # RelGraph copies its inputs, so the entry never holds the key tensor and the weak key can
        # be collected.
        prepared = RelGraph(edge_index, edge_type, num_nodes, num_relations)
        entry = _Entry(weakref.ref(edge_type), state, prepared)
        _CACHE[edge_index] = entry
    return entry.graph if device is None else entry.graph.to(device)
