"""Runs the emulated CUDA kernels against the CPU kernels, bit for bit (see README.md).

    python tools/cuda_emulator/build.py && python tools/cuda_emulator/check.py
"""

import itertools
import os
import sys

import torch

from gfmrag_fast.ops import RelGraph
from gfmrag_fast.ops.graph import DEFAULT_CHUNK_SIZE
from gfmrag_fast.synthetic import random_graph, real_shape_kg

HERE = os.path.dirname(os.path.abspath(__file__))

torch.ops.load_library(os.path.join(HERE, "build", "gfmrag_emu.so"))
cpu, emu = torch.ops.gfmrag_fast, torch.ops.gfmrag_emu

def same(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(torch.nan_to_num(a, 7.0, 8.0, 9.0), torch.nan_to_num(b, 7.0, 8.0, 9.0)) and torch.equal(a.isnan(), b.isnan())

fails = 0; count = 0
VEC_USED = {"vec": 0, "scalar": 0}
def misalign(t):
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    assert out.is_contiguous() and out.data_ptr() % 16 != 0
    return out

def expect_path(what, involved, D, dtype, extremum_aux=None):
    # what the kernel should have used: vector loads iff d % VEC == 0 and all pointers aligned
    v, sc, _, _ = emu.stats()
    VEC = 16 // torch.empty(0, dtype=dtype).element_size()
    aligned = all(t.data_ptr() % 16 == 0 for t in involved)
    VEC_USED["vec"] += v; VEC_USED["scalar"] += sc
    if v + sc == 0:
        return True
    if D % VEC == 0 and aligned:
        return sc == 0 and v > 0
    return v == 0

def check(B, N, E, R, D, dtype, message, aggregate, per_query, weighted, masked, seed=0, nan=False, shift=(),
          chunk=None, node_major=False, skewed=False):
    global fails, count
    count += 1
    g = torch.Generator().manual_seed(seed)
    if skewed:
        shaped = real_shape_kg(N, E // 2, R, seed=seed)
        graph = RelGraph(shaped.edge_index, shaped.edge_type, N, R, chunk_size=chunk or DEFAULT_CHUNK_SIZE)
    else:
        if N > 0 and E > 0:
            ei, et = random_graph(N, E, R, seed=seed)
        else:
            ei, et = torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        graph = RelGraph(ei, et, N, R, chunk_size=chunk or DEFAULT_CHUNK_SIZE)
    E = graph.num_edges
    x = torch.randn(B, N, D, generator=g).to(dtype)
    rel = torch.randn(*((B,) if per_query else ()), R, D, generator=g).to(dtype)
    if aggregate in ("max", "min") and message == "distmult" and N > 0 and D > 0:
        x[:, : N // 3] = x[:, : N // 3].round()  # more ties
    if nan and x.numel() > 3:
        x.view(-1)[3] = float("nan")
    w = torch.rand(E, generator=g).to(dtype) if weighted else None
    m = (torch.rand(E, generator=g) < 0.3) if masked else None
    go = torch.randn(B, N, D, generator=g).to(dtype)
    if node_major:
        x, go = x.transpose(0, 1).contiguous(), go.transpose(0, 1).contiguous()
    args = (graph.arrays, w, m, message, aggregate, node_major)
    oc, ac = cpu.rel_aggregate(x, rel, *args)
    xe = misalign(x) if "x" in shift and x.numel() else x
    re_ = misalign(rel) if "rel" in shift and rel.numel() else rel
    emu.stats()
    oe, ae = emu.rel_aggregate(xe, re_, *args)
    res = {"out": same(oc, oe), "aux": same(ac, ae)}
    res["fwd_path"] = expect_path("fwd", [xe, re_], D, dtype)
    goe = misalign(go) if "go" in shift and go.numel() else go
    ace = misalign(ac) if "aux" in shift and ac.numel() else ac
    ext = aggregate in ("max", "min")
    for name in ("rel_aggregate_backward_x", "rel_aggregate_backward_relation", "rel_aggregate_backward_edge_weight"):
        if name.endswith("weight") and not weighted:
            continue
        gc = getattr(cpu, name)(go, x, rel, ac, *args)
        ge = getattr(emu, name)(goe, xe, re_, ace, *args)
        if not name.endswith("weight"):
            res[name + "_path"] = expect_path(name, [xe, re_, goe] + ([ace] if ext else []), D, dtype)
        else:
            emu.stats()
        if name.endswith("weight"):
            tol = dict(rtol=1e-2, atol=1e-2) if dtype in (torch.half, torch.bfloat16) else dict(rtol=1e-5, atol=1e-5)
            ok = gc.shape == ge.shape and gc.dtype == ge.dtype and torch.allclose(gc.double(), ge.double(), equal_nan=True, **tol)
            if dtype in (torch.float32, torch.float64) and not same(gc, ge):
                res.setdefault("ew_not_bitwise", True)
        else:
            ok = same(gc, ge)
        res[name.split("_")[-1]] = ok
    bad = {k: v for k, v in res.items() if v is False}
    if bad:
        fails += 1
        print("FAIL", dict(B=B, N=N, E=E, R=R, D=D, dtype=dtype, message=message, aggregate=aggregate, per_query=per_query, weighted=weighted, masked=masked, nan=nan, chunk=chunk, node_major=node_major, skewed=skewed), bad)

dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# D = 8 with the graph's long rows cut into pieces of at most 4 edges (node 0 has 15 in-edges, each
# relation ~15 edges): both passes of every kernel; node major on alternate configurations.
for D in (5, 8):
    for i, (dtype, message, aggregate, per_query, weighted, masked) in enumerate(itertools.product(dtypes, ("distmult", "transe"), ("sum", "mean", "max", "min"), (False, True), (False, True), (False, True))):
        check(2, 13, 60, 4, D, dtype, message, aggregate, per_query, weighted, masked, chunk=4 if D == 8 else None,
              node_major=bool(i % 2))
print("main grid done", count, fails, flush=True)
# Skewed graphs (real_shape_kg: a synonym relation with 45 % of the triples, Zipf hub degrees) with
# small pieces, several pieces per row; B = 3, per-query and shared tables, both layouts.
for message, aggregate in itertools.product(("distmult", "transe"), ("sum", "mean", "max", "min")):
    for chunk, per_query, node_major in [(2, False, False), (5, True, True), (16, False, True), (None, True, False)]:
        check(3, 30, 240, 6, 8, torch.float32, message, aggregate, per_query, True, aggregate != "max", seed=chunk or 1,
              chunk=chunk, node_major=node_major, skewed=True)
    check(2, 30, 240, 6, 4, torch.bfloat16, message, aggregate, False, True, True, seed=2, chunk=3, skewed=True)
    check(2, 30, 240, 6, 3, torch.float64, message, aggregate, True, False, True, seed=3, chunk=7, skewed=True)
print("skewed grid done", count, fails, flush=True)
for message, aggregate in itertools.product(("distmult", "transe"), ("sum", "mean", "max", "min")):
    for (B, N, E, R, D) in [(0, 7, 20, 3, 4), (2, 7, 20, 3, 0), (2, 0, 0, 3, 4), (2, 7, 0, 3, 4), (1, 9, 30, 3, 33), (3, 5, 12, 2, 1), (2, 40, 300, 5, 70), (0, 7, 20, 3, 0)]:
        for per_query, weighted, masked in [(False, True, True), (True, True, False), (False, False, False)]:
            check(B, N, E, R, D, torch.float32, message, aggregate, per_query, weighted, masked, seed=B + N + D)
    check(2, 11, 50, 3, 6, torch.float32, message, aggregate, False, True, True, nan=True)
    check(2, 11, 50, 3, 6, torch.float64, message, aggregate, True, True, True, nan=True)
print("edge grid done", count, fails, flush=True)
# vector widths over several vectors per row, rows longer than 256 vectors (threads loop), and
# misaligned base pointers (each must fall back to VEC = 1 and still match)
for dtype in dtypes:
    for message, aggregate in itertools.product(("distmult", "transe"), ("sum", "mean", "max", "min")):
        for D in (16, 24, 48):
            check(3, 11, 45, 3, D, dtype, message, aggregate, aggregate in ("mean", "max"), True, aggregate != "sum", seed=D)
        for shift in (("x",), ("rel",), ("go",), ("aux",)):
            check(2, 11, 45, 3, 16, dtype, message, aggregate, message == "transe", True, True, seed=3, shift=shift)
for dtype, D in ((torch.float32, 1032), (torch.bfloat16, 2064), (torch.float32, 257), (torch.float64, 514)):
    for aggregate in ("sum", "max"):
        check(1, 5, 14, 2, D, dtype, "distmult", aggregate, aggregate == "max", True, False, seed=1)
print("vector grid done", count, fails, VEC_USED, flush=True)
# a grid smaller than the rows: the grid-stride loop
for cap in (1, 2, 3):
    emu.set_max_grid(cap)
    for dtype, D in ((torch.float32, 8), (torch.float32, 5), (torch.bfloat16, 2), (torch.float64, 70)):
        for aggregate in ("sum", "mean", "max", "min"):
            check(3, 17, 70, 3, D, dtype, "distmult", aggregate, aggregate == "min", True, True, seed=cap)
emu.set_max_grid(2**31 - 1)
print("grid-stride done", count, fails, flush=True)
# all-masked
check(2, 9, 30, 3, 4, torch.float32, "distmult", "mean", False, True, True, seed=5)
print("done", count, "fails", fails)
edge_fails = 0
# all edges masked, and B == 0 mean degrees
for agg in ("sum", "mean", "max", "min"):
    ei, et = random_graph(9, 30, 3, seed=1); graph = RelGraph(ei, et, 9, 3)
    for B in (0, 2):
        x = torch.randn(B, 9, 4); rel = torch.randn(3, 4); w = torch.rand(30); m = torch.ones(30, dtype=torch.bool)
        for mask in (m, None):
            oc, ac = cpu.rel_aggregate(x, rel, graph.arrays, w, mask, "distmult", agg)
            oe, ae = emu.rel_aggregate(x, rel, graph.arrays, w, mask, "distmult", agg)
            go = torch.randn_like(x)
            res = [same(oc, oe), same(ac, ae)] + [same(getattr(cpu, n)(go, x, rel, ac, graph.arrays, w, mask, "distmult", agg), getattr(emu, n)(go, x, rel, ac, graph.arrays, w, mask, "distmult", agg)) for n in ("rel_aggregate_backward_x", "rel_aggregate_backward_relation")]
            a_, b_ = (getattr(l, "rel_aggregate_backward_edge_weight")(go, x, rel, ac, graph.arrays, w, mask, "distmult", agg) for l in (cpu, emu))
            res.append(torch.allclose(a_, b_, rtol=1e-5, atol=1e-6))
            ok = all(res); print(res, (a_ - b_).abs().max().item() if a_.numel() else 0.0)
            edge_fails += not ok
            print("edge case", agg, B, mask is None, "ok" if ok else "FAIL", ac.tolist() if agg == "mean" else "")

# The balance report (gfmrag_fast.ops.balance) against the edge visits counted while the kernels
# run: per kernel, thread groups, the most visits of one group and all visits, on skewed graphs
# with small pieces (no mask: a masked edge's warp in the edge-weight gradient leaves early).
balance_fails = 0
for (N, T, R, chunk, seed), B, per_query, D in itertools.product(
        [(30, 120, 6, 3, 0), (60, 300, 8, 7, 1), (25, 90, 4, 128, 2)], (1, 3), (False, True), (4, 9)):
    shaped = real_shape_kg(N, T, R, seed=seed)
    graph = RelGraph(shaped.edge_index, shaped.edge_type, N, R, chunk_size=chunk)
    x, rel = torch.randn(N, B, D), torch.randn(*((B,) if per_query else ()), R, D)
    w, go = torch.rand(graph.num_edges), torch.randn(N, B, D)
    emu.visits(True)
    _, aux = emu.rel_aggregate(x, rel, graph.arrays, w, None, "distmult", "max", True)
    for name in ("rel_aggregate_backward_x", "rel_aggregate_backward_relation", "rel_aggregate_backward_edge_weight"):
        getattr(emu, name)(go, x, rel, aux, graph.arrays, w, None, "distmult", "max", True)
    counted = emu.visits(False)
    reported = cpu.rel_aggregate_balance(graph.arrays, B, per_query)[:, :3]
    if not torch.equal(counted, reported):
        balance_fails += 1
        print("FAIL balance", dict(N=N, T=T, R=R, chunk=chunk, B=B, per_query=per_query, D=D), counted.tolist(),
              reported.tolist())
print("balance done", flush=True)


# --- dense_tail: forward (out, stats) and backward (grad_h, grad_params) must match bit for bit:
# both kernels follow the row-sum order of csrc/dense_tail.h.
tail_count = tail_fails = 0


def check_tail(M, D, dtype, param_dtype, params, residual, seed=0, nan=False):
    global tail_count, tail_fails
    tail_count += 1
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(M, D, generator=g) * 3 + 0.5).to(dtype)
    x = torch.randn(M, D, generator=g).to(dtype) if residual else None
    bias, ln_weight, ln_bias = (torch.randn(D, generator=g).to(param_dtype) if name in params else None
                                for name in ("bias", "ln_weight", "ln_bias"))
    if nan and h.numel() > 5:
        h.view(-1)[5] = float("nan")
    go = torch.randn(M, D, generator=g).to(dtype)
    res = {}
    oc, sc = cpu.dense_tail_norm(h, x, bias, ln_weight, ln_bias, 1e-5)
    oe, se = emu.dense_tail_norm(h, x, bias, ln_weight, ln_bias, 1e-5)
    res["out"], res["stats"] = same(oc, oe), same(sc, se)
    # with the short cut, the backward also writes grad_out's copy (the short cut's gradient)
    gc, pc, cc = cpu.dense_tail_norm_backward(go, h, sc, bias, ln_weight, ln_bias, residual)
    ge, pe, ce = emu.dense_tail_norm_backward(go, h, sc, bias, ln_weight, ln_bias, residual)
    res["grad_h"], res["grad_params"], res["grad_out_copy"] = same(gc, ge), same(pc, pe), same(cc, ce)
    if residual:
        res["grad_out_copy == grad_out"] = same(ce, go)
    bad = [k for k, v in res.items() if not v]
    if bad:
        tail_fails += 1
        print("FAIL dense_tail", dict(M=M, D=D, dtype=dtype, param_dtype=param_dtype, params=params,
                                      residual=residual, nan=nan), bad)


PARAM_SETS = [("bias", "ln_weight", "ln_bias"), (), ("ln_weight",), ("bias", "ln_bias")]
for dtype in dtypes:
    for param_dtype in {dtype, torch.float32} if dtype in (torch.half, torch.bfloat16) else {dtype}:
        for params, residual in itertools.product(PARAM_SETS, (True, False)):
            for M, D in ((7, 5), (130, 64)):
                check_tail(M, D, dtype, param_dtype, params, residual, seed=M + D)
print("dense_tail grid done", tail_count, tail_fails, flush=True)
# widths through every channels-per-lane variant and their edges, chunk edges, empty inputs, NaNs
for D in (1, 31, 32, 33, 64, 65, 128, 129, 256, 300, 512, 513, 1024):
    check_tail(9, D, torch.float32, torch.float32, PARAM_SETS[0], True, seed=D)
for M in (0, 1, 63, 64, 65, 257):
    check_tail(M, 40, torch.float32, torch.float32, PARAM_SETS[0], M % 2 == 1, seed=M)
    check_tail(M, 40, torch.bfloat16, torch.float32, PARAM_SETS[0], True, seed=M)
# more chunks than one group (64 x 64 rows): the two-stage sum of the parameter gradients
check_tail(64 * 64 * 2 + 70, 3, torch.float32, torch.float32, PARAM_SETS[0], False, seed=4)
check_tail(20, 33, torch.float32, torch.float32, PARAM_SETS[0], True, nan=True)
check_tail(20, 33, torch.float64, torch.float64, PARAM_SETS[2], False, nan=True)
# a grid smaller than the rows and chunks: the grid-stride loops
for cap in (1, 2):
    emu.set_max_grid(cap)
    for M, D, dtype in ((300, 40, torch.float32), (270, 70, torch.float64), (9, 8, torch.half)):
        check_tail(M, D, dtype, dtype, PARAM_SETS[0], True, seed=cap)
emu.set_max_grid(2**31 - 1)
try:
    emu.dense_tail_norm(torch.randn(2, 1025), None, None, None, None, 1e-5)
    tail_fails += 1
    print("FAIL dense_tail: d = 1025 was not refused")
except ValueError as exc:
    assert "d_out <= 1024" in str(exc), exc
print("dense_tail done", tail_count, "fails", tail_fails, flush=True)

print(f"cuda emulator: {count} configurations, {fails} failed; all-masked and B = 0 cases: {edge_fails} failed; "
      f"balance report = counted visits: {balance_fails} failed; dense_tail: {tail_count} configurations, "
      f"{tail_fails} failed")

# --- csrc/cuda/triple_index_cuda.cu (check_triple_index.py)
import check_triple_index  # noqa: E402

triple_index_fails = check_triple_index.main()
sys.exit(1 if fails or edge_fails or balance_fails or tail_fails or triple_index_fails else 0)
