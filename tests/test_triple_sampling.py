"""negative_sampling, easy_edge_mask and TripleIndex against brute-force sets."""

import pytest
import torch
from torch.library import opcheck

from gfmrag_fast.ops import (
    RelGraph,
    TripleIndex,
    easy_edge_mask,
    easy_edge_mask_reference,
    negative_sampling,
    negative_sampling_reference,
    triple_index,
)

from helpers import CUDA, DEVICES


def kg_graph(num_nodes=40, num_triples=300, num_direct=5, seed=0, device="cpu"):
    """GFM-RAG-style graph with parallel edges and self-loops: triples (h, r, t) + inverses."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randint(0, num_nodes, (num_triples,), generator=gen)
    t = torch.randint(0, num_nodes, (num_triples,), generator=gen)
    r = torch.randint(0, num_direct, (num_triples,), generator=gen)
    t[:10] = h[:10]  # self-loops
    h[-20:], t[-20:], r[-20:] = h[:20], t[:20], r[:20]  # parallel copies
    edge_index = torch.cat([torch.stack([h, t]), torch.stack([t, h])], 1)
    edge_type = torch.cat([r, r + num_direct])
    graph = RelGraph(edge_index, edge_type, num_nodes, 2 * num_direct).to(device)
    return graph, torch.stack([h, t, r], 1).to(device)


def true_answers(graph):
    """{(source, relation): set of edge_index[1] ends}."""
    answers = {}
    for s, d, r in zip(graph.edge_index[0].tolist(), graph.edge_index[1].tolist(), graph.edge_type.tolist()):
        answers.setdefault((s, r), set()).add(d)
    return answers


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", [negative_sampling, negative_sampling_reference])
def test_strict_negatives_are_never_true_answers(device, impl):
    graph, triples = kg_graph(device=device)
    answers = true_answers(graph)
    half = graph.num_relations // 2
    batch = triples[torch.randperm(len(triples), generator=torch.Generator().manual_seed(1))[:9].to(device)]
    out = impl(graph, batch, 64)
    assert out.shape == (9, 65, 3) and out.dtype == torch.long and out.device == batch.device
    assert torch.equal(out[:, 0], batch)
    for b, (h, t, r) in enumerate(batch.tolist()):
        rows = out[b, 1:].tolist()
        assert all(row[2] == r for row in rows)
        if b < 9 // 2:  # tails corrupted
            assert all(row[0] == h for row in rows)
            assert not {row[1] for row in rows} & (answers[(h, r)] | {t})
        else:  # heads corrupted, through the inverse relation
            assert all(row[1] == t for row in rows)
            assert not {row[0] for row in rows} & (answers[(t, r + half)] | {h})


@pytest.mark.parametrize("device", DEVICES)
def test_non_strict_is_uniform_over_all_entities(device):
    from scipy.stats import chisquare

    graph, triples = kg_graph(num_nodes=6, device=device)
    batch = triples[:2]
    out = negative_sampling(graph, batch, 6000, strict=False, generator=torch.Generator(device).manual_seed(0))
    assert torch.equal(out[0, 1:, 0::2], batch[0, 0::2].expand(6000, 2))  # row 0: (h, ?, r)
    assert torch.equal(out[1, 1:, 1:], batch[1, 1:].expand(6000, 2))  # row 1: (?, t, r)
    for drawn in (out[0, 1:, 1], out[1, 1:, 0]):
        counts = torch.bincount(drawn.cpu(), minlength=6)
        assert counts.numel() == 6 and counts.min() > 0  # true answers and the positive included
        assert chisquare(counts.numpy()).pvalue > 1e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", [negative_sampling, negative_sampling_reference])
def test_strict_negatives_cover_exactly_the_allowed_entities(device, impl):
    """Strict is exact: what is drawn is every entity that is neither a true answer of the query nor
    the positive, and nothing else (the positive alone when nothing is allowed)."""
    graph, triples = kg_graph(num_nodes=12, num_triples=60, num_direct=2, device=device)
    answers = true_answers(graph)
    half = graph.num_relations // 2
    batch = triples[:6]
    torch.manual_seed(0)
    out = impl(graph, batch, 3000)
    for b, (h, t, r) in enumerate(batch.tolist()):
        if b < 3:
            drawn, allowed = out[b, 1:, 1], set(range(12)) - answers[(h, r)] - {t}
        else:
            drawn, allowed = out[b, 1:, 0], set(range(12)) - answers[(t, r + half)] - {h}
        assert set(drawn.tolist()) == (allowed or {t if b < 3 else h}), b


@pytest.mark.parametrize("device", DEVICES)
def test_strict_sampling_is_exactly_uniform_chi_square(device):
    from scipy.stats import chisquare

    # Node 0 has tails {1, 4, 5} under relation 0; 0, 2, 3, 6..9 are the allowed negatives of (0, 0, 1).
    h = torch.tensor([0, 0, 0, 2])
    t = torch.tensor([1, 4, 5, 7])
    r = torch.tensor([0, 0, 0, 0])
    graph = RelGraph(torch.cat([torch.stack([h, t]), torch.stack([t, h])], 1), torch.cat([r, r + 1]), 10, 2).to(device)
    batch = torch.tensor([[0, 1, 0], [0, 7, 0]], device=device)  # row 0: tails of (0, 0, ?), row 1: heads of (?, 0, 7)
    out = negative_sampling(graph, batch, 70_000, generator=torch.Generator(device).manual_seed(0)).cpu()
    tails = torch.bincount(out[0, 1:, 1], minlength=10)
    assert tails[[1, 4, 5]].sum() == 0
    allowed = tails[[0, 2, 3, 6, 7, 8, 9]]
    assert chisquare(allowed.numpy()).pvalue > 1e-3
    heads = torch.bincount(out[1, 1:, 0], minlength=10)
    assert heads[[0, 2]].sum() == 0  # (2, 0, 7) is an edge; 0 is the positive
    assert chisquare(heads[[1, 3, 4, 5, 6, 7, 8, 9]].numpy()).pvalue > 1e-3


def test_sampling_is_seeded_and_reproducible():
    graph, triples = kg_graph()
    torch.manual_seed(3)
    a = negative_sampling(graph, triples[:8], 32)
    torch.manual_seed(3)
    b = negative_sampling(graph, triples[:8], 32)
    c = negative_sampling(graph, triples[:8], 32)
    gen = torch.Generator().manual_seed(5)
    d = negative_sampling(graph, triples[:8], 32, generator=gen)
    e = negative_sampling(graph, triples[:8], 32, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(b, c) and torch.equal(d, e)


@pytest.mark.parametrize("device", DEVICES)
def test_seed_tensor_and_generator(device):
    graph, triples = kg_graph(device=device)
    batch = triples[:8]
    # one seed, the same samples; another seed, others; [] and [1] seeds alike
    a = negative_sampling(graph, batch, 32, seed=torch.tensor(7, device=device))
    assert torch.equal(a, negative_sampling(graph, batch, 32, seed=torch.tensor([7], device=device)))
    assert not torch.equal(a, negative_sampling(graph, batch, 32, seed=torch.tensor(8, device=device)))
    # an explicit generator of the triples' device: reproducible, and it advances
    gen = torch.Generator(device=device).manual_seed(5)
    b, c = negative_sampling(graph, batch, 32, generator=gen), negative_sampling(graph, batch, 32, generator=gen)
    assert not torch.equal(b, c)
    assert torch.equal(b, negative_sampling(graph, batch, 32, generator=torch.Generator(device=device).manual_seed(5)))
    # the seed the generator draws is the seed tensor the op reads
    seed = torch.randint(-(2**63), 2**63 - 1, (), generator=torch.Generator(device=device).manual_seed(5),
                         dtype=torch.int64, device=device)
    assert torch.equal(b, negative_sampling(graph, batch, 32, seed=seed))
    with pytest.raises(ValueError, match="not both"):
        negative_sampling(graph, batch, 4, generator=gen, seed=seed)
    with pytest.raises(TypeError, match="seed must be a one-element int64 tensor, got torch.int32"):
        negative_sampling(graph, batch, 4, seed=seed.int())
    with pytest.raises(TypeError, match=r"seed must be a one-element int64 tensor, got int"):
        negative_sampling(graph, batch, 4, seed=3)
    index = triple_index(graph)
    op_args = (batch.contiguous(), index.arrays, graph.num_nodes, graph.num_relations, 4, True)
    with pytest.raises(ValueError, match=r"seed must be a one-element int64 tensor, got Int \[\]"):
        torch.ops.gfmrag_fast.negative_sampling(*op_args, seed.int())
    with pytest.raises(ValueError, match=r"seed must be a one-element int64 tensor, got Long \[2\]"):
        torch.ops.gfmrag_fast.negative_sampling(*op_args, torch.zeros(2, dtype=torch.long, device=device))
    if device != "cpu":
        with pytest.raises(ValueError, match="seed is on cpu"):
            torch.ops.gfmrag_fast.negative_sampling(*op_args, seed.cpu())


def test_compiled_sampling_has_no_graph_break():
    """negative_sampling + easy_edge_mask under torch.compile(fullgraph=True): one graph, no break;
    a new seed on every call, the same samples after the same torch.manual_seed."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    graph, triples = kg_graph()
    triple_index(graph)  # built eagerly once, as the training loop does
    batch = triples[:8].contiguous()

    def step(batch):
        sample = negative_sampling(graph, batch, 16, check_values=False)
        return sample, easy_edge_mask(graph, sample, check_values=False)

    torch._dynamo.reset()
    counters.clear()
    explained = torch._dynamo.explain(step)(batch)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step, fullgraph=True)
    torch.manual_seed(0)
    a, mask_a = compiled(batch)
    b, _ = compiled(batch)
    torch.manual_seed(0)
    c, mask_c = compiled(batch)
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 1
    assert not torch.equal(a, b) and torch.equal(a, c) and torch.equal(mask_a, mask_c)
    assert torch.equal(mask_a, easy_edge_mask(graph, a))
    assert torch.equal(a[:, 0], batch)
    answers = true_answers(graph)  # compiled strict negatives are still never true answers
    for row, (h, t, r) in enumerate(batch.tolist()):
        if row < 4:
            assert not set(a[row, 1:, 1].tolist()) & (answers[(h, r)] | {t})
        else:
            assert not set(a[row, 1:, 0].tolist()) & (answers[(t, r + graph.num_relations // 2)] | {h})
    # a seed tensor passed in traces too, and gives the eager samples
    seeded = torch.compile(lambda batch, seed: negative_sampling(graph, batch, 16, check_values=False, seed=seed),
                           fullgraph=True)
    seed = torch.tensor(-77)
    assert torch.equal(seeded(batch, seed), negative_sampling(graph, batch, 16, seed=seed))


def test_query_without_allowed_entity_repeats_the_positive():
    # 3 nodes, node 0 -> every node under relation 0: (0, 0, ?) has no negative at all.
    h, t, r = torch.tensor([0, 0, 0]), torch.tensor([0, 1, 2]), torch.tensor([0, 0, 0])
    graph = RelGraph(torch.cat([torch.stack([h, t]), torch.stack([t, h])], 1), torch.cat([r, r + 1]), 3, 2)
    out = negative_sampling(graph, torch.tensor([[0, 1, 0], [0, 2, 0], [1, 0, 0]]), 5)
    assert torch.equal(out[0, 1:], torch.tensor([[0, 1, 0]] * 5))
    ref = negative_sampling_reference(graph, torch.tensor([[0, 1, 0], [0, 2, 0]]), 5)
    assert torch.equal(ref[0, 1:], torch.tensor([[0, 1, 0]] * 5))


def test_positive_outside_graph_is_still_excluded():
    graph, _ = kg_graph(num_nodes=5, num_triples=4)
    batch = torch.tensor([[0, 3, 4], [1, 2, 4]])  # triples that need not be edges
    out = negative_sampling(graph, batch, 2000)
    assert (out[0, 1:, 1] != 3).all() and (out[1, 1:, 0] != 1).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_easy_edge_mask_matches_brute_force(device, seed):
    graph, triples = kg_graph(seed=seed, device=device)
    batch = negative_sampling(graph, triples[torch.arange(0, 300, 17, device=device)], 8)
    expected = torch.zeros(graph.num_edges, dtype=torch.bool)
    edges = list(zip(graph.edge_index[0].tolist(), graph.edge_index[1].tolist(), graph.edge_type.tolist()))
    wanted = set()
    half = graph.num_relations // 2
    for h, t, r in batch.reshape(-1, 3).tolist():
        wanted |= {(h, t, r), (t, h, r + half)}
    for e, edge in enumerate(edges):
        expected[e] = edge in wanted
    mask = easy_edge_mask(graph, batch)
    assert mask.dtype == torch.bool and mask.shape == (graph.num_edges,)
    assert torch.equal(mask.cpu(), expected)
    assert torch.equal(easy_edge_mask(graph, batch[:, 0]).cpu(), easy_edge_mask_reference(graph, batch[:, 0]).cpu())
    assert torch.equal(easy_edge_mask_reference(graph, batch).cpu(), expected)
    # Every parallel copy of an edge and of its inverse is removed: edge 280 copies edge 0 (a
    # self-loop), 300 and 580 are their inverses.
    dup = torch.tensor([[*triples[0].tolist()]], device=device)
    copies = easy_edge_mask(graph, dup)
    assert copies[0] and copies[280] and copies[300] and copies[580]


def test_answer_mask_matches_brute_force():
    graph, triples = kg_graph(seed=4)
    index = triple_index(graph)
    assert triple_index(graph) is index  # built once per graph
    answers = true_answers(graph)
    sources = torch.arange(40).repeat(10)
    relations = torch.arange(10).repeat_interleave(40)
    mask = index.answer_mask(sources, relations)
    for q, (s, r) in enumerate(zip(sources.tolist(), relations.tolist())):
        assert set(mask[q].nonzero().flatten().tolist()) == answers.get((s, r), set())
    empty = TripleIndex(torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 4, 2)
    assert not empty.answer_mask(torch.tensor([1]), torch.tensor([0])).any()


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    graph, triples = kg_graph(device=device)
    index = triple_index(graph)
    seed = torch.tensor(123, device=device)
    for strict in (True, False):
        opcheck(torch.ops.gfmrag_fast.negative_sampling.default,
                (triples[:6].contiguous(), index.arrays, graph.num_nodes, graph.num_relations, 4, strict, seed))
    opcheck(torch.ops.gfmrag_fast.easy_edge_mask.default,
            (triples[:6].contiguous(), index.arrays, graph.num_edges, graph.num_relations))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.cuda
def test_cuda_samples_equal_cpu_samples():
    graph, triples = kg_graph()
    cuda_graph = graph.to("cuda")
    for strict in (True, False):
        seed = torch.tensor(-(2**62) + 9)
        cpu = negative_sampling(graph, triples[:10], 50, strict=strict, seed=seed)
        gpu = negative_sampling(cuda_graph, triples[:10].cuda(), 50, strict=strict, seed=seed.cuda())
        assert torch.equal(cpu, gpu.cpu())
    assert torch.equal(easy_edge_mask(graph, cpu), easy_edge_mask(cuda_graph, cpu.cuda()).cpu())
    # A CUDA generator draws the seed on the device; the same generator state, the same samples.
    a = negative_sampling(cuda_graph, triples[:4].cuda(), 8, generator=torch.Generator(device="cuda").manual_seed(1))
    b = negative_sampling(cuda_graph, triples[:4].cuda(), 8, generator=torch.Generator(device="cuda").manual_seed(1))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="generator is on cpu but triples are on cuda"):
        negative_sampling(cuda_graph, triples[:4].cuda(), 4, generator=torch.Generator())
    with pytest.raises(ValueError, match="seed is on cpu but triples are on cuda"):
        negative_sampling(cuda_graph, triples[:4].cuda(), 4, seed=torch.tensor(1))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.cuda
def test_cuda_graph_capture_draws_new_samples_each_replay():
    graph, triples = kg_graph(device="cuda")
    triple_index(graph)
    batch = triples[:8].contiguous()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the capture
        negative_sampling(graph, batch, 16, check_values=False)
    torch.cuda.current_stream().wait_stream(stream)
    cuda_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(cuda_graph):
        out = negative_sampling(graph, batch, 16, check_values=False)
        mask = easy_edge_mask(graph, out, check_values=False)
    cuda_graph.replay()
    first, first_mask = out.clone(), mask.clone()
    cuda_graph.replay()
    assert not torch.equal(first, out)  # a new seed on every replay
    assert torch.equal(first_mask, easy_edge_mask(graph, first))
    assert torch.equal(mask, easy_edge_mask(graph, out))


def test_bad_input_raises_clear_errors():
    graph, triples = kg_graph()
    with pytest.raises(ValueError, match="num_negative must be a positive int"):
        negative_sampling(graph, triples[:4], 0)
    with pytest.raises(ValueError, match="triples is empty"):
        negative_sampling(graph, triples[:0], 4)
    with pytest.raises(ValueError, match=r"entity ids must be in \[0, 40\), found \[0, 40\]"):
        negative_sampling(graph, torch.tensor([[0, 40, 1]]), 4)
    with pytest.raises(ValueError, match=r"relations must be direct ids in \[0, 5\)"):
        negative_sampling(graph, torch.tensor([[0, 1, 5]]), 4)
    with pytest.raises(ValueError, match=r"shape \[B, 3\]"):
        negative_sampling(graph, triples[:4, :2], 4)
    with pytest.raises(TypeError, match="triples must be an integer tensor"):
        negative_sampling(graph, triples[:4].float(), 4)
    with pytest.raises(TypeError, match="graph must be a RelGraph"):
        easy_edge_mask(graph.edge_index, triples[:4])
    with pytest.raises(ValueError, match=r"entity ids must be in \[0, 40\)"):
        easy_edge_mask(graph, torch.tensor([[-1, 2, 0]]))
    odd = RelGraph(graph.edge_index, graph.edge_type, 40, 11)
    with pytest.raises(ValueError, match="must count direct and inverse relations"):
        negative_sampling(odd, triples[:4], 4)
    # Unchecked out-of-range rows never read outside the index: they match / exclude nothing, so
    # the corrupted end is drawn from every entity (the positive included) and the rest is kept.
    unchecked = easy_edge_mask(graph, torch.tensor([[10**9, 2, 0], [0, 1, 99]]), check_values=False)
    assert not unchecked.any()
    out = negative_sampling(graph, torch.tensor([[0, 1, 99], [0, 10**9, 1]]), 2000, check_values=False,
                            generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[0, 1:, 0::2], torch.tensor([0, 99]).expand(2000, 2))
    assert torch.equal(out[1, 1:, 1:], torch.tensor([10**9, 1]).expand(2000, 2))
    assert set(out[0, 1:, 1].tolist()) == set(out[1, 1:, 0].tolist()) == set(range(40))
