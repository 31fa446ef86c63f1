"""Hydra's side of a run directory: the log files it opens there (held back until the run's
first step, ``HeldLogs``) and the folders it makes for a job (removed when the job fails while
they are still empty, ``RunDirCleanup``)."""

from __future__ import annotations

import atexit
import logging
import os
from pathlib import Path
from typing import Any

from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

__all__ = ["HeldLogs", "RunDirCleanup"]


class HeldLogs(logging.Handler):
    """Stands in on the root logger for its file handlers that write into ``run_dir``: keeps
    their records until ``attach`` (which writes them and puts the handlers back) and drops
    them at ``hand_back`` if the run never committed. ``hand_back`` also takes the file handlers
    off the root logger, so that nothing logged after the run (Hydra's launcher announcing the
    next job of a sweep) lands in this run's log."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__()
        self._root = logging.getLogger()
        inside = run_dir.resolve()
        self.files = [
            h
            for h in self._root.handlers
            if isinstance(h, logging.FileHandler) and Path(h.baseFilename).is_relative_to(inside)
        ]
        self.paths = [Path(h.baseFilename) for h in self.files]
        self.records: list[logging.LogRecord] = []
        for handler in self.files:
            self._root.removeHandler(handler)
        if self.files:
            self._root.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def attach(self) -> None:
        self._root.removeHandler(self)
        for handler in self.files:
            for record in self.records:
                handler.handle(record)
            self._root.addHandler(handler)
        self.records.clear()

    def close_files(self) -> None:
        for handler in self.files:
            handler.close()  # a FileHandler opens its file again at its next record

    def hand_back(self) -> None:
        self._root.removeHandler(self)
        for handler in self.files:
            self._root.removeHandler(handler)
        self.close_files()
        self.records.clear()


class RunDirCleanup(Callback):
    """Hydra callback: a job that failed leaves none of the folders Hydra made for it.

    Hydra creates the run directory (with its missing parents) before the app runs; a run that
    fails before its first step writes nothing into it (``RunDir``), so the folders that did not
    exist when the run or sweep started are removed if they are still empty. Configured in
    ``conf/config.yaml`` under ``hydra.callbacks``.
    """

    def __init__(self) -> None:
        self._made: set[str] = set()  # folders missing at the start
        self._sweep: str | None = None
        self._existing: set[str] = set()  # folders under the sweep directory at its start

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._made = _missing(_select_dir(config, "hydra.run.dir"))
        atexit.register(self._remove_empty)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = _select_dir(config, "hydra.sweep.dir")
        if sweep is None:
            return
        self._sweep = str(sweep)
        self._made = _missing(sweep)
        self._existing = {root for root, _, _ in os.walk(sweep)}
        atexit.register(self._remove_empty)

    def _remove_empty(self) -> None:
        """At exit, however the run ended (an interrupt before the first step skips
        ``on_job_end``): the folders made for it that are still empty go."""
        made = set(self._made)
        if self._sweep is not None and os.path.isdir(self._sweep):
            made.update(root for root, _, _ in os.walk(self._sweep) if self._was_made(root))
        for folder in sorted(made, key=len, reverse=True):  # the deepest first
            try:
                os.rmdir(folder)  # only when empty
            except OSError:
                pass

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if job_return.status != JobStatus.FAILED:
            return
        job_dir = Path(os.path.abspath(str(config.hydra.runtime.output_dir)))
        for folder in (job_dir, *job_dir.parents):
            if not self._was_made(str(folder)):
                return
            try:
                folder.rmdir()  # only when empty
            except OSError:
                return

    def _was_made(self, folder: str) -> bool:
        if folder in self._made:
            return True
        under_sweep = self._sweep is not None and folder.startswith(self._sweep + os.sep)
        return under_sweep and folder not in self._existing


def _select_dir(config: DictConfig, key: str) -> Path | None:
    try:  # interpolations Hydra resolves only later (${hydra:...}) leave nothing to record
        value = OmegaConf.select(config, key)
    except Exception:  # a callback must not fail the run
        return None
    return Path(os.path.abspath(str(value))) if value is not None else None


def _missing(path: Path | None) -> set[str]:
    """``path`` and its parents that do not exist yet (the folders ``mkdir -p`` would make)."""
    if path is None:
        return set()
    return {str(p) for p in (path, *path.parents) if not p.exists()}
