"""Folds a GPU-check folder into summary.json and prints the table of targets.

    python benchmarks/summarize.py OUTPUT_DIR [--quiet]

Reads what benchmarks/gpu_check.sh leaves there, whichever of it exists (the script runs this
after every step, so a check cut off by its deadline still has a summary of what it measured):
steps.tsv (each step's outcome), gpu.txt (the card), tests.xml (pytest's junit report),
memcheck.log, bench_*.json (rows of the pytest benchmarks, benchmarks/conftest.py),
train_step.json (rows of benchmarks/bench_train_step.py) and scale.json (bench_scale.py).

The targets are those of one H100 against the original GFM-RAG on the same graph: rel_aggregate
forward and backward (backward = forward_backward - forward) on the HotpotQA-sized graph at B = 8 and
B = 1 and on N 100k / E 1M at B = 8, uniform and real-shape ("skewed") graphs; bf16 at most half our
fp32 time; strict negative sampling and easy-edge removal; the fine-tune step's time and peak memory
in fp32 and bf16 and the pre-train step's time. rel_aggregate rows also get the bandwidth floor:
the minimum bytes (each input read once, each output written once) at 3.0 TB/s, the H100's
measured peak. --quiet writes summary.json only (no table, no plot).
"""

import glob
import json
import os
import sys
import xml.etree.ElementTree as ET

PEAK_BYTES_PER_S = 3.0e12
SHAPES = ("skewed", "uniform")
# case -> (forward ms, backward ms) on one H100; cases of bench_rel_aggregate.py.
REL_AGG_TARGETS_MS = {"hotpotqa-B8": (1.35, 2.2), "big-B8": (1.6, 2.5), "hotpotqa-B1": (0.2, 0.3)}
SAMPLING_TARGETS_MS = {
    "negative_sampling/hotpotqa-{shape}-B8-K256/cuda": ("strict negatives B 8 x 256", 0.2),
    "easy_edge_mask/hotpotqa-{shape}-B8x257/cuda": ("easy-edge removal B 8 x 257", 0.1),
}
# (kind, dtype) -> (step ms, peak GiB or None) of bench_train_step.py's CUDA rows (impl kernel, and
# kernel_node_major listed beside it where it ran).
TRAIN_STEP_TARGETS = {
    ("finetune", "float32"): (120.0, 16.0),
    ("finetune", "bfloat16"): (50.0, 12.0),
    ("pretrain", "float32"): (100.0, None),
}


def min_bytes(row, direction):
    """Bytes the op cannot avoid moving, in the row's dtype, with int32 graph arrays."""
    b, n, d, r, e = row["batch"], row["num_nodes"], row["dim"], row["num_relations"], row["num_edges"]
    size = 2 if "bfloat16" in row["dtype"] or "float16" in row["dtype"] else 4
    nodes, graph = b * n * d * size, (n + 1 + 3 * e) * 4
    rel = (b if row.get("per_query") else 1) * r * d * size
    forward = 2 * nodes + rel + graph  # read x, relation, CSR; write out
    # backward: read grad_out, x, relation, CSC + relation order; write grad_x, grad_relation
    backward = 3 * nodes + 2 * rel + 2 * graph
    return forward if direction == "forward" else forward + backward


def _read_json(path, default):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):  # absent, or cut off mid-write by a deadline
        return default


def read_steps(folder):
    steps = []
    path = os.path.join(folder, "steps.tsv")
    if os.path.exists(path):
        for number, line in enumerate(open(path), 1):
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 4:
                raise ValueError(f"{path}:{number}: expected 4 tab-separated fields, got {len(fields)}")
            name, outcome, seconds, note = fields
            steps.append({"step": name, "outcome": outcome, "seconds": int(seconds), "note": note})
    return steps


def read_tests(folder):
    path = os.path.join(folder, "tests.xml")
    if not os.path.exists(path):
        return None
    try:
        suite = ET.parse(path).getroot()
    except ET.ParseError:
        return None
    suite = suite if suite.tag == "testsuite" else suite[0]
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def read_memcheck(folder):
    """True: the sanitizer ran and found no error; False: it found some or the case failed; None:
    not run (no log, no sanitizer, or the CPU dry run)."""
    path = os.path.join(folder, "memcheck.log")
    if not os.path.exists(path):
        return None
    text = open(path).read()
    if "compute-sanitizer not found" in text or "COMPUTE-SANITIZER" not in text:
        return None
    return "ERROR SUMMARY: 0 errors" in text and "memcheck case ran" in text


def read_bench_rows(folder):
    rows = []
    for path in sorted(glob.glob(os.path.join(folder, "bench_*.json"))):
        rows += _read_json(path, [])
    for r in rows:
        if r["group"].startswith("rel_aggregate/") and r.get("device") == "cuda":
            direction = r["group"].rsplit("/", 1)[1]
            r["min_bytes"] = min_bytes(r, direction)
            r["gb_per_s"] = r["min_bytes"] / (r["median_ms"] * 1e-3) / 1e9
            r["fraction_of_floor"] = (r["min_bytes"] / PEAK_BYTES_PER_S * 1e3) / r["median_ms"]
    return rows


def _target(what, value, target, unit, card):
    met = None if value is None else value <= target
    return {"what": what, "value": value, "target": target, "unit": unit, "met": met, "card": card}


