"""Metrics: AUC of weights against a corruption mask, accuracy per class."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["auc", "per_class_accuracy"]


def auc(scores: Tensor, positive: Tensor) -> float:
    """P(score of a random positive > score of a random negative), ties counting one half.

    The Mann–Whitney U statistic from average ranks; NaN when either group is empty.
    """
    scores = scores.detach().double().flatten().cpu()
    positive = positive.flatten().bool().cpu()
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    sorted_scores, order = torch.sort(scores)
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # average the ranks of tied scores
    _, inverse, counts = torch.unique_consecutive(
        sorted_scores, return_inverse=True, return_counts=True
    )
    ends = torch.cumsum(counts, 0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks[order] = mean_rank[inverse]
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def per_class_accuracy(correct: Tensor, targets: Tensor, num_classes: int) -> list[float]:
    """Accuracy within each class (NaN for a class absent from ``targets``)."""
    hits = torch.bincount(targets[correct], minlength=num_classes).double()
    totals = torch.bincount(targets, minlength=num_classes).double()
    acc = hits / totals
    return [float(a) for a in acc]
