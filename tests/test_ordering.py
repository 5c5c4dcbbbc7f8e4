"""Entity numberings for locality (gfmrag_fast.data.ordering) and the stage-2 option that uses them.

The end-to-end case builds the bundled MuSiQue dataset both ways with a stub text model (hashed
character trigrams) and checks that everything read by name is the same.
"""

import shutil
from pathlib import Path

import pytest
import torch

from gfmrag_fast import GFMRetriever
from gfmrag_fast.data import KGDataset, QADataset, read_triples
from gfmrag_fast.data.ordering import locality_order, neighbour_distance, relabel
from gfmrag_fast.checkpoints import build_model
from gfmrag_fast.retrieval.evaluation import evaluate_split
from gfmrag_fast.synthetic import real_shape_kg

from helpers import TRIGRAM_DIM, TrigramEmb

REPO = Path(__file__).resolve().parent.parent
MUSIQUE = REPO / "data" / "musique_hippo"
DIM = TRIGRAM_DIM


def is_permutation(order, n):
    return order.dtype == torch.long and torch.equal(torch.sort(order).values, torch.arange(n))


def test_path_graph_is_numbered_along_the_path():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randperm(50, generator=gen)
    edge_index = torch.stack([ids[:-1], ids[1:]])  # a path through shuffled ids
    order = locality_order(edge_index, 50)
    assert is_permutation(order, 50)
    assert neighbour_distance(relabel(order)[edge_index]) == {"bandwidth": 1.0, "mean": 1.0}


