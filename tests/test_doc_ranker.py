"""Document rankers on hand-computed examples."""

import pytest
import torch

from gfmrag_fast.doc_rankers import IDFRanker, IDFWeightedRanker, IDFWeightedTopKRanker, SimpleRanker, TopKRanker

# 4 entities × 3 documents; entity 3 occurs in no document.
ENT2DOC = torch.tensor([
    [1.0, 1.0, 0.0],  # df 2
    [0.0, 1.0, 0.0],  # df 1
    [1.0, 1.0, 1.0],  # df 3
    [0.0, 0.0, 0.0],  # df 0
])
SCORES = torch.tensor([
    [0.5, 2.0, 1.0, 3.0],
    [4.0, -1.0, 0.0, 1.0],
])


def layouts():
    return [ENT2DOC, ENT2DOC.to_sparse(), ENT2DOC.to_sparse_csr()]


@pytest.mark.parametrize("ent2doc", layouts(), ids=["dense", "coo", "csr"])
def test_simple_ranker(ent2doc):
    expected = torch.tensor([
        [0.5 + 1.0, 0.5 + 2.0 + 1.0, 1.0],
        [4.0 + 0.0, 4.0 - 1.0 + 0.0, 0.0],
    ])
    torch.testing.assert_close(SimpleRanker(ent2doc)(SCORES), expected)


@pytest.mark.parametrize("ent2doc", layouts(), ids=["dense", "coo", "csr"])
def test_idf_weighted_ranker(ent2doc):
    # idf = [1/2, 1, 1/3, 0]
    expected = torch.tensor([
        [0.25 + 1 / 3, 0.25 + 2.0 + 1 / 3, 1 / 3],
        [2.0, 2.0 - 1.0, 0.0],
    ])
    torch.testing.assert_close(IDFWeightedRanker(ent2doc)(SCORES), expected)
    assert IDFRanker is IDFWeightedRanker


@pytest.mark.parametrize("ent2doc", layouts(), ids=["dense", "coo", "csr"])
def test_top_k_ranker(ent2doc):
    # top-2: row 0 → entities 3, 1; row 1 → entities 0, 3
    expected = torch.tensor([
        [0.0, 1.0, 0.0],
        [1.0, 1.0, 0.0],
    ])
    torch.testing.assert_close(TopKRanker(ent2doc, top_k=2)(SCORES), expected)


@pytest.mark.parametrize("ent2doc", layouts(), ids=["dense", "coo", "csr"])
def test_idf_weighted_top_k_ranker(ent2doc):
    # top-2 with idf weights: row 0 → 0 · e3 + 1 · e1; row 1 → 1/2 · e0 + 0 · e3
    expected = torch.tensor([
        [0.0, 1.0, 0.0],
        [0.5, 0.5, 0.0],
    ])
    torch.testing.assert_close(IDFWeightedTopKRanker(ent2doc, top_k=2)(SCORES), expected)
    # top-3 adds entity 2 to row 0 (score 1.0 > 0.5) and to row 1 (0.0 > -1.0): 1/3 to each document
    expected3 = expected + torch.tensor([[1 / 3] * 3, [1 / 3] * 3])
    torch.testing.assert_close(IDFWeightedTopKRanker(ent2doc, top_k=3)(SCORES), expected3)


def test_defaults_and_k_larger_than_entities():
    ranker = IDFWeightedTopKRanker(ENT2DOC)
    assert ranker.top_k == 20
    # k is capped at N = 4: every entity counts with its idf weight, whatever its score
    torch.testing.assert_close(ranker(SCORES), torch.tensor([[0.5 + 1 / 3, 0.5 + 1 + 1 / 3, 1 / 3]] * 2))


def test_shape_and_dtype():
    ranker = SimpleRanker(ENT2DOC.to_sparse())
    out = ranker(SCORES.double())
    assert out.dtype == torch.float64 and out.shape == (2, 3)
    with pytest.raises(ValueError, match="ent_pred must have shape"):
        ranker(torch.zeros(2, 5))
