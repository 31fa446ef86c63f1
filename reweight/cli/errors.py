"""Errors as the command line shows them: one ``error: ...`` line naming the key or the file and
what to do, exit status 2, for what is the user's to fix; a traceback for anything else.

Hydra prints its own errors over several lines; ``one_line`` condenses them (and ours), unwraps
``instantiate``'s wrapper to the root cause, lists the allowed options of a config group, and
turns a failed write of Hydra's into the run directory into its path and the fix.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

from hydra.errors import (
    HydraException,
    InstantiationException,
    MissingConfigException,
    OverrideParseException,
)
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

__all__ = [
    "CONFIG_ERRORS",
    "JobErrorFilter",
    "RunFailed",
    "describe",
    "disk_full",
    "is_config_error",
    "is_multirun",
    "one_line",
]

# Exceptions that mean "the configuration is wrong": reported as one line, exit status 2.
# FileNotFoundError covers a missing data root (the data module names the expected folder).
CONFIG_ERRORS = (ValueError, FileNotFoundError, HydraException, OmegaConfBaseException)


class RunFailed(Exception):
    """A run that failed after it started, for a reason the user can act on (it diverged): one
    ``error:`` line with the message, which says what was kept and what to do, exit status 1."""


class JobErrorFilter:
    """stderr, minus Hydra's "Error executing job with overrides: [...]" line (which ``main``
    folds into its one-line error); everything else, tqdm included, passes through."""

    _PREFIX = "Error executing job with overrides: "

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.failed_job: str | None = None

    def write(self, text: str) -> int:
        if text.startswith(self._PREFIX):
            self.failed_job = text[len(self._PREFIX) :].strip()
            return len(text)
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def is_config_error(err: BaseException, task: Callable[..., Any] | None = None) -> bool:
    """Whether ``err`` is the user's to fix (one ``error:`` line, exit 2), not a bug; ``task``:
    the app's task function, inside which an OSError is not about the run directory."""
    if _write_error(err, task) is not None:
        return True
    if isinstance(err, InstantiationException) and err.__cause__ is not None:
        # the target refused its arguments, or the _target_ itself is wrong
        return isinstance(err.__cause__, (*CONFIG_ERRORS, TypeError, ImportError))
    return isinstance(err, CONFIG_ERRORS)


def is_multirun() -> bool:
    return any(arg in ("-m", "--multirun") for arg in sys.argv[1:])


# What a write into a folder raises when the folder is not writable or a file is in the way.
_WRITE_ERRNOS = frozenset(
    (errno.EACCES, errno.EPERM, errno.EROFS, errno.EEXIST, errno.ENOTDIR, errno.EISDIR)
)


def _write_error(err: BaseException, task: Callable[..., Any] | None) -> OSError | None:
    """The ``OSError`` of one of Hydra's own writes before the run (making the run or sweep
    directory, opening the log file, ``multirun.yaml``), or None. ``train`` checks its directory
    itself (``RunDirError``); other OSErrors raised inside it are not about the run directory."""
    code = getattr(task, "__code__", None)
    inside_train = code is not None and any(
        frame.f_code is code for frame, _ in traceback.walk_tb(err.__traceback__)
    )
    for candidate in (err, err.__cause__):
        if (
            isinstance(candidate, OSError)
            and candidate.errno in _WRITE_ERRNOS
            and candidate.filename is not None
            and not inside_train
        ):
            return candidate
    return None


_FULL_ERRNOS = frozenset((errno.ENOSPC, errno.EDQUOT))


def disk_full(err: BaseException) -> str | None:
    """The one line for a write that failed because the disk (or the quota) is full, naming the
    file, or None for any other error. Every file of a run goes through ``atomic_write``, which
    keeps the previous version of the file and names the file in the error it raises."""
    seen: set[int] = set()
    candidate: BaseException | None = err
    while candidate is not None and id(candidate) not in seen:  # the error and its causes
        seen.add(id(candidate))
        if isinstance(candidate, OSError) and candidate.errno in _FULL_ERRNOS:
            where = f" writing {candidate.filename}" if candidate.filename else ""
            return (
                f"{os.strerror(candidate.errno).lower()}{where}: free some space there, then "
                "run the command again (with resume=true it continues from the last checkpoint, "
                "which was kept)"
            )
        candidate = candidate.__cause__ or candidate.__context__
    return None


