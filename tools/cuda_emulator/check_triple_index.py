"""Runs the emulated CUDA kernels of triple_index_cuda.cu against the CPU kernels, bit for bit.

    python tools/cuda_emulator/build.py && python tools/cuda_emulator/check_triple_index.py

(check.py runs it too.) For the same seed tensor the CUDA kernel must draw the same negatives as
the CPU kernel, and find the same easy edges, over uniform and real-shape (skewed) graphs,
parallel edges, strict and non-strict sampling, K = 1, queries with no allowed negative, empty
batches, rows outside the graph (as ``check_values=False`` lets through), 2-D and 3-D batches.
"""

import os
import sys

import torch

from gfmrag_fast.ops import RelGraph, easy_edge_mask, easy_edge_mask_reference, triple_index
from gfmrag_fast.synthetic import real_shape_kg, synthetic_kg

HERE = os.path.dirname(os.path.abspath(__file__))
LIBRARY = os.path.join(HERE, "build", "triple_index", "gfmrag_emu_triple_index.so")
SEEDS = (0, 1, -1, 2**63 - 1, -(2**63), 0x243F6A8885A308D3)


def gfm_graph(num_nodes, num_triples, num_direct, seed, copies=1):
    """Triples (h, r, t) with self-loops, each `copies` times, plus their inverse edges."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randint(0, num_nodes, (num_triples,), generator=gen)
    t = torch.randint(0, num_nodes, (num_triples,), generator=gen)
    r = torch.randint(0, num_direct, (num_triples,), generator=gen)
    t[: num_triples // 10] = h[: num_triples // 10]
    h, t, r = h.repeat(copies), t.repeat(copies), r.repeat(copies)
    edge_index = torch.cat([torch.stack([h, t]), torch.stack([t, h])], 1)
    return RelGraph(edge_index, torch.cat([r, r + num_direct]), num_nodes, 2 * num_direct)


def saturated_graph(num_nodes):
    """Node 0 links to every node under relation 0 and every node links to node 1 under relation
    1: (0, 0, ?) and (?, 1, 1) have no allowed negative; relation 2 is absent from the graph."""
    nodes = torch.arange(num_nodes)
    h = torch.cat([torch.zeros(num_nodes, dtype=torch.long), nodes])
    t = torch.cat([nodes, torch.ones(num_nodes, dtype=torch.long)])
    r = torch.cat([torch.zeros(num_nodes, dtype=torch.long), torch.ones(num_nodes, dtype=torch.long)])
    edge_index = torch.cat([torch.stack([h, t]), torch.stack([t, h])], 1)
    return RelGraph(edge_index, torch.cat([r, r + 3]), num_nodes, 6)


def graphs():
    """(name, graph) pairs: uniform, real-shape, dense, saturated, tiny and edgeless graphs."""
    yield "uniform N=300", synthetic_kg(300, 2_000, 20, seed=1)
    yield "uniform N=40 dense", synthetic_kg(40, 1_200, 4, seed=2)
    yield "real-shape N=200", real_shape_kg(200, 2_000, 20, seed=3)
    yield "real-shape N=2000", real_shape_kg(2_000, 12_000, 200, seed=4)
    yield "real-shape N=30 dense", real_shape_kg(30, 600, 6, seed=5)
    yield "parallel x3 N=50", gfm_graph(50, 300, 5, seed=6, copies=3)
    yield "parallel x1 N=7", gfm_graph(7, 60, 2, seed=7)
    yield "saturated N=9", saturated_graph(9)
    yield "one node", gfm_graph(1, 5, 1, seed=8)
    empty = torch.zeros(2, 0, dtype=torch.long)
    yield "no edges", RelGraph(empty, torch.zeros(0, dtype=torch.long), 12, 4)


def batches(graph, seed):
    """[B, 3] (h, t, r) batches: the graph's own triples, triples that are not edges, the
    saturated queries, rows outside the graph, and an empty batch."""
    gen = torch.Generator().manual_seed(seed)
    n, half = graph.num_nodes, graph.num_relations // 2
    direct = (graph.edge_type < half).nonzero().flatten()
    own = torch.stack([graph.edge_index[0, direct], graph.edge_index[1, direct], graph.edge_type[direct]], 1)
    for size in (1, 2, 7, 33):
        if len(own):
            yield f"own B={size}", own[torch.randint(0, len(own), (size,), generator=gen)]
    yield "random B=6", torch.stack([torch.randint(0, n, (6,), generator=gen), torch.randint(0, n, (6,), generator=gen),
                                     torch.randint(0, half, (6,), generator=gen)], 1)
    if n > 1:
        # head-corrupted rows second: (?, 1, 1) is saturated in saturated_graph
        yield "saturated B=4", torch.tensor([[0, 1, 0], [0, n - 1, 0], [0, 1, 1], [n - 1, 1, 1]])
    yield "outside B=6", torch.tensor([[n, 0, 0], [0, n + 5, 0], [0, 0, half], [-1, 0, 0], [0, 0, -3], [2**40, 1, 0]])
    yield "empty B=0", torch.zeros(0, 3, dtype=torch.long)


class Checker:
    def __init__(self):
        torch.ops.load_library(LIBRARY)
        self.cpu, self.emu = torch.ops.gfmrag_fast, torch.ops.gfmrag_emu
        self.counts = {"negative_sampling": 0, "easy_edge_mask": 0, "errors": 0}
        self.fails = 0
        self.stats = [0, 0, 0, 0]  # launches, threads, largest grid, __umul64hi calls

    def fail(self, what, **config):
        self.fails += 1
        print("FAIL", what, config, flush=True)

    def _emu_stats(self):
        launches, threads, grid, umul = self.emu.triple_index_stats()
        self.stats = [self.stats[0] + launches, self.stats[1] + threads, max(self.stats[2], grid), self.stats[3] + umul]
        return launches, threads

    def negative_sampling(self, graph, triples, K, strict, seed, **config):
        self.counts["negative_sampling"] += 1
        index = triple_index(graph).arrays
        args = (triples, index, graph.num_nodes, graph.num_relations, K, strict, seed)
        expected = self.cpu.negative_sampling(*args)
        self._emu_stats()
        got = self.emu.negative_sampling(*args)
        launches, threads = self._emu_stats()
        rows = triples.size(0) * (K + 1)
        if launches != (rows > 0) or threads < rows:
            self.fail("negative_sampling launch", launches=launches, threads=threads, rows=rows, **config)
        if not (got.shape == expected.shape and got.dtype == expected.dtype and torch.equal(got, expected)):
            self.fail("negative_sampling", K=K, strict=strict, seed=seed.tolist(), **config)
        return expected

    def easy_edge_mask(self, graph, batch, **config):
        self.counts["easy_edge_mask"] += 1
        index = triple_index(graph).arrays
        rows = batch.reshape(-1, 3)  # what the public function passes for [B, 3] and [B, 1 + K, 3]
        expected = self.cpu.easy_edge_mask(rows, index, graph.num_edges, graph.num_relations)
        self._emu_stats()
        got = self.emu.easy_edge_mask(rows, index, graph.num_edges, graph.num_relations)
        launches, threads = self._emu_stats()
        if launches != (rows.size(0) > 0 and graph.num_edges > 0) or threads < 2 * rows.size(0) * launches:
            self.fail("easy_edge_mask launch", launches=launches, threads=threads, **config)
        ok = got.dtype == torch.bool and torch.equal(got, expected)
        inside = ((rows[:, :2] >= 0) & (rows[:, :2] < graph.num_nodes)).all(1) & (rows[:, 2] >= 0) & (
            rows[:, 2] < graph.num_relations // 2)
        # the brute-force reference and the public function (rows inside the graph only)
        if inside.all() and graph.num_edges:
            ok = ok and torch.equal(expected, easy_edge_mask_reference(graph, batch))
            ok = ok and torch.equal(expected, easy_edge_mask(graph, batch))
        if not ok:
            self.fail("easy_edge_mask", shape=tuple(batch.shape), **config)

    def same_error(self, graph, triples, seed, what):
        """A bad seed tensor: both kernels must refuse it with the same error."""
        self.counts["errors"] += 1
        index = triple_index(graph).arrays
        args = (triples, index, graph.num_nodes, graph.num_relations, 3, True, seed)
        errors = []
        for lib in (self.cpu, self.emu):
            try:
                lib.negative_sampling(*args)
                errors.append(None)
            except ValueError as e:
                errors.append(str(e).splitlines()[0])
        if errors[0] is None or errors[0] != errors[1]:
            self.fail("bad seed", seed=what, errors=errors)


def main() -> int:
    check = Checker()
    for g, (name, graph) in enumerate(graphs()):
        for b, (batch_name, triples) in enumerate(batches(graph, seed=g)):
            config = dict(kg=name, rows=batch_name)
            for K in (1, 2, 5, 64, 256):
                for strict in (True, False):
                    seed = torch.tensor(SEEDS[(g + b + K) % len(SEEDS)])
                    samples = check.negative_sampling(graph, triples, K, strict, seed, **config)
                    if K in (1, 64) and strict:
                        check.easy_edge_mask(graph, samples, **config, K=K)
            check.easy_edge_mask(graph, triples, **config)
            # seeds as [1] tensors, and every seed on one batch
            if b == 0:
                for s in SEEDS:
                    check.negative_sampling(graph, triples, 16, True, torch.tensor([s]), **config)
    print("triple_index grid done", check.counts, check.fails, flush=True)

    # multi-block launches on a real-shape graph (B (1 + K) and 2 B (1 + K) far above one block)
    graph = real_shape_kg(5_000, 30_000, 400, seed=11)
    own = torch.stack([graph.edge_index[0, :64], graph.edge_index[1, :64], graph.edge_type[:64]], 1)
    for strict in (True, False):
        samples = check.negative_sampling(graph, own, 256, strict, torch.tensor(12345), kg="real-shape N=5000")
        check.easy_edge_mask(graph, samples, kg="real-shape N=5000", K=256, strict=strict)
    print("large launches done", check.counts, check.fails, flush=True)

    graph = gfm_graph(20, 100, 3, seed=9)
    triples = torch.tensor([[0, 1, 0], [2, 3, 1]])
    for what, seed in (("float", torch.tensor(1.0)), ("int32", torch.tensor(1, dtype=torch.int32)),
                       ("two values", torch.tensor([1, 2])), ("empty", torch.zeros(0, dtype=torch.long))):
        check.same_error(graph, triples, seed, what)

    launches, threads, grid, umul = check.stats
    if umul == 0:
        check.fail("the device branch of uniform_below (__umul64hi) never ran")
    total = sum(check.counts.values())
    print(f"emulated launches {launches}, threads {threads}, largest grid {grid} blocks, __umul64hi calls {umul}")
    print(f"cuda emulator: triple_index_cuda.cu: {total} configurations ({check.counts['negative_sampling']} "
          f"negative_sampling, {check.counts['easy_edge_mask']} easy_edge_mask, {check.counts['errors']} bad seeds), "
          f"{check.fails} failed", flush=True)
    return check.fails


if __name__ == "__main__":
    sys.exit(1 if main() else 0)
