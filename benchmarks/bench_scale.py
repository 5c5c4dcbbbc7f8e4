"""How big a KG one process, and P graph-partitioned processes, can fine-tune on.

    python benchmarks/bench_scale.py                      # CPU: gloo, 1 process vs 2, small model
    python benchmarks/bench_scale.py --sizes 20000 40000 --dim 64 --budget-gib 1 --json scale.json
    python benchmarks/bench_scale.py --device cuda --procs 1 --dim 512 --batch 8   # one GPU
    pytest benchmarks/bench_scale.py -s                   # a small sweep

Graphs are real-shape KGs (:func:`gfmrag_fast.synthetic.real_shape_kg`) with HotpotQA's
proportions (a HotpotQA-sized GFM-RAG index: 1.2 triples and 0.43 relation types, inverses included, per entity).
One fine-tune step = GNNRetriever forward on B questions, 0.3 BCE + 0.7 ListCE over all N
entities, backward, gradient sum over ranks (partitioned), AdamW.

Reported:

1. step time (median) and peak memory against N, one process vs P processes splitting each
   graph's nodes (``train.graph_partition``), for each partition method;
2. per rank: owned and halo nodes, bytes sent per layer (forward; the backward sends as many),
   peak memory;
3. bytes per node: a linear fit of peak memory against N (one process) and against owned and
   halo nodes (per rank); the largest graph that fits ``--budget-gib``, estimated from the fit,
   then run to check it;
4. the same bytes per node scaled to GFM-RAG's model (B = 8, 6 x 512) and the N it allows on an
   80 GB GPU, alone or split over 2-8 GPUs with METIS halo fractions measured on real-shape graphs.
   Items 1-3 are measured; item 4 is an extrapolation (activation memory grows as B * d * layers).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` of each GPU; on CPU the growth of each
process's peak resident set over the measured steps (VmHWM, reset through /proc/self/clear_refs
before them; glibc returns freed blocks at once with MALLOC_MMAP_THRESHOLD_ set), i.e. all the
step allocates: activations, gradients, optimizer state updates, temporaries, exchange buffers.
Times on a shared CPU are indicative only; memory and bytes are exact.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import socket
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

GIB = 2**30
GFM_RAG = dict(batch=8, dim=512, layers=6)  # the released model's training shape
GPU_BYTES = 80e9
MUSIQUE_KG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "data", "musique_hippo", "processed", "stage1", "kg.txt")


@dataclass
class Config:
    sizes: List[int] = field(default_factory=lambda: [10_000, 20_000, 40_000])
    procs: int = 2
    methods: List[str] = field(default_factory=lambda: ["contiguous", "metis"])
    batch: int = 4
    dim: int = 32
    layers: int = 6
    text_dim: int = 768
    steps: int = 3
    budget_gib: Optional[float] = 0.5
    kg: Optional[str] = MUSIQUE_KG if os.path.isfile(MUSIQUE_KG) else None  # a real kg.txt measured too
    device: str = "cpu"
    threads: int = 2
    seed: int = 0


# --- one measurement, inside a worker process --------------------------------------------------
def load_graph(spec, text_dim: int, seed: int):
    """(name, GFM-RAG graph): ``spec`` an int N (a real-shape KG of N entities with HotpotQA's
    triples and relations per entity) or the path of a ``kg.txt`` (numbered as stage 2 does);
    random relation embeddings."""
    from torch_geometric.data import Data

    from gfmrag_fast.synthetic import real_shape_kg

    if isinstance(spec, int):
        name, num_nodes = f"real-shape {spec:,}", spec
        num_relations = max(2, 2 * round(0.2133 * num_nodes))  # 35,046 / 82,157 per entity, direct + inverse
        g = real_shape_kg(num_nodes, round(1.2015 * num_nodes), num_relations, seed=seed)
        edge_index, edge_type = g.edge_index, g.edge_type
    else:
        from gfmrag_fast.data.readers import read_triples

        triples, _ = read_triples(spec)
        entities, relations = {}, {}
        for h, r, t in triples:  # numbered by first appearance, as the stage-2 processing does
            entities.setdefault(h, len(entities))
            relations.setdefault(r, len(relations))
            entities.setdefault(t, len(entities))
        head = torch.tensor([entities[h] for h, _, _ in triples])
        tail = torch.tensor([entities[t] for _, _, t in triples])
        rel = torch.tensor([relations[r] for _, r, _ in triples])
        dataset = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(spec))))  # <name>/processed/stage1
        name, num_nodes, num_relations = f"{os.path.basename(dataset)} KG", len(entities), 2 * len(relations)
        edge_index = torch.cat([torch.stack([head, tail]), torch.stack([tail, head])], 1)
        edge_type = torch.cat([rel, rel + len(relations)])
    rel_emb = torch.randn(num_relations, text_dim, generator=torch.Generator().manual_seed(seed + 1))
    return name, Data(edge_index=edge_index, edge_type=edge_type, num_nodes=num_nodes, num_relations=num_relations,
                      rel_emb=rel_emb)


def _peak_reset(device: torch.device) -> int:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    return _status_bytes("VmRSS")


def _peak_growth(device: torch.device, start: int) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) - start
    return _status_bytes("VmHWM") - start


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def measure_step(cfg: Config, spec, method: str, device: torch.device) -> Dict:
    """Step time and peak memory of fine-tune steps on this rank (collective when partitioned)."""
    from gfmrag_fast.data import prepare_graph
    from gfmrag_fast.losses import adversarial_bce, list_ce
    from gfmrag_fast.models import GNNRetriever, QueryNBFNet
    from gfmrag_fast.models.partition import partition_graph
    from gfmrag_fast.training.distributed import sum_gradients

    partitioned = dist.is_initialized()
    name, graph = load_graph(spec, cfg.text_dim, cfg.seed)
    num_nodes = int(graph.num_nodes)
    started = time.perf_counter()
    graph = partition_graph(graph, method) if partitioned else graph
    partition_s = time.perf_counter() - started
    # One process: the graph prepared once (its RelGraph), as the training tasks hand it to the model;
    # partitioned: the model runs on the partition's own prepared local graph.
    graph = graph.to(device) if partitioned else prepare_graph(graph, device)
    torch.manual_seed(cfg.seed)
    model = GNNRetriever(QueryNBFNet(cfg.dim, [cfg.dim] * cfg.layers, "distmult", "sum", short_cut=True,
                                     layer_norm=True), cfg.text_dim).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    questions = torch.zeros(cfg.batch, num_nodes)
    questions[torch.arange(cfg.batch).repeat_interleave(2), torch.randint(0, num_nodes, (2 * cfg.batch,), generator=gen)] = 1
    targets = torch.zeros(cfg.batch, num_nodes)
    targets[torch.arange(cfg.batch).repeat_interleave(5), torch.randint(0, num_nodes, (5 * cfg.batch,), generator=gen)] = 1
    inputs = {"question_embeddings": torch.randn(cfg.batch, cfg.text_dim, generator=gen).to(device),
              "question_entities_masks": questions.to(device)}
    targets = targets.to(device)

    def step():
        pred = model(graph, inputs).float()
        loss = 0.3 * adversarial_bce(pred, targets, 0.2) + 0.7 * list_ce(pred, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if partitioned:
            sum_gradients(model)
        optimizer.step()

    step()  # warm-up: the optimizer state is allocated here
    start = _peak_reset(device)
    times = []
    for _ in range(cfg.steps):
        if partitioned:
            dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if partitioned:
            dist.barrier()
        times.append(time.perf_counter() - t0)
    peak = _peak_growth(device, start)
    row = {"graph": name, "num_nodes": num_nodes, "num_edges": int(graph.edge_index.shape[1]), "procs": 1, "rank": 0,
           "method": "none", "step_ms": 1e3 * statistics.median(times), "peak_bytes": peak,
           "owned": num_nodes, "halo": 0, "sent_rows": 0, "bytes_sent_per_layer": 0}
    partition = getattr(graph, "partition", None)
    if partition is not None:
        plan = partition.plan
        row.update(procs=plan.num_parts, rank=plan.rank, method=method, owned=plan.num_owned, halo=plan.num_halo,
                   sent_rows=sum(plan.send_counts), partition_s=partition_s,
                   bytes_sent_per_layer=partition.bytes_per_layer(cfg.batch, cfg.dim))
    return row


def _worker(rank: int, world: int, port: int, cfg: Config, cases, queue) -> None:
    torch.set_num_threads(max(1, cfg.threads // world))
    device = torch.device("cuda", rank) if cfg.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=30))
    try:
        for spec, method in cases:
            try:
                queue.put(measure_step(cfg, spec, method, device))
            except torch.OutOfMemoryError:
                queue.put({"graph": load_graph(spec, 1, 0)[0], "procs": world, "rank": rank, "method": method,
                           "oom": True})
                torch.cuda.empty_cache()
    finally:
        if world > 1:
            dist.destroy_process_group()


def run_cases(cfg: Config, world: int, cases) -> List[Dict]:
    """Runs ``cases`` [(graph spec, method)] in ``world`` fresh processes; every rank's rows."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # freed blocks go back to the OS at once
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(world, port, cfg, cases, queue), nprocs=world, join=True,
                       start_method="spawn")
    rows = []
    while not queue.empty():
        rows.append(queue.get())
    return rows


