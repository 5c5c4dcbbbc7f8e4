"""RelGraph: a relational graph prepared once for the aggregation kernels."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

_INT32_MAX = 2**31 - 1

# Longest edge list one thread group walks (see RelGraph). 128 keeps the shared relation table's
# gradient, whose groups also loop over the batch, at 1,024 edge visits per group for B = 8.
DEFAULT_CHUNK_SIZE = 128


def offsets(counts: torch.Tensor) -> torch.Tensor:  # [n] -> [n + 1] int64
    """Start of each run when runs of `counts` lengths are laid end to end, then the total."""
    ptr = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
    ptr[1:] = torch.cumsum(counts, 0)
    return ptr


def expand_ranges(starts: torch.Tensor, counts: torch.Tensor):
    """(row [M], position [M]) for every position in the ranges [starts[i], starts[i] + counts[i]):
    row i repeated counts[i] times, beside starts[i], starts[i] + 1, ... (M = counts.sum())."""
    rows = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    within = torch.arange(rows.numel(), device=counts.device) - offsets(counts)[:-1][rows]
    return rows, starts[rows] + within


def _row_pointer(keys: torch.Tensor, num_rows: int) -> torch.Tensor:
    """[num_rows + 1] int32 offsets of each key's run in `keys` sorted."""
    return offsets(torch.bincount(keys, minlength=num_rows)).to(torch.int32)


