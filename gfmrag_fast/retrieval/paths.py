"""Path explanations: which relational paths from the question's entities made a document score.

NBFNet's interpretation (Zhu et al. 2021, §4.4), adapted to documents:

1. **Edge importance.** Every layer l gets its own edge weights w_l [E], all 1 (the model's own
   output is unchanged); the importance of edge e at layer l is the gradient
   ``∂ doc_score / ∂ w_l[e]``. The document score differentiated is the IDF ranker's, on entity
   probabilities: ``Σ_e idf[e] · ent2doc[e, d] · sigmoid(logit_e)`` (GFM-RAG's top-k ranker is
   piecewise constant, so it has no gradient).
2. **Beam search over the layers.** A path's importance is the sum of its edges' importances,
   each at the layer that crosses it. Layer by layer, every node keeps its ``beam_size`` most
   important partial paths from a question entity: a path either crosses an edge at this layer
   or stays where it is (the boundary re-enters the question entities at every layer and the
   short cut carries every node's state forward, so a path of k < L edges may cross them at any
   k of the L layers). A path does not go straight back along the edge it came by, and does not
   go on from a document entity once it has reached one. After the last layer, the paths that end at
   one of the document's entities are the candidates.

Edges follow GFM-RAG's message direction: edge e carries ``edge_index[1, e] → edge_index[0, e]``
with relation ``edge_type[e]``; a step is reported as the KG triple it comes from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..models.aggregation import PreparedGraph
from ..models.graph_input import rel_graph_of
from ..models.retriever import GNNRetriever

__all__ = ["Path", "edge_importance", "beam_search_paths", "layered_forward"]

# Two 31-bit polynomial hashes packed in one int64 name a path by its edge sequence.
_MOD = 2_147_483_647
_MULT = (1_000_003, 998_244_353 % _MOD)


@dataclass
class Path:
    """A path of edge ids from a question entity, with its importance."""

    edges: List[int]
    nodes: List[int]  # len(edges) + 1, starting at the question entity
    importance: float


def layered_forward(
    model: GNNRetriever,
    graph,
    question_embeddings: torch.Tensor,  # [B, D]
    question_entities_masks: torch.Tensor,  # [B, N]
    entities_weight: Optional[torch.Tensor],  # [N]
    layer_edge_weights: Sequence[torch.Tensor],  # one [E] per layer
) -> torch.Tensor:  # [B, N] logits
    """``GNNRetriever.forward`` with a separate edge weight for each layer (same result when all are 1)."""
    entity_model = model.entity_model
    if len(layer_edge_weights) != len(entity_model.layers):
        raise ValueError(f"need one edge weight per layer ({len(entity_model.layers)}), got {len(layer_edge_weights)}")
    question = model.question_mlp(question_embeddings)  # [B, d0]
    relation = model.rel_mlp(graph.rel_emb)  # [2R, d0]
    mask = question_entities_masks
    if entities_weight is not None:
        mask = mask * entities_weight.unsqueeze(0)
    x = boundary = mask.to(question.dtype).unsqueeze(-1) * question.unsqueeze(1)  # [B, N, d0]
    rel_graph = rel_graph_of(graph, x.device)
    hiddens = []
    for layer, weight in zip(entity_model.layers, layer_edge_weights):
        residual = entity_model.short_cut and layer.output_dim == layer.input_dim
        x = layer(x, boundary, relation, PreparedGraph(rel_graph, weight), residual)
        hiddens.append(x)
    return entity_model.score(hiddens, question)


def edge_importance(
    model: GNNRetriever,
    graph,
    question_embedding: torch.Tensor,  # [D]
    question_entities: torch.Tensor,  # [k] entity ids
    entities_weight: Optional[torch.Tensor],  # [N]
    doc_entity_weights: torch.Tensor,  # [M, N]: row m = idf[e] · ent2doc[e, d_m]
) -> torch.Tensor:  # [M, L, E]
    """Gradient of each of M document scores w.r.t. every layer's edge weights (see module docstring)."""
    num_nodes, num_edges = int(graph.num_nodes), graph.edge_index.shape[1]
    device = question_embedding.device
    mask = torch.zeros(1, num_nodes, device=device)
    mask[0, question_entities] = 1.0
    weights = [torch.ones(num_edges, device=device, requires_grad=True) for _ in model.entity_model.layers]
    with torch.enable_grad():
        logits = layered_forward(model, graph, question_embedding[None], mask, entities_weight, weights)[0]  # [N]
        doc_scores = doc_entity_weights.to(logits.dtype) @ torch.sigmoid(logits)  # [M]
        grads = []
        for m in range(doc_scores.shape[0]):
            grad = torch.autograd.grad(doc_scores[m], weights, retain_graph=m + 1 < doc_scores.shape[0])
            grads.append(torch.stack(grad))
    return torch.stack(grads).detach()