def test_deterministic_and_independent_of_edge_direction_and_duplicates():
    graph = real_shape_kg(2_000, 5_000, 40, seed=3)
    edge_index = graph.edge_index.long()
    first = locality_order(edge_index, 2_000)
    assert torch.equal(first, locality_order(edge_index.clone(), 2_000))
    # Only the undirected simple graph counts: one direction, repeated edges, self loops.
    direct = edge_index[:, : edge_index.shape[1] // 2]
    noisy = torch.cat([direct.flip(0), direct[:, :100], torch.tensor([[5, 7], [5, 7]])], dim=1)
    assert torch.equal(first, locality_order(noisy, 2_000))


@pytest.mark.parametrize("shape", ["real", "musique"])
def test_neighbour_distance_reduced(shape):
    if shape == "real":  # the HotpotQA/4-sized real-shape graph; its ids are shuffled
        graph = real_shape_kg(20_539, 24_677, 8_762, seed=0)
        edge_index, n = graph.edge_index.long(), graph.num_nodes
    else:
        edge_index, n = first_appearance_edges(MUSIQUE / "processed" / "stage1" / "kg.txt")
    order = locality_order(edge_index, n)
    assert is_permutation(order, n)
    shuffled = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    before = neighbour_distance(shuffled[edge_index])
    after = neighbour_distance(relabel(order)[edge_index])
    assert after["bandwidth"] < 0.5 * before["bandwidth"]
    assert after["mean"] < 0.6 * before["mean"]


def first_appearance_edges(path):
    """([2, T] edges of a kg.txt in GFM-RAG's first-appearance numbering, its entity count)."""
    ent = {}
    pairs = [(ent.setdefault(h, len(ent)), ent.setdefault(t, len(ent))) for h, _, t in read_triples(path)[0]]
    return torch.tensor(pairs).t(), len(ent)


def test_components_stay_contiguous_and_isolated_nodes_are_kept():
    # Two triangles and a path, interleaved ids; 3, 8 and 11 have no edge.
    edges = [(0, 4), (4, 9), (9, 0), (1, 5), (5, 10), (10, 1), (2, 6), (6, 7)]
    edge_index = torch.tensor(edges).t()
    order = locality_order(edge_index, 12)
    assert is_permutation(order, 12)
    pos = relabel(order)
    for comp in ({0, 4, 9}, {1, 5, 10}, {2, 6, 7}):
        spots = sorted(int(pos[v]) for v in comp)
        assert spots == list(range(spots[0], spots[0] + 3))  # a component is one id range
    # Components in the order of their smallest old id; an isolated node is its own component.
    firsts = [min(int(pos[v]) for v in comp) for comp in ({0, 4, 9}, {1, 5, 10}, {2, 6, 7}, {3}, {8}, {11})]
    assert firsts == sorted(firsts)


def test_empty_graph_and_edge_cases():
    assert locality_order(torch.zeros(2, 0, dtype=torch.long), 0).numel() == 0
    assert torch.equal(locality_order(torch.zeros(2, 0, dtype=torch.long), 4), torch.arange(4))
    assert torch.equal(locality_order(torch.tensor([[0], [0]]), 1), torch.tensor([0]))  # a self loop
    with pytest.raises(ValueError, match=r"edge_index must have shape \[2, E\]"):
        locality_order(torch.zeros(3, 2, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="outside"):
        locality_order(torch.tensor([[0], [4]]), 4)
    with pytest.raises(ValueError, match="integer node ids"):
        locality_order(torch.zeros(2, 1), 4)
    with pytest.raises(ValueError, match="num_nodes"):
        locality_order(torch.zeros(2, 0, dtype=torch.long), -1)


# ----------------------------------------------------------------------------- stage 2, end to end
@pytest.fixture(scope="module")
def musique_both(tmp_path_factory):
    root = tmp_path_factory.mktemp("loc")
    shutil.copytree(MUSIQUE, root / "musique_hippo")
    emb = TrigramEmb()
    return {order: QADataset(root, "musique_hippo", text_emb_model=emb, entity_order=order)
            for order in ("original", "locality")}


def test_option_checked_and_in_the_fingerprint(musique_both, tmp_path):
    original, local = musique_both["original"], musique_both["locality"]
    assert original.fingerprint != local.fingerprint
    assert local.stats["entity_order"] == "locality"
    with pytest.raises(ValueError, match="entity_order"):
        KGDataset(tmp_path, "x", text_emb_model=TrigramEmb(), entity_order="rcm")


def test_kg_held_out_triples_follow_the_numbering(tmp_path):
    shutil.copytree(REPO / "tests" / "data" / "tiny_kg", tmp_path / "tiny_kg")
    both = {order: KGDataset(tmp_path, "tiny_kg", text_emb_model=TrigramEmb(), entity_order=order)
            for order in ("original", "locality")}
    kg_entities = both["original"].stats["kg_entities"]
    for split in ("valid_triples", "test_triples", "target_edge_index"):
        named = []
        for ds in both.values():
            names, values = list(ds.ent2id), getattr(ds.graph, split)
            rows = values.t() if split == "target_edge_index" else values[:, :2]
            named.append([(names[h], names[t]) for h, t in rows.tolist()])
        assert named[0] == named[1], split
    # Entities only in valid.txt / test.txt have no edge: numbered after the KG's, as in GFM-RAG.
    assert sorted(both["locality"].ent2id[name] for name in list(both["original"].ent2id)[kg_entities:]) == \
        list(range(kg_entities, both["original"].num_nodes))


def test_stage2_same_by_name(musique_both):
    original, local = musique_both["original"], musique_both["locality"]
    assert set(original.ent2id) == set(local.ent2id) and original.ent2id != local.ent2id
    assert list(local.ent2id.values()) == list(range(local.num_nodes))  # list(ent2id): names by id
    names = {key: list(ds.ent2id) for key, ds in musique_both.items()}
    # The ordering is the locality one of the original graph, and the edges keep their order.
    edges = {key: [(names[key][h], int(r), names[key][t]) for (h, t), r in
                   zip(ds.graph.edge_index.t().tolist(), ds.graph.edge_type)] for key, ds in musique_both.items()}
    assert edges["original"] == edges["locality"]
    assert torch.equal(original.graph.rel_emb, local.graph.rel_emb)
    gap = {key: neighbour_distance(ds.graph.edge_index)["mean"] for key, ds in musique_both.items()}
    assert gap["locality"] < 0.8 * gap["original"]
    pairs = {key: {(names[key][e], d) for e, d in ds.ent2doc.coalesce().indices().t().tolist()}
             for key, ds in musique_both.items()}
    assert pairs["original"] == pairs["locality"]
    for split in original.splits:
        a, b = original.split(split), local.split(split)
        assert a.ids == b.ids
        for i in range(len(a)):
            for key in ("question_entities", "supporting_entities"):
                assert [names["original"][e] for e in a[i][key].tolist()] == \
                       [names["locality"][e] for e in b[i][key].tolist()]
            assert torch.equal(a[i]["supporting_docs"], b[i]["supporting_docs"])


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return build_model({
        "_target_": "gfmrag.models.GNNRetriever", "rel_emb_dim": DIM,
        "entity_model": {"_target_": "gfmrag.ultra.models.QueryNBFNet", "input_dim": 16, "hidden_dims": [16] * 3,
                         "message_func": "distmult", "aggregate_func": "sum", "short_cut": True, "layer_norm": True},
    }).eval()


def test_same_rankings_and_metrics(musique_both):
    results = {}
    for key, ds in musique_both.items():
        retriever = GFMRetriever(tiny_model(), ds, device="cpu")
        row, predictions = evaluate_split(retriever, ds.split("train"), ["mrr", "hits@1", "hits@10", "recall@5"],
                                          top_k=10)
        ent_pred, _ = retriever.score(ds.split("train").question_embeddings[:8],
                                      [ds.split("train")[i]["question_entities"].tolist() for i in range(8)])
        by_name = dict(zip(retriever.entity_names, ent_pred.t()))
        results[key] = row, predictions, by_name
    (row_a, pred_a, ent_a), (row_b, pred_b, ent_b) = results["original"], results["locality"]
    assert row_a.keys() == row_b.keys()
    for key, value in row_a.items():
        assert value == (pytest.approx(row_b[key], rel=1e-6) if isinstance(value, float) else row_b[key]), key
    assert [[d["title"] for d in p["documents"]] for p in pred_a] == \
           [[d["title"] for d in p["documents"]] for p in pred_b]
    assert [p["question_entities"] for p in pred_a] == [p["question_entities"] for p in pred_b]
    for name, scores in ent_a.items():
        torch.testing.assert_close(scores, ent_b[name], rtol=1e-5, atol=1e-5)
