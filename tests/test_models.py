"""GFM-RAG models against an independent restatement of GFM-RAG's math (query-conditioned NBFNet
layers, DistMult messages, short cut, layer norm), plus options and caching."""

import gc

import pytest
import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch_geometric.data import Data

from gfmrag_fast.models import (
    AGGREGATES,
    MESSAGES,
    EntityNBFNet,
    GNNRetriever,
    QueryGNN,
    QueryNBFNet,
    rel_graph_of,
)
from gfmrag_fast.models.aggregation import OuterBoundary

from helpers import TEXT_DIM, make_batch, make_graph, perturb, retriever


# ---------------------------------------------------------------- the math, restated with the cat built


def ref_message(x_src, rel, message):  # [B, E, d], [E, d]
    if message == "distmult":
        return x_src * rel
    if message == "transe":
        return x_src + rel
    half = x_src.shape[-1] // 2
    a, b = x_src[..., :half], x_src[..., half:]
    c, d = rel[..., :half], rel[..., half:]
    return torch.cat([a * c - b * d, a * d + b * c], -1)


def ref_update(x, boundary, rel, edge_index, edge_type, message, aggregate, weight=None, mask=None):
    """The boundary is one more message per node (a self-loop of weight 1), as in GFM-RAG's PyG
    aggregate; messages go from edge_index[1] to edge_index[0]."""
    num_nodes = x.shape[1]
    dst, src, etype = edge_index[0], edge_index[1], edge_type
    if mask is not None:
        dst, src, etype = dst[~mask], src[~mask], etype[~mask]
        weight = None if weight is None else weight[~mask]
    msg = ref_message(x[:, src], rel[etype], message)
    if weight is not None:
        msg = msg * weight[None, :, None]
    index = torch.cat([dst, torch.arange(num_nodes)])
    messages = torch.cat([msg, boundary], 1)  # [B, E' + N, d]
    expanded = index[None, :, None].expand_as(messages)

    def scatter(values, reduce):
        return torch.zeros_like(x).scatter_reduce(1, expanded, values, reduce, include_self=False)

    if aggregate in ("sum", "mean", "max", "min"):
        return scatter(messages, {"sum": "sum", "mean": "mean", "max": "amax", "min": "amin"}[aggregate])
    squared = ref_message(x[:, src], rel[etype], message) ** 2
    if weight is not None:
        squared = squared * weight[None, :, None]
    squares = torch.cat([squared, boundary ** 2], 1)
    mean, sq_mean = scatter(messages, "mean"), scatter(squares, "mean")
    std = (sq_mean - mean ** 2).clamp(min=1e-6).sqrt()
    stats = torch.stack([mean, scatter(messages, "amax"), scatter(messages, "amin"), std], -1).flatten(-2)
    count = torch.bincount(index, minlength=num_nodes).to(x.dtype)
    scale = count.log() / count.log().mean()
    scalers = torch.stack([torch.ones_like(scale), scale, 1 / scale.clamp(min=1e-2)], -1)
    return (stats[..., None] * scalers[None, :, None, :]).flatten(-2)


def ref_entity_model(p, cfg, graph, x, boundary, rel, query, t_index=None, weight=None, mask=None):
    hiddens = []
    for layer in range(len(cfg["hidden_dims"])):
        w = lambda name: p[f"entity_model.layers.{layer}.{name}"]  # noqa: E731
        rel_l = F.linear(F.relu(F.linear(rel, w("relation_projection.0.weight"), w("relation_projection.0.bias"))),
                         w("relation_projection.2.weight"), w("relation_projection.2.bias"))
        update = ref_update(x, boundary, rel_l, graph.edge_index, graph.edge_type, cfg["message_func"],
                            cfg["aggregate_func"], weight, mask)
        h = F.linear(torch.cat([x, update], -1), w("linear.weight"), w("linear.bias"))
        if cfg.get("layer_norm"):
            h = F.layer_norm(h, h.shape[-1:], w("layer_norm.weight"), w("layer_norm.bias"))
        h = F.relu(h)
        if cfg.get("short_cut"):
            h = h + x
        hiddens.append(h)
        x = h
    feature = torch.cat((hiddens if cfg.get("concat_hidden") else hiddens[-1:])
                        + [query[:, None, :].expand(-1, x.shape[1], -1)], -1)
    if t_index is not None:
        feature = feature.gather(1, t_index[..., None].expand(-1, -1, feature.shape[-1]))
    num_mlp = cfg.get("num_mlp_layer", 2)
    for i in range(num_mlp):
        feature = F.linear(feature, p[f"entity_model.mlp.{2 * i}.weight"], p[f"entity_model.mlp.{2 * i}.bias"])
        if i < num_mlp - 1:
            feature = F.relu(feature)
    return feature.squeeze(-1)


