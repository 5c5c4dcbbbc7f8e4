"""Collects benchmark medians and prints each implementation's speed as a ratio to the baseline
measured in the same run. Set GFMRAG_BENCH_JSON=path to also write the table as JSON."""

import json
import os

import pytest

RESULTS = {}  # (group, impl) -> {"median_ms": ..., ...}
BASELINE = "reference"


@pytest.fixture
def record(benchmark):
    def _record(group, impl, **info):
        stats = benchmark.stats.stats
        RESULTS[(group, impl)] = {"median_ms": stats.median * 1e3, "min_ms": stats.min * 1e3, **info}

    return _record


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    rows = []
    for (group, impl), res in sorted(RESULTS.items()):
        base = RESULTS.get((group, BASELINE))
        res = dict(res, group=group, impl=impl)
        if base is not None:
            res["speedup_vs_reference"] = base["median_ms"] / res["median_ms"]
        rows.append(res)
    tr = terminalreporter
    tr.write_sep("=", "gfmrag_fast benchmark ratios (same run, same machine)")
    tr.write_line(f"{'group':58s} {'impl':12s} {'median ms':>10s} {'x reference':>12s}")
    for r in rows:
        ratio = f"{r['speedup_vs_reference']:.1f}x" if "speedup_vs_reference" in r else "-"
        tr.write_line(f"{r['group']:58s} {r['impl']:12s} {r['median_ms']:10.2f} {ratio:>12s}")
    path = os.environ.get("GFMRAG_BENCH_JSON")
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)
        tr.write_line(f"wrote {path}")
