"""The step benchmark's reporting (benchmarks/bench_train_step.py): the free-tail ceiling."""

import importlib.util
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def bench(monkeypatch):
    # The module sets OMP_WAIT_POLICY when imported (as the workflows do); monkeypatch puts it back.
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    spec = importlib.util.spec_from_file_location("bench_train_step", os.path.join(REPO, "benchmarks", "bench_train_step.py"))
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_train_step", module)  # its dataclasses look it up there
    spec.loader.exec_module(module)
    return module


def _row(bench, impl, step_ms, tail_fwd, tail_bwd, rest):
    breakdown = dict.fromkeys(bench.CATEGORIES, 0.0)
    breakdown.update({"dense tail fwd": tail_fwd, "dense tail bwd": tail_bwd, "matmuls": rest})
    breakdown["total"] = tail_fwd + tail_bwd + rest
    return {"case": "c", "kind": "pretrain", "dtype": "float32", "impl": impl, "step_ms": step_ms,
            "breakdown_ms": breakdown}


def test_free_tail_ceiling(bench, capsys):
    rows = [_row(bench, "kernel", 800.0, 50.0, 50.0, 700.0), _row(bench, "plain_tail", 1000.0, 150.0, 100.0, 750.0),
            _row(bench, "reference", 3000.0, 150.0, 100.0, 2750.0)]
    bench.add_ceilings(rows)
    kernel, plain, reference = rows
    assert plain["tail_share"] == pytest.approx(0.25)
    assert plain["free_tail_ceiling"] == pytest.approx(1 / 0.75)
    assert kernel["tail_share"] == pytest.approx(100 / 800) and "free_tail_ceiling" not in kernel
    assert "tail_share" not in reference
    bench.print_ratios(rows)
    out = capsys.readouterr().out
    assert "plain_tail / kernel = 1.25x" in out and "reference / kernel = 3.75x" in out
    assert "25 % of the plain_tail step, 12 % of the kernel step" in out and "free tail: 1.33x" in out


@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
@pytest.mark.parametrize("impl", ["kernel", "plain_tail"])
def test_breakdown_finds_every_part_of_a_step(bench, kind, impl):
    # Each part of the model the breakdown names must be found in the profile (the aggregation
    # once went uncounted when the layers stopped calling the function it wrapped).
    case = next(c for c in bench.CASES if c.name == "cpu-N20k").shrunk(100)
    totals = bench.profile_step(bench.make_step(case, kind, impl, "float32"), "cpu")
    for part in ("matmuls", "aggregation fwd", "aggregation bwd", "dense tail fwd", "dense tail bwd", "optimizer"):
        assert totals[part] > 0, (part, totals)