def targets(bench_rows, train_rows, card):
    """One row per target: our number (None when it did not run), the target, met or not."""
    kernel = {r["group"]: r["median_ms"] for r in bench_rows if r.get("impl") == "kernel"}

    def backward(group_prefix):
        fwd, both = kernel.get(group_prefix + "/forward"), kernel.get(group_prefix + "/forward_backward")
        return None if fwd is None or both is None else both - fwd

    out = []
    for case, (fwd_ms, bwd_ms) in REL_AGG_TARGETS_MS.items():
        for shape in SHAPES:
            prefix = f"rel_aggregate/{case}-{shape}/cuda"
            out.append(_target(f"rel_aggregate fwd fp32 {case} {shape}", kernel.get(prefix + "/forward"), fwd_ms,
                               "ms", card))
            out.append(_target(f"rel_aggregate bwd fp32 {case} {shape}", backward(prefix), bwd_ms, "ms", card))
    for case in REL_AGG_TARGETS_MS:
        for shape in SHAPES:
            fp32, bf16 = f"rel_aggregate/{case}-{shape}/cuda", f"rel_aggregate/{case}-{shape}-bf16/cuda"
            for direction, fp32_ms, bf16_ms in (
                ("fwd", kernel.get(fp32 + "/forward"), kernel.get(bf16 + "/forward")),
                ("bwd", backward(fp32), backward(bf16)),
            ):
                if fp32_ms is not None:  # the target is half of our own fp32 time
                    out.append(_target(f"rel_aggregate {direction} bf16 {case} {shape} (<= fp32 / 2)", bf16_ms,
                                       fp32_ms / 2, "ms", card))
    for pattern, (label, limit) in SAMPLING_TARGETS_MS.items():
        for shape in SHAPES:
            out.append(_target(f"{label} {shape}", kernel.get(pattern.format(shape=shape)), limit, "ms", card))
    for (kind, dtype), (limit_ms, limit_gib) in TRAIN_STEP_TARGETS.items():
        for impl, label in (("kernel", ""), ("kernel_node_major", " node major")):
            rows = [r for r in train_rows if r.get("device") == "cuda" and r.get("impl") == impl
                    and r.get("kind") == kind and r.get("dtype") == dtype and "hotpotqa" in r.get("case", "")]
            if not rows and impl != "kernel":
                continue  # the node-major variant is listed only where it ran
            for r in rows or [{"case": "hotpotqa-B8-6x512"}]:
                what = f"{kind} step {dtype} {r['case']}{label}"
                out.append(_target(what, r.get("step_ms"), limit_ms, "ms", card))
                if limit_gib is not None:
                    out.append(_target(what + " peak", r.get("peak_memory_gib"), limit_gib, "GiB", card))
    return out


def summarize(folder):
    card = open(os.path.join(folder, "gpu.txt")).read().strip() if os.path.exists(os.path.join(folder, "gpu.txt")) \
        else "unknown"
    bench_rows = read_bench_rows(folder)
    train_rows = _read_json(os.path.join(folder, "train_step.json"), [])
    scale = _read_json(os.path.join(folder, "scale.json"), None)
    return {
        "card": card,
        "steps": read_steps(folder),
        "tests": read_tests(folder),
        "memcheck_clean": read_memcheck(folder),
        "targets": targets(bench_rows, train_rows, card),
        "benchmarks": bench_rows,
        "train_step": train_rows,
        "scale": scale,
    }


def write(folder, summary):
    path = os.path.join(folder, "summary.json")
    with open(path + ".tmp", "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(path + ".tmp", path)  # never a half-written summary


def print_table(summary, out=sys.stdout):
    for s in summary["steps"]:
        print(f"step {s['outcome']:8s} {s['seconds']:4d} s  {s['step']}  ({s['note']})", file=out)
    print(f"tests: {summary['tests']}   memcheck clean: {summary['memcheck_clean']}", file=out)
    for r in summary["benchmarks"]:
        if r.get("impl") == "kernel" and "fraction_of_floor" in r:
            ratio = f"{r['speedup_vs_reference']:5.1f}x reference" if "speedup_vs_reference" in r else ""
            print(f"{r['group']:58s} {r['median_ms']:8.3f} ms {r['gb_per_s']:6.0f} GB/s "
                  f"{100 * r['fraction_of_floor']:5.1f}% of floor {ratio}", file=out)
    print(f"\n{'target (one H100; ours on the card named)':62s} {'ours':>9s} {'target':>8s} {'unit':4s} "
          f"{'result':8s} card", file=out)
    for t in summary["targets"]:
        value = "-" if t["value"] is None else f"{t['value']:.3f}"
        result = "not run" if t["met"] is None else ("pass" if t["met"] else "MISS")
        print(f"{t['what']:62s} {value:>9s} {t['target']:8.2f} {t['unit']:4s} {result:8s} {t['card']}", file=out)


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
            for shape in SHAPES:
                pts = sorted((r["num_edges"], r["median_ms"]) for r in rows
                             if r["impl"] == impl and r["group"].endswith(direction) and r.get("device") == "cuda"
                             and r.get("batch") == 8 and r.get("shape") == shape and not r.get("per_query")
                             and r.get("dtype") == "torch.float32" and not r.get("node_major"))
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"{impl} {direction} {shape}")
    if not ax.lines:
        plt.close(fig)
        return
    ax.set(xlabel="edges", ylabel="ms (median)", xscale="log", yscale="log",
           title="rel_aggregate, B = 8, d = 512, fp32, shared table")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv):
    args = [a for a in argv if a != "--quiet"]
    if len(args) > 1:
        sys.exit("usage: python benchmarks/summarize.py [OUTPUT_DIR] [--quiet]")
    folder = args[0] if args else os.environ.get("OUT", "gpu_check_out")
    if not os.path.isdir(folder):
        sys.exit(f"summarize: {folder} is not a folder")
    summary = summarize(folder)
    write(folder, summary)
    if "--quiet" not in argv:
        _plot(summary["benchmarks"], os.path.join(folder, "rel_aggregate.png"))
        print_table(summary)


if __name__ == "__main__":
    main(sys.argv[1:])
