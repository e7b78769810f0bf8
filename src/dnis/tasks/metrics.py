"""Metrics over whole prediction vectors (never averaged per batch)."""

from __future__ import annotations

import numpy as np
import torch


def rmse(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float(torch.sqrt(torch.mean((pred.double() - target.double()) ** 2)))


def mae(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float(torch.mean(torch.abs(pred.double() - target.double())))


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, ties given their average rank."""
    s = scores.double().numpy()
    y = labels.numpy() > 0.5
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_scores = s[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # average 1-based rank of each run of equal scores
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(s)]
    average = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(average, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def logloss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float(
        torch.nn.functional.binary_cross_entropy_with_logits(logits.double(), labels.double())
    )


def ranking_metrics(ranks: torch.Tensor, ks: tuple[int, ...]) -> dict[str, float]:
    """Recall@K and NDCG@K with one held-out item per user, from its 0-based rank (the
    leave-last-out special case of `per_user_ranking_metrics`, averaged)."""
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        out[f"recall@{k}"] = float(hit.double().mean())
        gain = torch.where(
            hit, 1.0 / torch.log2(ranks.double() + 2.0), torch.zeros_like(ranks).double()
        )
        out[f"ndcg@{k}"] = float(gain.mean())
    return out


def per_user_ranking_metrics(
    hit: torch.Tensor, relevant: torch.Tensor, ks: tuple[int, ...]
) -> torch.Tensor:
    """Per-user Recall@K and NDCG@K from the relevance of each user's ranked top positions.

    `hit` [U, k] bool: whether the item at 0-based position p of a user's ranking is one of the
    user's held-out items (k >= max(ks), or every item when there are fewer). `relevant` [U]: how
    many held-out items the user has (>= 1). Returns float64 [U, 2 * len(ks)] with columns
    (recall@K, ndcg@K) for K in ks: recall = hits in the top K / relevant; NDCG = DCG / IDCG with
    DCG = sum of 1 / log2(p + 2) over hit positions p < K and IDCG the same over the first
    min(relevant, K) positions (every held-out item ranked first).
    """
    top = max(ks)
    discount = 1.0 / torch.log2(torch.arange(top, dtype=torch.float64) + 2.0)
    ideal = torch.cumsum(discount, 0)
    gains = hit.double()
    relevant = relevant.double()
    columns = []
    for k in ks:
        cut = min(k, hit.shape[1])
        found = gains[:, :cut]
        columns.append(found.sum(1) / relevant)
        dcg = found @ discount[:cut]
        best = ideal[(relevant.clamp(max=k) - 1).long()]
        columns.append(dcg / best)
    return torch.stack(columns, dim=1)
