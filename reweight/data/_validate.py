"""Parameter checks shared by the dataset builders.

Every check raises ``ValueError`` with a message that names the config key, the allowed values
and the value received, so that a bad Hydra override is fixed from the message alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "check_at_least",
    "check_bool",
    "check_choice",
    "check_int",
    "check_label_tensor",
    "check_open_unit",
    "check_rate",
]


def _is_real(value: Any) -> bool:
    # bool is an int subclass; `noise_rate: true` is a typo, not a rate.
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_choice(key: str, value: Any, allowed: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def check_rate(key: str, value: Any) -> float:
    """Return ``value`` as a float if it lies in [0, 1)."""
    if not _is_real(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"{key} must be a number in [0, 1); got {value!r}")
    return float(value)


def check_open_unit(key: str, value: Any) -> float:
    """Return ``value`` as a float if it lies in the open interval (0, 1)."""
    if not _is_real(value) or not 0.0 < value < 1.0:
        raise ValueError(f"{key} must be a number in (0, 1); got {value!r}")
    return float(value)


def check_at_least(key: str, value: Any, minimum: float) -> float:
    """Return ``value`` as a float if it is a finite number >= ``minimum``."""
    if not _is_real(value) or value < minimum:
        raise ValueError(f"{key} must be a number >= {minimum:g}; got {value!r}")
    return float(value)


def check_int(key: str, value: Any, *, minimum: int) -> int:
    """Return ``value`` if it is an int >= ``minimum`` (bools are refused)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}; got {value!r}")
    return value


def check_bool(key: str, value: Any) -> bool:
    """Return ``value`` if it is a bool (``"false"`` as a string would be truthy)."""
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false; got {value!r}")
    return value


def check_label_tensor(key: str, labels: Tensor, num_classes: int) -> None:
    """Check that ``labels`` is a 1-D integer tensor with values in ``[0, num_classes)``."""
    if (
        labels.dim() != 1
        or labels.dtype.is_floating_point
        or labels.dtype.is_complex
        or (labels.dtype == torch.bool)
    ):
        raise ValueError(
            f"{key} must be a 1-D integer tensor; got dtype {labels.dtype}, "
            f"shape {tuple(labels.shape)}"
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"{key} must lie in [0, {num_classes}); got values in "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
