"""Collects benchmark medians and prints each implementation's speed as a ratio to the baseline
measured in the same run. Set GFMRAG_BENCH_JSON=path to also write the table as JSON.

Every benchmark runs with the allocator setting the workflows use
(:func:`gfmrag_fast.runtime.configure_allocator`: large blocks stay with the process instead of being
unmapped and page-faulted in anew on every call), so that the times are those of training, not of
the page faults; ``GFMRAG_FAST_MALLOC=system`` measures without it."""

import json
import os

import pytest
import torch

from gfmrag_fast.runtime import configure_allocator



@pytest.fixture(scope="session", autouse=True)
def _training_allocator():
    configure_allocator()


RESULTS = {}  # (group, impl) -> {"median_ms": ..., ...}
BASELINE = "reference"


@pytest.fixture
def record(benchmark):
    def _record(group, impl, **info):
        stats = benchmark.stats.stats
        RESULTS[(group, impl)] = {"median_ms": stats.median * 1e3, "min_ms": stats.min * 1e3, **info}
        _write_json(_rows())  # after every case, so a run stopped by a time limit keeps its results

    return _record


@pytest.fixture
def measure(benchmark, record):
    """Times ``fn`` (waiting for the GPU after each call), then records its median, with the peak
    GPU memory on CUDA; a case that runs out of GPU memory is skipped, not failed."""

    def _measure(fn, group, impl, device, rounds, warmup_rounds=1, **info):
        def run():
            fn()
            if device == "cuda":
                torch.cuda.synchronize()

        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            benchmark.pedantic(run, rounds=rounds, warmup_rounds=warmup_rounds)
        except torch.OutOfMemoryError:
            pytest.skip(f"{group} {impl}: does not fit in this GPU's memory")
        if device == "cuda":
            info["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        record(group, impl, device=device, **info)

    return _measure


def _rows():
    rows = []
    for (group, impl), res in sorted(RESULTS.items()):
        base = RESULTS.get((group, BASELINE))
        res = dict(res, group=group, impl=impl)
        if base is not None:
            res["speedup_vs_reference"] = base["median_ms"] / res["median_ms"]
        if "floor_ms" in res:  # a copy-bandwidth floor measured beside it (bench_rel_aggregate.py)
            res["times_floor"] = res["median_ms"] / res["floor_ms"]
        rows.append(res)
    return rows


def _write_json(rows):
    path = os.environ.get("GFMRAG_BENCH_JSON")
    if path:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(tmp, path)


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    rows = _rows()
    tr = terminalreporter
    tr.write_sep("=", "gfmrag_fast benchmark ratios (same run, same machine)")
    tr.write_line(f"{'group':58s} {'impl':12s} {'median ms':>10s} {'x reference':>12s} {'x floor':>8s}")
    for r in rows:
        ratio = f"{r['speedup_vs_reference']:.1f}x" if "speedup_vs_reference" in r else "-"
        floor = f"{r['times_floor']:.1f}x" if "times_floor" in r else "-"
        tr.write_line(f"{r['group']:58s} {r['impl']:12s} {r['median_ms']:10.2f} {ratio:>12s} {floor:>8s}")
    if os.environ.get("GFMRAG_BENCH_JSON"):
        _write_json(rows)
        tr.write_line(f"wrote {os.environ['GFMRAG_BENCH_JSON']}")
