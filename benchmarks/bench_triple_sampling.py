"""Strict negative sampling and easy-edge removal against the original's method (hash sort per
call, dense [B, N] masks, nonzero), same graph, same run.

    pytest benchmarks/bench_triple_sampling.py

The graph is HotpotQA-sized (the GFM-RAG index of HotpotQA): N = 82,157, 98,709 triples + inverses, 2R = 35,046;
B = 8 triples, K = 256 negatives, on CPU and (when present) CUDA; a uniform random graph and the
skewed shape of a real GFM-RAG index (gfmrag_fast.synthetic.real_shape_kg) side by side.
"""

import functools

import pytest
import torch

from gfmrag_fast.ops import (
    easy_edge_mask,
    easy_edge_mask_reference,
    negative_sampling,
    negative_sampling_reference,
    triple_index,
)
from gfmrag_fast.synthetic import real_shape_kg, synthetic_kg

NUM_NODES, NUM_TRIPLES, NUM_RELATIONS, BATCH, NUM_NEGATIVE = 82_157, 98_709, 35_046, 8, 256
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SHAPES = {"uniform": synthetic_kg, "skewed": real_shape_kg}


@functools.lru_cache(maxsize=None)
def graph_and_batch(device, shape):
    graph = SHAPES[shape](NUM_NODES, NUM_TRIPLES, NUM_RELATIONS, seed=0, device=device)
    triple_index(graph)  # built once per graph, outside the timed region
    pick = torch.randperm(NUM_TRIPLES, generator=torch.Generator().manual_seed(1))[:BATCH].to(device)
    triples = torch.stack([graph.edge_index[0, pick], graph.edge_index[1, pick], graph.edge_type[pick]], 1)
    return graph, triples


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_negative_sampling(measure, shape, device, impl):
    graph, triples = graph_and_batch(device, shape)
    if impl == "kernel":
        fn = lambda: negative_sampling(graph, triples, NUM_NEGATIVE, check_values=False)  # noqa: E731
    else:
        fn = lambda: negative_sampling_reference(graph, triples, NUM_NEGATIVE)  # noqa: E731
    measure(fn, f"negative_sampling/hotpotqa-{shape}-B{BATCH}-K{NUM_NEGATIVE}/{device}", impl, device, rounds=30,
            warmup_rounds=2)


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_easy_edge_mask(measure, shape, device, impl):
    graph, triples = graph_and_batch(device, shape)
    batch = negative_sampling(graph, triples, NUM_NEGATIVE)
    if impl == "kernel":
        fn = lambda: easy_edge_mask(graph, batch, check_values=False)  # noqa: E731
    else:
        fn = lambda: easy_edge_mask_reference(graph, batch)  # noqa: E731
    measure(fn, f"easy_edge_mask/hotpotqa-{shape}-B{BATCH}x{NUM_NEGATIVE + 1}/{device}", impl, device, rounds=30,
            warmup_rounds=2)
