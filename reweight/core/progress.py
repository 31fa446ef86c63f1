"""What a user sees while a run works, with a terminal (tqdm bars) or without (log lines only).

- ``TqdmHandler``: a logging handler that writes through ``tqdm.write``, so a log line clears the
  bars, takes its own line and the bars are drawn again below it (a plain ``StreamHandler``
  writes after the bar's text: ``train l2rw: 3%|▎ | 240/8000 [...]step 240: ...``). The CLI's
  console handler (``conf/hydra/job_logging/run_log.yaml``).
- ``phase(log, what, detail)``: a block logged when it starts and when it ends, with its duration
  (``final weights: 8000 examples, 1 pass ...`` then ``final weights: 21.4 s``), for the work
  between the last step and ``done:`` that has no bar without a terminal.
- ``Heartbeat``: without a bar, a line with the step, the time per step and the ETA, first
  ``first`` seconds into training (so the first command says at once how long it takes), then
  at doubling intervals up to ``every`` seconds.

Example:
    >>> import logging
    >>> log = logging.getLogger("demo")
    >>> with phase(log, "plots", "3 PNGs"):
    ...     pass
    >>> clock = iter([0.0, 1.0, 4.0]).__next__  # seconds: at the start, after steps 1 and 10
    >>> beat = Heartbeat(log, total=100, first=3.0, every=60.0, clock=clock)
    >>> beat.tick(step=1), beat.tick(step=10)
    (None, 'step 10/100 (10%), 0.4 s/step, ETA 36 s')
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator

from tqdm.auto import tqdm

__all__ = ["Heartbeat", "TqdmHandler", "format_duration", "phase"]


class TqdmHandler(logging.StreamHandler):
    """A ``StreamHandler`` whose lines go through ``tqdm.write``: never into a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # as logging.StreamHandler does: report, never raise into the caller
            self.handleError(record)


def format_duration(seconds: float) -> str:
    """``42 s``, ``3 min 5 s``, ``4 h 36 min``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


@contextlib.contextmanager
def phase(log: logging.Logger, what: str, detail: str = "") -> Iterator[None]:
    """Log ``what: detail ...`` now and ``what: <duration>`` when the block ends (not when it
    raises: the error says what happened)."""
    log.info("%s: %s ...", what, detail)
    start = time.perf_counter()
    yield
    log.info("%s: %s", what, format_duration(time.perf_counter() - start))


class Heartbeat:
    """``tick(step)`` after each step; logs (and returns) a progress line when one is due.

    ``clock`` (default ``time.perf_counter``) is read once at construction and once per tick.
    """

    def __init__(
        self,
        log: logging.Logger,
        total: int,
        first: float = 3.0,
        every: float = 60.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.log, self.total, self.every, self.clock = log, total, every, clock
        self.start = clock()
        self.start_step: int | None = None
        self.interval = first
        self.due = self.start + first

    def tick(self, step: int) -> str | None:
        now = self.clock()
        if self.start_step is None:
            self.start_step = step - 1  # the steps this session made, for the rate
        if now < self.due:
            return None
        done = step - self.start_step
        per_step = (now - self.start) / max(done, 1)
        line = (
            f"step {step}/{self.total} ({100 * step / self.total:.0f}%), "
            f"{per_step:.2g} s/step, ETA {format_duration(per_step * (self.total - step))}"
        )
        self.log.info("%s", line)
        self.interval = min(self.interval * 2, self.every)
        self.due = now + self.interval
        return line
