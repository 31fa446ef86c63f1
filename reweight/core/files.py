"""The files of a run, named once, and the one atomic writer every one of them goes through
(checkpoint, labels, CSV, JSON, PNG), so that a reader, or a run killed mid-write, sees either
the old file or the complete new one, and every file gets the same permissions.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> path = atomic_write_text(Path(tempfile.mkdtemp()) / "note.txt", "done\\n")
    >>> path.read_text()
    'done\\n'
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = [
    "CHECKPOINT",
    "CURVES_PNG",
    "DIVERGED",
    "FAILED_JOBS",
    "HISTOGRAM_PNG",
    "HYDRA_DIR",
    "INFO_FILE",
    "LABELS_FILE",
    "LOGGER_FILES",
    "METRICS",
    "OVERRIDES",
    "REPLACED_SUFFIX",
    "RESOLVED_CONFIG",
    "RESULTS_CSV",
    "RESULTS_MD",
    "SUMMARY",
    "SUSPECTS",
    "SUSPECTS_PNG",
    "SUSPECTS_SCATTER_PNG",
    "TRACKER_DIRS",
    "TRACKER_FILES",
    "WEIGHTS",
    "atomic_write",
    "atomic_write_text",
]

# In a run's directory
CHECKPOINT = "checkpoint.pt"  # Trainer.state_dict(), every trainer.checkpoint_every steps
METRICS = "metrics.csv"  # the history, one row per trainer.log_every steps
SUMMARY = "summary.json"  # the final metrics, written last: it says the run is finished
RESOLVED_CONFIG = "config.yaml"  # the config, interpolations resolved
WEIGHTS = "weights.pt"  # every training example's final weight
LABELS_FILE = "labels.pt"  # observed and true training labels, the corruption mask
INFO_FILE = "dataset.json"  # how the dataset was built (sizes, noise rate, seeds)
DIVERGED = "diverged.json"  # a run stopped by a NaN/inf: the step, the checkpoint kept
SUSPECTS = (
    "suspects.csv"  # every training example, most suspect label first (reweight.outputs.suspects)
)
CURVES_PNG = "learning_curves.png"
# written by `python -m reweight.outputs.inspect RUN_DIR`
SUSPECTS_PNG = "suspects.png"  # the lowest-weight images, given -> predicted label
SUSPECTS_SCATTER_PNG = "suspects_scatter.png"  # final weight vs loss, clean / corrupted
HISTOGRAM_PNG = "weight_histogram.png"
TENSORBOARD_DIR = "tensorboard"  # logger=tensorboard: event files
MLFLOW_DB = "mlflow.db"  # logger=mlflow: the local SQLite store (unless logger.mlflow.tracking_uri)
MLFLOW_DIR = "mlruns"  # logger=mlflow: its artifacts
MLFLOW_RUN_ID = "mlflow_run_id.txt"  # logger=mlflow: the run a resume continues
WANDB_RUN_ID = "wandb_run_id.txt"  # logger=wandb: the id a resume keeps (its folder: wandb/)
WANDB_DIR = "wandb"  # logger=wandb: the offline-run-* folders (unless logger.wandb.dir)
LOGGER_FILES = {
    "tensorboard": TENSORBOARD_DIR,
    "mlflow_db": MLFLOW_DB,
    "mlruns": MLFLOW_DIR,
    "mlflow_id": MLFLOW_RUN_ID,
    "wandb_id": WANDB_RUN_ID,
}
TRACKER_FILES = (MLFLOW_DB, MLFLOW_RUN_ID, WANDB_RUN_ID)
TRACKER_DIRS = (TENSORBOARD_DIR, MLFLOW_DIR, WANDB_DIR)
"""What the trackers leave in a run directory: a run that starts over there removes them."""
"""Where each tracker writes in a run directory (``reweight.train.loggers.build_loggers``)."""
HYDRA_DIR = Path(".hydra")  # Hydra's records of the job: config, hydra, overrides
OVERRIDES = HYDRA_DIR / "overrides.yaml"  # the job's command-line overrides (sweep tables)
REPLACED_SUFFIX = ".replaced"  # <run dir>.replaced: a finished run that resume=false replaces,
# kept beside until the new run has finished (reweight.cli.run_dir)
# In a sweep's directory
RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
FAILED_JOBS = "failed"  # failed/<job number>.json: a job that failed, its overrides and error


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write a file through ``write(f)`` (a binary file object) into a temporary file next to
    ``path``, then ``os.replace`` it onto ``path``. The file gets the permissions a plain
    ``open(path, "w")`` would (0666 less the umask), not ``mkstemp``'s owner-only 0600, so that
    others on a shared cluster can read run outputs. The temporary file never outlives a
    failure. The parent folder must exist.
    An ``OSError`` that names no file (a full disk: ``ENOSPC`` from a write or the sync), also
    one that ``write`` wrapped in another error (``torch.save`` raises a ``RuntimeError`` about
    its zip writer, the ``OSError`` its context), is raised again naming ``path``.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as err:
        cause = _os_error(err)
        if cause is None or cause.filename is not None:
            raise
        raise OSError(cause.errno, cause.strerror or str(cause), str(path)) from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _os_error(err: BaseException) -> OSError | None:
    """``err`` if it is an ``OSError``, else the first one among its causes and contexts."""
    seen: set[int] = set()
    candidate: BaseException | None = err
    while candidate is not None and id(candidate) not in seen:
        if isinstance(candidate, OSError):
            return candidate
        seen.add(id(candidate))
        candidate = candidate.__cause__ or candidate.__context__
    return None


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """``atomic_write`` of ``text`` as UTF-8, newlines as given."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))


def _umask() -> int:
    """The process's umask: from /proc on Linux (no side effect), else by setting it back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
