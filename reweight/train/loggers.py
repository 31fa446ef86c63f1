"""Experiment trackers behind one interface: the ``Logger`` protocol, ``build_loggers`` (the
``logger`` config block -> the writers of ``reweight.train.trackers``), ``close_all`` and
``LoggerGroup`` (several loggers as one, for the Trainer).

A ``Trainer(..., loggers=[...])`` hands every logger the run's config once, then each history
row (``step`` is the x axis; every other numeric key is a scalar) and a histogram of the last
batch's relative weights (B·wᵢ, 1 is uniform). Anything with these four methods is a logger::

    class PrintLogger:
        def log_config(self, config): print(config)
        def log_row(self, step, row): print(step, row)
        def log_histogram(self, name, values, step): pass
        def close(self): pass
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from reweight.train.trackers import MLflowLogger, TensorBoardLogger, WandbLogger

__all__ = ["LOGGERS", "Logger", "LoggerGroup", "build_loggers", "close_all"]

log = logging.getLogger(__name__)


@runtime_checkable
class Logger(Protocol):
    """What the Trainer calls: config once (after the first step), rows and histograms as they
    are made, ``close`` when ``fit`` returns or raises."""

    def log_config(self, config: Mapping[str, Any]) -> None: ...

    def log_row(self, step: int, row: Mapping[str, float]) -> None: ...

    def log_histogram(self, name: str, values: Tensor, step: int) -> None: ...

    def close(self) -> None: ...


LOGGERS = ("csv", "tensorboard", "wandb", "mlflow")
"""The options of the ``logger`` config group; ``csv`` (metrics.csv) is always written."""


def build_loggers(
    options: Mapping[str, Mapping[str, Any] | None],
    run_dir: str | os.PathLike,
    *,
    files: Mapping[str, str],
    run_name: str | None = None,
) -> list[Logger]:
    """The loggers of the ``logger`` config block (``{"tensorboard": {...}, ...}``) for a run
    in ``run_dir``. ``files`` names their places in the run directory
    (``reweight.core.files``: tensorboard, mlflow_db, mlruns, mlflow_id, wandb_id). Nothing is
    written here. An unknown name raises ``ValueError`` with the allowed names."""
    run = Path(run_dir)
    out: list[Logger] = []
    for name, settings in options.items():
        opts = dict(settings or {})
        if name == "csv":
            continue  # metrics.csv: written by every run
        if name == "tensorboard":
            out.append(TensorBoardLogger(run / files["tensorboard"], **opts))
        elif name == "mlflow":
            uri = opts.pop("tracking_uri", None)
            artifacts = None
            if uri is None:  # the local store in the run directory
                uri = f"sqlite:///{(run / files['mlflow_db']).resolve()}"
                artifacts = (run / files["mlruns"]).resolve().as_uri()
            out.append(
                MLflowLogger(
                    uri,
                    run / files["mlflow_id"],
                    run_name=run_name,
                    artifact_location=artifacts,
                    **opts,
                )
            )
        elif name == "wandb":
            directory = opts.pop("dir", None) or run
            out.append(WandbLogger(directory, run / files["wandb_id"], run_name=run_name, **opts))
        else:
            raise ValueError(f"logger={name} is not a logger; choose from {', '.join(LOGGERS)}")
    return out


def close_all(loggers: Sequence[Logger], status: str = "FINISHED") -> None:
    """Close every logger; a failing one does not keep the others open (logged, re-raised).
    ``status`` (FINISHED, KILLED, FAILED) goes to those whose ``close`` takes it (MLflow's run
    status, W&B's exit code)."""
    error: BaseException | None = None
    for logger in loggers:
        try:
            if "status" in inspect.signature(logger.close).parameters:
                logger.close(status=status)
            else:
                logger.close()
        except Exception as err:  # close the rest, then report the first
            log.warning("closing %s failed: %s", type(logger).__name__, err)
            error = error or err
    if error is not None:
        raise error


class LoggerGroup:
    """Several loggers as one, for the Trainer: the run's ``config`` once, with the first row;
    then every history row and a histogram of the last batch's relative weights; ``close``
    closes them all (``close_all``). ``backlog``: rows logged before the next one (a resumed
    run's history, which a tracker may lack), to the loggers with a ``has_step(step)`` method,
    each row it says it lacks."""

    def __init__(self, loggers: Sequence[Logger], config: Mapping[str, Any]) -> None:
        self.loggers, self.config = list(loggers), dict(config)
        self._config_logged = False
        self.backlog: list[Mapping[str, Any]] = []

    def log(self, step: int, row: Mapping[str, Any], weights: Any | None = None) -> None:
        if not self._config_logged:
            for logger in self.loggers:
                logger.log_config(self.config)
            self._config_logged = bool(self.loggers)
        backlog, self.backlog = self.backlog, []
        for old in backlog:  # a resumed run's rows from before its checkpoint, first
            for logger in self.loggers:
                has_step = getattr(logger, "has_step", None)  # a logger that can tell
                if has_step is not None and not has_step(int(old["step"])):
                    logger.log_row(int(old["step"]), old)
        for logger in self.loggers:
            logger.log_row(step, row)
            if weights is not None:
                logger.log_histogram("weights", weights, step)

    def close(self, status: str = "FINISHED") -> None:
        close_all(self.loggers, status)
