"""Node-major state storage in the entity models: the same layer outputs, bit for bit, as batch major
(scores and gradients to rounding), for pre-training and retrieval, every boundary kind, fused and
plain dense tail, float32 and bfloat16 autocast; and no node-sized copy that batch major does not make."""

import math
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch_geometric.data import Data

from gfmrag_fast.models import EntityNBFNet, GNNRetriever, QueryGNN, QueryNBFNet
from gfmrag_fast.models.aggregation import OuterBoundary, RowBoundary, is_node_major

from helpers import CUDA, TEXT_DIM, make_batch, make_graph, perturb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MUSIQUE_KG = os.path.join(REPO, "data", "musique_hippo", "processed", "stage1", "kg.txt")


def build(kind, seed=0, **cfg):
    torch.manual_seed(seed)
    cfg = {"input_dim": 8, "hidden_dims": [8, 8, 8], "message_func": "distmult", "aggregate_func": "sum",
           "short_cut": True, "layer_norm": True, **cfg}
    if kind == "pretrain":
        return perturb(QueryGNN(EntityNBFNet(**cfg), TEXT_DIM), seed)
    return perturb(GNNRetriever(QueryNBFNet(**cfg), TEXT_DIM), seed)


def kg_graph(num_nodes=40, num_triples=150, num_direct=4, seed=0):
    """Triples plus inverse edges (GFM-RAG's graphs), with an isolated node and a hub."""
    gen = torch.Generator().manual_seed(seed)
    h, t = torch.randint(0, num_nodes - 1, (2, num_triples), generator=gen)
    h[:20] = 0
    r = torch.randint(0, num_direct, (num_triples,), generator=gen)
    edge_index = torch.cat([torch.stack([h, t]), torch.stack([t, h])], 1)
    return Data(edge_index=edge_index, edge_type=torch.cat([r, r + num_direct]), num_nodes=num_nodes,
                num_relations=2 * num_direct, rel_emb=torch.randn(2 * num_direct, TEXT_DIM, generator=gen))


