"""Entity numberings that keep graph neighbours close in memory.

The aggregation kernels gather one row of node states per edge from the edge's source. Under a
random numbering (hubs and their neighbours anywhere in the id range) nearly every gather misses
the caches; numbered so that neighbours have nearby ids, consecutive destinations read rows that
were just read. :func:`locality_order` is reverse Cuthill–McKee: a breadth-first search over the
undirected graph from a peripheral node of each connected component, each level ordered by the
position of its parent and then by degree, the whole order reversed within each component.

Entity ids carry no meaning in GFM-RAG (the GNN has no per-entity parameters), so the stage-2
builder may number entities this way; see ``KGDataset(entity_order=...)``.
"""

from __future__ import annotations

import torch

__all__ = ["ENTITY_ORDERS", "locality_order", "neighbour_distance", "relabel", "undirected_csr"]

ENTITY_ORDERS = ("original", "locality")


def undirected_csr(edge_index: torch.Tensor, num_nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ptr [N + 1], neighbours [nnz]) of the simple undirected graph: both directions of every
    edge, parallel edges and self loops dropped, neighbours of each node in increasing id order."""
    u, v = edge_index[0], edge_index[1]
    keep = u != v
    u, v = u[keep], v[keep]
    key = torch.unique(torch.cat([u * num_nodes + v, v * num_nodes + u]))  # sorted by (row, column)
    rows, cols = key // num_nodes, key % num_nodes
    ptr = torch.zeros(num_nodes + 1, dtype=torch.long)
    torch.cumsum(torch.bincount(rows, minlength=num_nodes), 0, out=ptr[1:])
    return ptr, cols


def _components(ptr: torch.Tensor, nbr: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """[N] the smallest node id of each node's connected component (min-label propagation with
    pointer jumping: a few sweeps over the edges, however long the paths)."""
    label = torch.arange(num_nodes)
    rows = torch.repeat_interleave(torch.arange(num_nodes), ptr[1:] - ptr[:-1])
    while True:
        new = label.scatter_reduce(0, rows, label[nbr], reduce="amin")
        new = new[new]  # jump: a label's own label is at most as large
        if torch.equal(new, label):
            return label
        label = new


def _cuthill_mckee_levels(
    ptr: torch.Tensor, nbr: torch.Tensor, degree: torch.Tensor, roots: torch.Tensor, num_nodes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Breadth-first search from every root at once (one root per component).

    Returns ([N] level, [N] rank): level is the distance from the component's root; rank orders
    the nodes of one level as Cuthill–McKee does (by the rank of the parent that reached them
    first, then by degree, then by id). Unreached nodes keep level -1.
    """
    level = torch.full((num_nodes,), -1, dtype=torch.long)
    rank = torch.zeros(num_nodes, dtype=torch.long)
    frontier = roots  # in rank order
    level[frontier] = 0
    depth = 0
    while frontier.numel():
        counts = ptr[frontier + 1] - ptr[frontier]
        parent_pos = torch.repeat_interleave(torch.arange(frontier.numel()), counts)
        starts = torch.repeat_interleave(ptr[frontier], counts)
        offsets = torch.arange(parent_pos.numel()) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        child = nbr[starts + offsets]
        fresh = level[child] < 0
        child, parent_pos = child[fresh], parent_pos[fresh]
        if child.numel() == 0:
            break
        # Lexicographic (parent position, degree, id): stable sorts from the last key to the first.
        order = torch.argsort(child, stable=True)
        order = order[torch.argsort(degree[child[order]], stable=True)]
        order = order[torch.argsort(parent_pos[order], stable=True)]
        child = child[order]
        # A node reached from several parents belongs to the first of them.
        first = torch.ones(child.numel(), dtype=torch.bool)
        sorted_child, by_child = torch.sort(child, stable=True)
        first_sorted = torch.ones_like(first)
        first_sorted[1:] = sorted_child[1:] != sorted_child[:-1]
        first[by_child] = first_sorted
        frontier = child[first]
        depth += 1
        level[frontier] = depth
        rank[frontier] = torch.arange(frontier.numel())
    return level, rank


