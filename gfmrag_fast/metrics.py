"""Ranking metrics: multi-target retrieval (entities, documents) and filtered link prediction."""

from typing import Dict, Iterable, List

import torch


def target_ranks(
    scores: torch.Tensor,  # [B, M]
    target: torch.Tensor,  # [B, M] bool
) -> torch.Tensor:  # [B, M] float, rank of each target (inf elsewhere)
    """Filtered rank of every target: 1 + number of non-targets scoring at least as high (ties
    count against the target, as ULTRA/GFM-RAG); other targets are not competitors."""
    scores = scores.float()
    target = target.bool()
    neg = scores.masked_fill(target, float("-inf"))
    sorted_neg, _ = neg.sort(dim=-1)  # ascending
    # Targets sit at -inf in sorted_neg, below any score, so the entries >= s are exactly the
    # non-targets scoring at least s.
    below = torch.searchsorted(sorted_neg, scores.contiguous(), right=False)
    ranks = (scores.size(-1) - below).float() + 1
    return torch.where(target, ranks, torch.full_like(ranks, float("inf")))


def retrieval_metrics(
    scores: torch.Tensor,  # [B, M]
    target: torch.Tensor,  # [B, M] 0/1
    metrics: Iterable[str] = ("mrr", "hits@1", "hits@10", "recall@2", "recall@5"),
) -> Dict[str, torch.Tensor]:  # name -> [B'] per-query values (queries with a target)
    """Per-query metrics over the queries that have at least one target:

    * ``mrr``: mean over the query's targets of 1 / filtered rank;
    * ``hits@k``: fraction of the targets with filtered rank <= k;
    * ``recall@k``: fraction of the targets among the k highest scores (unfiltered top-k).
    """
    target = target.bool()
    keep = target.any(-1)
    scores, target = scores[keep].float(), target[keep]
    count = target.sum(-1).float()
    ranks = target_ranks(scores, target)
    out = {}
    for name in metrics:
        if name == "mrr":
            out[name] = torch.where(target, 1.0 / ranks, 0.0).sum(-1) / count
        elif name.startswith("hits@"):
            k = int(name.split("@")[1])
            out[name] = (ranks <= k).sum(-1).float() / count
        elif name.startswith("recall@"):
            k = min(int(name.split("@")[1]), scores.size(-1))
            top = scores.topk(k, dim=-1).indices
            out[name] = target.gather(-1, top).sum(-1).float() / count
        else:
            raise ValueError(f"unknown metric {name!r}: use mrr, hits@k or recall@k")
    return out


def link_prediction_ranks(
    scores: torch.Tensor,  # [Q, N] scores of every entity as the answer
    answer: torch.Tensor,  # [Q] the true answer of each query
    known: torch.Tensor,  # [Q, N] bool, all known true answers (filter), may include `answer`
) -> torch.Tensor:  # [Q] filtered rank, 1 = best
    """Filtered rank: 1 + number of entities that are not known answers and score at least as high
    as the answer (ties count against it, as ULTRA/NBFNet)."""
    scores = scores.float()
    true_score = scores.gather(-1, answer[:, None])
    competitors = ~known.clone()
    competitors.scatter_(-1, answer[:, None], False)
    return ((scores >= true_score) & competitors).sum(-1) + 1


LINK_PREDICTION_METRICS = ("mr", "mrr", "hits@1", "hits@3", "hits@10")


def check_link_prediction_metrics(names: Iterable[str]) -> List[str]:
    """The names as a list, or a ValueError naming the first one that is not mr, mrr or hits@k."""
    names = [str(name) for name in names]
    for name in names:
        if not (name in ("mr", "mrr") or (name.startswith("hits@") and name[len("hits@"):].isdigit())):
            raise ValueError(f"unknown link-prediction metric {name!r}: use mr, mrr or hits@k (e.g. hits@10)")
    return names


def link_prediction_metrics(ranks: torch.Tensor, names: Iterable[str] = LINK_PREDICTION_METRICS) -> Dict[str, float]:
    """MR, MRR and Hits@k (any k) of filtered ranks [Q]."""
    ranks = ranks.double()
    out = {}
    for name in check_link_prediction_metrics(names):
        if name == "mr":
            out[name] = ranks.mean().item()
        elif name == "mrr":
            out[name] = ranks.reciprocal().mean().item()
        else:
            out[name] = (ranks <= int(name[len("hits@"):])).double().mean().item()
    return out
