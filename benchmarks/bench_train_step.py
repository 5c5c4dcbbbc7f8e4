"""One fine-tune step and one pre-train step (forward, loss, backward, AdamW) of GFM-RAG's model, and
where their time goes, for three implementations measured in the same run:

  kernel      rel_aggregate op + dense_tail op (the package's default)
  plain_tail  rel_aggregate op + the dense tail in plain PyTorch (LayerNorm, ReLU, add)
  reference   pure-PyTorch aggregation (rel_aggregate_reference) + the plain tail

    pytest benchmarks/bench_train_step.py                              # step times (ratios vs reference)
    python benchmarks/bench_train_step.py [--json PATH] [--device D]   # + the per-category breakdown

The breakdown profiles one step with torch.profiler and sorts each op's self time (device time on
CUDA) into: matmuls (every mm / addmm), aggregation fwd / bwd, dense tail fwd / bwd (everything of
the tail but its products), sampling (negatives and easy edges), loss, optimizer, other (the
autograd engine, casts, the boundary add, the scoring MLP's elementwise work...). Backward ops are
attributed to the forward op that recorded them (autograd's sequence numbers). Memory: the bytes
autograd saves for the backward in one forward (CPU) or the step's peak allocation (CUDA).

Cases: CPU, a synthetic N = 20k graph (B = 4, 6 x 32) and the real MuSiQue KG bundled in
``data/musique_hippo`` (16,234 entities, 61,518 edges; pre-training with batch 32, 6 x 64, 256
negatives, as ``python -m gfmrag_fast.workflow.pretrain`` runs it; random relation features stand
in for the text embeddings, which do not change the step's work). CUDA: GFM-RAG's size on a
HotpotQA-sized graph with a real index's shape (``gfmrag_fast.synthetic.real_shape_kg``: N = 82,157,
98,709 triples + inverses, 2R = 35,046, one synonym relation with ~46 % of the triples,
heavy-tailed degrees), B = 8, 6 x 512, 768-d text embeddings, float32 (TF32) and bfloat16 autocast;
targets: fine-tune step <= 120 ms and 16 GiB peak (float32), <= 50 ms and 12 GiB (bfloat16),
pre-train step <= 100 ms (float32), on one H100.

The ratio plain_tail / kernel is bounded by the share of the plain_tail step that its tail spends
outside the products: with that share s, no tail kernel can make the step more than 1 / (1 - s)
faster. The script prints that ceiling next to each ratio (``free_tail_ceiling`` in the JSON).

``--shrink F`` runs the selected cases on graphs F times smaller (nodes, triples, relations), a
CUDA case on the CPU when no GPU is present: a quick run of its code path (bfloat16 autocast
included) before its first GPU run; the rows' case names get ``-div<F>``.

The script first calls :func:`gfmrag_fast.runtime.configure_allocator`, as the workflows do (large
blocks stay with the process instead of being unmapped and page-faulted in anew every step); every
implementation of a run gets the same setting. ``GFMRAG_FAST_MALLOC=system`` measures without it.
"""

from __future__ import annotations

import os

# As the workflows do (gfmrag_fast.workflow): OpenMP threads sleep rather than spin in barriers,
# which on a CPU shared with other processes decides the step time. Before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function
from torch_geometric.data import Data

import gfmrag_fast.models.aggregation as aggregation
import gfmrag_fast.models.dense as dense
from gfmrag_fast.data import prepare_graph
from gfmrag_fast.data.readers import read_triples
from gfmrag_fast.losses import adversarial_bce, list_ce
from gfmrag_fast.checkpoints import build_model
from gfmrag_fast.ops import easy_edge_mask, negative_sampling, rel_aggregate_reference
from gfmrag_fast.runtime import configure_allocator
from gfmrag_fast.synthetic import real_shape_kg, synthetic_kg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The MuSiQue index bundled with the repository (data/README.md).
MUSIQUE_KG = os.path.join(REPO, "data", "musique_hippo", "processed", "stage1", "kg.txt")