# --- fits and extrapolation --------------------------------------------------------------------
def fit_bytes(rows: List[Dict]) -> Dict[str, float]:
    """``peak = own * owned + halo * halo + whole * N + const``, least squares over every rank's
    measurement (one process: owned = N, halo = 0). ``whole`` is what every rank holds for the
    whole graph: the relation features of every layer (2R grows with N) and the [B, N] scores."""
    ok = [r for r in rows if not r.get("oom")]
    peaks = [r["peak_bytes"] for r in ok]
    if all(r["procs"] == 1 for r in ok):  # nothing tells owned from whole-graph bytes: all per owned node
        own, const = least_squares([[r["num_nodes"] for r in ok], [1.0] * len(ok)], peaks)
        return {"own": own, "halo": 0.0, "whole": 0.0, "const": const}
    columns = [[r["owned"] for r in ok], [r["halo"] for r in ok], [r["num_nodes"] for r in ok], [1.0] * len(ok)]
    own, halo, whole, const = least_squares(columns, peaks)
    return {"own": own, "halo": halo, "whole": whole, "const": const}


def least_squares(columns: List[List[float]], target: List[float]) -> List[float]:
    a = torch.tensor(columns, dtype=torch.float64).t()
    b = torch.tensor(target, dtype=torch.float64).unsqueeze(1)
    return torch.linalg.lstsq(a, b).solution.flatten().tolist()


