"""Pure-PyTorch versions of negative_sampling and easy_edge_mask, the way GFM-RAG/ULTRA compute
them: edges hashed and sorted on every call, dense [B, N] answer masks, ``nonzero`` over them.

Same signatures and guarantees as the kernels (exactly uniform strict negatives, the same rows);
they are the baseline of the benchmarks and a second implementation for the tests.
"""

from typing import Optional

import torch

from .graph import RelGraph, expand_ranges, offsets


def _edge_match(keys: torch.Tensor, query: torch.Tensor):
    """Positions in `keys` equal to each query key, as (query row, key position) pairs."""
    order = torch.argsort(keys)
    sorted_keys = keys[order]
    lo = torch.searchsorted(sorted_keys, query)
    hi = torch.searchsorted(sorted_keys, query, right=True)
    rows, positions = expand_ranges(lo, hi - lo)
    return rows, order[positions]


def negative_sampling_reference(
    graph: RelGraph,
    triples: torch.Tensor,  # [B, 3]
    num_negative: int,
    strict: bool = True,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:  # [B, 1 + K, 3]
    num_nodes, half = graph.num_nodes, graph.num_relations // 2
    h, t, r = triples.long().unbind(-1)
    batch = triples.size(0)
    tail_rows = torch.arange(batch, device=triples.device) < batch // 2
    source = torch.where(tail_rows, h, t)
    relation = torch.where(tail_rows, r, r + half)
    positive = torch.where(tail_rows, t, h)
    if strict:
        edge_key = graph.edge_index[0] * graph.num_relations + graph.edge_type
        rows, edges = _edge_match(edge_key, source * graph.num_relations + relation)
        allowed = torch.ones(batch, num_nodes, dtype=torch.bool, device=triples.device)
        allowed[rows, graph.edge_index[1, edges]] = False
        allowed[torch.arange(batch, device=triples.device), positive] = False
    else:
        allowed = torch.ones(batch, num_nodes, dtype=torch.bool, device=triples.device)
    candidates = allowed.nonzero()[:, 1]
    num_candidates = allowed.sum(-1)
    start = offsets(num_candidates)[:-1]
    rand = torch.rand(batch, num_negative, generator=generator).to(triples.device)
    pick = (rand * num_candidates[:, None]).long().clamp(max=(num_candidates - 1).clamp(min=0)[:, None])
    if candidates.numel():
        index = (start[:, None] + pick).clamp(max=candidates.numel() - 1)
        negatives = torch.where(num_candidates[:, None] > 0, candidates[index], positive[:, None])
    else:  # no query has an allowed entity: the negatives repeat the positive, as the kernels do
        negatives = positive[:, None].expand(batch, num_negative)
    out = triples.long()[:, None, :].repeat(1, num_negative + 1, 1)
    out[tail_rows, 1:, 1] = negatives[tail_rows]
    out[~tail_rows, 1:, 0] = negatives[~tail_rows]
    return out


def easy_edge_mask_reference(graph: RelGraph, batch: torch.Tensor) -> torch.Tensor:  # [E] bool
    flat = batch.reshape(-1, 3).long()
    h, t, r = flat.unbind(-1)
    n, rels = graph.num_nodes, graph.num_relations
    edge_key = (graph.edge_index[0] * n + graph.edge_index[1]) * rels + graph.edge_type
    query = torch.cat([(h * n + t) * rels + r, (t * n + h) * rels + r + rels // 2])
    _, edges = _edge_match(edge_key, query)
    mask = torch.zeros(graph.num_edges, dtype=torch.bool, device=batch.device)
    mask[edges] = True
    return mask