def beam_search_paths(
    edge_index: torch.Tensor,  # [2, E], messages edge_index[1] → edge_index[0]
    importance: torch.Tensor,  # [L, E] edge importance per layer
    sources: torch.Tensor,  # [S] question entity ids
    targets: torch.Tensor,  # [T] the document's entity ids
    num_nodes: int,
    top_k: int = 3,
    beam_size: int = 10,
) -> List[Path]:
    """The ``top_k`` most important paths (≥ 1 edge, no node twice) from ``sources`` to ``targets``."""
    device = importance.device
    src, dst = edge_index[1].to(device), edge_index[0].to(device)
    order = torch.argsort(src, stable=True)  # edges grouped by the node they leave
    out_degree = torch.bincount(src, minlength=num_nodes)
    out_start = torch.cumsum(out_degree, 0) - out_degree
    sources = torch.unique(sources.to(device))
    is_target = torch.zeros(num_nodes, dtype=torch.bool, device=device)
    is_target[targets.to(device)] = True
    beams = _Beams(node=sources, score=torch.zeros(len(sources), device=device, dtype=importance.dtype),
                   hash=torch.zeros(len(sources), dtype=torch.long, device=device),
                   prev_node=torch.full_like(sources, -1), parent=torch.full_like(sources, -1),
                   edge=torch.full_like(sources, -1), length=torch.zeros_like(sources))
    history = [beams]
    for layer_importance in importance:
        stay = beams.stay()
        move = beams.move(~is_target[beams.node] | (beams.length == 0), order, out_degree, out_start, src, dst, layer_importance)
        beams = _Beams.cat(stay, move).top_per_node(beam_size)
        history.append(beams)
    final = torch.nonzero(is_target[beams.node] & (beams.length > 0)).flatten()
    final = final[torch.argsort(beams.score[final], descending=True, stable=True)]
    paths: List[Path] = []
    for index in final.tolist():
        path = _backtrack(history, index, src, dst)
        if len(set(path.nodes)) == len(path.nodes):
            paths.append(path)
            if len(paths) == top_k:
                break
    return paths


