"""One fine-tune step and one pre-train step (forward, loss, backward, AdamW) of GFM-RAG's model,
with the fused aggregation and with the pure-PyTorch reference aggregation, in the same run.

    pytest benchmarks/bench_train_step.py

CUDA: the HotpotQA-sized synthetic graph of DESIGN §4 (N = 82,157, 197,418 edges, 2R = 35,046),
B = 8, 6 x 512, 768-d relation embeddings, float32 (TF32) and bfloat16 autocast. CPU: scaled down.
"""

import contextlib
import functools

import pytest
import torch
from torch_geometric.data import Data

import gfmrag_fast.models.aggregation as aggregation
from gfmrag_fast.losses import adversarial_bce, list_ce
from gfmrag_fast.models.checkpoint import build_model
from gfmrag_fast.data import prepare_graph
from gfmrag_fast.ops import easy_edge_mask, negative_sampling, rel_aggregate_reference
from gfmrag_fast.synthetic import synthetic_kg

# name: (N, triples, 2R, B, dim, layers, text dim, num_negative)
CASES = {"cpu": ("cpu-N20k", (20_000, 100_000, 400, 4, 32, 6, 64, 64))}
if torch.cuda.is_available():
    CASES["cuda"] = ("hotpotqa-B8-6x512", (82_157, 98_709, 35_046, 8, 512, 6, 768, 256))
DTYPES = {"cpu": ["float32"], "cuda": ["float32", "bfloat16"]}


def _params():
    return [pytest.param(dev, dt, id=f"{dev}-{dt}") for dev in CASES for dt in DTYPES[dev]]


@functools.lru_cache(maxsize=None)
def graph_of(device):
    n, t, r2, _, _, _, text_dim, _ = CASES[device][1]
    rg = synthetic_kg(n, t, r2, seed=0)
    rel_emb = torch.randn(r2, text_dim, generator=torch.Generator().manual_seed(2))
    data = Data(edge_index=rg.edge_index, edge_type=rg.edge_type, num_nodes=n, num_relations=r2, rel_emb=rel_emb)
    return prepare_graph(data, device)  # its RelGraph prepared once, as training does


def model_of(kind, device):
    _, (_, _, _, _, dim, layers, text_dim, _) = CASES[device]
    entity = "QueryNBFNet" if kind == "finetune" else "EntityNBFNet"
    config = {
        "_target_": "gfmrag.models.GNNRetriever" if kind == "finetune" else "gfmrag.models.QueryGNN",
        "entity_model": {"_target_": f"gfmrag.ultra.models.{entity}", "input_dim": dim, "hidden_dims": [dim] * layers,
                         "message_func": "distmult", "aggregate_func": "sum", "short_cut": True, "layer_norm": True},
        "rel_emb_dim": text_dim,
    }
    torch.manual_seed(0)
    return build_model(config).to(device)


@contextlib.contextmanager
def aggregation_impl(impl):
    """The same model, its aggregation swapped for the pure-PyTorch reference."""
    original = aggregation.rel_aggregate
    if impl == "reference":
        aggregation.rel_aggregate = rel_aggregate_reference
    try:
        yield
    finally:
        aggregation.rel_aggregate = original


def make_step(kind, device, dtype):
    graph = graph_of(device)
    n, _, _, batch, _, _, text_dim, num_negative = CASES[device][1]
    model = model_of(kind, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    gen = torch.Generator().manual_seed(3)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    if kind == "finetune":
        questions = torch.zeros(batch, n)
        questions[torch.arange(batch), torch.randint(0, n, (batch,), generator=gen)] = 1
        targets = (torch.rand(batch, n, generator=gen) < 1e-3).float()
        inputs = {"question_embeddings": torch.randn(batch, text_dim, generator=gen).to(device),
                  "question_entities_masks": questions.to(device)}
        targets = targets.to(device)

        def loss_fn():
            pred = model(graph, inputs).float()
            return 0.3 * adversarial_bce(pred, targets, 0.2) + 0.7 * list_ce(pred, targets)
    else:
        rg = graph.rel_graph
        pick = torch.randint(0, graph.edge_index.size(1) // 2, (batch,), generator=gen).to(device)
        triples = torch.stack([graph.edge_index[0, pick], graph.edge_index[1, pick], graph.edge_type[pick]], 1)
        target = torch.zeros(batch, num_negative + 1, device=device)
        target[:, 0] = 1

        def loss_fn():
            sample = negative_sampling(rg, triples, num_negative, check_values=False)
            mask = easy_edge_mask(rg, sample, check_values=False)
            return adversarial_bce(model(graph, sample, edge_mask=mask).float(), target, 1.0)

    def step():
        with autocast:
            loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("kind", ["finetune", "pretrain"])
@pytest.mark.parametrize("device,dtype", _params())
def test_train_step(measure, device, dtype, kind, impl):
    with aggregation_impl(impl):
        step = make_step(kind, device, dtype)
        measure(step, f"train_step/{kind}/{CASES[device][0]}/{device}/{dtype}", impl, device,
                rounds=3 if device == "cpu" else 5, dtype=dtype)