@dataclass(frozen=True)
class Case:
    name: str
    device: str
    kinds: tuple  # "finetune", "pretrain"
    graph: tuple  # ("synthetic" | "real_shape", N, triples, 2R) or ("kg", path)
    batch: int
    dim: int
    layers: int
    text_dim: int
    num_negative: int
    impls: tuple = ("kernel", "plain_tail", "reference")
    dtypes: tuple = ("float32",)

    def shrunk(self, factor: int) -> "Case":
        """The case on a graph `factor` times smaller, on the CPU when its device is absent."""
        if self.graph[0] == "kg":
            raise ValueError(f"--shrink: case {self.name} reads a real KG, which cannot be shrunk")
        kind, n, triples, r2 = self.graph
        graph = (kind, max(n // factor, 2), max(triples // factor, 1), max(2 * (r2 // (2 * factor)), 2))
        device = self.device if self.device == "cpu" or torch.cuda.is_available() else "cpu"
        return dataclasses.replace(self, name=f"{self.name}-div{factor}", device=device, graph=graph)


CASES = [
    Case("cpu-N20k", "cpu", ("finetune", "pretrain"), ("synthetic", 20_000, 100_000, 400), 4, 32, 6, 64, 64),
    # The reference aggregation would materialise [32, 61k, 64] messages per layer: left out.
    Case("musique-B32-6x64", "cpu", ("pretrain",), ("kg", MUSIQUE_KG), 32, 64, 6, 384, 256,
         impls=("kernel", "plain_tail")),
    # kernel_node_major: the kernel with node-major state storage (the CPU default), to decide the GPU's.
    Case("hotpotqa-B8-6x512", "cuda", ("finetune", "pretrain"), ("real_shape", 82_157, 98_709, 35_046), 8, 512, 6,
         768, 256, impls=("kernel", "kernel_node_major", "plain_tail", "reference"), dtypes=("float32", "bfloat16")),
]
CATEGORIES = ["matmuls", "aggregation fwd", "aggregation bwd", "dense tail fwd", "dense tail bwd", "sampling", "loss",
              "optimizer", "other"]
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::mv",
              "aten::addmv", "aten::dot", "aten::_addmm_activation"}


def available(case: Case) -> bool:
    if case.device == "cuda" and not torch.cuda.is_available():
        return False
    return case.graph[0] != "kg" or os.path.exists(case.graph[1])


# --------------------------------------------------------------------------------------- the step
@functools.lru_cache(maxsize=None)
def graph_of(case: Case) -> Data:
    if case.graph[0] in ("synthetic", "real_shape"):
        kind, n, triples, r2 = case.graph
        rg = (synthetic_kg if kind == "synthetic" else real_shape_kg)(n, triples, r2, seed=0)
        edge_index, edge_type = rg.edge_index, rg.edge_type
    else:
        names, _ = read_triples(case.graph[1])
        ent2id: Dict[str, int] = {}
        rel2id: Dict[str, int] = {}
        rows = []
        for h, r, t in names:  # numbering as the stage-2 builder: head, tail, then relation
            h_id = ent2id.setdefault(h, len(ent2id))
            t_id = ent2id.setdefault(t, len(ent2id))
            rows.append((h_id, t_id, rel2id.setdefault(r, len(rel2id))))
        hrt = torch.tensor(rows)
        n, r2 = len(ent2id), 2 * len(rel2id)
        edge_index = torch.cat([hrt[:, :2].t(), hrt[:, :2].t().flip(0)], 1)
        edge_type = torch.cat([hrt[:, 2], hrt[:, 2] + r2 // 2])
    rel_emb = torch.randn(r2, case.text_dim, generator=torch.Generator().manual_seed(2))
    data = Data(edge_index=edge_index, edge_type=edge_type, num_nodes=n, num_relations=r2, rel_emb=rel_emb)
    return prepare_graph(data, case.device)  # its RelGraph prepared once, as training does


def model_of(case: Case, kind: str, impl: str) -> torch.nn.Module:
    entity = "QueryNBFNet" if kind == "finetune" else "EntityNBFNet"
    config = {
        "_target_": "gfmrag.models.GNNRetriever" if kind == "finetune" else "gfmrag.models.QueryGNN",
        "entity_model": {"_target_": f"gfmrag.ultra.models.{entity}", "input_dim": case.dim,
                         "hidden_dims": [case.dim] * case.layers, "message_func": "distmult", "aggregate_func": "sum",
                         "short_cut": True, "layer_norm": True},
        "rel_emb_dim": case.text_dim,
    }
    torch.manual_seed(0)
    model = build_model(config).to(case.device)
    for layer in model.entity_model.layers:
        layer.fused_dense = impl in ("kernel", "kernel_node_major")
    # The device's default layout (node major on the CPU, batch major on CUDA) unless asked for.
    model.entity_model.node_major = True if impl == "kernel_node_major" else None
    return model


@contextlib.contextmanager
def aggregation_impl(impl: str):
    """The same model, its aggregation swapped for the pure-PyTorch reference."""
    original = aggregation.rel_aggregate
    if impl == "reference":
        aggregation.rel_aggregate = rel_aggregate_reference
    try:
        yield
    finally:
        aggregation.rel_aggregate = original


@dataclass
class Step:
    run: Callable[[], None]  # forward, loss, backward, AdamW
    forward: Callable[[], torch.Tensor]  # the loss alone
    model: torch.nn.Module


def make_step(case: Case, kind: str, impl: str, dtype: str) -> Step:
    graph, device = graph_of(case), case.device
    n = int(graph.num_nodes)
    model = model_of(case, kind, impl)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    gen = torch.Generator().manual_seed(3)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    if kind == "finetune":
        questions = torch.zeros(case.batch, n)
        questions[torch.arange(case.batch), torch.randint(0, n, (case.batch,), generator=gen)] = 1
        targets = (torch.rand(case.batch, n, generator=gen) < 1e-3).float().to(device)
        inputs = {"question_embeddings": torch.randn(case.batch, case.text_dim, generator=gen).to(device),
                  "question_entities_masks": questions.to(device)}

        def forward():
            pred = model(graph, inputs)
            with record_function("loss"):
                pred = pred.float()
                return 0.3 * adversarial_bce(pred, targets, 0.2) + 0.7 * list_ce(pred, targets)
    else:
        rg = graph.rel_graph
        num_triples = graph.edge_index.size(1) // 2
        pick = torch.randint(0, num_triples, (case.batch,), generator=gen).to(device)
        triples = torch.stack([graph.edge_index[0, pick], graph.edge_index[1, pick], graph.edge_type[pick]], 1)
        target = torch.zeros(case.batch, case.num_negative + 1, device=device)
        target[:, 0] = 1

        def forward():
            with record_function("sampling"):
                sample = negative_sampling(rg, triples, case.num_negative, check_values=False)
                mask = easy_edge_mask(rg, sample, check_values=False)
            pred = model(graph, sample, edge_mask=mask)
            with record_function("loss"):
                return adversarial_bce(pred.float(), target, 1.0)

    def run():
        with aggregation_impl(impl):
            with autocast:
                loss = forward()
            with record_function("optimizer"):
                optimizer.zero_grad(set_to_none=True)
            loss.backward()
            with record_function("optimizer"):
                optimizer.step()

    def forward_only():
        with aggregation_impl(impl), autocast:
            return forward()

    return Step(run, forward_only, model)


# ------------------------------------------------------------------------------------ breakdown
@contextlib.contextmanager
def profiling_scopes():
    """Names the aggregation and the dense tail for the profiler (module functions wrapped)."""
    patched = [(aggregation, "_fused_reduce", "aggregation"), (aggregation, "rel_aggregate_sharing_x", "aggregation"),
               (dense, "dense_update", "dense_tail"), (dense, "plain_tail", "dense_tail")]
    originals = [getattr(module, name) for module, name, _ in patched]

    def scoped(fn, scope):
        def wrapper(*args, **kwargs):
            with record_function(scope):
                return fn(*args, **kwargs)
        return wrapper

    for (module, name, scope), fn in zip(patched, originals):
        setattr(module, name, scoped(fn, scope))
    try:
        yield
    finally:
        for (module, name, _), fn in zip(patched, originals):
            setattr(module, name, fn)


SCOPE_CATEGORY = {"aggregation": "aggregation", "dense_tail": "dense tail", "loss": "loss", "optimizer": "optimizer",
                  "sampling": "sampling"}


def breakdown(events, device: str) -> Dict[str, float]:
    """ms per category of the profiled events (see the module docstring)."""

    def self_time(e):
        return (e.self_device_time_total if device == "cuda" else e.self_cpu_time_total) / 1e3

    def scope_of(e):
        while e is not None:
            if e.name in SCOPE_CATEGORY:
                return e.name, e
            e = e.cpu_parent
        return None, None

    # Forward ops (outside the engine) in a scope: their sequence numbers name their backward.
    backward_scope = {}
    for e in events:
        if e.sequence_nr >= 0 and not e.name.startswith("autograd::engine"):
            scope, _ = scope_of(e)
            if scope is not None:
                backward_scope.setdefault(e.sequence_nr, scope)
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for e in events:
        t = self_time(e)
        if t == 0.0:
            continue
        if e.name in MATMUL_OPS:
            totals["matmuls"] += t
            continue
        scope, engine = None, None
        walker = e
        while walker is not None:
            if walker.name in SCOPE_CATEGORY:
                scope = walker.name
                break
            if walker.name.startswith("autograd::engine::evaluate_function"):
                engine = walker
                break
            walker = walker.cpu_parent
        if engine is not None:
            scope = backward_scope.get(engine.sequence_nr)
            category = SCOPE_CATEGORY.get(scope, "other")
            if category in ("aggregation", "dense tail"):
                category += " bwd"
        else:
            category = SCOPE_CATEGORY.get(scope, "other")
            if category in ("aggregation", "dense tail"):
                category += " fwd"
        totals[category] += t
    return totals


def profile_step(step: Step, device: str) -> Dict[str, float]:
    step.run()  # warm up (and the optimizer's state)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profiling_scopes(), profile(activities=activities) as prof:
        step.run()
        if device == "cuda":
            torch.cuda.synchronize()
    totals = breakdown(prof.events(), device)
    totals["total"] = sum(totals.values())
    return totals


def step_memory(step: Step, device: str) -> Dict[str, float]:
    """CPU: MiB autograd saves for the backward (distinct storages, parameters excluded).
    CUDA: GiB peak allocation of one step."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        step.run()
        torch.cuda.synchronize()
        return {"peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
    storages = {}
    parameters = {p.untyped_storage().data_ptr() for p in step.model.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in parameters:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step.forward()
    del loss
    return {"saved_for_backward_mib": sum(storages.values()) / 2**20}


def take_turns(fns: Dict[str, Callable[[], object]], device: str, rounds: int) -> Dict[str, Dict[str, float]]:
    """Per name: the median wall ms of `rounds` calls and, on CPU, the median process CPU ms (on a
    machine shared with other processes the CPU time says more about the work than the wall time,
    which includes waiting for a core). One warm-up call each, then the functions take turns, so
    that a change in the machine's load hits them alike. Also used by the other benchmarks."""
    for fn in fns.values():
        fn()
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            wall[name].append((time.perf_counter() - start) * 1e3)
            cpu[name].append((time.process_time() - start_cpu) * 1e3)
    times = {}
    for name in fns:
        times[name] = {"step_ms": statistics.median(wall[name])}
        if device == "cpu":
            times[name]["step_cpu_ms"] = statistics.median(cpu[name])
    return times


def time_steps(steps: Dict[str, Step], device: str, rounds: int) -> Dict[str, Dict[str, float]]:
    """:func:`take_turns` over the implementations' training steps."""
    return take_turns({impl: step.run for impl, step in steps.items()}, device, rounds)


# ------------------------------------------------------------------------------------- pytest
def _params():
    return [pytest.param(case, kind, dt, impl, id=f"{case.name}-{kind}-{dt}-{impl}")
            for case in CASES if available(case) for kind in case.kinds for dt in case.dtypes
            for impl in case.impls]


@pytest.mark.parametrize("case,kind,dtype,impl", _params())
def test_train_step(measure, case, kind, dtype, impl):
    configure_allocator()
    step = make_step(case, kind, impl, dtype)
    measure(step.run, f"train_step/{kind}/{case.name}/{case.device}/{dtype}", impl, case.device,
            rounds=3 if case.device == "cpu" else 5, dtype=dtype)


# ------------------------------------------------------------------------------------- script
def run_profiles(devices: List[str], rounds: int, impls: Optional[List[str]] = None,
                 cases: Optional[List[str]] = None, shrink: Optional[int] = None) -> List[dict]:
    rows = []
    for case in CASES:
        if cases and case.name not in cases:
            continue
        if shrink:
            case = case.shrunk(shrink)
        if case.device not in devices or not available(case):
            continue
        for kind in case.kinds:
            for dtype in case.dtypes:
                steps = {impl: make_step(case, kind, impl, dtype) for impl in case.impls
                         if not impls or impl in impls}
                times = time_steps(steps, case.device, rounds)
                for impl, step in steps.items():
                    row = {"case": case.name, "kind": kind, "device": case.device, "dtype": dtype, "impl": impl,
                           **times[impl], "breakdown_ms": profile_step(step, case.device),
                           **step_memory(step, case.device)}
                    rows.append(row)
                    print_row(row)
                del steps
                if case.device == "cuda":
                    torch.cuda.empty_cache()
    return rows


def print_row(row: dict) -> None:
    cells = " ".join(f"{row['breakdown_ms'][c]:8.1f}" for c in CATEGORIES)
    memory = (f"{row['peak_memory_gib']:6.2f} GiB peak" if "peak_memory_gib" in row
              else f"{row['saved_for_backward_mib']:7.0f} MiB saved")
    cpu = f"{row['step_cpu_ms']:9.1f}" if "step_cpu_ms" in row else f"{'-':>9s}"
    print(f"{row['case']:18s} {row['kind']:8s} {row['dtype']:8s} {row['impl']:10s} {row['step_ms']:9.1f} {cpu} | "
          f"{cells} | {row['breakdown_ms']['total']:8.1f} | {memory}", flush=True)


def print_header() -> None:
    names = " ".join(f"{c[:8]:>8s}" for c in CATEGORIES)
    print(f"{'case':18s} {'kind':8s} {'dtype':8s} {'impl':10s} {'step ms':>9s} {'cpu ms':>9s} | {names} | "
          f"{'profiled':>8s} |")


def tail_share(row: dict) -> float:
    """The share of a row's profiled step spent in the dense tail outside its matrix products."""
    b = row["breakdown_ms"]
    return (b["dense tail fwd"] + b["dense tail bwd"]) / b["total"] if b["total"] > 0 else 0.0


def add_ceilings(rows: List[dict]) -> None:
    """Adds to every plain_tail row the largest step speed-up any dense-tail kernel could give over it,
    ``free_tail_ceiling = 1 / (1 - share)``: its step with the tail's elementwise work costing nothing
    (the products, which stay with BLAS / cuBLAS, and everything else unchanged)."""
    for row in rows:
        if row["impl"] == "plain_tail":
            share = tail_share(row)
            row["tail_share"] = share
            row["free_tail_ceiling"] = 1.0 / (1.0 - share) if share < 1.0 else float("inf")
        elif row["impl"] == "kernel":
            row["tail_share"] = tail_share(row)


def print_ratios(rows: List[dict]) -> None:
    print("\nstep time of plain_tail (and reference) / kernel, same run (wall; CPU time):")
    for row in rows:
        if row["impl"] != "kernel":
            continue
        same = [r for r in rows if all(r[k] == row[k] for k in ("case", "kind", "dtype"))]
        for other in same:
            if other["impl"] != "kernel":
                cpu = (f"; {other['step_cpu_ms'] / row['step_cpu_ms']:.2f}x" if "step_cpu_ms" in row else "")
                print(f"  {row['case']} {row['kind']} {row['dtype']}: {other['impl']} / kernel = "
                      f"{other['step_ms'] / row['step_ms']:.2f}x{cpu}")
            if other["impl"] == "plain_tail":
                print(f"    dense tail outside the products: {100 * other['tail_share']:.0f} % of the plain_tail step, "
                      f"{100 * row['tail_share']:.0f} % of the kernel step; ceiling of plain_tail / kernel with a "
                      f"free tail: {other['free_tail_ceiling']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--impl", action="append", help="only these implementations (repeatable)")
    parser.add_argument("--case", action="append", help="only these cases (repeatable): " +
                        ", ".join(case.name for case in CASES))
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per case (median)")
    parser.add_argument("--shrink", type=int, metavar="F",
                        help="graphs F times smaller; CUDA cases on the CPU when no GPU is present")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.shrink is not None and args.shrink < 1:
        parser.error(f"--shrink must be >= 1, got {args.shrink}")
    allocator = configure_allocator()
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True  # the workflows' default (train.tf32)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, allocator: {allocator}"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    print_header()
    rows = run_profiles(devices, args.rounds, args.impl, args.case, args.shrink)
    for row in rows:
        row["allocator"] = allocator
    add_ceilings(rows)
    print_ratios(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