@dataclass
class _Beams:
    """Partial paths after some layers, one row each; ``parent`` indexes the previous layer's rows."""

    node: torch.Tensor
    score: torch.Tensor
    hash: torch.Tensor
    prev_node: torch.Tensor  # the node before the last edge (-1 at a question entity)
    parent: torch.Tensor
    edge: torch.Tensor  # the edge crossed at this layer, -1 for a stay
    length: torch.Tensor  # number of edges

    def stay(self) -> "_Beams":
        rows = torch.arange(len(self.node), device=self.node.device)
        return _Beams(self.node, self.score, self.hash, self.prev_node, rows, torch.full_like(rows, -1), self.length)

    def move(self, active, order, out_degree, out_start, src, dst, layer_importance) -> "_Beams":
        """The ``active`` partial paths extended by every edge out of their node, except straight back."""
        active = torch.nonzero(active).flatten()
        count = out_degree[self.node[active]]
        rows = torch.repeat_interleave(active, count)
        first = torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
        edge = order[out_start[self.node[rows]] + torch.arange(len(rows), device=rows.device) - first]
        node = dst[edge]
        keep = node != self.prev_node[rows]
        rows, edge, node = rows[keep], edge[keep], node[keep]
        return _Beams(node, self.score[rows] + layer_importance[edge], _extend(self.hash[rows], edge),
                      src[edge], rows, edge, self.length[rows] + 1)

    @staticmethod
    def cat(a: "_Beams", b: "_Beams") -> "_Beams":
        return _Beams(*(torch.cat([x, y]) for x, y in zip(a.__dict__.values(), b.__dict__.values())))

    def take(self, index: torch.Tensor) -> "_Beams":
        return _Beams(*(x[index] for x in self.__dict__.values()))

    def top_per_node(self, k: int) -> "_Beams":
        """Each node's k best rows; of rows with the same edge sequence only the best is kept
        (a path of k edges can cross them at several choices of layers)."""
        by_score = torch.argsort(self.score, descending=True, stable=True)
        beams = self.take(by_score)
        beams = beams.take(torch.argsort(beams.node, stable=True))  # by node, best first within
        key = torch.stack([beams.node, beams.hash], dim=1)
        _, inverse = torch.unique(key, dim=0, return_inverse=True)
        position = torch.arange(len(inverse), device=inverse.device)
        first = torch.full((int(inverse.max()) + 1 if len(inverse) else 0,), len(inverse), device=inverse.device)
        first = first.scatter_reduce(0, inverse, position, "amin")
        beams = beams.take(torch.sort(first).values)  # still by node, best first
        _, counts = torch.unique_consecutive(beams.node, return_counts=True)
        rank = torch.arange(len(beams.node), device=counts.device) - torch.repeat_interleave(
            torch.cumsum(counts, 0) - counts, counts)
        return beams.take(torch.nonzero(rank < k).flatten())


def _extend(path_hash: torch.Tensor, edge: torch.Tensor) -> torch.Tensor:
    high, low = path_hash >> 31, path_hash & _MOD
    high = (high * _MULT[0] + edge + 1) % _MOD
    low = (low * _MULT[1] + edge + 1) % _MOD
    return (high << 31) | low


def _backtrack(history: List[_Beams], index: int, src: torch.Tensor, dst: torch.Tensor) -> Path:
    score = float(history[-1].score[index])
    edges = []
    for beams in reversed(history[1:]):
        edge = int(beams.edge[index])
        if edge >= 0:
            edges.append(edge)
        index = int(beams.parent[index])
    edges.reverse()
    nodes = [int(src[edges[0]])] + [int(dst[e]) for e in edges]
    return Path(edges, nodes, score)


def describe_step(
    edge: int, edge_index: torch.Tensor, edge_type: torch.Tensor, num_relations: int,
    entity_names: Sequence[str], relation_names: Sequence[str],
) -> Tuple[str, Tuple[str, str, str]]:
    """(readable step ``-[r]-> v`` or ``<-[r]- v``, the KG triple (head, relation, tail) of the edge).

    Edge e of direct type r < R stores triple (edge_index[0, e], r, edge_index[1, e]) and carries
    messages tail → head, so crossing it reads ``tail <-[r]- head``; the inverse edge (type r + R)
    carries head → tail: ``head -[r]-> tail``.
    """
    num_direct = num_relations // 2
    u, v, k = int(edge_index[1, edge]), int(edge_index[0, edge]), int(edge_type[edge])
    if k >= num_direct:
        rel = relation_names[k - num_direct]
        return f" -[{rel}]-> {entity_names[v]}", (entity_names[u], rel, entity_names[v])
    rel = relation_names[k]
    return f" <-[{rel}]- {entity_names[v]}", (entity_names[v], rel, entity_names[u])


def describe_path(
    path: Path, edge_index: torch.Tensor, edge_type: torch.Tensor, num_relations: int,
    entity_names: Sequence[str], relation_names: Sequence[str],
) -> Dict[str, object]:
    """``{"path": "a -[r]-> b <-[s]- c", "importance": float, "entities": [a, b, c],
    "triples": [[h, r, t], ...]}``."""
    text, triples = entity_names[path.nodes[0]], []
    for edge in path.edges:
        step, triple = describe_step(edge, edge_index, edge_type, num_relations, entity_names, relation_names)
        text += step
        triples.append(list(triple))
    return {"path": text, "importance": path.importance, "entities": [entity_names[v] for v in path.nodes],
            "triples": triples}