def _pieces(ptr: torch.Tensor, chunk_size: int) -> List[torch.Tensor]:
    """The pieces of the rows of an edge list (row i: edges ptr[i] .. ptr[i + 1]) longer than
    `chunk_size`: a row of L edges becomes n = ceil(L / chunk_size) pieces of nearly equal length,
    piece j spanning ptr[i] + L * j // n .. ptr[i] + L * (j + 1) // n.

    Returns int32 (piece_ptr [rows + 1]: the pieces of row i are piece_ptr[i] .. piece_ptr[i + 1],
    none for a row walked whole; piece_begin [S], piece_end [S]: each piece's edge positions).
    """
    length = ptr[1:] - ptr[:-1]
    count = torch.where(length > chunk_size, (length + chunk_size - 1) // chunk_size, 0)
    row, piece = expand_ranges(torch.zeros_like(count), count)
    n, size, start = count[row], length[row], ptr[row]
    begin = start + torch.div(size * piece, n, rounding_mode="floor")
    end = start + torch.div(size * (piece + 1), n, rounding_mode="floor")
    return [offsets(count).to(torch.int32), begin.to(torch.int32), end.to(torch.int32)]


class RelGraph:
    """A directed multigraph with typed edges, validated and prepared once for `rel_aggregate`.

    Edge ``e`` goes from ``edge_index[1, e]`` (its source, where messages are gathered) to
    ``edge_index[0, e]`` (its destination, where they are summed), with relation
    ``edge_type[e]``; this is GFM-RAG's convention. Parallel edges and self-loops are allowed.

    Preparation builds, in int32: the CSR by destination (forward), the CSC by source (input
    gradient), edges grouped by relation (relation gradient), and the in-degrees. Nothing is
    re-sorted afterwards; ``to(device)`` copies the arrays once and caches the copy.

    It also plans the kernels' work (the same plan on every device): each of the three edge lists
    is walked by one thread group per row (node or relation), except rows longer than
    ``chunk_size`` edges (hub nodes, the synonym relation of a GFM-RAG index), which are cut into
    pieces of at most ``chunk_size`` edges. A piece writes a partial result and the row's group
    combines its pieces' partials in piece order, so no group walks more than ``chunk_size``
    edges (times the batch, where it loops over it) and results do not depend on scheduling.

    The graph owns its tensors: ``edge_index`` and ``edge_type`` are copied, so later changes to
    the caller's tensors do not reach it. The ops check the prepared arrays' values the first time
    they see them and remember that they passed (``csrc/array_checks.h``); written in place, the
    arrays are checked again.

    Args:
        edge_index: [2, E] integer tensor, rows (destination, source).
        edge_type: [E] integer tensor of relation ids.
        num_nodes: N; every index must be in [0, N).
        num_relations: number of relation types, inverses included (2R in GFM-RAG);
            default ``max(edge_type) + 1``.
        chunk_size: longest edge list one thread group walks (default DEFAULT_CHUNK_SIZE). It
            changes the order in which long rows are summed, so results match bit for bit only
            between graphs with the same chunk size.
    """

    FIELDS = (
        "dst_ptr", "dst_src", "dst_type", "dst_eid",
        "src_ptr", "src_dst", "src_type", "src_eid",
        "rel_ptr", "rel_eid", "rel_src", "rel_dst",
        "edge_src", "edge_dst", "edge_type32",
        "dst_piece_ptr", "dst_piece_begin", "dst_piece_end",
        "src_piece_ptr", "src_piece_begin", "src_piece_end",
        "rel_piece_ptr", "rel_piece_begin", "rel_piece_end",
    )  # order of the C++ GraphField enum

    def __init__(
        self,
        edge_index: torch.Tensor,  # [2, E]
        edge_type: torch.Tensor,  # [E]
        num_nodes: int,
        num_relations: Optional[int] = None,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ):
        if not isinstance(edge_index, torch.Tensor) or edge_index.dim() != 2 or edge_index.size(0) != 2:
            raise ValueError(f"RelGraph: edge_index must be a tensor of shape [2, E], got {_shape(edge_index)}")
        if edge_index.dtype.is_floating_point or edge_index.dtype == torch.bool or edge_index.is_complex():
            raise TypeError(f"RelGraph: edge_index must hold integers, got {edge_index.dtype}")
        num_edges = edge_index.size(1)
        if not isinstance(edge_type, torch.Tensor) or edge_type.shape != (num_edges,):
            raise ValueError(f"RelGraph: edge_type must have shape [E] = [{num_edges}], got {_shape(edge_type)}")
        if edge_type.dtype.is_floating_point or edge_type.dtype == torch.bool or edge_type.is_complex():
            raise TypeError(f"RelGraph: edge_type must hold integers, got {edge_type.dtype}")
        if edge_type.device != edge_index.device:
            raise ValueError(
                f"RelGraph: edge_type is on {edge_type.device} but edge_index is on {edge_index.device}"
            )
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or not 1 <= chunk_size <= _INT32_MAX:
            raise ValueError(f"RelGraph: chunk_size must be a positive int, got {chunk_size!r}")
        num_nodes = int(num_nodes)
        if num_nodes < 0 or num_nodes > _INT32_MAX or num_edges > _INT32_MAX:
            raise ValueError(f"RelGraph: num_nodes ({num_nodes}) and E ({num_edges}) must be in [0, 2**31)")
        # Copies, never views of the caller's tensors (`.long()` of an int64 tensor is the tensor
        # itself): the prepared arrays must describe the same graph as edge_index for good.
        # Normal tensors even under inference mode: the ops can only remember that normal tensors
        # passed their value check (inference tensors have no version counter).
        with torch.inference_mode(False):
            edge_index = edge_index.to(torch.long, memory_format=torch.contiguous_format, copy=True)
            edge_type = edge_type.to(torch.long, memory_format=torch.contiguous_format, copy=True)
        if num_edges > 0:
            lo, hi = int(edge_index.min()), int(edge_index.max())
            if lo < 0 or hi >= num_nodes:
                raise ValueError(
                    f"RelGraph: edge_index values must be in [0, num_nodes = {num_nodes}), found [{lo}, {hi}]"
                )
            type_lo, type_hi = int(edge_type.min()), int(edge_type.max())
            if type_lo < 0:
                raise ValueError(f"RelGraph: edge_type values must be >= 0, found {type_lo}")
        else:
            type_hi = -1
        if num_relations is None:
            num_relations = type_hi + 1
        num_relations = int(num_relations)
        if num_relations <= type_hi or num_relations > _INT32_MAX:
            raise ValueError(
                f"RelGraph: num_relations = {num_relations} but edge_type holds relation {type_hi}"
            )

        self.num_nodes = num_nodes
        self.num_edges = num_edges
        self.num_relations = num_relations
        self.chunk_size = chunk_size
        self.edge_index = edge_index  # [2, E] int64, a copy of the argument
        self.edge_type = edge_type  # [E] int64, a copy of the argument
        with torch.inference_mode(False):
            self._arrays = self._prepare(edge_index, edge_type)
        self._copies: Dict[torch.device, "RelGraph"] = {}

    def _prepare(self, edge_index: torch.Tensor, edge_type: torch.Tensor) -> List[torch.Tensor]:
        dst, src = edge_index[0], edge_index[1]
        i32 = torch.int32
        by_dst = torch.argsort(dst, stable=True)
        by_src = torch.argsort(src, stable=True)
        by_rel = torch.argsort(edge_type, stable=True)
        dst_ptr = _row_pointer(dst, self.num_nodes)
        src_ptr = _row_pointer(src, self.num_nodes)
        rel_ptr = _row_pointer(edge_type, self.num_relations)
        arrays = [
            dst_ptr, src[by_dst].to(i32), edge_type[by_dst].to(i32), by_dst.to(i32),
            src_ptr, dst[by_src].to(i32), edge_type[by_src].to(i32), by_src.to(i32),
            rel_ptr, by_rel.to(i32), src[by_rel].to(i32), dst[by_rel].to(i32),
            src.to(i32), dst.to(i32), edge_type.to(i32),
        ]
        for ptr in (dst_ptr, src_ptr, rel_ptr):
            arrays += _pieces(ptr.long(), self.chunk_size)
        return [a.contiguous() for a in arrays]

    @property
    def arrays(self) -> List[torch.Tensor]:
        """The prepared int32 arrays, in the order the kernels expect (FIELDS)."""
        return self._arrays

    @property
    def device(self) -> torch.device:
        return self.edge_index.device

    @property
    def in_degree(self) -> torch.Tensor:
        """[N] int32 number of edges into each node (masks not applied)."""
        ptr = self._arrays[0]
        return ptr[1:] - ptr[:-1]

    def to(self, device) -> "RelGraph":
        """This graph on `device`; the copy is made once and cached."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device == self.device:
            return self
        if device not in self._copies:
            copy = RelGraph.__new__(RelGraph)
            copy.num_nodes, copy.num_edges, copy.num_relations = self.num_nodes, self.num_edges, self.num_relations
            copy.chunk_size = self.chunk_size
            with torch.inference_mode(False):
                copy.edge_index = self.edge_index.to(device)
                copy.edge_type = self.edge_type.to(device)
                copy._arrays = [a.to(device) for a in self._arrays]
            copy._copies = {self.device: self}
            self._copies[device] = copy
        return self._copies[device]

    def __repr__(self) -> str:
        return (
            f"RelGraph(num_nodes={self.num_nodes}, num_edges={self.num_edges}, "
            f"num_relations={self.num_relations}, chunk_size={self.chunk_size}, device={self.device})"
        )


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__
