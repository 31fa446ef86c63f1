"""Reading a Trainer checkpoint safely: ``weights_only`` loading, and one clear error naming the
file and the fix when it cannot be resumed from. Writing goes through ``reweight.core.files``."""

from __future__ import annotations

import dataclasses
import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from reweight.core.files import atomic_write

__all__ = [
    "CheckpointError",
    "load_trainer_state",
    "read_checkpoint",
    "restore_rng_state",
    "rng_state",
    "trainer_state",
    "write_checkpoint",
]


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: damaged, empty, or not a Trainer's.

    A ValueError, because the fix is the user's (delete the file or start over), and the command
    line reports ValueErrors as one ``error:`` line.
    """


# What every Trainer checkpoint holds (``Trainer.state_dict``); checked before anything is loaded.
_CHECKPOINT_KEYS = ("step", "model", "optimizer", "method", "rng", "history", "stats")


def read_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device | None = None
) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` of a ``Trainer`` checkpoint, checked.

    A file that torch cannot read (truncated by a full disk, empty, overwritten) or that is not
    a Trainer's raises ``CheckpointError`` naming the file, the reason in a few words and the
    fix, instead of torch's messages (one of which recommends ``weights_only=False``, i.e.
    running whatever code the file holds). Errors of the file system itself (missing file, no
    permission) propagate unchanged: their message already names the file. The file is only
    read, never changed.
    """
    path = Path(path)
    with path.open("rb") as f:  # a missing file, no permission: the OS's error, naming the file
        try:
            state = torch.load(f, map_location=map_location, weights_only=True)
        except Exception as err:  # RuntimeError, EOFError, UnpicklingError, OSError, KeyError...
            # from None: the cause's text is what this message replaces
            raise CheckpointError(_unreadable(path, _unreadable_reason(path, err))) from None
    if not isinstance(state, dict):
        raise CheckpointError(
            _unreadable(path, f"not a Trainer checkpoint: it holds a {type(state).__name__}")
        )
    missing = [key for key in _CHECKPOINT_KEYS if key not in state]
    if missing:
        raise CheckpointError(
            _unreadable(path, f"not a Trainer checkpoint: no {', '.join(map(repr, missing))}")
        )
    return state


def _unreadable(path: Path, reason: str) -> str:
    return (
        f"checkpoint {path} cannot be read ({reason}): delete it, or run with resume=false to "
        "start over"
    )


def _unreadable_reason(path: Path, err: Exception) -> str:
    """A few words on why ``torch.load`` failed, from the file itself where it can tell."""
    size = path.stat().st_size
    if size == 0:
        return "the file is empty"
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive, complete or not at all
        return f"{size} bytes that are not a complete PyTorch zip archive: truncated or overwritten"
    if isinstance(err, pickle.UnpicklingError) or "weights_only" in str(err):
        return "it holds Python objects other than tensors and plain containers"
    first = str(err).strip().splitlines()[0].split(". ")[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def write_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """``torch.save(state)`` to ``path`` atomically (a reader never sees half a checkpoint)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda f: torch.save(state, f))


def rng_state() -> dict[str, Any]:
    """The global random state as a checkpoint holds it: the CPU generator's and every CUDA
    device's (none without CUDA)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the global random state from ``rng_state()``'s (CUDA's only where it was saved and
    CUDA is available)."""
    torch.set_rng_state(state["cpu"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainer_state(trainer: Any) -> dict[str, Any]:
    """Everything a ``Trainer`` needs to resume exactly: the model, optimizer, schedule and
    method states, the RNG states, the history and every counter; loadable with
    ``weights_only=True`` (the format of ``checkpoint.pt``)."""
    scheduler, source = trainer.scheduler, trainer.meta_source
    return {
        "step": trainer.step,
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "method": {"name": trainer.method.name, "state": trainer.method.state_dict()},
        "rng": rng_state(),
        "history": trainer.history,
        "best_test_accuracy": trainer.evaluation.best_test_accuracy,
        "stats": trainer._stats.state_dict(),
        "elapsed": trainer._elapsed,
        "config": dataclasses.asdict(trainer.config),
        **({"meta_source": source.state_dict()} if source is not None else {}),
    }


def load_trainer_state(
    trainer: Any, state: dict[str, Any], setup: Callable[[], None] = lambda: None
) -> None:
    """Put ``trainer_state``'s record back into ``trainer``, after ``setup()`` (the method's,
    which needs the model); ``ValueError`` first when another method wrote it."""
    if state["method"]["name"] != trainer.method.name:
        raise ValueError(
            f"checkpoint was written by method {state['method']['name']!r}, "
            f"this run uses {trainer.method.name!r}"
        )
    setup()
    trainer.model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    if trainer.scheduler is not None and state["scheduler"] is not None:
        trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.method.load_state_dict(state["method"]["state"])
    restore_rng_state(state["rng"])
    trainer.step = int(state["step"])
    trainer.records.rows = list(state["history"])
    trainer.evaluation.best_test_accuracy = float(state["best_test_accuracy"])
    trainer._stats.load_state_dict(state["stats"])
    trainer._elapsed = float(state["elapsed"])
    if trainer.meta_source is not None:
        trainer.meta_source.load_state_dict(state["meta_source"])
