"""Find the bad labels: every training example ranked from most to least suspect.

After training, each example has a final weight (``Trainer.example_weights``, 1 = uniform), a
mean weight over training (``WeightStats``: weight received / times drawn), and the model's
prediction and loss on its given label. **Most suspect** = lowest weight first (the final weight
when it was scored, ``trainer.final_weights >= 1``, else the mean weight over training); ties
(e.g. ERM's constant weights, or L2RW's many zeros) are broken by the higher final loss, then by
the index. ``suspects.csv`` lists them in that order; ``ranking_metrics`` says how well the
ranking finds the corrupted labels, beside the small-loss ranking (highest loss first, the usual
baseline), so a user sees whether the learned weights beat it.

Example:
    >>> import torch
    >>> w = torch.tensor([1.0, 0.0, 1.0, 0.0])
    >>> loss = torch.tensor([0.1, 2.0, 3.0, 1.0])
    >>> suspect_order(w, loss).tolist()
    [1, 3, 2, 0]
    >>> corrupted = torch.tensor([False, True, False, True])
    >>> precision_recall_at_k(torch.tensor([1, 3, 2, 0]), corrupted, 2)
    (1.0, 1.0)
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from reweight.core.files import atomic_write
from reweight.core.inputs import to_device

__all__ = [
    "FIXED_K",
    "SUSPECT_COLUMNS",
    "example_ids",
    "precision_recall_at_k",
    "ranking_metrics",
    "score_examples",
    "suspect_order",
    "suspects_table",
    "write_suspects",
]

FIXED_K = (10, 50, 100, 500, 1000)
"""The fixed k of precision@k / recall@k besides k = number of corrupted (those <= N)."""

SUSPECT_COLUMNS = (
    "rank",
    "index",
    "id",
    "given_label",
    "predicted_label",
    "probability",
    "loss",
    "final_weight",
    "mean_weight",
    "corrupted",
)
"""Columns of ``suspects.csv``: ``index`` is the position in the training set, ``id`` the file
path or CSV id (else the index), labels are class names, ``probability`` is the model's
softmax probability of its predicted label, ``loss`` the loss on the given label,
``corrupted`` is 1/0 where the corruption is known (synthetic noise), else empty."""


def example_ids(ids: list[str] | None, n: int) -> list[str]:
    """The id of each of ``n`` training examples as ``suspects.csv`` and ``weights.pt`` write it:
    the dataset's ids (file path, CSV id) where it has them, else the index as a string."""
    return list(ids) if ids is not None else [str(i) for i in range(n)]


@torch.no_grad()
def score_examples(trainer: Any) -> dict[str, Tensor]:
    """The model's prediction, its probability and the loss on the given label of every training
    example, in dataset order, in eval mode (no update, no augmentation noise from dropout).
    Returns CPU tensors ``predicted`` (int64), ``probability`` and ``loss`` (float32)."""
    model, data = trainer.model, trainer.train_data
    loader = DataLoader(data, batch_size=trainer.config.eval_batch_size, shuffle=False)
    was_training = model.training
    model.eval()
    out: dict[str, list[Tensor]] = {"predicted": [], "probability": [], "loss": []}
    try:
        for x, y in loader:
            x, y = to_device(x, trainer.device), torch.as_tensor(y).to(trainer.device)
            logits = model(x).float()
            prob, pred = logits.softmax(dim=1).max(dim=1)
            out["predicted"].append(pred.cpu())
            out["probability"].append(prob.cpu())
            out["loss"].append(trainer.loss_fn(logits, y, reduction="none").float().cpu())
    finally:
        model.train(was_training)
    return {k: torch.cat(v) for k, v in out.items()}


def suspect_order(weights: Tensor, losses: Tensor) -> Tensor:
    """Indices from most to least suspect: lowest weight, ties by highest loss, then index.
    NaN weights (examples never drawn) count as weight 1 (uniform)."""
    w = torch.nan_to_num(weights.double(), nan=1.0).tolist()
    ls = losses.double().tolist()
    order = sorted(range(len(w)), key=lambda i: (w[i], -ls[i], i))
    return torch.tensor(order, dtype=torch.int64)


