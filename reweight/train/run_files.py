"""The files a finished run leaves, written in one place for the command line and for
``Trainer(..., run_dir=...)`` alike: ``metrics.csv``, ``weights.pt`` (each example's final
weight and id), ``suspects.csv`` (where the labels may be noisy), ``summary.json`` and the
plots. ``checkpoint.pt`` is the Trainer's; ``labels.pt`` / ``dataset.json`` come with a dataset
bundle (``Trainer.from_bundle``); ``config.yaml``, ``train.log`` and ``.hydra/`` are the
command line's.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from reweight.core.files import (
    CURVES_PNG,
    HISTOGRAM_PNG,
    METRICS,
    SUMMARY,
    SUSPECTS,
    WEIGHTS,
    atomic_write,
)
from reweight.core.progress import phase
from reweight.data.core import save_labels
from reweight.outputs.plots import plot_learning_curves, plot_weight_histogram
from reweight.outputs.records import write_metrics_csv, write_summary
from reweight.outputs.suspects import example_ids, ranking_metrics, suspects_table, write_suspects

__all__ = ["write_run_files", "write_trainer_files"]

log = logging.getLogger(__name__)


def write_run_files(
    run_dir: str | os.PathLike,
    trainer: Any,
    result: Any,
    *,
    dataset: str = "data",
    class_names: Sequence[str] | None = None,
    ids: Sequence[str] | None = None,
    labels_known: bool = False,
    extra: Mapping[str, Any] | None = None,
    title: str | None = None,
) -> dict[str, Any]:
    """Write the end-of-run files of ``trainer`` (after ``fit``) into ``run_dir``; returns the
    summary written to ``summary.json``.

    ``result``: what ``fit`` returned (``FitResult``: the metrics, and every example's final
    weight when the trainer scored them). ``class_names`` / ``ids``: the dataset's class names
    and each training example's id (default: the indices). ``labels_known``: every training
    label's truth is known (a built-in dataset), so that without corrupted labels there is no
    noisy label to find and ``suspects.csv`` is left out (and the log says why). ``extra``:
    more summary keys, after the metrics.
    """
    run_dir = Path(run_dir)
    write_metrics_csv(run_dir / METRICS, trainer.history)
    n = len(trainer.train_data)
    names = example_ids(list(ids) if ids is not None else None, n)
    metrics: Mapping[str, Any] = result.metrics
    weights: Tensor | None = result.example_weights
    if weights is not None:
        payload = {"weights": weights.detach().cpu().clone(), "ids": names, "step": trainer.step}
        atomic_write(run_dir / WEIGHTS, lambda f: torch.save(payload, f))
    ranking = _suspects(run_dir, trainer, weights, class_names, names, labels_known, dataset)
    summary = {
        "method": metrics["method"],
        "dataset": dataset,
        **metrics,
        **({"suspect_ranking": ranking} if ranking else {}),
        **(extra or {}),
    }
    title = title or f"{summary['method']} on {dataset}"
    _plots(run_dir, trainer, weights, class_names, title)
    write_summary(run_dir / SUMMARY, summary)  # last: a run with a summary.json is finished
    return summary


def _suspects(
    run_dir: Path,
    trainer: Any,
    weights: Tensor | None,
    class_names: Sequence[str] | None,
    names: list[str],
    labels_known: bool,
    dataset: str,
) -> dict[str, Any]:
    """``suspects.csv`` where a label may be noisy; the ranking's precision where the
    corruption is known ({} otherwise)."""
    corrupted = trainer.corrupted
    known = corrupted if corrupted is not None and bool(corrupted.any()) else None
    if known is None and labels_known:
        log.info(
            "no %s: every training label of %s is its true label (no noisy label to find)",
            SUSPECTS,
            dataset,
        )
        return {}
    with phase(log, SUSPECTS, f"scoring {len(names)} training examples"):
        rows, ranking_w, losses = suspects_table(
            trainer,
            final=weights,
            class_names=list(class_names) if class_names is not None else None,
            ids=names,
            corrupted=known,
        )
        write_suspects(run_dir / SUSPECTS, rows)
    return {} if known is None else ranking_metrics(ranking_w, losses, known)


def _plots(
    run_dir: Path,
    trainer: Any,
    weights: Tensor | None,
    class_names: Sequence[str] | None,
    title: str,
) -> None:
    """The learning curves, and the final weights' histogram when there are final weights."""
    pngs = [CURVES_PNG] + ([HISTOGRAM_PNG] if weights is not None else [])
    with phase(log, "plots", ", ".join(pngs)):
        plot_learning_curves(
            trainer.history,
            run_dir / CURVES_PNG,
            title=title,
            class_names=class_names,
            max_steps=trainer.config.max_steps,
        )
        if weights is not None:
            plot_weight_histogram(
                weights,
                trainer.corrupted,
                run_dir / HISTOGRAM_PNG,
                labels=trainer.train_labels,
                class_names=class_names,
                title=title,
            )


def write_trainer_files(trainer: Any, result: Any) -> dict[str, Any]:
    """``write_run_files`` into ``trainer.run_dir`` (``Trainer(run_dir=...)`` after ``fit``),
    with the records of ``trainer.bundle`` when it was made ``from_bundle``: ``labels.pt``,
    ``dataset.json``, the class names and each example's id."""
    run_dir, bundle = Path(trainer.run_dir), trainer.bundle
    extra: dict[str, Any] = {"run_dir": str(run_dir.resolve())}
    if bundle is None:
        return write_run_files(run_dir, trainer, result, extra=extra)
    save_labels(bundle, run_dir)
    extra["dataset_info"] = bundle.info
    return write_run_files(
        run_dir,
        trainer,
        result,
        dataset=bundle.name,
        class_names=bundle.class_names,
        ids=bundle.train_ids,
        labels_known=bundle.info.get("true_labels_known", True),
        extra=extra,
    )
