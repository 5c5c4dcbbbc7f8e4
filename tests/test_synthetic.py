import os

import pytest
import torch

from gfmrag_fast.synthetic import KGShape, graph_shape_stats, musique_shape, real_shape_kg, synthetic_kg

MUSIQUE_KG = os.path.join(os.path.dirname(__file__), "..", "data", "musique_hippo", "processed", "stage1", "kg.txt")


def _musique_stats():
    from gfmrag_fast.data.readers import read_triples

    triples, _ = read_triples(MUSIQUE_KG)
    rel = {}
    deg = {}
    for h, r, t in triples:
        rel[r] = rel.get(r, 0) + 1
        deg[h] = deg.get(h, 0) + 1
        deg[t] = deg.get(t, 0) + 1
    return len(triples), len(rel), len(deg), max(rel.values()) / len(triples), max(deg.values())


def test_fit_from_kg_reproduces_the_real_index_shape():
    num_triples, num_rel, num_ent, top_share, max_degree = _musique_stats()
    shape = KGShape.from_kg(MUSIQUE_KG)
    assert shape.relation_share.numel() == num_rel and shape.degree_share.numel() == num_ent
    assert shape.relation_share[0].item() == pytest.approx(top_share)
    graph = real_shape_kg(num_ent, num_triples, 2 * num_rel, shape=shape, seed=0)
    stats = graph_shape_stats(graph)
    assert stats["num_edges"] == 2 * num_triples
    assert stats["top_relation_share"] == pytest.approx(top_share, abs=0.01)
    # Degree counts both directions here (edge + inverse), like the fit: the hub is a hub.
    degree = torch.bincount(graph.edge_index[0], minlength=num_ent)
    assert 0.6 * max_degree <= degree.max().item() <= 1.6 * max_degree
    assert degree.float().median().item() <= 3


@pytest.mark.parametrize("shape", [None, "musique"])
def test_shape_holds_at_hotpotqa_size(shape):
    shape = musique_shape() if shape == "musique" else shape
    graph = real_shape_kg(82_157, 98_709, 35_046, shape=shape, seed=3)
    stats = graph_shape_stats(graph)
    uniform = graph_shape_stats(synthetic_kg(82_157, 98_709, 35_046, seed=3))
    assert stats["top_relation_share"] == pytest.approx(0.456, abs=0.01)
    assert uniform["top_relation_share"] < 0.01
    assert stats["max_in_degree"] >= 10 * uniform["max_in_degree"]
    assert graph.edge_type.max().item() < 35_046


def test_real_shape_graph_is_seeded_and_well_formed():
    a = real_shape_kg(500, 3_000, 40, seed=7)
    b = real_shape_kg(500, 3_000, 40, seed=7)
    c = real_shape_kg(500, 3_000, 40, seed=8)
    assert torch.equal(a.edge_index, b.edge_index) and torch.equal(a.edge_type, b.edge_type)
    assert not torch.equal(a.edge_index, c.edge_index)
    head, tail = a.edge_index[:, :3_000]
    assert (head != tail).all()
    # Inverses: (t, h) with type r + R for every (h, t, r).
    assert torch.equal(a.edge_index[:, 3_000:], a.edge_index[:, :3_000].flip(0))
    assert torch.equal(a.edge_type[3_000:], a.edge_type[:3_000] + 20)


def test_relation_weights_keep_the_synonym_share_at_any_size():
    shape = KGShape.zipf()
    for num_relations in (1, 2, 10, 200, 20_000):
        w = shape.relation_weights(num_relations)
        assert w.numel() == num_relations
        assert w.sum().item() == pytest.approx(1.0)
        if num_relations > 1:
            assert w[0].item() == pytest.approx(0.456)
            assert (w[1:-1] >= w[2:]).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_nodes=10, num_triples=5, num_relations=3), "num_relations"),
    (dict(num_nodes=0, num_triples=5, num_relations=4), "num_nodes"),
    (dict(num_nodes=10, num_triples=-1, num_relations=4), "num_triples"),
])
def test_bad_sizes_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        real_shape_kg(**kwargs)


def test_fit_from_empty_kg_names_the_file(tmp_path):
    path = tmp_path / "kg.txt"
    path.write_text("\n")
    with pytest.raises(ValueError, match="kg.txt holds no triples"):
        KGShape.from_kg(path)
