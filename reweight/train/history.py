"""The rows a run makes, and where each goes as it is made: the history (every process), and on
the process that writes, the log line, the callbacks (e.g. ``metrics.csv``) and the trackers;
what ``Trainer.fit`` and ``Trainer.train_step`` return."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from reweight.methods import MethodOutput
from reweight.train.loggers import Logger, LoggerGroup

__all__ = ["FitResult", "History", "StepResult"]

log = logging.getLogger("reweight.train.trainer")  # the loop's lines, under the loop's name


@dataclass
class FitResult:
    history: list[dict[str, float]]  # one row per log step (and per evaluation)
    metrics: dict[str, Any]  # final metrics: test accuracy, per-class accuracy, weight stats
    example_weights: Tensor | None = None  # (N,) every example's final weight (final_weights)


@dataclass
class StepResult:
    """What one real update did (``Trainer.train_step``)."""

    method: MethodOutput  # this process's weights (B,), the meta loss, the zero-sum flag
    loss: float  # Σ wᵢℓᵢ over the global batch: what the update minimised
    mean_loss: float  # the unweighted mean loss of the global batch
    lr: float  # the learning rate the update used


class History:
    """The history rows of a run and their readers.

    ``emit(row, weights)`` appends a row and, when ``is_main``, logs it as one line, calls each
    callback with it and hands it to the trackers with the last batch's relative weights (their
    histogram). ``resumed()``: the rows from before a checkpoint are offered to the trackers
    first (each skips those it has). ``close(status)`` closes the trackers.
    """

    def __init__(
        self,
        callbacks: Sequence[Callable[[dict[str, float]], None]],
        loggers: Sequence[Logger],
        config: Mapping[str, Any],
        is_main: bool = True,
    ) -> None:
        self.rows: list[dict[str, float]] = []
        self.callbacks = list(callbacks)
        self.trackers = LoggerGroup(loggers, config)
        self.is_main = is_main

    def emit(self, row: dict[str, float], weights: Tensor | None = None) -> None:
        self.rows.append(row)
        if not self.is_main:
            return
        log.info(
            "step %d: %s",
            int(row["step"]),
            ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "step" and not math.isnan(v)),
        )
        for callback in self.callbacks:
            callback(row)
        self.trackers.log(int(row["step"]), row, weights)

    def resumed(self) -> None:
        self.trackers.backlog = list(self.rows)

    def close(self, status: str) -> None:
        if self.is_main:
            self.trackers.close(status)
