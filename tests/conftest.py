import pytest
import torch

CUDA = torch.cuda.is_available()

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]),
]


def random_graph(num_nodes, num_edges, num_relations, seed=0, duplicates=True, special=True):
    """edge_index [2, E], edge_type [E] with parallel edges, self-loops, a hub and isolated nodes.

    Node num_nodes - 1 is isolated (no edge at all) and node 0 receives a quarter of the edges
    (a hub), when `special`.
    """
    gen = torch.Generator().manual_seed(seed)
    high = num_nodes - 1 if special and num_nodes > 2 else num_nodes
    edge_index = torch.randint(0, high, (2, num_edges), generator=gen)
    edge_type = torch.randint(0, num_relations, (num_edges,), generator=gen)
    if special and num_edges >= 8:
        edge_index[0, : num_edges // 4] = 0  # hub destination
        edge_index[1, num_edges // 4 : num_edges // 4 + 3] = edge_index[0, num_edges // 4 : num_edges // 4 + 3]  # self-loops
    if duplicates and num_edges >= 10:
        k = num_edges // 10
        edge_index[:, -k:] = edge_index[:, :k]
        edge_type[-k:] = edge_type[:k]
    return edge_index, edge_type
