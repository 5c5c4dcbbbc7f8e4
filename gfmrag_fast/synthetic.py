"""Seeded synthetic knowledge graphs for demos, benchmarks and speed tests."""

import torch

from .ops import RelGraph


def synthetic_kg(num_nodes: int, num_triples: int, num_relations: int, seed: int = 0, device="cpu") -> RelGraph:
    """A random KG shaped like GFM-RAG's: `num_triples` triples (h, r, t) with r < num_relations / 2,
    each as edge_index column (h, t) with type r plus its inverse (t, h) with type r + num_relations / 2.

    `num_relations` counts both halves (2R), so the graph has E = 2 * num_triples edges.
    """
    if num_relations < 2 or num_relations % 2:
        raise ValueError(f"synthetic_kg: num_relations counts direct and inverse types (2R), got {num_relations}")
    gen = torch.Generator().manual_seed(seed)
    head = torch.randint(0, num_nodes, (num_triples,), generator=gen)
    tail = torch.randint(0, num_nodes, (num_triples,), generator=gen)
    rel = torch.randint(0, num_relations // 2, (num_triples,), generator=gen)
    edge_index = torch.cat([torch.stack([head, tail]), torch.stack([tail, head])], 1)
    edge_type = torch.cat([rel, rel + num_relations // 2])
    return RelGraph(edge_index, edge_type, num_nodes, num_relations).to(device)
