"""Hostile input to the ops: crafted graph and index arrays (never a crash), checks remembered
only while the arrays are unchanged, graphs that own their tensors, second derivatives that fail
loudly, id checks."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from gfmrag_fast.ops import (
    AGGREGATES,
    MESSAGES,
    RelGraph,
    TripleIndex,
    easy_edge_mask,
    negative_sampling,
    rel_aggregate,
    rel_aggregate_reference,
    triple_index,
)
from gfmrag_fast.synthetic import random_graph

from helpers import DEVICES

ops = torch.ops.gfmrag_fast
N, E, R = 40, 300, 10  # graph of the crafted cases (R even: the triple ops need direct + inverse)
FIELDS = RelGraph.FIELDS
INDEX_FIELDS = ("keys", "unique_ptr", "unique_values", "all_ptr", "all_values", "all_eids")


def _graph(device="cpu"):
    # Rows longer than 16 edges (the hub node 0, every relation) are cut into pieces: the plan's
    # arrays are not empty, so they can be crafted too.
    edge_index, edge_type = random_graph(N, E, R, seed=3)
    return RelGraph(edge_index, edge_type, N, R, chunk_size=16).to(device)


def _decrease(ptr):
    ptr[3] = ptr[-1]  # ptr[3] > ptr[4]: offsets that go back


def _decrease_at_end(ptr):
    ptr[-2] = ptr[-1] + 3  # the piece offsets of the hub node 0 stay; the last row's go back


# (case, op, array, change, message) for crafted arrays; `array` names the field changed in a
# copy of a valid graph's (or triple index's) arrays, `change` changes it in place or returns a
# replacement. `<op>_after_check` calls the op on the valid copy first (so its check is
# remembered) and then writes to it; `wrapper_written` does the same through the public function
# and the RelGraph's (TripleIndex's) own arrays. The error must be a ValueError naming the array.
GRAPH_CASES = [
    ("source id 10**9", "forward", "dst_src", lambda a: a.__setitem__(5, 10**9), "dst_src"),
    ("offset past E", "forward", "dst_ptr", lambda a: a.__setitem__(-1, E + 5), "dst_ptr"),
    ("offsets decrease", "forward", "dst_ptr", _decrease, "dst_ptr"),
    ("negative first offset", "forward", "dst_ptr", lambda a: a.__setitem__(0, -1), "dst_ptr"),
    ("relation id R", "forward", "dst_type", lambda a: a.__setitem__(0, R), "dst_type"),
    ("edge id E", "forward_max", "dst_eid", lambda a: a.__setitem__(0, E), "dst_eid"),
    ("negative destination", "backward_x", "src_dst", lambda a: a.__setitem__(0, -1), "src_dst"),
    ("CSC offset past E", "backward_x", "src_ptr", lambda a: a.__setitem__(-1, 10**6), "src_ptr"),
    ("CSC relation 10**9", "backward_x", "src_type", lambda a: a.__setitem__(0, 10**9), "src_type"),
    ("CSC edge id -7", "backward_x", "src_eid", lambda a: a.__setitem__(0, -7), "src_eid"),
    ("relation offsets decrease", "backward_relation", "rel_ptr", _decrease, "rel_ptr"),
    ("relation-order edge id", "backward_relation", "rel_eid", lambda a: a.__setitem__(0, 10**9), "rel_eid"),
    ("edge source 10**9", "backward_edge_weight", "edge_src", lambda a: a.__setitem__(0, 10**9), "edge_src"),
    ("edge destination -1", "backward_edge_weight", "edge_dst", lambda a: a.__setitem__(0, -1), "edge_dst"),
    ("edge relation R", "backward_edge_weight", "edge_type32", lambda a: a.__setitem__(0, R), "edge_type"),
    ("short dst_type", "forward", "dst_type", lambda a: a[:-1].clone(), "dst_type"),
    ("short dst_ptr", "forward", "dst_ptr", lambda a: a[:-1].clone(), "dst_ptr"),
    ("short src_ptr", "backward_x", "src_ptr", lambda a: a[:-1].clone(), "src_ptr"),
    ("relation-order source 10**9", "backward_relation", "rel_src", lambda a: a.__setitem__(0, 10**9), "rel_src"),
    ("relation-order destination -1", "backward_relation", "rel_dst", lambda a: a.__setitem__(0, -1), "rel_dst"),
    ("piece begin 10**9", "forward", "dst_piece_begin", lambda a: a.__setitem__(0, 10**9), "dst_piece_begin"),
    ("piece end -1", "forward_max", "dst_piece_end", lambda a: a.__setitem__(0, -1), "dst_piece_end"),
    ("piece end past E", "backward_relation", "rel_piece_end", lambda a: a.__setitem__(0, E + 1), "rel_piece_end"),
    ("piece offsets decrease", "forward_max", "dst_piece_ptr", _decrease_at_end, "dst_piece_ptr"),
    ("piece offsets past the pieces", "backward_relation", "rel_piece_ptr", lambda a: a.__setitem__(-1, 10**6),
     "rel_piece_ptr"),
    ("short piece_end", "forward", "dst_piece_end", lambda a: a[:-1].clone(), "dst_piece_end"),
    ("short piece_ptr", "backward_x", "src_piece_ptr", lambda a: a[:-1].clone(), "src_piece_ptr"),
    ("checked plan, then a piece written", "backward_relation_after_check", "rel_piece_begin",
     lambda a: a.__setitem__(0, -5), "rel_piece_begin"),
    ("checked arrays, then source written", "forward_after_check", "dst_src", lambda a: a.__setitem__(5, 10**9),
     "dst_src"),
    ("checked arrays, then offsets written", "backward_x_after_check", "src_ptr", _decrease, "src_ptr"),
    ("a RelGraph's array written", "wrapper_written", "dst_src", lambda a: a.__setitem__(5, 10**9), "dst_src"),
]
INDEX_CASES = [
    ("edge id 10**9", "easy_edge_mask", "all_eids", lambda a: a.__setitem__(0, 10**9), "all_eids"),
    ("negative edge id", "easy_edge_mask", "all_eids", lambda a: a.__setitem__(0, -1), "all_eids"),
    ("offset past the edges", "easy_edge_mask", "all_ptr", lambda a: a.__setitem__(-1, 10**9), "all_ptr"),
    ("edge offsets decrease", "easy_edge_mask", "all_ptr", _decrease, "all_ptr"),
    ("short all_values", "easy_edge_mask", "all_values", lambda a: a[:-1].clone(), "all_values"),
    ("offset 10**9", "negative_sampling", "unique_ptr", lambda a: a.__setitem__(1, 10**9), "unique_ptr"),
    ("offsets decrease", "negative_sampling", "unique_ptr", _decrease, "unique_ptr"),
    ("short unique_values", "negative_sampling", "unique_values", lambda a: a[:-1].clone(), "unique_ptr"),
    ("negative node id", "negative_sampling", "unique_values", lambda a: a.__setitem__(0, -5), "unique_values"),
    ("checked arrays, then written", "easy_edge_mask_after_check", "all_eids", lambda a: a.__setitem__(0, 10**9),
     "all_eids"),
    ("a TripleIndex's array written", "wrapper_written", "all_eids", lambda a: a.__setitem__(0, 10**9), "all_eids"),
]


def _run_graph_case(op, field, change, device):
    graph = _graph(device)
    gen = torch.Generator().manual_seed(0)
    x, relation, weight = torch.randn(2, N, 4, generator=gen), torch.randn(R, 4, generator=gen), torch.rand(E)
    mask = torch.rand(E, generator=gen) < 0.2
    x, relation, weight, mask = (t.to(device) for t in (x, relation, weight, mask))
    aggregate = "max" if op == "forward_max" else "mean"
    _, aux = ops.rel_aggregate(x, relation, graph.arrays, weight, mask, "distmult", aggregate)
    i = FIELDS.index(field)
    if op == "wrapper_written":
        rel_aggregate(x, relation, graph, weight, mask, aggregate=aggregate)
        change(graph.arrays[i])  # in place, on the graph's own array, after a checked call
        return rel_aggregate(x, relation, graph, weight, mask, aggregate=aggregate)
    arrays = [a.clone() for a in graph.arrays]
    grad_out = torch.randn(2, N, 4, generator=gen).to(device)

    def call():
        if op.startswith("forward"):
            return ops.rel_aggregate(x, relation, arrays, weight, mask, "distmult", aggregate)
        name = op.removesuffix("_after_check")
        return getattr(ops, f"rel_aggregate_{name}")(grad_out, x, relation, aux, arrays, weight, mask, "transe",
                                                     aggregate)

    if op.endswith("_after_check"):
        call()  # valid: checked and remembered; the write below must void that
    replaced = change(arrays[i])
    arrays[i] = arrays[i] if replaced is None else replaced
    return call()


def _run_index_case(op, field, change, device):
    graph = _graph(device)
    index = triple_index(graph)
    triples = torch.stack([graph.edge_index[0, :8], graph.edge_index[1, :8], graph.edge_type[:8] % (R // 2)], 1)
    i = INDEX_FIELDS.index(field)
    if op == "wrapper_written":
        easy_edge_mask(graph, triples)
        change(index.arrays[i])  # in place, on the index's own array, after a checked call
        return easy_edge_mask(graph, triples)
    arrays = [a.clone() for a in index.arrays]

    def call():
        if op.startswith("easy_edge_mask"):
            return ops.easy_edge_mask(triples, arrays, E, R)
        return ops.negative_sampling(triples, arrays, N, R, 16, True, torch.ones((), dtype=torch.long, device=device))

    if op.endswith("_after_check"):
        call()
    replaced = change(arrays[i])
    arrays[i] = arrays[i] if replaced is None else replaced
    return call()


def _crafted_main(device):
    """Runs every crafted case in this process; one line per case: name, error type, message."""
    for kind, cases, run in (("graph", GRAPH_CASES, _run_graph_case), ("index", INDEX_CASES, _run_index_case)):
        for name, op, field, change, _ in cases:
            print(f"{kind}:{name}", end="\t", flush=True)
            try:
                run(op, field, change, device)
                if device == "cuda":
                    torch.cuda.synchronize()  # an illegal access would surface here
                print("no error", flush=True)
            except Exception as exc:  # noqa: BLE001  (the type is what the test checks)
                print(type(exc).__name__, str(exc).splitlines()[0], sep="\t", flush=True)


_CRAFTED_RESULTS = {}


def _crafted_results(device):
    # A crafted array used to crash the process (SIGSEGV): run the cases in a child process, once
    # per device, so that a crash fails the tests instead of killing the test run.
    if device not in _CRAFTED_RESULTS:
        proc = subprocess.run([sys.executable, __file__, "crafted", device], capture_output=True, text=True,
                              timeout=600)
        results = dict(line.split("\t", 1) for line in proc.stdout.splitlines() if "\t" in line)
        _CRAFTED_RESULTS[device] = proc, results
    return _CRAFTED_RESULTS[device]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,case", [("graph", c) for c in GRAPH_CASES] + [("index", c) for c in INDEX_CASES],
                         ids=lambda c: c if isinstance(c, str) else f"{c[1]}-{c[0]}")
def test_crafted_arrays_raise_value_error_naming_the_array(device, kind, case):
    proc, results = _crafted_results(device)
    name, op, _, _, expected = case
    key = f"{kind}:{name}"
    assert proc.returncode == 0, (
        f"the child process died (return code {proc.returncode}) after {list(results)[-1:]}:\n{proc.stderr[-2000:]}"
    )
    assert key in results, f"{key} did not run:\n{proc.stdout[-2000:]}"
    error, _, message = results[key].partition("\t")
    assert error == "ValueError", f"{key} ({op}): {results[key]}"
    assert expected in message, f"{key} ({op}): {message}"


def _plan_in_range_but_wrong(arrays):
    """Plans whose values pass the check (offsets monotone, positions in [0, E]) but describe
    nothing RelGraph would build: the kernels must still stay in bounds."""
    fields = dict(zip(FIELDS, arrays))
    for name, rows in (("dst", N), ("src", N), ("rel", R)):
        pieces = fields[f"{name}_piece_begin"].numel()
        yield f"{name}: every piece spans all edges", {f"{name}_piece_begin": torch.zeros(pieces, dtype=torch.int32),
                                                     f"{name}_piece_end": torch.full((pieces,), E, dtype=torch.int32)}
        yield f"{name}: pieces run backwards", {f"{name}_piece_begin": torch.full((pieces,), E, dtype=torch.int32),
                                               f"{name}_piece_end": torch.zeros(pieces, dtype=torch.int32)}
        every_row_split = torch.full((rows + 1,), pieces, dtype=torch.int32)
        every_row_split[0] = 0
        yield f"{name}: the first row owns every piece", {f"{name}_piece_ptr": every_row_split}
        yield f"{name}: no row is split", {f"{name}_piece_ptr": torch.zeros(rows + 1, dtype=torch.int32),
                                          f"{name}_piece_begin": torch.zeros(0, dtype=torch.int32),
                                          f"{name}_piece_end": torch.zeros(0, dtype=torch.int32)}


@pytest.mark.parametrize("node_major", [False, True])
def test_plans_in_range_but_wrong_never_leave_bounds(node_major):
    graph = _graph()
    gen = torch.Generator().manual_seed(0)
    x, relation = torch.randn(2, N, 4, generator=gen), torch.randn(2, R, 4, generator=gen)
    weight, mask = torch.rand(E, generator=gen), torch.rand(E, generator=gen) < 0.2
    if node_major:
        x = x.transpose(0, 1).contiguous()
    for name, change in _plan_in_range_but_wrong(graph.arrays):
        arrays = [change.get(field, a.clone()) for field, a in zip(FIELDS, graph.arrays)]
        for aggregate in ("mean", "max"):
            out, aux = ops.rel_aggregate(x, relation, arrays, weight, mask, "distmult", aggregate, node_major)
            assert out.shape == x.shape, name
            for op in ("rel_aggregate_backward_x", "rel_aggregate_backward_relation",
                       "rel_aggregate_backward_edge_weight"):
                getattr(ops, op)(torch.ones_like(out), x, relation, aux, arrays, weight, mask, "distmult", aggregate,
                                 node_major)


def test_checked_arrays_skip_the_value_check():
    # A write through .data bypasses the version counter, so the ops still recognise the arrays
    # they checked and trust them (that is the point of remembering), while a copy is checked.
    # The change is harmless to the kernels: node N - 1 has no in-edge, and its empty row
    # [dst_ptr[N - 1], dst_ptr[N]) stays empty when dst_ptr[N] decreases.
    graph = _graph()
    x, relation = torch.randn(2, N, 4, requires_grad=True), torch.randn(R, 4, requires_grad=True)
    weight = torch.rand(E, requires_grad=True)
    rel_aggregate(x, relation, graph, weight).sum().backward()  # checked, remembered
    dst_ptr = graph.arrays[0]
    assert dst_ptr[-2] == dst_ptr[-1] == E
    dst_ptr.data[-1] -= 1
    # Recognised in the forward and in the three backward ops (autograd saves the same tensors).
    rel_aggregate(x, relation, graph, weight).sum().backward()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def compiled(x, relation, weight):
        return rel_aggregate(x, relation, graph, weight).sum()

    compiled(x, relation, weight).backward()  # and under torch.compile
    copies = [a.clone() for a in graph.arrays]
    with pytest.raises(ValueError, match=r"graph array dst_ptr holds offsets that decrease"):
        ops.rel_aggregate(x.detach(), relation.detach(), copies, None, None, "distmult", "sum")


def test_graphs_under_torch_compile_do_not_recompile_per_graph():
    # Nothing graph-specific reaches the op but the arrays: alternating graphs (several datasets)
    # compile once static, once dynamic, not once per graph.
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    graphs = []
    for seed in range(5):
        edge_index, edge_type = random_graph(20 + 5 * seed, 60 + seed, 4, seed=seed)
        graphs.append(RelGraph(edge_index, edge_type, 20 + 5 * seed, 4))

    @torch.compile(backend="aot_eager")
    def step(x, relation, graph):
        return rel_aggregate(x, relation, graph).sum()

    for _ in range(2):
        for graph in graphs:
            step(torch.randn(2, graph.num_nodes, 8, requires_grad=True), torch.randn(4, 8), graph).backward()
    assert counters["stats"]["unique_graphs"] <= 2
    torch._dynamo.reset()


def test_graph_built_under_inference_mode_has_normal_tensors():
    edge_index, edge_type = random_graph(N, E, R, seed=3)
    with torch.inference_mode():
        graph = RelGraph(edge_index, edge_type, N, R)
        index = triple_index(graph)
    assert not any(a.is_inference() for a in graph.arrays + index.arrays)
    x, relation = torch.randn(2, N, 4), torch.randn(R, 4)
    torch.testing.assert_close(rel_aggregate(x, relation, graph), rel_aggregate_reference(x, relation, graph))
    # Inference tensors have no version counter: their check is never remembered.
    with torch.inference_mode():
        frozen = [a.clone() for a in graph.arrays]
        ops.rel_aggregate(x, relation, frozen, None, None, "distmult", "sum")
        frozen[0][-1] -= 1  # no version bump
        with pytest.raises(ValueError, match="graph array dst_ptr holds offsets that decrease"):
            ops.rel_aggregate(x, relation, frozen, None, None, "distmult", "sum")


# --- RelGraph owns its tensors ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_relgraph_copies_the_callers_tensors(dtype):
    edge_index, edge_type = random_graph(N, E, R, seed=5)
    edge_index, edge_type = edge_index.to(dtype), edge_type.to(dtype)
    graph = RelGraph(edge_index, edge_type, N, R)
    kept_index, kept_type = edge_index.long().clone(), edge_type.long().clone()
    x, relation = torch.randn(2, N, 4), torch.randn(R, 4)
    expected = rel_aggregate(x, relation, graph)
    answers = TripleIndex.of(graph).answer_mask(torch.arange(N), torch.zeros(N, dtype=torch.long))

    edge_index[0].fill_(1)  # every edge now points at node 1, with relation 0
    edge_index[1] = torch.arange(E) % N
    edge_type.zero_()

    assert torch.equal(graph.edge_index, kept_index) and torch.equal(graph.edge_type, kept_type)
    torch.testing.assert_close(rel_aggregate_reference(x, relation, graph), expected)
    assert torch.equal(rel_aggregate(x, relation, graph), expected)
    assert torch.equal(TripleIndex.of(graph).answer_mask(torch.arange(N), torch.zeros(N, dtype=torch.long)), answers)


# --- second derivatives -------------------------------------------------------------------------


@pytest.mark.parametrize("message", MESSAGES)
@pytest.mark.parametrize("aggregate", AGGREGATES)
@pytest.mark.parametrize("per_query", [False, True])
def test_double_backward_raises_on_every_path(message, aggregate, per_query):
    edge_index, edge_type = random_graph(12, 60, 4, seed=1, duplicates=False)
    graph = RelGraph(edge_index, edge_type, 12, 4)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 12, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    relation = torch.randn(*((2,) if per_query else ()), 4, 3, generator=gen, dtype=torch.float64,
                           requires_grad=True)
    weight = (torch.rand(60, generator=gen, dtype=torch.float64) + 0.5).requires_grad_(True)
    mask = torch.rand(60, generator=gen) < 0.2
    leaves = (x, relation, weight)
    out = rel_aggregate(x, relation, graph, weight, mask, message, aggregate)
    first = torch.autograd.grad(out.square().sum(), leaves, create_graph=True)

    # create_graph=True still gives the right first derivatives ...
    expected = torch.autograd.grad(
        rel_aggregate_reference(x, relation, graph, weight, mask, message, aggregate).square().sum(), leaves
    )
    for got, want in zip(first, expected):
        torch.testing.assert_close(got, want)
    # ... and any derivative of them, in any direction, is refused rather than wrong.
    pattern = "rel_aggregate: double backward is not supported"
    for grad in first:
        for leaf in leaves:
            with pytest.raises(NotImplementedError, match=pattern):
                torch.autograd.grad(grad.sum(), leaf, retain_graph=True)
    fn = lambda x, r, w: rel_aggregate(x, r, graph, w, mask, message, aggregate)  # noqa: E731
    with pytest.raises(NotImplementedError, match=pattern):
        torch.autograd.gradgradcheck(fn, leaves, fast_mode=True)


# --- ids and counts of the triple ops -----------------------------------------------------------


def test_answer_mask_rejects_ids_out_of_range():
    graph = _graph()
    index = triple_index(graph)
    src, rel = torch.tensor([0, 1]), torch.tensor([0, 1])
    cases = [
        (dict(relations=torch.tensor([0, -3])), ValueError, r"relations must be ids in \[0, 10\), found \[-3, 0\]"),
        (dict(relations=torch.tensor([10, 0])), ValueError, r"relations must be ids in \[0, 10\), found \[0, 10\]"),
        (dict(sources=torch.tensor([-1, 0])), ValueError, r"sources must be node ids in \[0, 40\), found \[-1, 0\]"),
        (dict(sources=torch.tensor([0, 40])), ValueError, r"sources must be node ids in \[0, 40\)"),
        (dict(sources=torch.tensor([0.0, 1.0])), TypeError, "sources must be an integer tensor"),
        (dict(relations=torch.tensor([True, False])), TypeError, "relations must be an integer tensor"),
        (dict(relations=torch.tensor([0])), ValueError, "sources and relations must have the same length"),
        (dict(sources=torch.tensor([[0, 1]])), ValueError, r"sources must have shape \[Q\]"),
    ]
    for change, error, pattern in cases:
        args = {"sources": src, "relations": rel, **change}
        with pytest.raises(error, match=pattern):
            index.answer_mask(**args)
    assert index.answer_mask(src, rel).shape == (2, N)


def test_triple_index_rejects_ids_out_of_range():
    edge_index, edge_type = random_graph(N, E, R, seed=3)
    with pytest.raises(ValueError, match=r"TripleIndex: edge_index must hold node ids in \[0, 38\)"):
        TripleIndex(edge_index, edge_type, N - 2, R)
    with pytest.raises(ValueError, match=r"TripleIndex: edge_type must hold relation ids in \[0, 9\)"):
        TripleIndex(edge_index, edge_type, N, R - 1)
    with pytest.raises(TypeError, match="TripleIndex: edge_index must be an integer tensor"):
        TripleIndex(edge_index.float(), edge_type, N, R)
    with pytest.raises(ValueError, match=r"TripleIndex: edge_type must have shape \[E\] = \[300\]"):
        TripleIndex(edge_index, edge_type[:-1], N, R)


def test_num_negative_must_be_a_positive_int():
    graph = _graph()
    triples = torch.tensor([[0, 1, 0], [2, 3, 1]])
    for bad in (True, False, 2.0, "4", None):
        with pytest.raises(TypeError, match="negative_sampling: num_negative must be an int"):
            negative_sampling(graph, triples, bad)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="negative_sampling: num_negative must be a positive int"):
            negative_sampling(graph, triples, bad)
    assert negative_sampling(graph, triples, np.int64(3)).shape == (2, 4, 3)


if __name__ == "__main__" and sys.argv[1:2] == ["crafted"]:
    _crafted_main(sys.argv[2])
