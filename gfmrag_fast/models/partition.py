"""Graph-partitioned message passing: the KG's nodes split over the ranks of a job.

For one KG whose [B, N, d] activations do not fit one device. Every rank sees the same batch of
queries and owns a set of nodes: their states for every query, and the edges into them (edges
whose destination ``edge_index[0]`` it owns: messages are summed into ``edge_index[0]``). A layer
needs, besides its own nodes' states, the states of the *halo*: the sources of its edges that
other ranks own. Each layer exchanges exactly those rows with one ``all_to_all``; its backward is
the reverse exchange, the gradients of a node sent to several ranks summed on its owner.

This is the only part of the model that talks to ``torch.distributed``. The layers reach it
through :class:`~gfmrag_fast.models.aggregation.PreparedGraph` (``source_states``, ``owned``,
``mean_over_nodes``), the entity models through :func:`partition_of` of the graph they are given,
and the tasks through :func:`partition_graph`. A graph without a partition never gets here.

Layout on rank r, with P ranks and ``part[v]`` the owner of node v:

* owned nodes, in increasing global id: local ids ``0 .. n_r - 1``;
* halo nodes, grouped by owner rank then by global id: local ids ``n_r .. n_r + h_r - 1``;
* the local :class:`RelGraph` holds the edges into owned nodes (global edge order kept), over
  ``n_r + h_r`` nodes, so ``rel_aggregate`` runs on it unchanged.

Scores: the rank's scores of its own nodes are combined into the full [B, N] (or [B, M]
candidates) by a sum over ranks, whose backward hands each rank the gradient unchanged. That is
right because what follows (loss, metrics) is computed identically on every rank: each rank then
back-propagates the same loss through its own nodes, and the parameter gradient of the loss is
the **sum** over ranks of their gradients (:func:`gfmrag_fast.training.distributed.sum_gradients`),
never their mean.
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import torch
import torch.distributed as dist

from ..data.ordering import undirected_csr
from ..ops import RelGraph
from .aggregation import PreparedGraph
from .graph_input import num_relations_of

PARTITION_METHODS = ("none", "contiguous", "metis")

log = logging.getLogger(__name__)


# --- which rank owns which node -----------------------------------------------------------
def partition_nodes(
    edge_index: torch.Tensor,  # [2, E] rows (destination, source)
    num_nodes: int,
    num_parts: int,
    method: str = "contiguous",
    seed: int = 0,
) -> torch.Tensor:  # [N] int64 owner rank of each node
    """Splits ``num_nodes`` nodes into ``num_parts`` non-empty parts.

    * ``contiguous``: node ids in equal ranges (sizes differ by at most one).
    * ``metis``: METIS k-way (``pymetis``) on the undirected simple graph, minimising the total
      communication volume (the halo rows every layer exchanges), with parts balanced in nodes
      to 1 %; seeded, so the same graph gives the same parts.
    """
    if method not in PARTITION_METHODS[1:]:
        raise ValueError(f"graph partition method must be one of {PARTITION_METHODS[1:]}, got {method!r}")
    num_nodes, num_parts = int(num_nodes), int(num_parts)
    if num_parts < 1 or num_nodes < num_parts:
        raise ValueError(f"cannot split a graph of {num_nodes} nodes into {num_parts} non-empty parts")
    if num_parts == 1:
        return torch.zeros(num_nodes, dtype=torch.long)
    if method == "contiguous":
        return torch.arange(num_nodes, dtype=torch.long) * num_parts // num_nodes
    part = _metis_parts(edge_index.cpu().long(), num_nodes, num_parts, seed)
    sizes = torch.bincount(part, minlength=num_parts)
    if (sizes == 0).any():
        raise ValueError(f"METIS left a part empty (nodes per part {sizes.tolist()}); use graph_partition=contiguous")
    return part


def _metis_parts(edge_index: torch.Tensor, num_nodes: int, num_parts: int, seed: int) -> torch.Tensor:
    try:
        import pymetis
    except ImportError as exc:
        raise ImportError(
            "graph_partition=metis needs the pymetis package: pip install 'gfmrag_fast[partition]' "
            "(or pip install pymetis), or use graph_partition=contiguous"
        ) from exc
    # METIS wants an undirected simple graph: both directions, no self-loops, no parallel edges.
    starts, cols = undirected_csr(edge_index, num_nodes)
    options = pymetis.Options(objtype=int(pymetis.ObjType.VOL), seed=int(seed), ufactor=10)
    # The volume objective is a k-way one (recursive bisection only minimises the cut).
    _, part = pymetis.part_graph(
        num_parts, pymetis.CSRAdjacency(starts.numpy(), cols.numpy()), options=options, recursive=False
    )
    return torch.as_tensor(part, dtype=torch.long)


def partition_stats(edge_index: torch.Tensor, part: torch.Tensor, num_parts: int) -> Dict[str, List[int]]:
    """Per rank: owned nodes, edges into them, halo nodes (rows received per layer and query) and
    rows sent per layer and query."""
    dst, src = edge_index[0].cpu(), edge_index[1].cpu()
    part = part.cpu()
    num_nodes = part.numel()
    cross = part[dst] != part[src]
    pairs = torch.unique(part[dst[cross]] * num_nodes + src[cross])  # (receiver, node) once each
    return {
        "nodes": torch.bincount(part, minlength=num_parts).tolist(),
        "edges": torch.bincount(part[dst], minlength=num_parts).tolist(),
        "halo": torch.bincount(pairs // num_nodes, minlength=num_parts).tolist(),
        "sent": torch.bincount(part[pairs % num_nodes], minlength=num_parts).tolist(),
    }


# --- one rank's share of the graph ----------------------------------------------------------
@dataclass
class PartitionPlan:
    """What rank ``rank`` holds of a graph partitioned by ``part`` (module docstring's layout)."""

    rank: int
    num_parts: int
    num_nodes: int  # N, the whole graph's
    num_edges: int  # E, the whole graph's
    owned: torch.Tensor  # [n] global ids of the owned nodes, increasing
    local_of: torch.Tensor  # [N] local id of each owned node, -1 elsewhere
    edge_ids: torch.Tensor  # [E_r] global ids of the edges into owned nodes, increasing
    graph: RelGraph  # the E_r edges over n + h local nodes
    halo_ids: torch.Tensor  # [h] global ids of the halo nodes (local ids n ..), by owner then id
    recv_counts: List[int]  # [P] halo rows received from each rank
    send_index: torch.Tensor  # [S] local ids of the owned rows sent, by receiving rank then id
    send_counts: List[int]  # [P] rows sent to each rank

    @property
    def num_owned(self) -> int:
        return int(self.owned.numel())

    @property
    def num_halo(self) -> int:
        return int(self.halo_ids.numel())

    def to(self, device: torch.device) -> "PartitionPlan":
        moved = copy.copy(self)
        for name in ("owned", "local_of", "edge_ids", "halo_ids", "send_index"):
            setattr(moved, name, getattr(self, name).to(device))
        moved.graph = self.graph.to(device)
        return moved


def plan_partition(
    edge_index: torch.Tensor,  # [2, E] rows (destination, source)
    edge_type: torch.Tensor,  # [E]
    num_nodes: int,
    num_relations: int,
    part: torch.Tensor,  # [N] owner rank of each node
    rank: int,
    num_parts: int,
) -> PartitionPlan:
    """Rank ``rank``'s owned nodes, local graph, halo and send lists (no communication: every rank
    derives the same lists from the whole graph, so sends and receives agree)."""
    edge_index, edge_type, part = edge_index.cpu().long(), edge_type.cpu().long(), part.cpu().long()
    dst, src = edge_index[0], edge_index[1]
    owned = (part == rank).nonzero().flatten()
    num_owned = owned.numel()
    local_of = torch.full((num_nodes,), -1, dtype=torch.long)
    local_of[owned] = torch.arange(num_owned)

    edge_ids = (part[dst] == rank).nonzero().flatten()
    edge_src = src[edge_ids]
    remote = edge_src[part[edge_src] != rank]
    halo_key = torch.unique(part[remote] * num_nodes + remote)  # sorted by (owner, id)
    halo_ids = halo_key % num_nodes
    recv_counts = torch.bincount(halo_key // num_nodes, minlength=num_parts).tolist()
    extended = local_of.clone()
    extended[halo_ids] = num_owned + torch.arange(halo_ids.numel())
    local_edges = torch.stack([local_of[dst[edge_ids]], extended[edge_src]])
    graph = RelGraph(local_edges, edge_type[edge_ids], num_owned + halo_ids.numel(), num_relations)

    # What every other rank q needs from this one: owned sources of edges into q's nodes, in the
    # order q lays out its halo (by owner, then id; the owner being this rank, by id).
    outgoing = (part[src] == rank) & (part[dst] != rank)
    send_key = torch.unique(part[dst[outgoing]] * num_nodes + src[outgoing])
    send_index = local_of[send_key % num_nodes]
    send_counts = torch.bincount(send_key // num_nodes, minlength=num_parts).tolist()
    return PartitionPlan(rank, num_parts, num_nodes, edge_index.shape[1], owned, local_of, edge_ids, graph,
                         halo_ids, recv_counts, send_index, send_counts)


# --- collectives with autograd ----------------------------------------------------------------
def _all_to_all(values: torch.Tensor, send_counts: List[int], recv_counts: List[int], group) -> torch.Tensor:
    """values [B, S, d] (rows in receiver order) -> [B, sum(recv_counts), d] (rows in sender order)."""
    batch, _, dim = values.shape
    send = values.transpose(0, 1).contiguous()  # rows first: all_to_all splits dim 0
    recv = send.new_empty((sum(recv_counts), batch, dim))
    dist.all_to_all_single(recv, send, recv_counts, send_counts, group=group)
    return recv.transpose(0, 1)


class _HaloExchange(torch.autograd.Function):
    """Owned states [B, n, d] -> halo states [B, h, d]; backward: the reverse exchange."""

    @staticmethod
    def forward(ctx, x, plan: PartitionPlan, group):
        ctx.plan, ctx.group, ctx.num_owned = plan, group, x.shape[1]
        return _all_to_all(x.index_select(1, plan.send_index), plan.send_counts, plan.recv_counts, group)

    @staticmethod
    def backward(ctx, grad_halo):
        plan = ctx.plan
        sent = _all_to_all(grad_halo, plan.recv_counts, plan.send_counts, ctx.group)  # [B, S, d]
        grad = sent.new_zeros((sent.shape[0], ctx.num_owned, sent.shape[2]))
        # One index_add per receiving rank: ids are distinct within one, so the sum is deterministic.
        start = 0
        for count in plan.send_counts:
            if count:
                grad.index_add_(1, plan.send_index[start:start + count], sent[:, start:start + count])
            start += count
        return grad, None, None


class _SumOverRanks(torch.autograd.Function):
    """Sum over ranks; backward passes the gradient through, because every rank computes the same
    function of the sum (the loss), so each rank's gradient already is the sum's."""

    @staticmethod
    def forward(ctx, x, group):
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


# --- the partition a model sees ------------------------------------------------------------------
class GraphPartition:
    """One rank's share of a partitioned graph and its collectives (attached to the graph as
    ``graph.partition`` by :func:`partition_graph`). ``parts`` [N] (host) is the owner rank of
    every node, the same on every rank: handing it to :func:`partition_graph` again rebuilds this
    partition without partitioning or communicating."""

    def __init__(self, plan: PartitionPlan, method: str, stats: Dict[str, List[int]], group=None,
                 parts: Optional[torch.Tensor] = None):
        self.plan, self.method, self.stats, self.group, self.parts = plan, method, stats, group, parts
        # Copies on other devices, sharing one dict (never this object itself: no reference cycle,
        # so a partition is freed as soon as its graph is).
        self._copies: Dict[torch.device, GraphPartition] = {}

    @property
    def num_nodes(self) -> int:
        return self.plan.num_nodes

    @property
    def num_owned(self) -> int:
        return self.plan.num_owned

    @property
    def owned(self) -> torch.Tensor:  # [n]
        return self.plan.owned

    def to(self, device) -> "GraphPartition":
        """This partition with its index tensors and local graph on ``device`` (copied once)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device == self.plan.owned.device:
            return self
        if device not in self._copies:
            moved = GraphPartition(self.plan.to(device), self.method, self.stats, self.group, self.parts)
            self._copies[device] = moved
        return self._copies[device]

    def prepare(
        self,
        edge_weight: Optional[torch.Tensor] = None,  # [E] of the whole graph
        edge_mask: Optional[torch.Tensor] = None,  # [E] bool of the whole graph
    ) -> PreparedGraph:
        """The local graph for one forward pass, with the whole graph's edge weight / mask cut to
        the local edges."""
        num_edges, edge_ids = self.plan.num_edges, self.plan.edge_ids
        for name, value in (("edge_weight", edge_weight), ("edge_mask", edge_mask)):
            if value is not None and value.shape != (num_edges,):
                raise ValueError(f"{name} must have shape [E] = [{num_edges}] (the whole graph's), "
                                 f"got {tuple(value.shape)}")
        local_weight = None if edge_weight is None else edge_weight[edge_ids.to(edge_weight.device)]
        local_mask = None if edge_mask is None else edge_mask[edge_ids.to(edge_mask.device)]
        return PreparedGraph(self.plan.graph, local_weight, local_mask, halo=self)

    # The interface of PreparedGraph's halo ------------------------------------------------------
    @contextmanager
    def source_states(self, x: torch.Tensor) -> Iterator[torch.Tensor]:  # [B, n, d] -> [B, n + h, d]
        """The owned states followed by the halo's, fetched from their owners.

        While the context is open, an op that saves the joined tensor for its backward stores the
        owned part and the halo instead (the owned part is the layer's input, stored anyway), so
        the join is not kept twice per layer; unless saved tensors already go to other hooks
        (activation checkpointing, which stores nothing of the layer)."""
        if x.shape[1] != self.num_owned:
            raise ValueError(f"partitioned graph: expected the {self.num_owned} owned nodes' states, "
                             f"got {x.shape[1]} rows")
        halo = _HaloExchange.apply(x, self.plan, self.group)
        source = torch.cat([x, halo], dim=1)
        if not torch.is_grad_enabled() or _has_saved_tensor_hooks():
            yield source
            return
        key = (source.data_ptr(), source.shape, source.dtype)

        def pack(t):
            return (x, halo) if (t.data_ptr(), t.shape, t.dtype) == key else t

        def unpack(saved):
            return torch.cat(saved, dim=1) if isinstance(saved, tuple) else saved

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield source

    def owned_part(self, t: torch.Tensor) -> torch.Tensor:  # [B, n + h, ...] -> [B, n, ...]
        return t[:, : self.num_owned]

    def mean_over_nodes(self, values: torch.Tensor) -> torch.Tensor:  # [n] -> scalar, no gradient
        """The mean over all N nodes of a per-node quantity of which each rank holds its share."""
        total = values.detach().sum().reshape(1).to(torch.float64)
        dist.all_reduce(total, group=self.group)
        return (total / self.num_nodes).to(values.dtype).squeeze(0)

    # Inputs and scores of the entity models ---------------------------------------------------
    def owned_rows(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The owned nodes' rows of a tensor over all N nodes (returned as is when it already has
        only the owned rows)."""
        size = t.shape[dim]
        if size == self.num_owned:
            return t
        if size == self.num_nodes:
            return t.index_select(dim, self.owned.to(t.device))
        raise ValueError(f"partitioned graph: expected {self.num_nodes} (all) or {self.num_owned} (owned) "
                         f"nodes along dim {dim}, got {size}")

    def local_ids(self, node_ids: torch.Tensor):
        """(local id [...], owned [...] bool) of global node ids; the local id is 0 where not owned."""
        local = self.plan.local_of.to(node_ids.device)[node_ids]
        owned = local >= 0
        return local.clamp(min=0), owned

    def gather_scores(self, scores: torch.Tensor) -> torch.Tensor:  # [B, n] -> [B, N]
        """Every rank's owned scores in one [B, N] tensor, the same on every rank."""
        full = scores.new_zeros((scores.shape[0], self.num_nodes)).index_copy(1, self.owned, scores)
        return _SumOverRanks.apply(full, self.group)

    def sum_over_ranks(self, scores: torch.Tensor) -> torch.Tensor:
        """Sum of the ranks' tensors (each rank's zero where it owns nothing), the same on every rank."""
        return _SumOverRanks.apply(scores, self.group)

    def bytes_per_layer(self, batch_size: int, dim: int, dtype: torch.dtype = torch.float32) -> int:
        """Bytes this rank sends per layer of a forward pass (the backward sends as many back)."""
        return sum(self.plan.send_counts) * batch_size * dim * torch.empty((), dtype=dtype).element_size()

    def __repr__(self) -> str:
        p = self.plan
        return (f"GraphPartition({self.method}, rank {p.rank}/{p.num_parts}: {p.num_owned} of {p.num_nodes} nodes, "
                f"{p.edge_ids.numel()} of {p.num_edges} edges, halo {p.num_halo}, sends {sum(p.send_counts)})")


def _has_saved_tensor_hooks() -> bool:
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(True) is not None


def partition_of(graph) -> Optional[GraphPartition]:
    """The partition attached to a graph by :func:`partition_graph`, or None."""
    return getattr(graph, "partition", None)


def partition_graph(graph, method: str, group=None, seed: int = 0, parts: Optional[torch.Tensor] = None):
    """A shallow copy of the GFM-RAG graph ``graph`` with ``graph.partition``: this rank's share
    of it, when ``method`` is ``contiguous`` or ``metis`` and the job has several ranks; ``graph``
    itself otherwise.

    Collective: every rank of ``group`` calls it with the same graph. Rank 0 partitions and sends
    the parts to the others (METIS runs once). With ``parts`` (the ``partition.parts`` of an
    earlier call for the same graph and ranks, given on every rank) nothing is partitioned or
    sent: each rank only rebuilds its share.
    """
    method = "none" if method is None else str(method)
    if method not in PARTITION_METHODS:
        raise ValueError(f"train.graph_partition must be one of {PARTITION_METHODS}, got {method!r}")
    if method == "none" or not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return graph
    rank, num_parts = dist.get_rank(group), dist.get_world_size(group)
    edge_index, edge_type = graph.edge_index.cpu(), graph.edge_type.cpu()
    num_nodes, num_relations = int(graph.num_nodes), num_relations_of(graph)
    if parts is not None:
        part = parts.cpu().long()
        if part.shape != (num_nodes,) or (num_nodes and (int(part.min()) < 0 or int(part.max()) >= num_parts)):
            raise ValueError(f"graph partition: parts must be [N] = [{num_nodes}] owner ranks in [0, {num_parts}), "
                             f"got shape {tuple(part.shape)}")
    else:
        header = torch.tensor([num_nodes, edge_index.shape[1]], dtype=torch.long)
        part = partition_nodes(edge_index, num_nodes, num_parts, method, seed) if rank == 0 else None
        part = _broadcast_parts(part, header, group)
    plan = plan_partition(edge_index, edge_type, num_nodes, num_relations, part, rank, num_parts)
    stats = partition_stats(edge_index, part, num_parts)
    log.info("graph partition (%s) of %d nodes, %d edges over %d ranks: nodes %s, edges %s, halo nodes %s%s",
             method, num_nodes, edge_index.shape[1], num_parts, stats["nodes"], stats["edges"], stats["halo"],
             " (owners reused)" if parts is not None else "")
    partitioned = copy.copy(graph)
    # The owners kept compactly (int16 while the ranks fit): a task may keep them for many graphs.
    compact = part.to(torch.int16 if num_parts <= torch.iinfo(torch.int16).max else torch.int32)
    partitioned.partition = GraphPartition(plan, method, stats, group, compact)
    return partitioned


def _broadcast_parts(part: Optional[torch.Tensor], header: torch.Tensor, group) -> torch.Tensor:
    """Rank 0's parts on every rank, after checking that every rank holds a graph of the same size."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    src = 0 if group is None else dist.get_global_rank(group, 0)
    first = header.clone().to(device)
    dist.broadcast(first, src=src, group=group)
    if not torch.equal(first.cpu(), header):
        raise ValueError(f"graph partition: this rank's graph has (nodes, edges) = {header.tolist()}, rank 0's "
                         f"{first.cpu().tolist()}: every rank must load the same graph")
    buffer = (part if part is not None else torch.empty(int(header[0]), dtype=torch.long)).to(device)
    dist.broadcast(buffer, src=src, group=group)
    return buffer.cpu()
