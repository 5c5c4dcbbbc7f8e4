"""Triple sampling for KG pre-training: strict negatives, easy-edge removal, filtered answers.

All three read one :class:`TripleIndex` of the graph, built once: the graph's edges grouped by
(source = ``edge_index[0]``, relation) with their ``edge_index[1]`` ends sorted. With GFM-RAG's
inverse edges, key (h, r) lists every true tail of (h, r, ?) and key (t, r + R) every true head
of (?, r, t).
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch

from . import _library
from .graph import RelGraph, expand_ranges, offsets

_ops = torch.ops.gfmrag_fast


class TripleIndex:
    """Sorted (source, relation) -> neighbours index of a typed multigraph, on one device.

    Args:
        edge_index: [2, E] rows (source, target) — for GFM-RAG graphs (head, tail) plus inverses.
        edge_type: [E] relation ids in [0, num_relations).
        num_nodes, num_relations: graph sizes (num_relations counts inverse relations too).
    """

    def __init__(self, edge_index: torch.Tensor, edge_type: torch.Tensor, num_nodes: int, num_relations: int):
        _check_int_tensor(edge_index, "TripleIndex", "edge_index")
        if edge_index.dim() != 2 or edge_index.size(0) != 2:
            raise ValueError(f"TripleIndex: edge_index must have shape [2, E], got {tuple(edge_index.shape)}")
        _check_int_tensor(edge_type, "TripleIndex", "edge_type")
        if edge_type.shape != (edge_index.size(1),):
            raise ValueError(
                f"TripleIndex: edge_type must have shape [E] = [{edge_index.size(1)}], got {tuple(edge_type.shape)}"
            )
        if edge_type.device != edge_index.device:
            raise ValueError(
                f"TripleIndex: edge_type is on {edge_type.device} but edge_index is on {edge_index.device}"
            )
        self.num_nodes, self.num_relations, self.num_edges = int(num_nodes), int(num_relations), edge_index.size(1)
        if not (0 <= self.num_nodes < 2**31 and 0 <= self.num_relations < 2**31 and self.num_edges < 2**31):
            raise ValueError(
                f"TripleIndex: num_nodes ({self.num_nodes}), num_relations ({self.num_relations}) and "
                f"E ({self.num_edges}) must be in [0, 2**31)"
            )
        _check_range(edge_index, self.num_nodes, "TripleIndex", "edge_index", "node ids")
        _check_range(edge_type, self.num_relations, "TripleIndex", "edge_type", "relation ids")
        # Normal tensors even under inference mode: the ops can only remember that normal tensors
        # passed their value check (inference tensors have no version counter).
        with torch.inference_mode(False):
            self._build(edge_index, edge_type)

    def _build(self, edge_index: torch.Tensor, edge_type: torch.Tensor) -> None:
        src, dst, rel = edge_index[0].long(), edge_index[1].long(), edge_type.long()
        key = src * self.num_relations + rel
        # Sort by (key, dst) with two stable sorts: key * N + dst could overflow int64.
        order = torch.argsort(dst, stable=True)
        order = order[torch.argsort(key[order], stable=True)]
        key, dst = key[order], dst[order]
        keys, counts = torch.unique_consecutive(key, return_counts=True)
        first = torch.ones_like(key, dtype=torch.bool)
        first[1:] = (key[1:] != key[:-1]) | (dst[1:] != dst[:-1])
        _, unique_counts = torch.unique_consecutive(key[first], return_counts=True)  # every key has a first
        self.keys = keys.contiguous()  # [U] int64
        self.unique_ptr = offsets(unique_counts)  # [U + 1] int64
        self.unique_values = dst[first].to(torch.int32).contiguous()  # [M] int32
        self.all_ptr = offsets(counts)  # [U + 1] int64
        self.all_values = dst.to(torch.int32).contiguous()  # [E] int32
        self.all_eids = order.to(torch.int32).contiguous()  # [E] int32

    @classmethod
    def of(cls, graph: RelGraph) -> "TripleIndex":
        return cls(graph.edge_index, graph.edge_type, graph.num_nodes, graph.num_relations)

    @property
    def arrays(self):
        return [self.keys, self.unique_ptr, self.unique_values, self.all_ptr, self.all_values, self.all_eids]

    @property
    def device(self) -> torch.device:
        return self.keys.device

    def answer_mask(
        self,
        sources: torch.Tensor,  # [Q] node ids in [0, num_nodes)
        relations: torch.Tensor,  # [Q] relation ids in [0, num_relations), inverses included
        check_values: bool = True,
    ) -> torch.Tensor:  # [Q, N] bool
        """[Q, N] bool: True at every node v with an edge (sources[q], relations[q], v).

        The filter of filtered link prediction: build the index over train + valid + test
        triples (with inverses) and pass heads with direct relations for tail prediction, tails
        with inverse relations (r + R) for head prediction. Ids out of range raise ValueError
        (one host read; with ``check_values=False`` they are not checked and the rows of such
        queries are meaningless).
        """
        for name, ids in (("sources", sources), ("relations", relations)):
            _check_int_tensor(ids, "answer_mask", name)
            if ids.dim() != 1:
                raise ValueError(f"answer_mask: {name} must have shape [Q], got {tuple(ids.shape)}")
            if ids.device != self.device:
                raise ValueError(f"answer_mask: {name} are on {ids.device} but the index is on {self.device}")
        if sources.shape != relations.shape:
            raise ValueError(
                f"answer_mask: sources and relations must have the same length, got {len(sources)} and {len(relations)}"
            )
        if check_values and sources.numel():
            lo_s, hi_s, lo_r, hi_r = torch.stack(
                [sources.min().long(), sources.max().long(), relations.min().long(), relations.max().long()]
            ).tolist()
            if lo_s < 0 or hi_s >= self.num_nodes:
                raise ValueError(
                    f"answer_mask: sources must be node ids in [0, {self.num_nodes}), found [{lo_s}, {hi_s}]"
                )
            if lo_r < 0 or hi_r >= self.num_relations:
                raise ValueError(
                    f"answer_mask: relations must be ids in [0, {self.num_relations}), found [{lo_r}, {hi_r}]"
                )
        query = sources.long() * self.num_relations + relations.long()
        mask = torch.zeros(query.numel(), self.num_nodes, dtype=torch.bool, device=query.device)
        if self.keys.numel() == 0:
            return mask
        pos = torch.searchsorted(self.keys, query).clamp(max=self.keys.numel() - 1)
        found = self.keys[pos] == query
        lo = torch.where(found, self.unique_ptr[pos], 0)
        counts = torch.where(found, self.unique_ptr[pos + 1] - lo, 0)
        row, position = expand_ranges(lo, counts)
        mask[row, self.unique_values[position].long()] = True
        return mask


def triple_index(graph: RelGraph) -> TripleIndex:
    """The graph's TripleIndex, built on first use and cached on the graph."""
    index = getattr(graph, "_triple_index", None)
    if index is None:
        index = TripleIndex.of(graph)
        graph._triple_index = index
    return index


