"""Metrics: AUC of weights against a corruption mask, accuracy per class, and the evaluation
of a model on the validation and test sets while it trains (``Evaluation``)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from reweight.core.device import Placement
from reweight.train.batches import loader
from reweight.train.config import TrainerConfig

__all__ = [
    "Evaluation",
    "auc",
    "best_accuracy_of",
    "evaluate_classifier",
    "per_class_accuracy",
    "summarize_test",
]


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


def summarize_test(
    evaluation: dict[str, Any], best_accuracy: float, name: str | None = None
) -> dict[str, Any]:
    """The summary's ``test_*`` keys from an ``evaluate_classifier`` result, and the best test
    accuracy seen (``best_accuracy``, NaN when none was evaluated before). ``name``: a further
    test set's, whose keys are ``test_<name>_*`` (and no best accuracy: the main test set's
    alone is tracked)."""
    acc, balanced = evaluation["accuracy"], evaluation["balanced_accuracy"]
    prefix = "test" if name is None else f"test_{name}"
    out = {
        f"{prefix}_accuracy": acc,
        f"{prefix}_error": 1 - acc,
        f"{prefix}_balanced_accuracy": balanced,
        f"{prefix}_balanced_error": 1 - balanced,
        f"{prefix}_loss": evaluation["loss"],
    }
    if name is not None:
        return {**out, f"{prefix}_per_class_accuracy": evaluation["per_class_accuracy"]}
    out["best_test_accuracy"] = best_accuracy_of(best_accuracy, acc)
    return {**out, "per_class_accuracy": evaluation["per_class_accuracy"]}


class Evaluation:
    """The validation and test sets of a run, evaluated when the loop asks.

    ``row(step)``: the ``val_*`` and ``test_*`` scalars of a history row (the best test accuracy
    so far follows); ``summary(step)``: the summary's keys. ``extra_tests``: more test sets by
    name, evaluated wherever the test set is (``test_<name>_*`` keys). A test set is evaluated
    once per step: the summary reuses the last row's result. ``best_test_accuracy`` is part of a
    checkpoint (the loop saves and restores it). ``config``: the loop's (its evaluation batch
    size, workers and progress bars).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., Tensor],
        placement: Placement,
        num_classes: int | None,
        config: TrainerConfig,
        val_data: Dataset | None = None,
        test_data: Dataset | None = None,
        extra_tests: Mapping[str, Dataset] | None = None,
    ) -> None:
        self.model, self.loss_fn, self.placement = model, loss_fn, placement
        self.num_classes, self.config = num_classes, config
        self.val_data, self.test_data = val_data, test_data
        self.extra_tests = dict(extra_tests or {})
        self.best_test_accuracy = float("nan")
        self._tested: dict[str | None, tuple[int, dict[str, Any]]] = {}  # name: (step, result)

    def evaluate(self, data: Dataset) -> dict[str, Any]:
        """Accuracy, balanced (mean per-class) accuracy, per-class accuracy and mean loss."""
        batched = loader(
            data,
            batch_size=self.config.eval_batch_size,
            num_workers=self.config.num_workers,
            generator=torch.Generator().manual_seed(0),  # keep the global RNG intact
        )
        device = self.placement.device
        return evaluate_classifier(
            self.model,
            batched,
            self.loss_fn,
            prepare=lambda x, y: (self.placement.inputs(x), torch.as_tensor(y).to(device)),
            autocast=self.placement.autocast,
            num_classes=self.num_classes,
            progress=self.config.show_progress,
        )

    def val_metrics(self) -> dict[str, float]:
        """``val_*`` scalars of the validation set ({} without one)."""
        if self.val_data is None:
            return {}
        ev = self.evaluate(self.val_data)
        return {f"val_{k}": v for k, v in ev.items() if not isinstance(v, list)}

    def test(self, step: int, name: str | None = None) -> dict[str, Any]:
        """``evaluate(test_data)`` (``name``: ``extra_tests[name]``), once per step."""
        data = self.test_data if name is None else self.extra_tests[name]
        assert data is not None
        done = self._tested.get(name)
        if done is None or done[0] != step:
            done = self._tested[name] = (step, self.evaluate(data))
        return done[1]

    def row(self, step: int) -> dict[str, float]:
        """The evaluation scalars of a history row at ``step``."""
        row = self.val_metrics()
        if self.test_data is not None:
            ev = self.test(step)
            row.update({f"test_{k}": v for k, v in ev.items() if not isinstance(v, list)})
            self.best_test_accuracy = best_accuracy_of(self.best_test_accuracy, ev["accuracy"])
        for name in self.extra_tests:
            ev = self.test(step, name)
            row.update({f"test_{name}_{k}": v for k, v in ev.items() if not isinstance(v, list)})
        return row

    def summary(self, step: int) -> dict[str, Any]:
        """The summary's evaluation keys at ``step`` (``summarize_test`` for each test set)."""
        out: dict[str, Any] = self.val_metrics()
        if self.test_data is not None:
            out.update(summarize_test(self.test(step), self.best_test_accuracy))
        for name in self.extra_tests:
            out.update(summarize_test(self.test(step, name), math.nan, name))
        return out

    def sets(self) -> str:
        """What ``summary`` evaluates, in words (for the log)."""
        names = [n for n, d in (("val", self.val_data), ("test", self.test_data)) if d]
        names += [f"test_{name}" for name in self.extra_tests]
        return " and ".join(names) or "nothing to evaluate"
