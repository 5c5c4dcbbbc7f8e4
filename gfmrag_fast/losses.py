"""Training losses of GFM-RAG: BCE with self-adversarial negative weights, and ListCE."""

import torch
import torch.nn.functional as F


def adversarial_bce(
    logits: torch.Tensor,  # [B, M] scores of M candidates per query
    target: torch.Tensor,  # [B, M] 1 for true candidates, 0 for negatives
    adversarial_temperature: float = 0.0,
) -> torch.Tensor:  # scalar
    """Binary cross-entropy where, per query, positives share weight 1 equally and negatives share
    weight 1 by ``softmax(logit / temperature)`` over the negatives (self-adversarial sampling,
    weights detached), or equally when the temperature is 0:

        loss_b = Σ_j w_bj · BCE(logit_bj, target_bj) / Σ_j w_bj,   loss = mean_b loss_b

    Pre-training uses temperature 1 on [B, 1 + K] batches (column 0 positive); fine-tuning 0.2 on
    [B, N] entity scores. Queries without positives or negatives contribute only the other part.
    """
    logits = logits.float()
    target = target.to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    positive = target > 0.5
    negative = ~positive
    num_positive = positive.sum(-1, keepdim=True).clamp(min=1)
    pos_weight = positive.to(logits.dtype) / num_positive
    with torch.no_grad():
        if adversarial_temperature > 0:
            scaled = (logits / adversarial_temperature).masked_fill(positive, float("-inf"))
            neg_weight = torch.softmax(scaled, dim=-1).nan_to_num(0.0)  # rows without negatives: 0
        else:
            neg_weight = negative.to(logits.dtype) / negative.sum(-1, keepdim=True).clamp(min=1)
    weight = pos_weight + neg_weight * negative
    return ((loss * weight).sum(-1) / weight.sum(-1).clamp(min=1e-12)).mean()


def list_ce(
    logits: torch.Tensor,  # [B, N]
    target: torch.Tensor,  # [B, N] 0/1
    eps: float = 1e-5,
) -> torch.Tensor:  # scalar
    """GFM-RAG's listwise cross-entropy: with p = sigmoid(logits) normalised over the list,

        loss_b = - Σ_j target_bj · log(p_bj / (Σ_k p_bk + eps) + eps) / Σ_j target_bj

    averaged over the queries that have at least one target."""
    logits = logits.float()
    target = target.to(logits.dtype)
    count = target.sum(-1)
    has_target = (count > 0).to(logits.dtype)
    prob = torch.sigmoid(logits)
    share = prob / (prob.sum(-1, keepdim=True) + eps)
    per_query = -(torch.log(share + eps) * target).sum(-1) / count.clamp(min=1)
    # Masked mean rather than boolean indexing: no host synchronisation in the training step.
    return (per_query * has_target).sum() / has_target.sum().clamp(min=1)