def describe(err: BaseException, task: Callable[..., Any] | None = None) -> str:
    """Any error as one line: ours as the command line prints them, anything else as its type
    and the first line of its message (what a sweep's table says of a job that failed)."""
    if isinstance(err, RunFailed):
        return str(err)
    full = disk_full(err)
    if full is not None:
        return full
    if is_config_error(err, task):
        return one_line(err, task)
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _not_key_value(word: str) -> str:
    """An argument without ``=``: most often the rest of the previous one's value, split at an
    unquoted space by the shell."""
    args = sys.argv[1:]
    where = args.index(word) if word in args else -1
    if where > 0 and "=" in args[where - 1]:
        joined = f"{args[where - 1]} {word}"
        return (
            f"{word!r} is not KEY=VALUE: if it is the rest of {args[where - 1]!r} (a value with "
            f'a space), quote the whole override for the shell: "{joined}"'
        )
    return f"{word!r} is not KEY=VALUE: each override is key=value (quote a value with a space)"


_NOISE_PREFIXES = (
    "Config search path",
    "provider=",
    "object_type=",
    "reference_type=",
    "Set the environment variable HYDRA_FULL_ERROR",
)


def one_line(err: BaseException, task: Callable[..., Any] | None = None) -> str:
    """A configuration error as one line: Hydra's multi-line messages condensed, instantiate's
    wrapper unwrapped to the root cause, a missing group option turned into the allowed list,
    a failed write into the run directory turned into its path and the fix."""
    write = _write_error(err, task)
    if write is not None:
        key = "hydra.sweep.dir" if is_multirun() else "hydra.run.dir"
        if write.errno in (errno.EEXIST, errno.ENOTDIR):
            return (
                f"cannot make the folder {write.filename}: a file is in the way "
                f"({write.strerror}); choose another {key} or move the file"
            )
        return (
            f"cannot write to {write.filename} ({write.strerror}): choose another {key} "
            "or fix the permissions"
        )
    if isinstance(err, OverrideParseException) and "missing EQUAL" in err.message:
        return _not_key_value(err.override)
    if isinstance(err, MissingConfigException) and err.options and err.missing_cfg_file:
        group, _, option = err.missing_cfg_file.rpartition("/")
        if group:
            return f"{group}={option} is not an option of '{group}'; allowed: " + ", ".join(
                sorted(err.options)
            )
    cause = err.__cause__
    if isinstance(cause, ConfigAttributeError | ConfigKeyError) and cause.full_key:
        parent = getattr(cause, "parent_node", None)
        if isinstance(parent, DictConfig):
            group = cause.full_key.rpartition(".")[0] or "the root config"
            return (
                f"{cause.full_key} is not a config key; keys of {group}: "
                + ", ".join(str(k) for k in parent.keys())
                + f" (to add a new key: +{cause.full_key}=...)"
            )
    if isinstance(err, InstantiationException) and err.__cause__ is not None:
        # "Error in call to target ...\nValueError(...)\nfull_key: model" -> the cause, keyed
        full_key = next(
            (
                line.split(":", 1)[1].strip()
                for line in str(err).splitlines()
                if line.startswith("full_key:")
            ),
            "",
        )
        cause = one_line(err.__cause__, task)
        if isinstance(err.__cause__, CONFIG_ERRORS):
            return f"{full_key}: {cause}" if full_key and not cause.startswith(full_key) else cause
        return f"{full_key}: {type(err.__cause__).__name__}: {cause}" if full_key else cause
    parts = [str(err)]
    if isinstance(err, HydraException) and isinstance(err.__cause__, OmegaConfBaseException):
        parts.append(str(err.__cause__))
    lines = [
        line.strip()
        for part in parts
        for line in part.splitlines()
        if line.strip() and not line.strip().startswith(_NOISE_PREFIXES)
    ]
    return " ".join(dict.fromkeys(lines)) or type(err).__name__
