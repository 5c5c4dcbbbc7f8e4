"""Seeded synthetic knowledge graphs for demos, benchmarks and speed tests.

Two families:

* :func:`synthetic_kg` — uniform: heads, tails and relations drawn uniformly. Easy on kernels and
  unlike any real KG index.
* :func:`random_graph` — raw ``edge_index`` / ``edge_type`` with the cases kernels get wrong:
  parallel edges, self-loops, a hub and an isolated node (used by the tests and the CUDA
  emulator's checks).
* :func:`real_shape_kg` — the shape of a real GFM-RAG index at any size: one synonym relation
  ("equivalent") holding about half of the triples, a long tail of rare relations, and
  heavy-tailed entity degrees (a few hubs with hundreds of edges, most entities with 1–3). The
  shape is a :class:`KGShape`, fitted from any ``kg.txt`` or the built-in fit of the bundled
  MuSiQue index.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass
from typing import Dict, Union

import torch

from .ops import RelGraph

__all__ = ["synthetic_kg", "random_graph", "real_shape_kg", "KGShape", "musique_shape", "graph_shape_stats"]


def _check_sizes(fn: str, num_nodes: int, num_triples: int, num_relations: int) -> None:
    if num_relations < 2 or num_relations % 2:
        raise ValueError(f"{fn}: num_relations counts direct and inverse types (2R), got {num_relations}")
    if num_nodes < 1:
        raise ValueError(f"{fn}: num_nodes must be >= 1, got {num_nodes}")
    if num_triples < 0:
        raise ValueError(f"{fn}: num_triples must be >= 0, got {num_triples}")


def _with_inverses(head, tail, rel, num_nodes, num_relations, device) -> RelGraph:
    edge_index = torch.cat([torch.stack([head, tail]), torch.stack([tail, head])], 1)
    edge_type = torch.cat([rel, rel + num_relations // 2])
    return RelGraph(edge_index, edge_type, num_nodes, num_relations).to(device)


def synthetic_kg(num_nodes: int, num_triples: int, num_relations: int, seed: int = 0, device="cpu") -> RelGraph:
    """A uniform random KG: `num_triples` triples (h, r, t) with r < num_relations / 2, each as
    edge_index column (h, t) with type r plus its inverse (t, h) with type r + num_relations / 2.

    `num_relations` counts both halves (2R), so the graph has E = 2 * num_triples edges.
    """
    _check_sizes("synthetic_kg", num_nodes, num_triples, num_relations)
    gen = torch.Generator().manual_seed(seed)
    head = torch.randint(0, num_nodes, (num_triples,), generator=gen)
    tail = torch.randint(0, num_nodes, (num_triples,), generator=gen)
    rel = torch.randint(0, num_relations // 2, (num_triples,), generator=gen)
    return _with_inverses(head, tail, rel, num_nodes, num_relations, device)


def random_graph(num_nodes: int, num_edges: int, num_relations: int, seed: int = 0, duplicates: bool = True,
                 special: bool = True):
    """``edge_index`` [2, E] and ``edge_type`` [E], seeded, with the cases kernels get wrong.

    With ``special`` (and enough nodes / edges): node ``num_nodes - 1`` has no edge at all,
    node 0 is the destination of a quarter of the edges (a hub) and three edges are self-loops.
    With ``duplicates``: the last tenth of the edges repeats the first tenth (parallel edges).
    No inverse edges: unlike :func:`synthetic_kg`, direction matters in this graph.
    """
    gen = torch.Generator().manual_seed(seed)
    high = num_nodes - 1 if special and num_nodes > 2 else num_nodes
    edge_index = torch.randint(0, high, (2, num_edges), generator=gen)
    edge_type = torch.randint(0, num_relations, (num_edges,), generator=gen)
    if special and num_edges >= 8:
        edge_index[0, : num_edges // 4] = 0
        loops = slice(num_edges // 4, num_edges // 4 + 3)
        edge_index[1, loops] = edge_index[0, loops]
    if duplicates and num_edges >= 10:
        k = num_edges // 10
        edge_index[:, -k:] = edge_index[:, :k]
        edge_type[-k:] = edge_type[:k]
    return edge_index, edge_type


@dataclass(frozen=True)
class KGShape:
    """The size-free shape of a KG: how triples spread over relations and edge ends over entities.

    Attributes:
        relation_share: [R0] float64, descending, sums to 1 — the fraction of triples of each
            direct relation, most frequent first.
        degree_share: [N0] float64, descending, sums to 1 — each entity's fraction of all edge
            ends (heads and tails), highest degree first.
    """

    relation_share: torch.Tensor  # [R0]
    degree_share: torch.Tensor  # [N0]

    @classmethod
    def from_kg(cls, path: Union[str, os.PathLike]) -> "KGShape":
        """Fit from a ``head,relation,tail`` file (GFM-RAG's ``kg.txt``)."""
        from .data.readers import read_triples

        triples, _ = read_triples(path)
        if not triples:
            raise ValueError(f"KGShape.from_kg: {os.fspath(path)} holds no triples")
        relations = collections.Counter(r for _, r, _ in triples)
        degrees = collections.Counter()
        for h, _, t in triples:
            degrees[h] += 1
            degrees[t] += 1
        return cls(_descending_share(relations.values()), _descending_share(degrees.values()))

    @classmethod
    def zipf(
        cls,
        num_relations: int = 4_939,
        num_entities: int = 16_234,
        top_relation_share: float = 0.456,
        relation_exponent: float = 0.87,
        degree_exponent: float = 0.52,
    ) -> "KGShape":
        """A parametric shape. The defaults are fitted to the bundled MuSiQue index
        (``data/musique_hippo``): "equivalent" holds 45.6 % of the triples, the other relations'
        frequencies fall as rank^-0.87, and entity degrees as rank^-0.52 (max/median ≈ 110).
        """
        if not 0.0 < top_relation_share <= 1.0:
            raise ValueError(f"KGShape.zipf: top_relation_share must be in (0, 1], got {top_relation_share}")
        if num_relations < 1 or num_entities < 1:
            raise ValueError(f"KGShape.zipf: num_relations and num_entities must be >= 1, got "
                             f"{num_relations} and {num_entities}")
        rest = torch.arange(2, num_relations + 1, dtype=torch.float64).pow(-relation_exponent)
        if num_relations == 1:
            relation_share = torch.ones(1, dtype=torch.float64)
        else:
            relation_share = torch.cat([torch.tensor([top_relation_share], dtype=torch.float64),
                                        rest / rest.sum() * (1.0 - top_relation_share)])
        degree = torch.arange(1, num_entities + 1, dtype=torch.float64).pow(-degree_exponent)
        return cls(relation_share, degree / degree.sum())

    def relation_weights(self, num_relations: int) -> torch.Tensor:  # -> [num_relations]
        """Weights of `num_relations` direct relations with this shape. The top relation keeps its
        share at any size (a KG has one synonym relation, not a fixed fraction of them); the tail's
        profile is stretched or thinned over the remaining relations."""
        share = self.relation_share
        if num_relations == 1 or share.numel() == 1:
            return torch.ones(num_relations, dtype=torch.float64) / num_relations
        tail = _resample(share[1:], num_relations - 1)
        top = share[0].clamp(max=1.0 - 1e-12)
        return torch.cat([top.reshape(1), tail / tail.sum() * (1.0 - top)])

    def entity_weights(self, num_entities: int) -> torch.Tensor:  # -> [num_entities]
        """Expected share of edge ends of `num_entities` entities with this degree profile."""
        weights = _resample(self.degree_share, num_entities)
        return weights / weights.sum()


def _descending_share(counts) -> torch.Tensor:
    values = torch.tensor(sorted(counts, reverse=True), dtype=torch.float64)
    return values / values.sum()


def _resample(profile: torch.Tensor, size: int) -> torch.Tensor:  # [n] descending -> [size]
    """The profile read at `size` evenly spaced ranks (nearest rank), keeping its shape."""
    n = profile.numel()
    ranks = torch.div(torch.arange(size, dtype=torch.int64) * n, size, rounding_mode="floor")
    return profile[ranks.clamp_(max=n - 1)]


_MUSIQUE_KG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "data", "musique_hippo", "processed", "stage1", "kg.txt")


