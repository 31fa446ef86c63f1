"""``TrainerConfig``: the settings of the training loop (the ``trainer`` block of the command
line's config; ``reweight.cli.schema`` types that block from these fields)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from reweight.core.device import check_channels_last

__all__ = ["NO_EFFECT_FIELDS", "TrainerConfig"]

NO_EFFECT_FIELDS = ("progress", "num_workers", "eval_batch_size", "channels_last")
"""The fields that cannot change what a run computes: bars, DataLoader workers (every batch is
drawn by the Trainer's own seeded order), the evaluation's batch size (memory only) and the
memory format (NHWC computes the same sums in another order: rounding only). A run may resume,
or be found finished, with them changed (``reweight.cli.run_config.NO_EFFECT_KEYS``)."""


@dataclass
class TrainerConfig:
    """Loop settings. Steps count real optimizer updates."""

    max_steps: int = 1000  # optimizer steps in all
    batch_size: int = 100  # training examples per step
    meta_batch_size: int = 100  # clean examples per meta step (capped at the meta set's size)
    eval_every: int = 500  # evaluate the test set every N steps (0: only at the end)
    eval_batch_size: int = 1000
    log_every: int = 50  # one history row per N steps
    grad_clip: float | None = None  # clip the global gradient norm of the real update
    seed: int = 0  # training seed: data order, dropout, augmentation (not data corruption)
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", or "auto"
    bf16: bool = False  # bf16 autocast for forward passes (CUDA only)
    # NHWC memory format for the model and 4-D inputs: True, False, or "auto" (on where it is
    # faster and changes only the rounding: reweight.core.device.channels_last_choice)
    channels_last: bool | str = "auto"
    num_workers: int = 0  # DataLoader workers
    checkpoint_every: int = 0  # write the checkpoint every N steps (0: only at the end)
    progress: bool | None = None  # tqdm bars; None: only when stderr is a terminal
    final_weights: int = 1  # passes that score every training example's weight at the end (0: off)

    @property
    def show_progress(self) -> bool:
        return self.progress if self.progress is not None else sys.stderr.isatty()

    def __post_init__(self) -> None:
        for key in ("max_steps", "batch_size", "meta_batch_size", "eval_batch_size", "log_every"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"trainer.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("eval_every", "checkpoint_every", "num_workers"):
            if int(getattr(self, key)) < 0:
                raise ValueError(f"trainer.{key} must be >= 0, got {getattr(self, key)}")
        check_channels_last(self.channels_last)
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"trainer.grad_clip must be > 0 or null, got {self.grad_clip}")
