"""How the models read their graph argument: a GFM-RAG ``Data`` (or a RelGraph) -> the RelGraph
the kernels run on.

Models receive GFM-RAG's ``torch_geometric.data.Data`` (``edge_index`` [2, E], ``edge_type`` [E],
``num_nodes``, ``num_relations``) on every call. Preparing a RelGraph sorts the edges, so a graph
used for many calls should be prepared once: :func:`gfmrag_fast.data.prepare_graph` returns a copy
that carries its RelGraph as ``rel_graph``, and that is what the training tasks hand the models
(their datasets' prepared state is owned by :class:`gfmrag_fast.data.ResidentDatasets`). The
models hold no cache of their own: a graph without a prepared RelGraph is prepared for the call.

A carried RelGraph is used only while it describes the graph: the graph's ``edge_index`` and
``edge_type`` must be the RelGraph's own tensors (which ``prepare_graph`` makes them) and the
sizes must agree. Assigning other edge tensors, or ``data.to(other_device)``, therefore makes the
model prepare the graph again, per call.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..ops import RelGraph


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
    """The RelGraph of a PyG ``Data`` graph: the one it carries (see the module docstring), else
    one prepared now.

    Args:
        graph: ``Data`` with ``edge_index`` [2, E] (rows: destination, source), ``edge_type`` [E],
            ``num_nodes`` and ``num_relations`` (2R); a RelGraph is returned as it is.
        device: where the result must live (default: where ``edge_index`` is).
    """
    if isinstance(graph, RelGraph):
        return graph if device is None else graph.to(device)
    edge_index, edge_type = graph.edge_index, graph.edge_type
    num_nodes, num_relations = int(graph.num_nodes), num_relations_of(graph)
    carried = getattr(graph, "rel_graph", None)
    if (isinstance(carried, RelGraph) and carried.edge_index is edge_index and carried.edge_type is edge_type
            and carried.num_nodes == num_nodes and carried.num_relations == num_relations):
        prepared = carried
    else:
        prepared = RelGraph(edge_index, edge_type, num_nodes, num_relations)
    return prepared if device is None else prepared.to(device)
