"""Statistics of the per-example weights: how clean and corrupted examples are weighed, and
each class; kept while training (``WeightStats``) and for a final scoring of every example
(``score_example_weights``, ``weight_diagnostics``). Weights here are *relative*: B·wᵢ, 1 is
the uniform weight.

Example:
    >>> import torch
    >>> w = torch.tensor([2.0, 1.5, 0.5, 0.0])
    >>> corrupted = torch.tensor([False, False, True, True])
    >>> clean_vs_corrupted(w, corrupted)
    {'weight_mean_clean': 1.75, 'weight_mean_corrupted': 0.25, 'weight_auc': 1.0}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from reweight.core.device import Placement
from reweight.train.batches import shuffled_pass
from reweight.train.metrics import auc

if TYPE_CHECKING:
    from reweight.methods import Method, StepInputs

__all__ = [
    "WeightStats",
    "clean_vs_corrupted",
    "example_labels",
    "per_class_means",
    "score_example_weights",
    "weight_diagnostics",
]

MAX_CLASSES = 10  # per-class weight means are reported for up to this many classes


def example_labels(
    n: int, labels: Tensor | None, corrupted: Tensor | None, num_classes: int | None
) -> tuple[Tensor | None, Tensor | None, int | None]:
    """The training set's observed labels, corruption mask and number of classes, as the
    diagnostics use them: each given one checked to have ``n`` entries; the mask on the CPU and
    only when something is corrupted (None for pure imbalance); the classes from the labels
    when not given."""
    for name, per_example in (("train_labels", labels), ("corrupted", corrupted)):
        if per_example is not None and len(per_example) != n:
            raise ValueError(f"{name} has {len(per_example)} entries, train_data {n}")
    mask = corrupted.bool().cpu() if corrupted is not None and bool(corrupted.any()) else None
    if num_classes is None and labels is not None:
        num_classes = int(labels.max()) + 1
    return labels, mask, num_classes


def clean_vs_corrupted(weights: Tensor, corrupted: Tensor) -> dict[str, float]:
    """Mean weight of the clean and of the corrupted examples (NaN for an empty group), and
    the AUC with which the weights separate them: P(a clean example outweighs a corrupted one)."""
    c = corrupted.bool()
    return {
        "weight_mean_clean": float(weights[~c].mean()) if (~c).any() else math.nan,
        "weight_mean_corrupted": float(weights[c].mean()) if c.any() else math.nan,
        "weight_auc": auc(weights, ~c),
    }


def per_class_means(weights: Tensor, labels: Tensor, num_classes: int | None) -> list[float]:
    """Mean weight of each class 0..K-1 (NaN for a class absent here); [] beyond MAX_CLASSES."""
    if num_classes is None or num_classes > MAX_CLASSES:
        return []
    return [
        float(weights[labels == k].mean()) if (labels == k).any() else math.nan
        for k in range(num_classes)
    ]


class WeightStats:
    """Running statistics of the weights: a window (reset at each log row) and run totals."""

    def __init__(self, num_classes: int | None, corrupted: Tensor | None, n: int) -> None:
        self.num_classes = num_classes
        self.corrupted = corrupted
        # per-example sums of the relative weight received in real updates
        self.received = torch.zeros(n, dtype=torch.float64)
        self.visits = torch.zeros(n, dtype=torch.float64)
        self.totals: dict[str, float] = {"zero_sum_batches": 0.0}
        self.reset_window()

    def reset_window(self) -> None:
        self.w: list[Tensor] = []
        self.idx: list[Tensor] = []
        self.y: list[Tensor] = []
        self.losses: list[float] = []
        self.mean_losses: list[float] = []
        self.meta_losses: list[float] = []

    def add(
        self, w: Tensor, out: Any, idx: Tensor, y: Tensor, loss: float, mean_loss: float
    ) -> None:
        """Record a (global) batch's weights ``w``; ``out`` for the meta loss and zero sum."""
        rel = w.detach().float().cpu() * len(w)  # 1 = uniform weight
        self.received.index_add_(0, idx.cpu(), rel.double())
        self.visits.index_add_(0, idx.cpu(), torch.ones_like(rel, dtype=torch.float64))
        self.w.append(rel)
        self.idx.append(idx.cpu())
        self.y.append(y.cpu())
        self.losses.append(loss)
        self.mean_losses.append(mean_loss)
        if out.meta_loss is not None:
            self.meta_losses.append(out.meta_loss)
        self.totals["zero_sum_batches"] += float(out.zero_sum)

    def mean_weights(self) -> Tensor:
        """(N,) each example's mean relative weight over the updates it was in; NaN if never."""
        mean = self.received / self.visits.clamp_min(1.0)
        return torch.where(self.visits > 0, mean, torch.full_like(mean, math.nan))

    def window_row(self) -> dict[str, float]:
        w, y = torch.cat(self.w), torch.cat(self.y)
        row = {
            "train_loss": sum(self.losses) / len(self.losses),
            "train_loss_unweighted": sum(self.mean_losses) / len(self.mean_losses),
            "meta_loss": (
                sum(self.meta_losses) / len(self.meta_losses) if self.meta_losses else float("nan")
            ),
            "weight_mean": float(w.mean()),
            "weight_std": float(w.std()) if len(w) > 1 else 0.0,
            "weight_max": float(w.max()),
            "weight_zero_frac": float((w == 0).double().mean()),
            "zero_sum_batches": self.totals["zero_sum_batches"],
        }
        if self.corrupted is not None:
            row.update(clean_vs_corrupted(w, self.corrupted[torch.cat(self.idx)]))
        for k, mean in enumerate(per_class_means(w, y, self.num_classes)):
            row[f"weight_mean_class{k}"] = mean
        self.reset_window()
        return row

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {"zero_sum_batches": int(self.totals["zero_sum_batches"])}
        seen = self.visits > 0
        if self.corrupted is not None and seen.any():
            # each example's mean weight over the real updates it took part in
            mean = self.received[seen] / self.visits[seen]
            stats = clean_vs_corrupted(mean, self.corrupted[seen])
            out.update({f"train_{k}": v for k, v in stats.items()})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "totals": dict(self.totals),
            "received": self.received,
            "visits": self.visits,
            "window": {
                "w": list(self.w),
                "idx": list(self.idx),
                "y": list(self.y),
                "losses": list(self.losses),
                "mean_losses": list(self.mean_losses),
                "meta_losses": list(self.meta_losses),
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.totals = dict(state["totals"])
        self.received, self.visits = state["received"].double(), state["visits"].double()
        for key, value in state["window"].items():
            setattr(self, key, list(value))


def weight_diagnostics(
    weights: Tensor, corrupted: Tensor | None, labels: Tensor | None, num_classes: int | None
) -> dict[str, Any]:
    """Mean weight of clean and corrupted examples, their AUC, and mean weight per class."""
    out: dict[str, Any] = {"weight_mean": float(weights.mean())}
    if corrupted is not None:
        out.update(clean_vs_corrupted(weights, corrupted))
    if labels is not None:
        means = per_class_means(weights, labels, num_classes)
        if means:
            out["weight_mean_per_class"] = means
    return out


def score_example_weights(
    method: Method,
    model: nn.Module,
    data: Dataset,
    placement: Placement,
    *,
    meta_batches: Callable[[int], Iterator[Any] | None],
    step_inputs: Callable[[Any, Tensor, Any, Tensor | None], StepInputs],
    batch_size: int,
    seed: int,
    num_workers: int = 0,
    passes: int = 1,
    progress: bool = False,
) -> Tensor:
    """The relative weight (B·wᵢ; 1 is uniform) the method gives every example of ``data`` now.

    Each pass visits ``data`` once in seeded random batches of ``batch_size`` (pass ``p``: seed
    ``seed + 12345 + p``), each with the meta batch ``meta_batches(2 + p)`` yields (None for
    methods without one), through ``method.weigh``; the result is the mean over ``passes``
    (different batch compositions average out the batch-to-batch noise of L2RW's clamped
    weights). Nothing is updated: not the model, its BatchNorm statistics or the method's
    state. ``step_inputs(x, y, meta_x, meta_y)`` builds what the method sees of a batch (on
    the device). Returns a (N,) tensor in dataset order.
    """
    n = len(data)  # type: ignore[arg-type]
    weights = torch.zeros(n)
    was_training = model.training
    model.train()
    try:
        for p in range(passes):
            meta_iter = meta_batches(2 + p)
            scored = shuffled_pass(data, batch_size, seed + 12_345 + p, num_workers)
            bar = tqdm(
                scored,
                total=-(-n // batch_size),
                desc=f"final weights, pass {p + 1}/{passes}",
                leave=False,
                disable=not progress,
                dynamic_ncols=True,
            )
            for idx, x, y in bar:
                mx = my = None
                if meta_iter is not None:
                    _, mx, my = next(meta_iter)
                    mx, my = placement.inputs(mx), my.to(placement.device)
                batch = step_inputs(placement.inputs(x), y.to(placement.device), mx, my)
                with placement.autocast():
                    w = method.weigh(batch)
                weights[idx] += w.detach().float().cpu() * len(idx) / passes
    finally:
        model.train(was_training)
    return weights
