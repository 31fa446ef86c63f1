"""A run directory that never lies: what ``python -m reweight`` may find there and when it writes.

A run writes nothing into its directory until it has made its first training step. Before
that, ``RunDir.check`` reads what a previous invocation left there and decides:

- nothing there (or no ``config.yaml``): a fresh run;
- the same config (keys in ``NO_EFFECT_KEYS`` aside) and a checkpoint at ``trainer.max_steps``
  with a ``summary.json``: the run is finished, a re-run is a no-op that reports its results;
- the same config and a checkpoint before the end: ``resume=true`` continues from it; so does
  a finished or interrupted run given a larger ``trainer.max_steps`` (the checkpoint holds the
  schedule, the RNG states and every counter; a key that follows ``trainer.max_steps``, such
  as a cosine schedule's ``T_max``, differs, and is refused with the override that keeps it);
- another config: refused with the differing keys (``resume=false`` starts over there).

``RunDir.commit``, called by the Trainer right after the first optimizer step, then writes the
run's records (``config.yaml``, ``.hydra/``, ``labels.pt``...) and opens ``train.log`` with the
lines logged so far. A run that starts over (``resume=false``, or no checkpoint to resume from)
deletes the files of the unfinished run it replaces only at that point, so an invocation that
fails its checks, cannot read its data or fails before its first step leaves an existing run
untouched. A *finished* run is never deleted by one that does not finish: at that point its
files move, whole, to the folder beside it, ``<run dir>.replaced``, which ``RunDir.finish``
removes once the new run has written its last file (``summary.json``, the marker of a finished
run, is written last).
Hydra creates the directory (and its missing parents) before the app runs; ``RunDirCleanup``, a
Hydra callback, removes the folders it made for a job that failed while they were still empty.

Hydra's own early writes are turned off in ``conf/``: ``hydra.output_subdir`` is null (the app
writes ``.hydra/`` at the commit) and the ``run_log`` job logging opens ``train.log`` lazily
(``delay: true``), so that ``RunDir`` can hold its file handler back until the commit.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from reweight.cli.hydra_dirs import HeldLogs
from reweight.cli.run_config import (
    LENGTH_KEY,
    NO_EFFECT_KEYS,
    another_config,
    config_differences,
)
from reweight.core.files import (
    CHECKPOINT,
    CURVES_PNG,
    DIVERGED,
    HISTOGRAM_PNG,
    HYDRA_DIR,
    INFO_FILE,
    LABELS_FILE,
    METRICS,
    OVERRIDES,
    REPLACED_SUFFIX,
    RESOLVED_CONFIG,
    SUMMARY,
    SUSPECTS,
    SUSPECTS_PNG,
    SUSPECTS_SCATTER_PNG,
    TRACKER_DIRS,
    TRACKER_FILES,
    WEIGHTS,
    atomic_write,
)

__all__ = ["DIVERGENCE_KEYS", "Finished", "RunDir", "RunDirError", "hydra_files"]

log = logging.getLogger(__name__)

_HYDRA_SUBDIR = HYDRA_DIR  # where reweight.outputs.aggregate_sweep reads overrides.yaml
_HYDRA_FILES = ("config.yaml", "hydra.yaml", OVERRIDES.name)
_RUN_FILES = (
    RESOLVED_CONFIG,
    CHECKPOINT,
    METRICS,
    SUMMARY,
    WEIGHTS,
    CURVES_PNG,
    HISTOGRAM_PNG,
    LABELS_FILE,
    INFO_FILE,
    SUSPECTS,
    SUSPECTS_PNG,
    SUSPECTS_SCATTER_PNG,
    DIVERGED,
    *TRACKER_FILES,
    *(str(_HYDRA_SUBDIR / name) for name in _HYDRA_FILES),
)

DIVERGENCE_KEYS = ("optimizer.lr", "trainer.grad_clip")
"""What a run that diverged may change to continue from its last finite checkpoint."""


class RunDirError(ValueError):
    """The run directory cannot be used as it is: a file in the way, no permission to write, or
    another run there. A ``ValueError``, so the CLI reports it as one line with exit status 2."""


@dataclasses.dataclass(frozen=True)
class Finished:
    """What a finished run recorded: where its summary is, and its final test accuracy."""

    summary: Path
    step: int
    test_accuracy: float


class RunDir:
    """The directory of one run, from the first check to the commit after the first step.

    Used as a context manager around the whole run (``reweight.cli.train``)::

        with RunDir(path, dir_key="hydra.run.dir") as run:
            finished = run.check(config_yaml, resume=True, max_steps=4000)
            if finished is None:
                ...  # read the data, build the model and the Trainer (nothing written yet)
                trainer.fit(resume=True, on_start=lambda: run.commit(files))

    From the start the root logger's file handlers that write into ``path`` (Hydra's
    ``train.log``) are held back: their records are kept and written once the run commits, and
    dropped if it never does. ``dir_key`` is the setting that chose the directory, named in
    error messages (``hydra.run.dir``, ``hydra.sweep.dir``, or ``run_dir`` from Python).
    """

    def __init__(
        self, path: str | os.PathLike, dir_key: str = "run_dir", lock: bool = True
    ) -> None:
        self.path = Path(path)
        self.dir_key = dir_key
        self._logs = HeldLogs(self.path)
        self._start_over = True
        self._committed = False
        self._lock = lock
        self._lock_fd: int | None = None
        self.lr_change: tuple[Any, Any] | None = None  # (old, new) optimizer.lr after divergence

    def __enter__(self) -> RunDir:
        try:
            self._take_lock()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._logs.hand_back()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # the lock goes with the descriptor
            self._lock_fd = None

    def _take_lock(self) -> None:
        """One run per folder at a time: an exclusive ``flock`` on the folder itself (no file is
        written; the kernel drops it when the process ends, however it ends, so a lock left by a
        killed run is taken over). Under torchrun rank 0 alone takes it (``lock=False``
        elsewhere). A folder that does not exist yet is locked when the commit makes it."""
        if not self._lock or self._lock_fd is not None or not self.path.is_dir():
            return
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _flock_holder(fd)
            os.close(fd)
            who = f"process {holder}" if holder is not None else "another process"
            raise RunDirError(
                f"{self.path} is in use by {who}, another run into the same folder: wait for "
                f"it to end (or stop it), or choose another {self.dir_key}"
            ) from None
        self._lock_fd = fd

    # -- before anything is written ---------------------------------------------------------

    def check(self, config_yaml: str, resume: bool, max_steps: int) -> Finished | None:
        """Decide what this invocation does with the directory; raise ``RunDirError`` if it
        cannot use it. Reads only (a checkpoint's step through ``mmap``, no tensor data).

        ``config_yaml`` is the resolved config as ``config.yaml`` holds it. Returns the finished
        run's record when the directory already holds this run to its last step (and
        ``resume``), else None.
        """
        self._check_writable()
        previous = self.path / RESOLVED_CONFIG
        checkpoint = self.path / CHECKPOINT
        if not previous.is_file():
            if resume and checkpoint.exists():
                raise RunDirError(
                    f"{self.path} holds a {CHECKPOINT} but no {RESOLVED_CONFIG}, so nothing says "
                    f"which config wrote it: to start over there run with resume=false, or "
                    f"choose another {self.dir_key}"
                )
            return None
        if not resume:  # start over: the old run stays until this one has made a step
            if (self.path / SUMMARY).is_file():  # a finished run moves beside at that step
                self._check_writable(self.replaced.parent)
            return None
        old = _load_yaml(previous)
        new = _load_yaml_text(config_yaml, "the config")
        # trainer.max_steps may change: the run goes on from its checkpoint to the new length
        diffs = config_differences(old, new, ignore=(*NO_EFFECT_KEYS, LENGTH_KEY))
        if (self.path / DIVERGED).is_file():
            diffs = self._after_divergence(diffs)
        if diffs:
            raise RunDirError(another_config(self.path, diffs, old, new, self.dir_key))
        step = _checkpoint_step(checkpoint)
        if step is not None and step > max_steps:
            raise RunDirError(
                f"{self.path} holds this run at step {step}, past trainer.max_steps={max_steps}: "
                f"give trainer.max_steps={step} or more to continue it, resume=false to start "
                f"over there, or choose another {self.dir_key}"
            )
        self._start_over = step is None
        summary = self.path / SUMMARY
        if step == max_steps and summary.is_file():
            recorded = _load_json(summary).get("test_accuracy")
            accuracy = float(recorded) if isinstance(recorded, int | float) else math.nan
            return Finished(summary, step, accuracy)
        return None

    def _after_divergence(self, diffs: list[tuple[str, Any, Any]]) -> list[tuple[str, Any, Any]]:
        """A run that diverged continues from its last finite checkpoint only with a change
        that may keep it finite (``DIVERGENCE_KEYS``; ``RunDirError`` for none); returns the
        differences that still refuse it."""
        changed = [d for d in diffs if d[0] in DIVERGENCE_KEYS]
        if not diffs:
            record = _load_json(self.path / DIVERGED)
            step = record.get("checkpoint_step")
            kept = f"its checkpoint at step {step}" if step is not None else "the start"
            raise RunDirError(
                f"{self.path} holds a run that diverged ({record.get('reason', 'NaN/inf')}): "
                f"to continue from {kept} run again with a lower optimizer.lr or with "
                "trainer.grad_clip; resume=false starts over"
            )
        self.lr_change = next(((a, b) for k, a, b in changed if k == "optimizer.lr"), None)
        return [d for d in diffs if d[0] not in DIVERGENCE_KEYS]

    def diverged(self, reason: str) -> str:
        """The run stopped at a NaN/inf (``reason`` names the step): record it in
        ``diverged.json`` (once the run has written its files) and return the line that says
        which checkpoint is kept and how to continue from it."""
        fix = "run again with a lower optimizer.lr or with trainer.grad_clip"
        if not self._committed:
            return f"{reason}; nothing was written to {self.path}: {fix}"
        step = _checkpoint_step(self.path / CHECKPOINT)
        record = {"reason": reason, "checkpoint_step": step}
        atomic_write(self.path / DIVERGED, lambda f: f.write(json.dumps(record).encode()))
        kept = (
            f"{self.path / CHECKPOINT} (step {step}), the last finite checkpoint, is kept: to "
            "continue from it"
            if step is not None
            else "no checkpoint was written before it: to start again"
        )
        beside = (
            f" (the finished run it replaced is kept in {self.replaced})"
            if self.replaced.is_dir()
            else ""
        )
        return f"{reason}; {kept} {fix}{beside}"

    @property
    def committed(self) -> bool:
        """The run has written its records (``commit``): the folder holds this run now."""
        return self._committed

    @property
    def replaced(self) -> Path:
        """``<run dir>.replaced``: where a finished run waits while ``resume=false`` replaces it."""
        path = self.path.absolute()
        return path.with_name(path.name + REPLACED_SUFFIX)

    def _check_writable(self, folder: Path | None = None) -> None:
        """Fail now, naming the path, where a write would fail after the first step."""
        start = self.path if folder is None else folder
        existing = next(p for p in (start, *start.absolute().parents) if p.exists())
        if not existing.is_dir():
            raise RunDirError(
                f"{existing} is a file, not a folder: choose another {self.dir_key} "
                "or move the file"
            )
        needed = [existing]
        if (
            folder is None and existing == self.path
        ):  # an existing run: the files appended to or written into
            needed += [p for p in (self.path / _HYDRA_SUBDIR, *self._logs.paths) if p.exists()]
        for path in needed:
            mode = os.W_OK | os.X_OK if path.is_dir() else os.W_OK
            if not os.access(path, mode):
                raise RunDirError(
                    f"cannot write to {path} ({os.strerror(errno.EACCES)}): choose another "
                    f"{self.dir_key} or fix the permissions"
                )

    # -- after the first training step --------------------------------------------------------

    def commit(self, files: Mapping[str, bytes], *writers: Callable[[Path], object]) -> None:
        """Write the run's records: ``files`` (relative path -> bytes, each atomically), then
        each ``writer(path)``; then open the held log files with the lines logged so far.

        Called once the run has made its first step (again later: nothing happens). A run that
        starts over first deletes the files of the run it replaces; a commit that fails removes
        what it wrote.
        """
        if self._committed:
            return
        self._committed = True
        if self._start_over:
            self._remove_old_run()
        (self.path / DIVERGED).unlink(missing_ok=True)  # a diverged run continues: no longer
        made = not self.path.exists()
        before = set() if made else set(_tree(self.path))
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._take_lock()
            for name, data in files.items():
                target = self.path / name
                target.parent.mkdir(exist_ok=True)
                atomic_write(target, lambda f, data=data: f.write(data))
            for write in writers:
                write(self.path)
        except BaseException:
            for path in sorted(set(_tree(self.path)) - before, reverse=True):
                if path.is_dir():
                    path.rmdir()
                else:
                    path.unlink()
            if made:
                self.path.rmdir()
            raise
        self._logs.attach()

    def finish(self) -> None:
        """The run has written its last file: the finished run it replaced (``resume=false``),
        kept beside it until now, goes."""
        if self.replaced.is_dir():
            shutil.rmtree(self.replaced)
            log.info("removed %s, the finished run this one replaced", self.replaced)

    def _remove_old_run(self) -> None:
        self._logs.close_files()  # the log of the old run goes too; reopened at its next line
        if (self.path / SUMMARY).is_file():
            self._keep_beside()
            return
        for name in (*_RUN_FILES, *self._logs.paths):
            (self.path / name).unlink(missing_ok=True)
        for name in TRACKER_DIRS:  # the old run's TensorBoard events, MLflow store, W&B runs
            if (self.path / name).is_dir():
                shutil.rmtree(self.path / name)
        hydra_dir = self.path / _HYDRA_SUBDIR
        if hydra_dir.is_dir() and not any(hydra_dir.iterdir()):
            hydra_dir.rmdir()

    def _keep_beside(self) -> None:
        """Move the finished run here, whole, to ``self.replaced`` (one rename per file, its
        ``.hydra/`` and tracker folders as they are); files that are not a run's stay."""
        kept = self.replaced
        if kept.exists():  # a run kept there earlier, superseded by the one finished here since
            shutil.rmtree(kept)
        kept.mkdir()
        names = {Path(name).parts[0] for name in _RUN_FILES}
        names.update(
            TRACKER_DIRS, (p.name for p in self._logs.paths if p.parent == self.path.resolve())
        )
        for name in sorted(names):
            if (self.path / name).exists():
                os.replace(self.path / name, kept / name)
        log.warning(
            "resume=false: the finished run in %s moved to %s, where it stays until this run "
            "has finished",
            self.path,
            kept,
        )


