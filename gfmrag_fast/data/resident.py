"""Which datasets are in memory, and their prepared per-device state: one owner.

A run may name more datasets than fit in memory (GFM-RAG's released model was pre-trained on 60
KGs). :class:`ResidentDatasets` holds at most ``max_resident`` of them at a time — each loaded
from its stage-2 cache and prepared for the device by the task's ``prepare`` (the graph on the
device with its :class:`~gfmrag_fast.ops.RelGraph`, and what else the task needs: ``TripleIndex``,
entity weights, ``ent2doc``; see :func:`prepare_dataset`) — and frees one when its slot is needed
for another. A walk over the datasets uses it so::

    pool.plan(names)          # the order they will be needed in: loaded ahead, in the background
    state = pool.hold(name)   # in use: waits for its load (or loads it now); never freed while held
    pool.get(name)            # the state of a dataset, loading it now if it is not resident
    pool.release(name)        # no longer in use

Residency: a dataset is resident from the moment its load starts until it is evicted, and there
are never more than ``max_resident`` resident datasets, loads in progress included. A background
load (``workers`` threads) therefore only starts in a free slot, or in the slot of a released
dataset that is not planned; so the next datasets of a walk load while the last ones of the
current group are still training, and no more than ``max_resident`` are ever in memory. A released
dataset stays resident until its slot is needed: a run whose datasets all fit loads each once.
``peak_resident``, ``events`` and ``wait_s`` measure all this.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch_geometric.data import Data

from ..ops import RelGraph, TripleIndex, triple_index

__all__ = ["LazyDataset", "PreparedDataset", "ResidentDatasets", "device_guard", "prepare_dataset", "prepare_graph"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LazyDataset:
    """A dataset known by its name and a few numbers (``info``, e.g. its number of training
    questions), whose tensors are loaded by ``load()`` only while it is resident."""

    data_name: str
    load: Callable[[], Any]
    info: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class PreparedDataset:
    """One resident dataset, ready for the model on one device."""

    dataset: Any  # the loaded dataset (QADataset / KGDataset): its host tensors
    graph: Data  # on the device, carrying its prepared RelGraph (prepare_graph)
    triple_index: Optional[TripleIndex] = None  # of graph.rel_graph: negatives and easy edges
    entities_weight: Optional[torch.Tensor] = None  # [N] on the device
    ent2doc: Optional[torch.Tensor] = None  # [N, num_docs] sparse, on the device
    extras: Dict[str, Any] = field(default_factory=dict)  # what else the task prepares

    @property
    def rel_graph(self) -> RelGraph:
        return self.graph.rel_graph


def device_guard(device: torch.device):
    """Makes ``device`` the current CUDA device of this thread (a loading thread has its own)."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def prepare_graph(graph: Data, device: torch.device | str) -> Data:
    """A copy of a GFM-RAG graph on ``device`` that carries its prepared RelGraph as ``rel_graph``.

    The copy's ``edge_index`` / ``edge_type`` are the RelGraph's own tensors, which is how the
    models (:func:`gfmrag_fast.models.graph_input.rel_graph_of`) know the RelGraph describes this
    graph and use it instead of preparing the graph on every call. Assigning other edge tensors
    to the copy makes the models prepare it per call again; do not edit them in place.
    """
    device = torch.device(device)
    num_relations = getattr(graph, "num_relations", None)
    rel_graph = RelGraph(graph.edge_index.to(device), graph.edge_type.to(device), int(graph.num_nodes),
                         None if num_relations is None else int(num_relations))
    out = Data(**{key: value.to(device) if torch.is_tensor(value) else value
                  for key, value in graph.items() if key not in ("edge_index", "edge_type")})
    out.edge_index, out.edge_type, out.num_nodes = rel_graph.edge_index, rel_graph.edge_type, int(graph.num_nodes)
    out.rel_graph = rel_graph
    return out