def ref_retriever(model, cfg, graph, batch, entities_weight=None, weight=None, mask=None):
    p = {k: v.double() for k, v in model.state_dict().items()}
    q = F.linear(batch["question_embeddings"].double(), p["question_mlp.weight"], p["question_mlp.bias"])
    rel = F.linear(graph.rel_emb.double(), p["rel_mlp.weight"], p["rel_mlp.bias"])
    ent_mask = batch["question_entities_masks"].double()
    if entities_weight is not None:
        ent_mask = ent_mask * entities_weight.double()
    x0 = torch.einsum("bn,bd->bnd", ent_mask, q)
    weight = None if weight is None else weight.double()
    return ref_entity_model(p, cfg, graph, x0, x0, rel, q, weight=weight, mask=mask)


# ---------------------------------------------------------------- fixtures


def rel_err(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("aggregate", AGGREGATES)
@pytest.mark.parametrize("message", MESSAGES)
def test_retriever_matches_restated_math(message, aggregate):
    model, cfg = retriever(message_func=message, aggregate_func=aggregate)
    graph, batch = make_graph(), make_batch(make_graph())
    out = model(graph, batch)
    assert out.shape == (3, graph.num_nodes) and out.dtype == torch.float32
    assert rel_err(out, ref_retriever(model, cfg, graph, batch)) <= 1e-5


@pytest.mark.parametrize("aggregate", ["sum", "max", "mean"])
def test_other_options_edge_mask_weight_and_entities_weight(aggregate):
    model, cfg = retriever(seed=1, aggregate_func=aggregate, hidden_dims=[8, 8, 6], short_cut=False,
                           layer_norm=False, concat_hidden=True, num_mlp_layer=3)
    graph = make_graph(seed=2)
    batch = make_batch(graph, seed=2)
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(graph.num_edges, generator=gen) < 0.3
    weight = torch.rand(graph.num_edges, generator=gen)
    ent_weight = torch.rand(graph.num_nodes, generator=gen)
    out = model(graph, batch, ent_weight, edge_mask=mask, edge_weight=weight)
    assert rel_err(out, ref_retriever(model, cfg, graph, batch, ent_weight, weight, mask)) <= 1e-5


def test_parameter_count_and_state_dict_keys():
    entity = QueryNBFNet(512, [512] * 6, message_func="distmult", aggregate_func="sum", short_cut=True, layer_norm=True)
    model = GNNRetriever(entity, 768)
    assert sum(p.numel() for p in model.parameters()) == 8_144_897
    expected = ["question_mlp.weight", "question_mlp.bias", "rel_mlp.weight", "rel_mlp.bias"]
    for layer in range(6):
        expected += [f"entity_model.layers.{layer}.{name}" for name in (
            "linear.weight", "linear.bias", "layer_norm.weight", "layer_norm.bias",
            "relation_projection.0.weight", "relation_projection.0.bias",
            "relation_projection.2.weight", "relation_projection.2.bias")]
    expected += [f"entity_model.mlp.{i}.{name}" for i in (0, 2) for name in ("weight", "bias")]
    state = model.state_dict()
    assert sorted(state) == sorted(expected)
    assert state["entity_model.layers.0.linear.weight"].shape == (512, 1024)
    assert state["entity_model.mlp.0.weight"].shape == (1024, 1024)
    assert state["entity_model.mlp.2.weight"].shape == (1, 1024)


class _RecordCats(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.cat_sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.cat.default:
            self.cat_sizes.append(out.numel())
        return out


def test_relation_projection_once_per_layer_and_no_node_sized_cat():
    model, cfg = retriever()
    graph, batch = make_graph(), make_batch(make_graph())
    calls = []
    for layer in model.entity_model.layers:
        layer.relation_projection.register_forward_hook(lambda mod, inp, out: calls.append(tuple(inp[0].shape)))
    with _RecordCats() as mode:
        model(graph, batch)
    assert calls == [(graph.num_relations, cfg["input_dim"])] * len(cfg["hidden_dims"])
    num_nodes_times_d = 3 * graph.num_nodes * cfg["input_dim"]
    assert all(size < num_nodes_times_d for size in mode.cat_sizes)


def test_bf16_autocast_close_to_float32():
    model, _ = retriever(input_dim=16, hidden_dims=[16] * 3)
    graph, batch = make_graph(), make_batch(make_graph())
    expected = model(graph, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(graph, batch)
        loss = out.float().pow(2).mean()
    loss.backward()
    assert rel_err(out.float(), expected) < 0.05
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("aggregate", ["sum", "max"])
def test_activation_checkpointing_gives_identical_gradients(aggregate):
    graph, batch = make_graph(), make_batch(make_graph())
    grads = []
    for checkpointing in (False, True):
        model, _ = retriever(aggregate_func=aggregate)
        model.entity_model.checkpoint_layers = checkpointing
        model(graph, batch).square().mean().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        assert torch.equal(grads[0][key], grads[1][key]), key


def query_gnn(seed=0, **cfg):
    torch.manual_seed(seed)
    cfg = {"input_dim": 8, "hidden_dims": [8, 8], "message_func": "distmult", "aggregate_func": "sum",
           "short_cut": True, "layer_norm": True, **cfg}
    return perturb(QueryGNN(EntityNBFNet(**cfg), TEXT_DIM), seed), cfg


def kg_graph(num_nodes=25, num_triples=60, num_direct=3, seed=0):
    """Triples plus inverse edges, as GFM-RAG builds its graphs."""
    gen = torch.Generator().manual_seed(seed)
    h, t = torch.randint(0, num_nodes - 1, (2, num_triples), generator=gen)
    r = torch.randint(0, num_direct, (num_triples,), generator=gen)
    edge_index = torch.cat([torch.stack([h, t]), torch.stack([t, h])], 1)
    return Data(edge_index=edge_index, edge_type=torch.cat([r, r + num_direct]), num_nodes=num_nodes,
                num_relations=2 * num_direct, rel_emb=torch.randn(2 * num_direct, TEXT_DIM, generator=gen))


def tail_batch(graph, batch_size=4, num_negative=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randint(0, graph.num_nodes, (batch_size, 1), generator=gen).expand(-1, 1 + num_negative)
    r = torch.randint(0, graph.num_relations // 2, (batch_size, 1), generator=gen).expand(-1, 1 + num_negative)
    t = torch.randint(0, graph.num_nodes, (batch_size, 1 + num_negative), generator=gen)
    return torch.stack([h, t, r], -1)


def test_query_gnn_matches_restated_math_and_edge_mask_changes_scores():
    model, cfg = query_gnn(aggregate_func="sum", message_func="distmult")
    graph = kg_graph()
    batch = tail_batch(graph)
    scores = model(graph, batch)
    assert scores.shape == (4, 6)

    p = {k: v.double() for k, v in model.state_dict().items()}
    rel = F.linear(graph.rel_emb.double(), p["rel_mlp.weight"], p["rel_mlp.bias"])
    query = rel[batch[:, 0, 2]]
    boundary = torch.zeros(4, graph.num_nodes, cfg["input_dim"], dtype=torch.float64)
    boundary[torch.arange(4), batch[:, 0, 0]] = query
    expected = ref_entity_model(p, cfg, graph, boundary, boundary, rel, query, t_index=batch[:, :, 1])
    assert rel_err(scores, expected) <= 1e-5

    edge_mask = torch.zeros(graph.num_edges, dtype=torch.bool)
    edge_mask[: graph.num_edges // 3] = True
    masked = model(graph, batch, edge_mask)
    assert not torch.allclose(masked, scores)
    expected_masked = ref_entity_model(p, cfg, graph, boundary, boundary, rel, query, t_index=batch[:, :, 1],
                                       mask=edge_mask)
    assert rel_err(masked, expected_masked) <= 1e-5


def test_retriever_outer_boundary_gives_the_dense_boundary_gradients():
    # GNNRetriever hands the sum aggregation its boundary as mask x question (OuterBoundary, added
    # in place by a batched rank-1 product): gradients must equal those of the dense boundary.
    model, _ = retriever(seed=8)
    model.double()
    graph = make_graph(seed=8)
    graph.rel_emb = graph.rel_emb.double()
    batch = make_batch(graph, seed=9)
    entities_weight = torch.rand(graph.num_nodes, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    mask = batch["question_entities_masks"].double() * entities_weight
    weights = torch.randn(3, graph.num_nodes, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    params = list(model.parameters())
    grads = []
    for outer in (True, False):
        question = model.question_mlp(batch["question_embeddings"].double())
        relation = model.rel_mlp(graph.rel_emb)
        boundary = OuterBoundary(mask, question)
        scores = model.entity_model(graph, boundary.dense(), relation, question,
                                    boundary=boundary if outer else None)
        grads.append(torch.autograd.grad((scores * weights).sum(), params))
    for got, want in zip(*grads):
        assert rel_err(got, want) <= 1e-12


@pytest.mark.parametrize("aggregate", ["sum", "mean"])
def test_query_gnn_gradients_match_the_dense_boundary(aggregate):
    # The sum aggregation adds the boundary's nonzero rows in place (RowBoundary); every parameter's
    # gradient must be what the dense [B, N, d] boundary gives, also when two queries share a head
    # and when the boundary meets masked-out nodes.
    model, cfg = query_gnn(aggregate_func=aggregate, seed=5)
    model.double()
    graph = kg_graph(seed=5)
    graph.rel_emb = graph.rel_emb.double()
    batch = tail_batch(graph, seed=6)
    batch[1, :, 0] = batch[0, 0, 0]
    edge_mask = torch.zeros(graph.num_edges, dtype=torch.bool)
    edge_mask[::4] = True
    weights = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    params = dict(model.named_parameters())
    grads = torch.autograd.grad((model(graph, batch, edge_mask) * weights).sum(), list(params.values()))

    rel = F.linear(graph.rel_emb, params["rel_mlp.weight"], params["rel_mlp.bias"])
    query = rel[batch[:, 0, 2]]
    boundary = torch.zeros(4, graph.num_nodes, cfg["input_dim"], dtype=torch.float64)
    boundary = boundary.index_put((torch.arange(4), batch[:, 0, 0]), query, accumulate=True)
    expected = ref_entity_model(params, cfg, graph, boundary, boundary, rel, query, t_index=batch[:, :, 1],
                                mask=edge_mask)
    expected_grads = torch.autograd.grad((expected * weights).sum(), list(params.values()))
    for name, grad, want in zip(params, grads, expected_grads):
        assert rel_err(grad, want) <= 1e-9, name


def test_query_gnn_turns_head_corruption_into_tail_prediction():
    model, _ = query_gnn(seed=3)
    graph = kg_graph(seed=3)
    tails = tail_batch(graph, seed=4)  # rows (h, t_i, r)
    num_direct = graph.num_relations // 2
    # the same queries asked as head prediction: rows (t_i, h, r - R) for inverse relations r
    inverse = tails.clone()
    inverse[..., 2] += num_direct
    heads = torch.stack([inverse[..., 1], inverse[..., 0], inverse[..., 2] - num_direct], -1)
    assert torch.allclose(model(graph, heads), model(graph, inverse))


def test_rel_graph_of_uses_a_prepared_graph_while_it_describes_it():
    from gfmrag_fast.data import prepare_graph

    graph = make_graph()
    fresh = rel_graph_of(graph)
    assert torch.equal(fresh.edge_index, graph.edge_index) and torch.equal(fresh.edge_type, graph.edge_type)
    assert rel_graph_of(graph) is not fresh  # the models keep no cache: a bare graph is prepared per call
    prepared = prepare_graph(graph, "cpu")
    assert rel_graph_of(prepared) is prepared.rel_graph and rel_graph_of(prepared) is prepared.rel_graph
    assert torch.equal(prepared.edge_index, graph.edge_index) and torch.equal(prepared.rel_emb, graph.rel_emb)
    same_values = Data(edge_index=prepared.edge_index.clone(), edge_type=prepared.edge_type, num_nodes=graph.num_nodes,
                       num_relations=graph.num_relations, rel_graph=prepared.rel_graph)
    assert rel_graph_of(same_values) is not prepared.rel_graph  # carried, but not describing these tensors
    prepared.edge_type = (prepared.edge_type + 1) % graph.num_relations  # replaced
    rebuilt = rel_graph_of(prepared)
    assert rebuilt is not prepared.rel_graph and torch.equal(rebuilt.edge_type, prepared.edge_type)


def test_prepared_graph_goes_with_the_graph():
    import weakref

    from gfmrag_fast.data import prepare_graph

    prepared = prepare_graph(make_graph(seed=7), "cpu")
    alive = weakref.ref(prepared.rel_graph)
    del prepared
    gc.collect()
    assert alive() is None  # nothing outside the graph holds its preparation


def test_model_output_follows_graph_edits():
    model, _ = retriever()
    graph, batch = make_graph(), make_batch(make_graph())
    before = model(graph, batch)
    graph.edge_type[:10] = (graph.edge_type[:10] + 1) % graph.num_relations
    after = model(graph, batch)
    assert not torch.allclose(before, after)
    fresh = Data(edge_index=graph.edge_index.clone(), edge_type=graph.edge_type.clone(), num_nodes=graph.num_nodes,
                 num_relations=graph.num_relations, rel_emb=graph.rel_emb)
    assert torch.equal(after, model(fresh, batch))


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="message_func"):
        QueryNBFNet(8, [8], message_func="complex")
    with pytest.raises(ValueError, match="aggregate_func"):
        QueryNBFNet(8, [8], aggregate_func="median")
    with pytest.raises(ValueError, match="input_dim"):
        QueryNBFNet(8, [16, 8])
    with pytest.raises(ValueError, match="edge_mask"):
        model, _ = retriever()
        graph = make_graph()
        model(graph, make_batch(graph), edge_mask=torch.zeros(3, dtype=torch.bool))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("aggregate", ["sum", "mean", "max"])
def test_models_on_cuda_match_cpu(aggregate):
    model, _ = retriever(aggregate_func=aggregate, input_dim=16, hidden_dims=[16] * 3)
    graph, batch = make_graph(), make_batch(make_graph())
    expected = model(graph, batch)
    cuda_model = model.cuda()
    cuda_batch = {k: v.cuda() for k, v in batch.items()}
    out = cuda_model(graph.to("cuda"), cuda_batch)
    assert rel_err(out.cpu(), expected) < 1e-4
    with torch.autocast("cuda", dtype=torch.bfloat16):
        low = cuda_model(graph.to("cuda"), cuda_batch)
    low.float().square().mean().backward()
    assert rel_err(low.float().cpu(), expected) < 0.05

    kg_model, _ = query_gnn(aggregate_func=aggregate)
    kg = kg_graph()
    triples = tail_batch(kg)
    mask = torch.zeros(kg.num_edges, dtype=torch.bool)
    mask[::3] = True
    expected = kg_model(kg, triples, mask)
    out = kg_model.cuda()(kg.to("cuda"), triples.cuda(), mask.cuda())
    assert rel_err(out.cpu(), expected) < 1e-4
