"""Metrics: AUC of weights against a corruption mask, accuracy per class, evaluation."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

__all__ = ["auc", "best_accuracy_of", "evaluate_classifier", "per_class_accuracy", "summarize_test"]


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


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module,
    batches: Iterable[tuple[Any, Any]],
    loss_fn: Callable[..., Tensor],
    *,
    prepare: Callable[[Any, Any], tuple[Tensor, Tensor]] = lambda x, y: (x, y),
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    num_classes: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Accuracy, balanced (mean per-class, over the classes present) accuracy, per-class
    accuracy and mean loss of ``model`` in eval mode over ``batches`` of ``(x, y)``; the
    model's mode is restored. ``prepare`` moves a batch to the model's device."""
    was_training = model.training
    model.eval()
    preds, targets, loss_sum = [], [], 0.0
    try:
        for x, y in tqdm(batches, desc="eval", leave=False, disable=not progress):
            x, y = prepare(x, y)
            with autocast():
                out = model(x)
            loss_sum += float(loss_fn(out.float(), y, reduction="sum"))
            preds.append(out.argmax(1).cpu())
            targets.append(y.cpu())
    finally:
        model.train(was_training)
    pred, target = torch.cat(preds), torch.cat(targets)
    k = num_classes or int(max(pred.max(), target.max())) + 1
    per_class = per_class_accuracy(pred == target, target, k)
    present = [a for a in per_class if not math.isnan(a)]
    return {
        "accuracy": float((pred == target).double().mean()),
        "balanced_accuracy": sum(present) / len(present),
        "loss": loss_sum / len(target),
        "per_class_accuracy": per_class,
    }


def best_accuracy_of(best: float, accuracy: float) -> float:
    """The best accuracy so far, given the best before (NaN: none yet) and a new one."""
    return accuracy if math.isnan(best) else max(best, accuracy)


def summarize_test(evaluation: dict[str, Any], best_accuracy: float) -> dict[str, Any]:
    """The summary's ``test_*`` keys from an ``evaluate_classifier`` result, and the best test
    accuracy seen (``best_accuracy``, NaN when none was evaluated before)."""
    acc, balanced = evaluation["accuracy"], evaluation["balanced_accuracy"]
    return {
        "test_accuracy": acc,
        "test_error": 1 - acc,
        "test_balanced_accuracy": balanced,
        "test_balanced_error": 1 - balanced,
        "test_loss": evaluation["loss"],
        "best_test_accuracy": best_accuracy_of(best_accuracy, acc),
        "per_class_accuracy": evaluation["per_class_accuracy"],
    }