def hydra_files(cfg: DictConfig) -> dict[str, bytes]:
    """What Hydra writes into ``<run dir>/.hydra/`` (the job's config unresolved, Hydra's
    config, the command line's overrides), for ``RunDir.commit``; empty outside a Hydra app."""
    if not HydraConfig.initialized():
        return {}
    hydra_cfg = HydraConfig.instance().cfg
    texts = (
        OmegaConf.to_yaml(cfg),
        OmegaConf.to_yaml(hydra_cfg),
        OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task),
    )
    return {str(_HYDRA_SUBDIR / n): t.encode() for n, t in zip(_HYDRA_FILES, texts, strict=True)}


# -- helpers ------------------------------------------------------------------------------------


def _load_yaml(path: Path) -> Any:
    try:
        return _load_yaml_text(path.read_text(), str(path))
    except OSError as err:
        raise RunDirError(
            f"cannot read {path} ({err.strerror}): fix the permissions, or start over there "
            "with resume=false"
        ) from err


def _load_json(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RunDirError(
            f"cannot read {path} ({err}): delete it and run again (the run writes it anew), "
            "or start over there with resume=false"
        ) from err
    return record if isinstance(record, dict) else {}


def _load_yaml_text(text: str, what: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RunDirError(
            f"{what} is not valid YAML ({err}): start over there with resume=false"
        ) from err


def _checkpoint_step(path: Path) -> int | None:
    """The step of a checkpoint, or None when there is none or it cannot be read (then the
    Trainer's resume reports it)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(state["step"])
    except Exception:  # any unreadable checkpoint: the resume says why
        return None


def _flock_holder(fd: int) -> int | None:
    """The process holding the ``flock`` on the file open at ``fd``, from ``/proc/locks``
    (Linux), or None where that cannot be told."""
    st = os.fstat(fd)
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:  # "1: FLOCK  ADVISORY  WRITE 4242 fe:00:2147009 0 EOF"; "->" waits
        parts = line.split()
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == where and parts[4].isdigit():
            return int(parts[4])
    return None


def _tree(path: Path) -> list[Path]:
    return sorted(path.rglob("*")) if path.is_dir() else []
