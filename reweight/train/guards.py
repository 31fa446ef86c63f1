"""NaN and inf stop a run with a message naming the step and what to do; a checkpoint is
never written from parameters that are not finite."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["check_finite_loss", "check_finite_parameters"]


def check_finite_loss(loss: float, meta_loss: float | None, step: int, method: str) -> None:
    """``FloatingPointError`` when the training loss or the meta loss of ``step`` (counted from
    1) is NaN or infinite."""
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"training loss is {loss} at step {step} (method {method}); "
            "lower the learning rate, set trainer.grad_clip, or check the data for NaN/Inf"
        )
    if meta_loss is not None and not math.isfinite(meta_loss):
        raise FloatingPointError(f"meta loss is {meta_loss} at step {step} (method {method})")


def check_finite_parameters(model: nn.Module, step: int, method: str) -> None:
    """A finite loss can still step the parameters to inf: ``FloatingPointError`` then."""
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise FloatingPointError(
            f"the parameters are not finite after step {step} (method {method}); lower the "
            "learning rate or set trainer.grad_clip"
        )
