"""The plots of a run: learning curves and the histogram of the final weights (matplotlib on the
Agg backend, imported lazily; each PNG written atomically)."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from reweight.core.files import atomic_write

__all__ = [
    "plot_learning_curves",
    "plot_suspect_grid",
    "plot_weight_histogram",
    "plot_weight_vs_loss",
]

log = logging.getLogger(__name__)


# -- plots --------------------------------------------------------------------------------------


@functools.cache
def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, or None when it cannot be imported (a base
    dependency, so only a broken install; warned once per process, not once per plot)."""
    try:
        import matplotlib
    except ImportError as err:
        log.warning("matplotlib cannot be imported (%s): no plots; pip install matplotlib", err)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextlib.contextmanager
def _figure(plt: Any, *args: Any, **kwargs: Any) -> Iterator[tuple[Any, Any]]:
    """``plt.subplots(*args, **kwargs)``, the figure closed however the block ends."""
    fig, axes = plt.subplots(*args, **kwargs)
    try:
        yield fig, axes
    finally:
        plt.close(fig)


def _save(fig: Any, path: str | os.PathLike) -> Path:
    """The figure as a PNG at ``path``, written atomically."""
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for row in history:
        value = row.get(key)
        if value is not None and isinstance(value, int | float) and math.isfinite(value):
            xs.append(float(row["step"]))
            ys.append(float(value))
    return xs, ys


def plot_learning_curves(
    history: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    title: str | None = None,
    class_names: Sequence[str] | None = None,
    max_steps: int | None = None,
) -> Path | None:
    """Four panels over optimizer steps: training losses, meta loss (both on a log axis, which
    keeps a loss that falls by decades readable), test accuracy and the mean relative weight of
    clean and corrupted examples (of each class, by ``class_names``, when nothing is
    corrupted). Every panel spans steps 0 to ``max_steps`` (else the last logged step), so a
    single evaluation of a short run sits where it belongs instead of alone on a ±5% axis;
    accuracies get at least ±0.02 around what was measured, within [0, 1].
    Returns the PNG's path, or None when matplotlib is missing or ``history`` is empty."""
    if not history:
        log.warning("no history rows: no learning curves")
        return None
    plt = _pyplot()
    if plt is None:
        return None
    panels = (
        (
            "loss",
            (("train_loss", "weighted train loss"), ("train_loss_unweighted", "mean train loss")),
        ),
        ("meta loss", (("meta_loss", "meta loss (clean batch)"),)),
        (
            "test accuracy",
            (("test_accuracy", "accuracy"), ("test_balanced_accuracy", "balanced accuracy")),
        ),
    )
    panels = (*panels, ("mean relative weight (1 = uniform)", _weight_curves(history, class_names)))
    steps = [float(row["step"]) for row in history if "step" in row]
    right = float(max_steps) if max_steps else max(steps, default=1.0)
    with _figure(plt, 2, 2, figsize=(10, 7), constrained_layout=True) as (fig, axes):
        for ax, (ylabel, curves) in zip(axes.flat, panels, strict=True):
            _panel(ax, history, ylabel, curves, right)
        if title:
            fig.suptitle(title)
        return _save(fig, path)


def _weight_curves(
    history: Sequence[Mapping[str, Any]], class_names: Sequence[str] | None
) -> tuple[tuple[str, str], ...]:
    """The weight panel's curves: clean and corrupted, or each class when nothing is
    corrupted (the mean over all when no class was logged)."""
    if _series(history, "weight_mean_corrupted")[0]:
        return (("weight_mean_clean", "clean"), ("weight_mean_corrupted", "corrupted"))
    classes = sorted(
        {k for row in history for k in row if k.startswith("weight_mean_class")},
        key=lambda k: int(k.removeprefix("weight_mean_class")),
    )
    return tuple(
        (k, _class_name(int(k.removeprefix("weight_mean_class")), class_names)) for k in classes
    ) or (("weight_mean", "all"),)


def _panel(
    ax: Any,
    history: Sequence[Mapping[str, Any]],
    ylabel: str,
    curves: Sequence[tuple[str, str]],
    right: float,
) -> None:
    """One panel of the learning curves: each curve logged, losses on a log axis, accuracies
    with a margin, steps 0 to ``right``."""
    from matplotlib import ticker

    drawn, positive = 0, True
    for key, label in curves:
        xs, ys = _series(history, key)
        if xs:
            ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=label)
            drawn += 1
            positive = positive and min(ys) > 0
    if "loss" in ylabel and drawn and positive:
        ax.set_yscale("log")
        # plain numbers (0.8, not 8×10⁻¹), minor ticks labelled as matplotlib thins them
        ax.yaxis.set_major_formatter(ticker.LogFormatter())
        ax.yaxis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False))
        ylabel = f"{ylabel} (log scale)"
    if "accuracy" in ylabel and drawn:  # one point or many: a range of accuracies
        values = [v for key, _ in curves for v in _series(history, key)[1]]
        margin = max(0.02, 0.1 * (max(values) - min(values)))
        ax.set_ylim(max(min(values) - margin, -0.01), min(max(values) + margin, 1.01))
    ax.set_xlim(0, max(right, 1.0) * 1.02)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)


