"""Folds a GPU-check folder (bench.json, tests.xml, memcheck.log) into summary.json and a plot.

    python benchmarks/summarize.py OUTPUT_DIR

For rel_aggregate rows it adds the bandwidth floor: the minimum bytes (each input read once,
each output written once) over the peak bandwidth measured on the H100 here (3.0 TB/s).
"""

import json
import os
import sys
import xml.etree.ElementTree as ET

PEAK_BYTES_PER_S = 3.0e12
# DESIGN §4 / issue targets, ms on one H100, fp32: group -> limit
# The rel_aggregate targets hold for both graph shapes (bench_rel_aggregate.py: uniform, skewed).
REL_AGG_FORWARD_TARGETS_MS = {"hotpotqa-B8": 1.35, "big-B8": 1.6, "hotpotqa-B1": 0.2}
TARGETS_MS = {
    **{f"rel_aggregate/{case}-{shape}/cuda/forward": ms
       for case, ms in REL_AGG_FORWARD_TARGETS_MS.items() for shape in ("uniform", "skewed")},
    **{f"negative_sampling/hotpotqa-{shape}-B8-K256/cuda": 0.2 for shape in ("uniform", "skewed")},
    **{f"easy_edge_mask/hotpotqa-{shape}-B8x257/cuda": 0.1 for shape in ("uniform", "skewed")},
    "train_step/finetune/hotpotqa-B8-6x512/cuda/float32": 120.0,
    "train_step/finetune/hotpotqa-B8-6x512/cuda/bfloat16": 50.0,
    "train_step/pretrain/hotpotqa-B8-6x512/cuda/float32": 100.0,
}
MEMORY_TARGETS_GIB = {
    "train_step/finetune/hotpotqa-B8-6x512/cuda/float32": 16.0,
    "train_step/finetune/hotpotqa-B8-6x512/cuda/bfloat16": 12.0,
}
# Backward targets apply to forward_backward minus forward.
BACKWARD_TARGETS_MS = {"hotpotqa-B8": 2.2, "big-B8": 2.5, "hotpotqa-B1": 0.3}


def min_bytes(row, direction):
    """Bytes the op cannot avoid moving, fp32 (4 bytes) and int32 graph arrays."""
    b, n, d, r, e = row["batch"], row["num_nodes"], row["dim"], row["num_relations"], row["num_edges"]
    size = 2 if "bfloat16" in row["dtype"] or "float16" in row["dtype"] else 4
    nodes, graph = b * n * d * size, (n + 1 + 3 * e) * 4
    rel = (b if row.get("per_query") else 1) * r * d * size
    forward = 2 * nodes + rel + graph  # read x, relation, CSR; write out
    # backward: read grad_out, x, relation, CSC + relation order; write grad_x, grad_relation
    backward = 3 * nodes + 2 * rel + 2 * graph
    return forward if direction == "forward" else forward + backward


def main(folder):
    summary = {"tests": None, "memcheck": None, "benchmarks": [], "targets": []}
    junit = os.path.join(folder, "tests.xml")
    if os.path.exists(junit):
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        summary["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    memcheck = os.path.join(folder, "memcheck.log")
    if os.path.exists(memcheck):
        text = open(memcheck).read()
        summary["memcheck"] = None if "compute-sanitizer not found" in text else "ERROR SUMMARY: 0 errors" in text
    rows = json.load(open(os.path.join(folder, "bench.json"))) if os.path.exists(os.path.join(folder, "bench.json")) else []
    by_group = {(r["group"], r["impl"]): r for r in rows}
    for r in rows:
        if r["group"].startswith("rel_aggregate/") and r.get("device") == "cuda":
            direction = r["group"].rsplit("/", 1)[1]
            r["min_bytes"] = min_bytes(r, direction)
            r["gb_per_s"] = r["min_bytes"] / (r["median_ms"] * 1e-3) / 1e9
            r["fraction_of_floor"] = (r["min_bytes"] / PEAK_BYTES_PER_S * 1e3) / r["median_ms"]
        summary["benchmarks"].append(r)
    for group, limit in TARGETS_MS.items():
        row = by_group.get((group, "kernel"))
        if row:
            summary["targets"].append({"what": group, "ms": row["median_ms"], "target_ms": limit, "met": row["median_ms"] <= limit})
    for group, limit in MEMORY_TARGETS_GIB.items():
        row = by_group.get((group, "kernel"))
        if row and "peak_memory_gib" in row:
            summary["targets"].append({"what": group + " peak GiB", "ms": row["peak_memory_gib"], "target_ms": limit,
                                       "met": row["peak_memory_gib"] <= limit})
    for case, limit in [(f"{c}-{shape}", ms) for c, ms in BACKWARD_TARGETS_MS.items() for shape in ("uniform", "skewed")]:
        fwd = by_group.get((f"rel_aggregate/{case}/cuda/forward", "kernel"))
        both = by_group.get((f"rel_aggregate/{case}/cuda/forward_backward", "kernel"))
        if fwd and both:
            ms = both["median_ms"] - fwd["median_ms"]
            summary["targets"].append({"what": f"rel_aggregate/{case}/cuda/backward", "ms": ms, "target_ms": limit, "met": ms <= limit})
    with open(os.path.join(folder, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    _plot(rows, os.path.join(folder, "rel_aggregate.png"))

    print(f"tests: {summary['tests']}   memcheck clean: {summary['memcheck']}")
    print(f"{'what (ms unless GiB)':52s} {'value':>9s} {'target':>8s}  met")
    for t in summary["targets"]:
        print(f"{t['what']:52s} {t['ms']:9.3f} {t['target_ms']:8.2f}  {'yes' if t['met'] else 'NO'}")
    for r in rows:
        if "fraction_of_floor" in r and r["impl"] == "kernel":
            print(f"{r['group']:52s} {r['median_ms']:9.3f} ms  {r['gb_per_s']:7.0f} GB/s  {100 * r['fraction_of_floor']:5.1f}% of floor")


def _plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for impl in sorted({r["impl"] for r in rows if r["group"].startswith("rel_aggregate/")}):
        for direction in ("forward", "forward_backward"):
            for shape in ("uniform", "skewed"):
                pts = sorted((r["num_edges"], r["median_ms"]) for r in rows
                             if r["impl"] == impl and r["group"].endswith(direction) and r.get("device") == "cuda"
                             and r.get("batch") == 8 and r.get("shape") == shape and not r.get("per_query")
                             and r.get("dtype") == "torch.float32")
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"{impl} {direction} {shape}")
    ax.set(xlabel="edges", ylabel="ms (median)", xscale="log", yscale="log", title="rel_aggregate, B = 8, d = 512, fp32, shared table")
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", "gpu_check_out"))