def rank_load(fit: Dict[str, float], shares) -> float:
    """Bytes per graph node of the fullest rank, from [(owned / N, halo / N)] per rank."""
    return max(fit["own"] * owned + fit["halo"] * halo for owned, halo in shares) + fit["whole"]


def shares_of(rows: List[Dict], procs: int, method: str):
    """[(owned / N, halo / N)] per rank on the largest synthetic graph measured."""
    mine = [r for r in rows if r["procs"] == procs and r["method"] == method and r["graph"].startswith("real-shape")
            and not r.get("oom")]
    largest = max(r["num_nodes"] for r in mine)
    return [(r["owned"] / largest, r["halo"] / largest) for r in mine if r["num_nodes"] == largest]


def partition_shares(spec, parts: List[int], seed: int) -> Dict[str, Dict[int, list]]:
    """[(owned / N, halo / N)] per rank, by method and number of parts (partitions only, no model:
    cheap at any P)."""
    from gfmrag_fast.models.partition import partition_nodes, partition_stats

    _, graph = load_graph(spec, 1, seed)
    n = int(graph.num_nodes)
    out: Dict[str, Dict[int, list]] = {}
    for method in ("contiguous", "metis"):
        for p in parts:
            stats = partition_stats(graph.edge_index, partition_nodes(graph.edge_index, n, p, method), p)
            out.setdefault(method, {})[p] = [(o / n, h / n) for o, h in zip(stats["nodes"], stats["halo"])]
    return out