def precision_recall_at_k(order: Tensor, corrupted: Tensor, k: int) -> tuple[float, float]:
    """Precision (corrupted among the top ``k``) and recall (of all corrupted, the share in the
    top ``k``) of a ranking ``order`` (most suspect first)."""
    hits = int(corrupted.bool()[order[:k]].sum())
    total = int(corrupted.bool().sum())
    return hits / k if k else math.nan, hits / total if total else math.nan


def ranking_metrics(weights: Tensor, losses: Tensor, corrupted: Tensor) -> dict[str, Any]:
    """Precision@k and recall@k of the suspect ranking and of the small-loss ranking against
    the corruption mask: k = the number of corrupted examples (``precision_at_k``, where
    precision equals recall) and each of ``FIXED_K`` up to N."""
    n, n_bad = losses.numel(), int(corrupted.sum())
    ks = [k for k in FIXED_K if k <= n]
    out: dict[str, Any] = {"num_corrupted": n_bad}
    rankings = {
        "weight": suspect_order(weights, losses),
        "small_loss": torch.argsort(losses.double(), descending=True, stable=True),
    }
    for name, order in rankings.items():
        p, r = precision_recall_at_k(order, corrupted, n_bad)
        row: dict[str, float] = {"precision_at_k": p, "recall_at_k": r}
        for k in ks:
            row[f"precision_at_{k}"], row[f"recall_at_{k}"] = precision_recall_at_k(
                order, corrupted, k
            )
        out[name] = row
    return out


def suspects_table(
    trainer: Any,
    *,
    final: Tensor | None = None,
    class_names: list[str] | None = None,
    ids: list[str] | None = None,
    corrupted: Tensor | None = None,
) -> tuple[list[dict[str, Any]], Tensor, Tensor]:
    """The rows of ``suspects.csv`` (most suspect first), the weights that ranked them and the
    final losses. ``final``: every example's final weight (``FitResult.example_weights``), which
    ranks them when given; else their mean weight over training."""
    scores = score_examples(trainer)
    n = scores["loss"].numel()
    mean = trainer.mean_example_weights()
    ranking_w = final.detach().cpu().float() if final is not None else mean.float()
    order = suspect_order(ranking_w, scores["loss"])
    labels = trainer.train_labels if trainer.train_labels is not None else None
    if labels is None:
        labels = torch.tensor([int(trainer.train_data[i][1]) for i in range(n)])

    def name(c: int) -> str:
        return class_names[c] if class_names is not None else str(c)

    names = example_ids(ids, n)
    # Python lists first: indexing a tensor element by element costs ~20 us an example
    given, predicted = labels.tolist(), scores["predicted"].tolist()
    probability, loss, mean_w = (t.tolist() for t in (scores["probability"], scores["loss"], mean))
    final_w = final.tolist() if final is not None else None
    bad = corrupted.tolist() if corrupted is not None else None
    rows = []
    for rank, i in enumerate(order.tolist(), start=1):
        rows.append(
            {
                "rank": rank,
                "index": i,
                "id": names[i],
                "given_label": name(int(given[i])),
                "predicted_label": name(predicted[i]),
                "probability": f"{probability[i]:.6g}",
                "loss": f"{loss[i]:.6g}",
                "final_weight": f"{final_w[i]:.6g}" if final_w is not None else "",
                "mean_weight": f"{mean_w[i]:.6g}",
                "corrupted": int(bad[i]) if bad is not None else "",
            }
        )
    return rows, ranking_w, scores["loss"]


def write_suspects(path: str | os.PathLike, rows: list[dict[str, Any]]) -> Path:
    """``suspects.csv`` through the one atomic writer."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUSPECT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    data = buf.getvalue().encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))
