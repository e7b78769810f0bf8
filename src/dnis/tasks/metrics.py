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
    """Recall@K and NDCG@K with one held-out item per user, from its 0-based rank."""
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        out[f"recall@{k}"] = float(hit.double().mean())
        gain = torch.where(
            hit, 1.0 / torch.log2(ranks.double() + 2.0), torch.zeros_like(ranks).double()
        )
        out[f"ndcg@{k}"] = float(gain.mean())
    return out