def report(cfg: Config, rows: List[Dict], verify: List[Dict], fit: Dict, shares, out=sys.stdout) -> None:
    def mib(b):
        return f"{b / 2**20:,.1f}"

    p = cfg.procs
    methods = cfg.methods if p > 1 else []
    print(f"\n## fine-tune step, B = {cfg.batch}, {cfg.layers} x {cfg.dim}, text dim {cfg.text_dim}, {cfg.device}, "
          f"median of {cfg.steps} steps", file=out)
    print("| graph (N) | edges | 1 process: ms, peak MiB | " + " | ".join(
        f"{p} x {m}: ms, peak MiB per rank, halo nodes per rank, MiB sent per layer (all ranks)" for m in methods)
        + " |", file=out)
    print("| --- " * (3 + len(methods)) + "|", file=out)
    for name in dict.fromkeys(r["graph"] for r in rows if r["procs"] == 1):
        single = [r for r in rows if r["graph"] == name and r["procs"] == 1]
        shown = name if single[0].get("oom") or f"{single[0]['num_nodes']:,}" in name else \
            f"{name} ({single[0]['num_nodes']:,})"
        cells = [shown,
                 "-" if single[0].get("oom") else f"{single[0]['num_edges']:,}"]
        cells.append("OOM" if not single or single[0].get("oom") else
                     f"{single[0]['step_ms']:,.0f}, {mib(single[0]['peak_bytes'])}")
        for m in methods:
            ranks = sorted((r for r in rows if r["graph"] == name and r["procs"] == p and r["method"] == m),
                           key=lambda r: r["rank"])
            if not ranks or any(r.get("oom") for r in ranks):
                cells.append("OOM" if ranks else "-")
                continue
            peaks = " / ".join(mib(r["peak_bytes"]) for r in ranks)
            halos = " / ".join(f"{r['halo']:,}" for r in ranks)
            sent = mib(sum(r["bytes_sent_per_layer"] for r in ranks))
            cells.append(f"{max(r['step_ms'] for r in ranks):,.0f}, {peaks}, {halos}, {sent}")
        print("| " + " | ".join(cells) + " |", file=out)

    print(f"\nbytes per node, fitted over every measurement above: {fit['own']:,.0f} per owned node, "
          f"{fit['halo']:,.0f} per halo node, {fit['whole']:,.0f} per node of the whole graph on every rank "
          f"(+ {mib(fit['const'])} MiB); one process: {fit['own'] + fit['whole']:,.0f} B per node", file=out)
    for row in verify:
        status = "fits" if row["peak_bytes"] <= row["budget_bytes"] else "DOES NOT FIT"
        print(f"largest N for {row['budget_bytes'] / GIB:g} GiB per process, {row['procs']} x {row['method']}: "
              f"estimated {row['num_nodes']:,}; run: peak {mib(row['peak_bytes'])} MiB ({status})", file=out)

    act = GFM_RAG["batch"] * GFM_RAG["dim"] * GFM_RAG["layers"] / (cfg.batch * cfg.dim * cfg.layers)
    rel = GFM_RAG["dim"] * GFM_RAG["layers"] / (cfg.dim * cfg.layers)
    big = {"own": fit["own"] * act, "halo": fit["halo"] * act, "whole": fit["whole"] * rel}
    print(f"\nextrapolated to GFM-RAG's model (B = 8, 6 x 512): node states x{act:.0f}, whole-graph part "
          f"x{rel:.0f}; {rank_load(big, [(1.0, 0.0)]) / 1e3:,.0f} kB per node in one process. "
          f"Largest N whose step fits {GPU_BYTES / 1e9:.0f} GB per GPU:", file=out)
    print(f"- 1 GPU: {GPU_BYTES / rank_load(big, [(1.0, 0.0)]) / 1e3:,.0f}k nodes", file=out)
    if cfg.procs == 1:
        return  # no partitioned measurement: nothing to extrapolate several GPUs from
    for graph_name, by_method in shares.items():
        for method, by_parts in by_method.items():
            cells = [f"{parts} GPUs {GPU_BYTES / rank_load(big, sh) / 1e3:,.0f}k (fullest rank: "
                     f"{max(o + h for o, h in sh) * parts:.2f} N/P nodes with its halo)"
                     for parts, sh in sorted(by_parts.items())]
            print(f"- {method}, halos of {graph_name}: " + "; ".join(cells), file=out)


