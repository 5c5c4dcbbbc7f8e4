"""Losses and ranking metrics against explicit loops."""

import math

import pytest
import torch

from gfmrag_fast.losses import adversarial_bce, list_ce
from gfmrag_fast.metrics import link_prediction_metrics, link_prediction_ranks, retrieval_metrics, target_ranks


def test_adversarial_bce_matches_loop():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 9, generator=gen)
    target = (torch.rand(4, 9, generator=gen) < 0.3).float()
    target[0] = 0  # no positive
    target[1, 0] = 1
    for temperature in (0.0, 0.2, 1.0):
        expected = []
        for b in range(4):
            pos = target[b] > 0.5
            neg = ~pos
            w = torch.zeros(9)
            if pos.any():
                w[pos] = 1 / pos.sum()
            if temperature > 0:
                w[neg] = torch.softmax(logits[b][neg] / temperature, 0)
            else:
                w[neg] = 1 / neg.sum()
            bce = torch.nn.functional.binary_cross_entropy_with_logits(logits[b], target[b], reduction="none")
            expected.append((w * bce).sum() / w.sum())
        torch.testing.assert_close(adversarial_bce(logits, target, temperature), torch.stack(expected).mean())


def test_adversarial_weights_carry_no_gradient():
    logits = torch.randn(2, 5, requires_grad=True)
    target = torch.tensor([[1.0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0]])
    adversarial_bce(logits, target, 1.0).backward()
    # d loss / d logit of a negative = weight * sigmoid(logit) / (Σ weights = 2) / (2 queries):
    # the adversarial weights themselves are detached
    w = torch.softmax(logits.detach()[0, 1:], 0)
    torch.testing.assert_close(logits.grad[0, 1:], w * torch.sigmoid(logits.detach()[0, 1:]) / 4)


def test_list_ce_matches_formula_and_skips_empty_rows():
    logits = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.0, 0.0]])
    target = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    p = torch.sigmoid(logits[0])
    share = p / (p.sum() + 1e-5)
    expected = -(torch.log(share[0] + 1e-5) + torch.log(share[2] + 1e-5)) / 2
    torch.testing.assert_close(list_ce(logits, target), expected)
    assert list_ce(logits, torch.zeros_like(target)).item() == 0.0


def test_retrieval_metrics_hand_computed():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1, 0.5], [0.1, 0.2, 0.3, 0.4, 0.5], [1, 1, 1, 1, 1.0]])
    target = torch.tensor([[0, 1, 0, 0, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    m = retrieval_metrics(scores, target, ["mrr", "hits@1", "hits@3", "recall@2", "recall@3"])
    # query 0: target 1 (0.8) beaten by 0.9 -> rank 2; target 4 (0.5) beaten by 0.9, 0.7 -> rank 3
    torch.testing.assert_close(m["mrr"], torch.tensor([(1 / 2 + 1 / 3) / 2, 1 / 5]))
    torch.testing.assert_close(m["hits@1"], torch.tensor([0.0, 0.0]))
    torch.testing.assert_close(m["hits@3"], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(m["recall@2"], torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(m["recall@3"], torch.tensor([0.5, 0.0]))
    with pytest.raises(ValueError, match="unknown metric"):
        retrieval_metrics(scores, target, ["ndcg"])


def test_target_ranks_random_against_loop():
    gen = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 5, (6, 12), generator=gen).float()  # many ties
    target = torch.rand(6, 12, generator=gen) < 0.3
    ranks = target_ranks(scores, target)
    for b in range(6):
        for j in range(12):
            if target[b, j]:
                expected = 1 + int(((scores[b] >= scores[b, j]) & ~target[b]).sum())
                assert ranks[b, j] == expected
            else:
                assert math.isinf(ranks[b, j])


def test_link_prediction_ranks_filtered():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.3, 0.3, 0.2, 0.1]])
    answer = torch.tensor([2, 0])
    known = torch.tensor([[False, True, True, False], [True, False, False, False]])
    ranks = link_prediction_ranks(scores, answer, known)
    assert ranks.tolist() == [2, 2]  # 0.9 filtered, 0.7 counts; tie 0.3 counts against
    m = link_prediction_metrics(ranks)
    assert m["mr"] == 2.0 and m["mrr"] == 0.5 and m["hits@1"] == 0.0 and m["hits@3"] == 1.0
