"""Stopping a run cleanly on SIGINT (Ctrl-C) or SIGTERM (what SLURM and most schedulers send
before they kill a job): the loop finishes its step, writes the checkpoint and raises
``TrainingInterrupted``; a second signal aborts at once.

Example:
    >>> import signal
    >>> with StopOnSignal(checkpoint=None) as stop:
    ...     signal.raise_signal(signal.SIGINT)  # recorded, not raised: the step finishes
    ...     stop.signum == signal.SIGINT
    True
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = ["StopOnSignal", "TrainingInterrupted"]

log = logging.getLogger("reweight.train.trainer")  # the loop's lines, under the loop's name


class TrainingInterrupted(KeyboardInterrupt):
    """``Trainer.fit`` stopped on SIGINT or SIGTERM after ``step`` complete steps.

    When the Trainer has a ``checkpoint_path``, ``checkpoint`` is that file and holds exactly
    this step, so ``fit(resume=True)`` continues as if nothing had happened. A KeyboardInterrupt,
    so that ``except Exception`` does not swallow a request to stop (Hydra's job runner, a loop
    over configurations) and code that already handles Ctrl-C keeps working.
    ``exit_status`` is the shell's convention for death by that signal: 130 for SIGINT, 143 for
    SIGTERM.
    """

    def __init__(self, step: int, signum: int, checkpoint: Path | None = None) -> None:
        super().__init__(step, signum, checkpoint)
        self.step, self.signum, self.checkpoint = step, signum, checkpoint

    @property
    def exit_status(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        saved = f"; checkpoint {self.checkpoint}" if self.checkpoint is not None else ""
        return f"{signal.Signals(self.signum).name} at step {self.step}{saved}"


class StopOnSignal:
    """SIGINT and SIGTERM handlers for the duration of ``Trainer.fit`` (a context manager).

    The first signal only records its number; the loop reads ``signum`` at each step boundary,
    writes the checkpoint and raises ``TrainingInterrupted``. Once the loop is over (the last
    checkpoint written, the final metrics being computed) ``steps_done`` is set and the first
    signal raises ``TrainingInterrupted`` at once: there is nothing left to save. A second
    signal does what it did before ``fit``: KeyboardInterrupt for SIGINT under Python's default
    handler, death for SIGTERM. Handlers are installed only in the main thread (the only one
    Python delivers signals to), never over a signal that is ignored (``nohup``, a background
    job), and the previous ones are restored on exit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, checkpoint: Path | None) -> None:
        self.checkpoint = checkpoint
        self.signum = 0  # the first signal received, 0 until then
        self.steps_done: int | None = None  # set when no step is left to finish
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                previous = signal.getsignal(sig)
                if previous is not signal.SIG_IGN:
                    self._previous[sig] = previous
                    signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            # None: a handler installed outside Python, which Python cannot reinstall
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum:  # the second signal: abort as it would have without us
            previous = self._previous.get(signum)
            if callable(previous):
                previous(signum, frame)  # Python's default SIGINT handler raises KeyboardInterrupt
            elif previous is not signal.SIG_IGN:
                signal.signal(signum, signal.SIG_DFL)
                signal.raise_signal(signum)
            return
        self.signum = signum
        if self.steps_done is not None:
            raise TrainingInterrupted(self.steps_done, signum, self.checkpoint)

    def stop(self, step: int, signum: int, dist: Any = None, is_main: bool = True) -> None:
        """Raise ``TrainingInterrupted`` after step ``step``, whose checkpoint is on disk. In
        data-parallel training (``dist``) no rank leaves before rank 0 has written: torchrun
        answers the first rank to exit by sending SIGTERM to the others."""
        if dist is not None:
            dist.barrier()
        if is_main:
            where = f"; checkpoint {self.checkpoint}" if self.checkpoint is not None else ""
            log.info("%s: stopped after step %d%s", signal.Signals(signum).name, step, where)
        raise TrainingInterrupted(step, signum, self.checkpoint)