def real_shape_kg(
    num_nodes: int,
    num_triples: int,
    num_relations: int,
    shape: Union[KGShape, str, os.PathLike, None] = None,
    seed: int = 0,
    device="cpu",
) -> RelGraph:
    """A KG with the relation-frequency and degree distributions of a real GFM-RAG index.

    Relations of the `num_triples` triples are drawn from ``shape.relation_weights``; heads and
    tails independently in proportion to ``shape.entity_weights`` (Chung–Lu), so an entity's
    expected degree follows the fitted profile; self loops are redrawn. Entity ids are then
    shuffled, so hubs sit anywhere in the id range, as they do in an index numbered by first
    appearance. Each triple also gets its inverse edge, as in :func:`synthetic_kg`.

    Args:
        shape: a :class:`KGShape`, a path to a ``kg.txt`` to fit one from, or None for
            :meth:`KGShape.zipf` (the MuSiQue fit).
    """
    _check_sizes("real_shape_kg", num_nodes, num_triples, num_relations)
    if shape is None:
        shape = KGShape.zipf()
    elif not isinstance(shape, KGShape):
        shape = KGShape.from_kg(shape)
    gen = torch.Generator().manual_seed(seed)
    rel = torch.multinomial(shape.relation_weights(num_relations // 2), num_triples, True, generator=gen)
    entity = shape.entity_weights(num_nodes)
    head = torch.multinomial(entity, num_triples, True, generator=gen)
    tail = torch.multinomial(entity, num_triples, True, generator=gen)
    if num_nodes > 1:
        for _ in range(8):
            loops = (head == tail).nonzero().flatten()
            if loops.numel() == 0:
                break
            tail[loops] = torch.multinomial(entity, loops.numel(), True, generator=gen)
    relabel = torch.randperm(num_nodes, generator=gen)
    return _with_inverses(relabel[head], relabel[tail], rel, num_nodes, num_relations, device)


def musique_shape() -> KGShape:
    """The shape fitted from the bundled MuSiQue index when the source tree is present, else the
    parametric fit of it (:meth:`KGShape.zipf`)."""
    return KGShape.from_kg(_MUSIQUE_KG) if os.path.isfile(_MUSIQUE_KG) else KGShape.zipf()


def graph_shape_stats(graph: RelGraph) -> Dict[str, float]:
    """What makes a graph hard for a kernel: the top relation's share of the edges (a relation and
    its inverse together), in-degree quantiles."""
    edge_type = graph.edge_type.cpu()
    rel_counts = torch.bincount(edge_type % max(graph.num_relations // 2, 1))
    degree = torch.bincount(graph.edge_index[0].cpu(), minlength=graph.num_nodes).double()
    num_edges = max(edge_type.numel(), 1)
    return {
        "num_nodes": graph.num_nodes,
        "num_edges": int(edge_type.numel()),
        "num_relations": graph.num_relations,
        "top_relation_share": float(rel_counts.max()) / num_edges if edge_type.numel() else 0.0,
        "max_in_degree": int(degree.max()) if degree.numel() else 0,
        "median_in_degree": float(degree.median()) if degree.numel() else 0.0,
        "p99_in_degree": float(degree.quantile(0.99)) if degree.numel() else 0.0,
    }