def _check_int_tensor(t, name: str, arg: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{name}: {arg} must be an integer tensor, got {got}")


def _check_range(t: torch.Tensor, bound: int, name: str, arg: str, what: str) -> None:
    """Values of `t` in [0, bound) (one host read)."""
    if t.numel():
        lo, hi = torch.stack([t.min().long(), t.max().long()]).tolist()
        if lo < 0 or hi >= bound:
            raise ValueError(f"{name}: {arg} must hold {what} in [0, {bound}), found [{lo}, {hi}]")


def _check_triples(graph, triples, name, *, dims, shape_text, check_values) -> torch.Tensor:
    if not isinstance(graph, RelGraph):
        raise TypeError(f"{name}: graph must be a RelGraph, got {type(graph).__name__}")
    if not isinstance(triples, torch.Tensor) or triples.dtype.is_floating_point or triples.dtype == torch.bool:
        raise TypeError(f"{name}: triples must be an integer tensor")
    if triples.dim() not in dims or triples.size(-1) != 3:
        raise ValueError(f"{name}: triples must have shape {shape_text}, got {tuple(triples.shape)}")
    if triples.device != graph.device:
        raise ValueError(f"{name}: triples are on {triples.device} but graph is on {graph.device}")
    if graph.num_relations % 2:
        raise ValueError(f"{name}: graph.num_relations = {graph.num_relations} must count direct and inverse relations")
    _library.check_device_supported(triples.device)
    if check_values and triples.numel():
        flat = triples.reshape(-1, 3)
        nodes, rels = flat[:, :2], flat[:, 2]
        # One host read for all four bounds (a device sync on CUDA; skip with check_values=False).
        lo_n, hi_n, lo_r, hi_r = torch.stack([nodes.min(), nodes.max(), rels.min(), rels.max()]).tolist()
        if lo_n < 0 or hi_n >= graph.num_nodes:
            raise ValueError(f"{name}: entity ids must be in [0, {graph.num_nodes}), found [{lo_n}, {hi_n}]")
        if lo_r < 0 or hi_r >= graph.num_relations // 2:
            raise ValueError(
                f"{name}: relations must be direct ids in [0, {graph.num_relations // 2}), found [{lo_r}, {hi_r}]"
            )
    return triples.long().contiguous()


def negative_sampling(
    graph: RelGraph,
    triples: torch.Tensor,  # [B, 3] rows (h, t, r), r a direct relation
    num_negative: int,
    strict: bool = True,
    generator: Optional[torch.Generator] = None,
    check_values: bool = True,
    seed: Optional[torch.Tensor] = None,  # [] or [1] int64 on the triples' device
) -> torch.Tensor:  # [B, 1 + K, 3]
    """Corrupts each triple K times, as GFM-RAG/ULTRA's pre-training batches.

    Row 0 of each triple is the positive. The first ``B // 2`` triples get corrupted tails
    ``(h, t', r)``, the others corrupted heads ``(h', t, r)``. With ``strict`` each negative is
    drawn exactly uniformly among the entities that are not a true answer of the query — for
    tails: no edge (h, r, t'), for heads: no inverse edge (t, r + R, h') — and never the
    positive; otherwise uniformly among all entities. When a query has no allowed entity (every
    entity is a true answer), its negatives repeat the positive.

    Randomness: negative k of triple b is a function of (seed, b * K + k) only, so one seed gives
    the same samples on every device. The seed is a one-element int64 tensor on the triples'
    device: ``seed`` when given, else drawn on that device from ``generator`` (a generator of the
    triples' device; default: that device's default generator, so ``torch.manual_seed`` makes
    samples reproducible — CPU and CUDA default generators draw different seeds). Drawing it is
    a device op and the kernels read it on the device: no host synchronisation, so the call can
    be captured in a CUDA graph and traced by ``torch.compile(fullgraph=True)`` (pass
    ``check_values=False``: the range check of the triples reads them on the host; torch.compile
    cannot trace an explicit ``generator``, use the default one or ``seed`` there). No [B, N]
    tensor, no ``nonzero``.
    """
    # bool is an int to Python: True would silently mean one negative.
    if isinstance(num_negative, bool) or not isinstance(num_negative, numbers.Integral):
        raise TypeError(
            f"negative_sampling: num_negative must be an int, got {type(num_negative).__name__} {num_negative!r}"
        )
    num_negative = int(num_negative)
    if num_negative <= 0:
        raise ValueError(f"negative_sampling: num_negative must be a positive int, got {num_negative}")
    triples = _check_triples(graph, triples, "negative_sampling", dims=(2,), shape_text="[B, 3]",
                             check_values=check_values)
    if triples.size(0) == 0:
        raise ValueError("negative_sampling: triples is empty (B = 0)")
    if seed is None:
        seed = _draw_seed(generator, triples.device)
    elif generator is not None:
        raise ValueError("negative_sampling: pass a generator or a seed tensor, not both")
    elif not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 1:
        got = f"{seed.dtype} {tuple(seed.shape)}" if isinstance(seed, torch.Tensor) else type(seed).__name__
        raise TypeError(f"negative_sampling: seed must be a one-element int64 tensor, got {got}")
    elif seed.device != triples.device:
        raise ValueError(f"negative_sampling: seed is on {seed.device} but triples are on {triples.device}")
    index = triple_index(graph)
    return _ops.negative_sampling(
        triples, index.arrays, graph.num_nodes, graph.num_relations, num_negative, bool(strict), seed
    )


def _draw_seed(generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:  # [] int64
    """A random int64 drawn on `device` from `generator` (default: the device's default one)."""
    if generator is not None and not _same_device(generator.device, device):
        raise ValueError(
            f"negative_sampling: generator is on {generator.device} but triples are on {device}: pass a generator "
            f"of the triples' device (the seed is drawn there, without a host synchronisation)"
        )
    return torch.randint(-(2**63), 2**63 - 1, (), generator=generator, dtype=torch.int64, device=device)


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device()
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


def easy_edge_mask(
    graph: RelGraph,
    batch: torch.Tensor,  # [B, 3] or [B, 1 + K, 3] rows (h, t, r)
    check_values: bool = True,
) -> torch.Tensor:  # [E] bool
    """The edges a pre-training step must not see: True for every edge (h, t, r) of the batch
    and every inverse edge (t, h, r + R), parallel copies included. Pass it as ``edge_mask`` to
    :func:`rel_aggregate`. Computed by lookup in the graph's TripleIndex: no graph copy, no sort."""
    batch = _check_triples(graph, batch, "easy_edge_mask", dims=(2, 3), shape_text="[B, 3] or [B, 1 + K, 3]",
                           check_values=check_values)
    index = triple_index(graph)
    return _ops.easy_edge_mask(batch.reshape(-1, 3), index.arrays, graph.num_edges, graph.num_relations)


@torch.library.register_fake("gfmrag_fast::negative_sampling")
def _negative_sampling_fake(triples, index, num_nodes, num_relations, num_negative, strict, seed):
    torch._check(seed.dtype == torch.int64 and seed.numel() == 1,
                 lambda: f"negative_sampling: seed must be a one-element int64 tensor, got {seed.dtype} {seed.shape}")
    torch._check(seed.device == triples.device,
                 lambda: f"negative_sampling: seed is on {seed.device} but triples are on {triples.device}")
    return triples.new_empty((triples.shape[0], num_negative + 1, 3))


@torch.library.register_fake("gfmrag_fast::easy_edge_mask")
def _easy_edge_mask_fake(triples, index, num_edges, num_relations):
    return triples.new_empty((num_edges,), dtype=torch.bool)