def pretrain_inputs(graph, batch_size=5, num_negative=6, seed=1):
    """A batch whose first queries corrupt tails and the others heads (then turned into tail
    prediction), two queries sharing a head, and an edge mask over a third of the edges."""
    gen = torch.Generator().manual_seed(seed)
    n = graph.num_nodes
    h = torch.randint(0, n, (batch_size, 1), generator=gen).expand(-1, 1 + num_negative).clone()
    t = torch.randint(0, n, (batch_size, 1 + num_negative), generator=gen)
    r = torch.randint(0, graph.num_relations // 2, (batch_size, 1), generator=gen).expand(-1, 1 + num_negative)
    h[1] = h[0]
    half = batch_size // 2
    t[half:] = t[half:, :1]
    h[half:] = torch.randint(0, n, (batch_size - half, 1 + num_negative), generator=gen)
    mask = torch.rand(graph.edge_index.shape[1], generator=gen) < 0.3
    return torch.stack([h, t, r], -1), mask


def run(model, kind, graph, node_major, dtype, edge_weight=None, seed=2):
    """Scores, every layer's output and every parameter's gradient (and the edge weight's) with the
    states stored as asked; also checks that the layers' outputs were stored so."""
    device = next(model.parameters()).device
    model.entity_model.node_major = node_major
    model.zero_grad(set_to_none=True)
    outputs = []
    hooks = [layer.register_forward_hook(lambda m, i, out: outputs.append(out.detach()))
             for layer in model.entity_model.layers]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        if kind == "pretrain":
            batch, mask = pretrain_inputs(graph)
            scores = model(graph, batch.to(device), mask.to(device), edge_weight=edge_weight)
        else:
            batch = {k: v.to(device) for k, v in make_batch(graph, batch_size=4, seed=seed).items()}
            scores = model(graph, batch, edge_weight=edge_weight)
    for hook in hooks:
        hook.remove()
    assert [is_node_major(out) for out in outputs] == [node_major] * len(model.entity_model.layers)
    weights = torch.randn(scores.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    (scores.float() * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    if edge_weight is not None:
        grads["edge_weight"] = edge_weight.grad
        edge_weight.grad = None
    return scores.detach(), outputs, grads


def assert_same(first, second, dtype="float32"):
    """Every layer's output the same bits in both layouts. Scores and gradients agree to rounding:
    the rows reach the matrix products in another order, so sums over rows (parameter gradients)
    add in another order, and MKL's matrix-vector product (the scoring MLP's last Linear) rounds a
    row by its position. Under bfloat16 autocast such sums round in bfloat16 (LayerNorm's parameter
    gradients on the CPU), hence the wide tolerance there."""
    (scores_a, outputs_a, grads_a), (scores_b, outputs_b, grads_b) = first, second
    assert len(outputs_a) == len(outputs_b)
    for layer, (out_a, out_b) in enumerate(zip(outputs_a, outputs_b)):
        assert torch.equal(out_a, out_b), f"layer {layer}"
    assert scores_a.shape == scores_b.shape and scores_a.is_contiguous() and scores_b.is_contiguous()
    assert grads_a.keys() == grads_b.keys()
    low = dtype == "bfloat16"
    torch.testing.assert_close(scores_b, scores_a, rtol=1e-2 if low else 1e-5, atol=1e-2 if low else 1e-6)
    for name in grads_a:
        scale = grads_a[name].abs().max().item()
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0 if low else 1e-5,
                                   atol=(0.1 if low else 1e-6) * scale, msg=name)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused_tail", "plain_tail"])
@pytest.mark.parametrize("aggregate", ["sum", "mean", "max", "pna"])
@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_node_major_gives_the_batch_major_bits(kind, aggregate, fused, dtype):
    model = build(kind, seed=3, aggregate_func=aggregate)
    for layer in model.entity_model.layers:
        layer.fused_dense = fused
    graph = kg_graph(seed=3) if kind == "pretrain" else make_graph(num_nodes=40, num_edges=160, seed=3)
    assert_same(run(model, kind, graph, False, dtype), run(model, kind, graph, True, dtype), dtype)


@pytest.mark.parametrize("message", ["transe", "rotate"])
@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_other_messages_and_a_learned_edge_weight(kind, message):
    model = build(kind, seed=4, message_func=message)
    graph = kg_graph(seed=4) if kind == "pretrain" else make_graph(num_nodes=40, num_edges=160, seed=4)
    weight = torch.rand(graph.edge_index.shape[1], generator=torch.Generator().manual_seed(5)) + 0.5
    results = [run(model, kind, graph, layout, "float32", weight.clone().requires_grad_())
               for layout in (False, True)]
    assert_same(*results)


def test_per_query_relations_and_concat_hidden():
    torch.manual_seed(6)
    model = perturb(EntityNBFNet(8, [8, 8], short_cut=True, layer_norm=True, concat_hidden=True), 6)
    graph = kg_graph(seed=6)
    batch, mask = pretrain_inputs(graph, seed=7)
    relation = torch.randn(batch.shape[0], graph.num_relations, 8, generator=torch.Generator().manual_seed(8))
    results = []
    for layout in (False, True):
        model.node_major = layout
        model.zero_grad(set_to_none=True)
        rel = relation.clone().requires_grad_()
        outputs = []
        hooks = [layer.register_forward_hook(lambda m, i, out: outputs.append(out.detach()))
                 for layer in model.layers]
        scores = model(graph, rel, batch, mask)
        for hook in hooks:
            hook.remove()
        scores.square().sum().backward()
        grads = {**{n: p.grad for n, p in model.named_parameters()}, "relation": rel.grad}
        results.append((scores.detach(), outputs, grads))
    assert [is_node_major(out) for out in results[1][1]] == [True, True]
    assert_same(*results)


def test_retrieval_boundary_with_entity_weights_within_one_rounding():
    # A question-entity mask scaled by entity weights: node major adds weight x question with one
    # rounding (a fused multiply-add), batch major with two; float64 shows both are the same sum.
    model = build("finetune", seed=9)
    graph = make_graph(num_nodes=40, num_edges=160, seed=9)
    batch = make_batch(graph, batch_size=4, seed=10)
    entities_weight = torch.rand(graph.num_nodes, generator=torch.Generator().manual_seed(11)) + 0.5
    results = []
    for layout in (False, True):
        model.entity_model.node_major = layout
        model.zero_grad(set_to_none=True)
        scores = model(graph, batch, entities_weight)
        scores.square().sum().backward()
        results.append((scores, [p.grad for p in model.parameters()]))
    (a, grads_a), (b, grads_b) = results
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for grad_a, grad_b in zip(grads_a, grads_b):
        torch.testing.assert_close(grad_a, grad_b, rtol=1e-4, atol=1e-5)


def test_boundaries_store_node_major_and_add_in_place():
    gen = torch.Generator().manual_seed(12)
    nodes, values = torch.tensor([3, 0, 3]), torch.randn(3, 5, generator=gen)
    weights = torch.rand(3, 7, generator=gen)
    for boundary in (RowBoundary(nodes, values, 7), OuterBoundary(weights, values)):
        dense = boundary.dense()
        stored = boundary.dense(node_major=True)
        assert is_node_major(stored) and dense.is_contiguous() and torch.equal(stored, dense)
        base = torch.randn(7, 3, 5, generator=gen)
        expected = base.transpose(0, 1) + dense
        target = base.clone()
        out = boundary.add_to(target, inplace=True, node_major=True)
        assert out.data_ptr() == target.data_ptr()
        torch.testing.assert_close(out.transpose(0, 1), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(boundary.add_to(base, inplace=False, node_major=True).transpose(0, 1),
                                   expected, rtol=0, atol=1e-6)


def test_outer_boundary_node_major_gradients():
    gen = torch.Generator().manual_seed(13)
    weights = torch.rand(3, 7, dtype=torch.float64, generator=gen).requires_grad_()
    values = torch.randn(3, 5, dtype=torch.float64, generator=gen).requires_grad_()
    base = torch.randn(7, 3, 5, dtype=torch.float64, generator=gen).requires_grad_()

    def node_major(base, weights, values):
        return OuterBoundary(weights, values).add_to(base * 1, inplace=True, node_major=True)

    assert torch.autograd.gradcheck(node_major, (base, weights, values))


class _NodeSizedCopies(TorchDispatchMode):
    """Counts copy_/clone calls (forward and backward) that write at least `numel` elements."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.copy_.default, torch.ops.aten.clone.default) and out.numel() >= self.numel:
            self.count += 1
        return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused_tail", "plain_tail"])
@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_node_major_copies_no_state(kind, fused, dtype):
    model = build(kind, seed=14)
    for layer in model.entity_model.layers:
        layer.fused_dense = fused
    graph = kg_graph(seed=14) if kind == "pretrain" else make_graph(num_nodes=40, num_edges=160, seed=14)
    counts = []
    for layout in (False, True):
        with _NodeSizedCopies(numel=4 * 40 * 8) as copies:
            run(model, kind, graph, layout, dtype)
        counts.append(copies.count)
    assert counts == [0, 0], counts  # neither layout copies a state (x0 built in its layout)


@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_node_major_sums_state_gradients_in_place(kind):
    """x's two gradients in a layer (the aggregation's and the tail's) are summed in place by
    autograd in both layouts: node major adds no fresh node-sized sum (it would if the aggregation
    and the tail read x through two transpose views). Profiled (a dispatch mode would hold
    references to the gradients and so keep autograd from summing in place)."""
    model = build(kind, seed=14)
    graph = kg_graph(seed=14) if kind == "pretrain" else make_graph(num_nodes=40, num_edges=160, seed=14)
    sums = []
    for layout in (False, True):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            run(model, kind, graph, layout, "float32")
        sums.append(sum(1 for e in prof.events() if e.name == "aten::add" and e.input_shapes
                        and math.prod(e.input_shapes[0]) >= 4 * 40 * 8))
    assert sums[1] == sums[0], sums


def test_layout_choice():
    cpu = torch.device("cpu")
    model = EntityNBFNet(8, [8])
    assert model.node_major is None and model.stores_node_major(cpu)
    assert not model.stores_node_major(torch.device("cuda"))
    assert not model.stores_node_major(cpu, partitioned=True)
    assert not EntityNBFNet(8, [8], node_major=False).stores_node_major(cpu)
    assert EntityNBFNet(8, [8], node_major=True).stores_node_major(torch.device("cuda"))
    assert "node_major" not in model.config


def test_query_model_given_a_batch_major_input_stores_it_node_major():
    torch.manual_seed(15)
    model = perturb(QueryNBFNet(8, [8, 8], short_cut=True, layer_norm=True), 15)
    graph = make_graph(seed=15)
    gen = torch.Generator().manual_seed(16)
    x0 = torch.randn(3, graph.num_nodes, 8, generator=gen)
    query = torch.randn(3, 8, generator=gen)
    relation = torch.randn(graph.num_relations, 8, generator=gen)
    layouts = []
    model.layers[0].register_forward_pre_hook(lambda m, args: layouts.append(is_node_major(args[0])))
    out = {}
    for layout in (False, True):
        model.node_major = layout
        out[layout] = model(graph, x0, relation, query)
    assert layouts == [False, True]
    torch.testing.assert_close(out[True], out[False], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not os.path.exists(MUSIQUE_KG), reason="needs data/musique_hippo")
@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_musique_kg_same_bits(kind):
    from gfmrag_fast.data.readers import read_triples

    names, _ = read_triples(MUSIQUE_KG)
    ent2id, rel2id, rows = {}, {}, []
    for h, r, t in names:
        rows.append((ent2id.setdefault(h, len(ent2id)), ent2id.setdefault(t, len(ent2id)),
                     rel2id.setdefault(r, len(rel2id))))
    hrt = torch.tensor(rows)
    num_direct = len(rel2id)
    graph = Data(edge_index=torch.cat([hrt[:, :2].t(), hrt[:, :2].t().flip(0)], 1),
                 edge_type=torch.cat([hrt[:, 2], hrt[:, 2] + num_direct]), num_nodes=len(ent2id),
                 num_relations=2 * num_direct,
                 rel_emb=torch.randn(2 * num_direct, TEXT_DIM, generator=torch.Generator().manual_seed(17)))
    model = build(kind, seed=17, input_dim=16, hidden_dims=[16, 16])
    assert_same(run(model, kind, graph, False, "float32"), run(model, kind, graph, True, "float32"))


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_node_major_switch_on_cuda(kind, dtype):
    # Batch major is CUDA's default; node_major=True, the switch that tries node major there, must
    # give the same results.
    model = build(kind, seed=18).cuda()
    assert not model.entity_model.stores_node_major(torch.device("cuda"))
    graph = kg_graph(seed=18) if kind == "pretrain" else make_graph(num_nodes=40, num_edges=160, seed=18)
    graph = graph.to("cuda")
    assert_same(run(model, kind, graph, False, dtype), run(model, kind, graph, True, dtype), dtype)