def locality_order(edge_index: torch.Tensor, num_nodes: int) -> torch.Tensor:  # [2, E] -> [N]
    """A reverse Cuthill–McKee numbering of a graph: ``order[new_id] = old_id``.

    Edge directions are ignored. Each connected component is searched breadth-first from a
    pseudo-peripheral node (a lowest-degree node of the last level of a first search that starts
    at the component's lowest-degree node), the levels ordered as Cuthill–McKee orders them, and
    the component's order reversed. Components keep the order of their smallest old id; an
    isolated node is its own component. The result is a permutation of ``range(num_nodes)`` and
    depends only on the graph (deterministic, no randomness).

    Args:
        edge_index: [2, E] integer node ids in ``[0, num_nodes)``.
        num_nodes: N >= 0.
    Returns:
        [N] long tensor, the old id of the node numbered i at position i.
    """
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 0:
        raise ValueError(f"locality_order: num_nodes must be an integer >= 0, got {num_nodes!r}")
    edge_index = torch.as_tensor(edge_index)
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"locality_order: edge_index must have shape [2, E], got {tuple(edge_index.shape)}")
    if edge_index.is_floating_point() or edge_index.is_complex() or edge_index.dtype == torch.bool:
        raise ValueError(f"locality_order: edge_index must hold integer node ids, got {edge_index.dtype}")
    edge_index = edge_index.detach().to("cpu", torch.long)
    if edge_index.numel() and (int(edge_index.min()) < 0 or int(edge_index.max()) >= num_nodes):
        raise ValueError(f"locality_order: edge_index holds ids outside [0, {num_nodes}) "
                         f"(min {int(edge_index.min())}, max {int(edge_index.max())})")
    if num_nodes == 0:
        return torch.zeros(0, dtype=torch.long)
    ptr, nbr = undirected_csr(edge_index, num_nodes)
    degree = ptr[1:] - ptr[:-1]
    comp = _components(ptr, nbr, num_nodes)

    def lowest_degree_per_component(candidates: torch.Tensor) -> torch.Tensor:
        # Sorted by (component, degree, id); the first candidate of each component wins.
        order = torch.argsort(candidates, stable=True)
        order = order[torch.argsort(degree[candidates[order]], stable=True)]
        order = order[torch.argsort(comp[candidates[order]], stable=True)]
        ranked = candidates[order]
        head = torch.ones(ranked.numel(), dtype=torch.bool)
        head[1:] = comp[ranked[1:]] != comp[ranked[:-1]]
        return ranked[head]  # one per component, in component order

    roots = lowest_degree_per_component(torch.arange(num_nodes))
    level, _ = _cuthill_mckee_levels(ptr, nbr, degree, roots, num_nodes)
    # Pseudo-peripheral start: the farthest level from the first root holds the ends of a long path.
    depth = torch.zeros(num_nodes, dtype=torch.long).scatter_reduce(0, comp, level, reduce="amax")
    roots = lowest_degree_per_component(torch.nonzero(level == depth[comp]).flatten())
    level, rank = _cuthill_mckee_levels(ptr, nbr, degree, roots, num_nodes)
    # Cuthill–McKee is (component, level, rank); reversing within each component negates the last two.
    order = torch.argsort(-rank, stable=True)
    order = order[torch.argsort(-level[order], stable=True)]
    return order[torch.argsort(comp[order], stable=True)]


def relabel(order: torch.Tensor) -> torch.Tensor:  # [N] -> [N]
    """The inverse of an order: ``new_id = relabel(order)[old_id]``."""
    new_id = torch.empty_like(order)
    new_id[order] = torch.arange(order.numel(), dtype=order.dtype)
    return new_id


def neighbour_distance(edge_index: torch.Tensor) -> dict[str, float]:  # [2, E]
    """How far apart the ends of the edges are numbered: ``bandwidth`` (the largest ``|u - v|``)
    and ``mean`` ``|u - v|`` over the edges."""
    gap = (edge_index[0].long() - edge_index[1].long()).abs()
    if gap.numel() == 0:
        return {"bandwidth": 0.0, "mean": 0.0}
    return {"bandwidth": float(gap.max()), "mean": float(gap.double().mean())}