def prepare_dataset(
    ds: Any,
    device: torch.device | str,
    *,
    with_triple_index: bool = False,
    with_entities_weight: bool = False,
    with_ent2doc: bool = False,
) -> PreparedDataset:
    """The device state of a loaded dataset: its graph (:func:`prepare_graph`) and, on request,
    the graph's TripleIndex, the entity weights (``ds.entities_weight()``) and ``ent2doc``."""
    device = torch.device(device)
    with device_guard(device):
        graph = prepare_graph(ds.graph, device)
        prepared = PreparedDataset(dataset=ds, graph=graph)
        if with_triple_index:
            prepared.triple_index = triple_index(graph.rel_graph)
        if with_entities_weight:
            prepared.entities_weight = ds.entities_weight().to(device)
        if with_ent2doc:
            prepared.ent2doc = ds.ent2doc.coalesce().to(device)
    return prepared


@dataclass
class _Entry:
    future: Future
    holds: int = 0
    last_used: int = 0


class ResidentDatasets:
    """Holds at most ``max_resident`` datasets loaded and prepared; see the module docstring.

    Args:
        datasets: dataset objects (already loaded: only their prepared state is freed) or
            :class:`LazyDataset` (loaded when needed, freed with their state); names unique.
        prepare: loaded dataset -> its prepared state (e.g. :func:`prepare_dataset`); runs in a
            loading thread when ``workers`` > 0.
        max_resident: ``datasets.max_datasets_in_memory``; None: all of them.
        workers: ``datasets.data_loading_workers``, threads loading planned datasets in the
            background; 0: every load happens when the dataset is needed, in the caller's thread.
    """

    def __init__(
        self,
        datasets: Sequence[Any],
        prepare: Callable[[Any], Any],
        max_resident: Optional[int] = None,
        workers: int = 0,
    ):
        self._sources: Dict[str, Any] = {}
        for ds in datasets:
            other = self._sources.setdefault(ds.data_name, ds)
            if other is not ds:
                raise ValueError(f"two different datasets are named {ds.data_name!r}")
        if max_resident is None:
            max_resident = max(len(self._sources), 1)
        if isinstance(max_resident, bool) or int(max_resident) < 1:
            raise ValueError(f"datasets.max_datasets_in_memory must be at least 1 (or null: all), got {max_resident!r}")
        if isinstance(workers, bool) or int(workers) < 0:
            raise ValueError(f"datasets.data_loading_workers must be 0 or more, got {workers!r}")
        self.max_resident, self.workers = int(max_resident), int(workers)
        self._prepare = prepare
        self._executor = (ThreadPoolExecutor(self.workers, thread_name_prefix="gfmrag-load")
                          if self.workers else None)
        self._lock = threading.Condition()
        self._entries: Dict[str, _Entry] = {}
        self._plan: List[str] = []
        self._clock = itertools.count(1)
        # Instrumentation: the most datasets ever resident at once, every ("load" | "evict", name),
        # and the seconds callers spent waiting for loads.
        self.peak_resident = 0
        self.events: List[Tuple[str, str]] = []
        self.wait_s = 0.0

    # --- the walk's side -----------------------------------------------------------------
    @property
    def names(self) -> List[str]:
        return list(self._sources)

    @property
    def resident(self) -> List[str]:
        """The resident datasets now (loads in progress included)."""
        with self._lock:
            return list(self._entries)

    def plan(self, names: Sequence[str]) -> None:
        """The order the next :meth:`hold` calls will ask for datasets in (replacing any earlier
        plan): loaded ahead in the background as slots allow."""
        for name in names:
            self._check_name(name)
        with self._lock:
            self._plan = list(dict.fromkeys(names))
            self._fill()

    def hold(self, name: str) -> Any:
        """The prepared state of ``name``, kept resident until :meth:`release`."""
        return self._acquire(name, hold=True)

    def get(self, name: str) -> Any:
        """The prepared state of ``name`` (loaded now, if it is not resident)."""
        return self._acquire(name, hold=False)

    def release(self, name: str) -> None:
        """Ends one :meth:`hold` of ``name``; it stays resident until its slot is needed."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None and entry.holds > 0:
                entry.holds -= 1
            self._fill()
            self._lock.notify_all()

    def close(self) -> None:
        """Stops the loading threads and frees every dataset."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._entries.clear()
            self._plan = []

    def stats(self) -> Dict[str, Any]:
        with self._lock:
            return {"resident": len(self._entries), "peak_resident": self.peak_resident,
                    "loads": sum(kind == "load" for kind, _ in self.events),
                    "evictions": sum(kind == "evict" for kind, _ in self.events), "wait_s": self.wait_s}

    # --- internals ---------------------------------------------------------------------
    def _check_name(self, name: str) -> None:
        if name not in self._sources:
            raise KeyError(f"no dataset named {name!r}; known: {sorted(self._sources)}")

    def _acquire(self, name: str, hold: bool) -> Any:
        self._check_name(name)
        with self._lock:
            if name in self._plan:
                self._plan.remove(name)  # its planned use has come
            entry = self._entries.get(name)
            while entry is None:
                if len(self._entries) < self.max_resident or self._evict_one(planned_too=True):
                    entry = self._start(name)
                elif all(e.holds for e in self._entries.values()):
                    raise RuntimeError(
                        f"dataset {name!r} is needed while {len(self._entries)} others are in use "
                        f"({', '.join(self._entries)}): more than max_datasets_in_memory = {self.max_resident}"
                    )
                else:
                    self._lock.wait()  # a load in progress finishes: its dataset can then be evicted
                    entry = self._entries.get(name)
            entry.holds += int(hold)
            entry.last_used = next(self._clock)
        start = time.perf_counter()
        if self._executor is None and not entry.future.done():
            self._run(name, entry.future)
        try:
            state = entry.future.result()
        except BaseException:
            with self._lock:
                if self._entries.get(name) is entry:
                    del self._entries[name]
                    self._lock.notify_all()
            raise
        finally:
            waited = time.perf_counter() - start
            with self._lock:
                self.wait_s += waited
        with self._lock:
            self._fill()
        return state

    def _start(self, name: str) -> _Entry:
        """Makes ``name`` resident and starts its load (caller holds the lock; a slot is free)."""
        entry = _Entry(Future())
        self._entries[name] = entry
        self.peak_resident = max(self.peak_resident, len(self._entries))
        self.events.append(("load", name))
        log.debug("loading dataset %s (resident: %s)", name, ", ".join(self._entries))
        if self._executor is not None:
            self._executor.submit(self._run, name, entry.future)
        return entry

    def _run(self, name: str, future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            source = self._sources[name]
            future.set_result(self._prepare(source.load() if isinstance(source, LazyDataset) else source))
        except BaseException as exc:  # handed to the caller of hold/get
            future.set_exception(exc)
        with self._lock:
            self._lock.notify_all()

    def _evict_one(self, planned_too: bool) -> bool:
        """Frees one loaded dataset that is not held (caller holds the lock): the least recently
        used among those not planned, else (``planned_too``) the one planned last."""
        idle = [name for name, e in self._entries.items() if not e.holds and e.future.done()]
        unplanned = [name for name in idle if name not in self._plan]
        if unplanned:
            victim = min(unplanned, key=lambda name: self._entries[name].last_used)
        elif planned_too and idle:
            victim = max(idle, key=self._plan.index)
        else:
            return False
        del self._entries[victim]
        self.events.append(("evict", victim))
        log.debug("freed dataset %s", victim)
        return True

    def _fill(self) -> None:
        """Starts background loads of planned datasets while slots allow (caller holds the lock)."""
        if self._executor is None:
            return
        for name in self._plan:
            if name in self._entries:
                continue
            if len(self._entries) >= self.max_resident and not self._evict_one(planned_too=False):
                break
            self._start(name)