def plot_weight_histogram(
    weights: Sequence[float] | Any,
    corrupted: Sequence[bool] | Any | None,
    path: str | os.PathLike,
    labels: Sequence[int] | Any | None = None,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
) -> Path | None:
    """Histogram of every training example's relative weight (1 = uniform), clean vs corrupted.

    ``weights`` and ``corrupted`` are (N,) sequences or tensors. When no example is corrupted
    (an imbalanced dataset) and ``labels`` are given, the groups are the classes instead (up to
    10). Returns the PNG's path, or None when matplotlib is missing.
    """
    plt = _pyplot()
    if plt is None:
        return None
    w = [float(v) for v in _tolist(weights)]
    groups: list[tuple[str, list[float]]]
    mask = [bool(c) for c in _tolist(corrupted)] if corrupted is not None else [False] * len(w)
    if len(mask) != len(w):
        raise ValueError(f"weights has {len(w)} entries, corrupted {len(mask)}")
    if any(mask):
        groups = [
            ("clean", [v for v, c in zip(w, mask, strict=True) if not c]),
            ("corrupted", [v for v, c in zip(w, mask, strict=True) if c]),
        ]
    elif labels is not None and len(set(_tolist(labels))) <= 10:
        ys = [int(y) for y in _tolist(labels)]
        groups = [
            (_class_name(k, class_names), [v for v, y in zip(w, ys, strict=True) if y == k])
            for k in sorted(set(ys))
        ]
    else:
        groups = [("all (none corrupted)", w)]
    top = max(w) if w else 1.0
    bins = [top * i / 40 for i in range(41)] if top > 0 else 40
    with _figure(plt, figsize=(7, 4.5), constrained_layout=True) as (fig, ax):
        for name, values in groups:
            if values:
                # density per group: a 2 % minority stays visible beside the majority
                ax.hist(
                    values, bins=bins, alpha=0.55, density=True, label=f"{name} (n={len(values)})"
                )
        ax.set_xlabel("relative weight B·wᵢ at the end of training (1 = uniform)")
        ax.set_ylabel("density")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
        if title:
            ax.set_title(title)
        return _save(fig, path)


def _tolist(values: Any) -> list:
    return values.tolist() if hasattr(values, "tolist") else list(values)


def _class_name(k: int, class_names: Sequence[str] | None) -> str:
    """The dataset's name of class ``k`` (as ``suspects.csv`` writes it), else ``class k``."""
    names = list(class_names or [])
    return str(names[k]) if k < len(names) else f"class {k}"


def _short(text: str, width: int = 18) -> str:
    """``text`` cut to its last ``width`` characters (a file path keeps its name)."""
    return text if len(text) <= width else "…" + text[-(width - 1) :]


def plot_suspect_grid(
    images: Sequence[Any],
    suspects: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    title: str | None = None,
) -> Path | None:
    """A grid of images (``(C, H, W)`` tensors, any scale: each is min-max scaled for display),
    each captioned from its row of ``suspects.csv`` (``id``, ``given_label``,
    ``predicted_label``, ``probability``) over three lines: the id (a file name keeps its
    tail), ``given → predicted`` and ``p = 0.93``; the heading says what the lines are."""
    plt = _pyplot()
    if plt is None or not images:
        return None
    cols = min(8, len(images))
    rows = -(-len(images) // cols)
    figsize = (max(1.7 * cols, 6.0), 2.3 * rows + 0.8)  # wide enough for the heading
    with _figure(plt, rows, cols, figsize=figsize, squeeze=False, layout="constrained") as (
        fig,
        axes,
    ):
        for ax in axes.flat:
            ax.axis("off")
        for ax, image, row in zip(axes.flat, images, suspects, strict=False):
            x = image.detach().float().cpu()
            x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)
            if x.shape[0] == 1:
                ax.imshow(x[0].numpy(), cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(x[:3].permute(1, 2, 0).numpy())
            caption = (
                f"{_short(str(row['id']))}\n"
                f"{row['given_label']} → {row['predicted_label']}\n"
                f"p = {float(row['probability']):.2f}"
            )
            ax.set_title(caption, fontsize=8, linespacing=1.15)
        legend = "each image: id; given label → predicted label; p = the model's probability of it"
        fig.suptitle(f"{title}\n{legend}" if title else legend, fontsize=9)
        return _save(fig, path)


def plot_weight_vs_loss(
    weights: Sequence[float],
    losses: Sequence[float],
    corrupted: Sequence[bool] | None,
    path: str | os.PathLike,
    title: str | None = None,
) -> Path | None:
    """Each training example's weight against its final loss; clean and corrupted examples in
    two colours when the corruption is known, else one."""
    plt = _pyplot()
    if plt is None or not len(weights):
        return None
    with _figure(plt, figsize=(5.5, 4.5)) as (fig, ax):
        if corrupted is None:
            ax.scatter(losses, weights, s=4, alpha=0.5, label="training examples")
        else:
            for flag, name, colour in (
                (False, "clean", "tab:blue"),
                (True, "corrupted", "tab:red"),
            ):
                xs = [loss for loss, c in zip(losses, corrupted, strict=True) if c == flag]
                ys = [w for w, c in zip(weights, corrupted, strict=True) if c == flag]
                ax.scatter(xs, ys, s=4, alpha=0.5, c=colour, label=f"{name} ({len(xs)})")
        ax.set_xlabel("final loss on the given label")
        ax.set_ylabel("weight (1 = uniform)")
        ax.legend(loc="best", fontsize=8)
        if title:
            ax.set_title(title, fontsize=9)
        fig.tight_layout()
        return _save(fig, path)
