"""The cuda policy's timed choice: the tape or dual numbers through the twin, whichever a
model's first training steps time faster (``reweight.jvp.planner`` says why).

Each candidate holds no training graph across a meta pass, so either keeps the step's peak
memory near a plain step's. They are timed in turn, ``TIMED_STEPS`` steps each; the first
step of each is warm-up (one-time set-up) and is not compared. In a data-parallel run every
rank times its own steps, and every rank keeps rank 0's verdict (``keep_rank0_verdict``): the
ranks then run one engine, as one process on the global batch would.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["CANDIDATES", "TIMED_STEPS", "Timing", "keep_rank0_verdict"]

CANDIDATES = ("tape", "dual_twin")  # in the order they are timed
TIMED_STEPS = 3  # steps per candidate


@dataclass
class Timing:
    """The cuda policy's timings of one model: seconds per training step, by engine."""

    key: tuple  # the model's signature when timed
    seconds: dict[str, list[float]] = field(default_factory=lambda: {e: [] for e in CANDIDATES})
    verdict: str | None = None

    def next(self) -> str:
        """The candidate to time next: the one timed least (in ``CANDIDATES`` order)."""
        return min(CANDIDATES, key=lambda e: len(self.seconds[e]))

    def add(self, engine: str, seconds: float) -> None:
        self.seconds[engine].append(seconds)
        if all(len(t) >= TIMED_STEPS for t in self.seconds.values()):
            self.verdict = min(CANDIDATES, key=lambda e: min(self.seconds[e][1:]))

    def summary(self) -> str:
        return ", ".join(f"{e} {1e3 * min(self.seconds[e][1:]):.1f} ms" for e in CANDIDATES)


def keep_rank0_verdict(timing: Timing, device: torch.device) -> None:
    """Every rank of a data-parallel run keeps rank 0's verdict (a broadcast on the default
    group, on ``device``: the batch's, which the group's backend can send). Every rank decides
    at the same step (each times the same number of steps), so every rank calls this once."""
    if timing.verdict is None or not dist.is_available() or not dist.is_initialized():
        return
    if dist.get_world_size() == 1:
        return
    choice = torch.tensor([CANDIDATES.index(timing.verdict)], device=device)
    dist.broadcast(choice, src=0)
    timing.verdict = CANDIDATES[int(choice.item())]