def run(cfg: Config, out=sys.stdout) -> Dict:
    specs = [*cfg.sizes, *([cfg.kg] if cfg.kg else [])]
    rows = run_cases(cfg, 1, [(spec, "none") for spec in specs])
    if cfg.procs > 1:
        rows += run_cases(cfg, cfg.procs, [(spec, m) for spec in specs for m in cfg.methods])
    fit = fit_bytes(rows)
    verify = []
    if cfg.budget_gib:
        budget = cfg.budget_gib * GIB
        n_single = int((budget - fit["const"]) / rank_load(fit, [(1.0, 0.0)])) // 1000 * 1000
        verify += [dict(r, budget_bytes=budget) for r in run_cases(cfg, 1, [(n_single, "none")])]
        if cfg.procs > 1:
            method = cfg.methods[-1]
            n_split = int((budget - fit["const"]) / rank_load(fit, shares_of(rows, cfg.procs, method))) // 1000 * 1000
            got = run_cases(cfg, cfg.procs, [(n_split, method)])
            verify.append(dict(max(got, key=lambda r: r.get("peak_bytes", math.inf)), budget_bytes=budget))
    shares = {}
    if cfg.procs > 1:
        shares[f"real-shape {max(cfg.sizes):,}"] = partition_shares(max(cfg.sizes), [2, 4, 8], cfg.seed)
        if cfg.kg:
            shares[load_graph(cfg.kg, 1, 0)[0]] = partition_shares(cfg.kg, [2, 4, 8], cfg.seed)
    report(cfg, rows, verify, fit, shares, out)
    return {"config": asdict(cfg), "rows": rows, "verify": verify, "fit": fit, "partition_shares": shares}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Config()
    parser.add_argument("--sizes", type=int, nargs="+", default=defaults.sizes)
    parser.add_argument("--procs", type=int, default=defaults.procs)
    parser.add_argument("--methods", nargs="+", default=defaults.methods, choices=["contiguous", "metis"])
    for name in ("batch", "dim", "layers", "text_dim", "steps", "threads", "seed"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument("--budget-gib", type=float, default=defaults.budget_gib)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--kg", default=defaults.kg,
                        help="a real kg.txt measured too (default: the bundled MuSiQue; 'none': no real KG)")
    parser.add_argument("--json", help="also write every row as JSON here")
    args = parser.parse_args(argv)
    if args.kg in ("none", ""):
        args.kg = None
    cfg = Config(**{k: v for k, v in vars(args).items() if k != "json"})
    if cfg.device == "cuda" and cfg.procs > torch.cuda.device_count():
        parser.error(f"--procs {cfg.procs} needs as many GPUs, this machine has {torch.cuda.device_count()}")
    result = run(cfg)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


def test_scale_small():
    """A quick sweep (no assertion on time): partitioned peaks below the single process's."""
    cfg = Config(sizes=[3_000, 6_000], steps=1, dim=16, layers=3, text_dim=64, budget_gib=None, kg=None)
    result = run(cfg)
    single = {r["graph"]: r["peak_bytes"] for r in result["rows"] if r["procs"] == 1}
    for r in result["rows"]:
        if r["procs"] > 1:
            assert r["peak_bytes"] < single[r["graph"]]


if __name__ == "__main__":
    main()
