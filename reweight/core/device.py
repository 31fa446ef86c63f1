"""``trainer.device`` as a device that exists on this machine, and the memory format a model
trains in there (``trainer.channels_last``)."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from torch import nn

from reweight.core.inputs import Inputs, to_device

log = logging.getLogger(__name__)

__all__ = [
    "CHANNELS_LAST_SETTINGS",
    "Placement",
    "channels_last_choice",
    "check_channels_last",
    "resolve_device",
]

CHANNELS_LAST_SETTINGS = (True, False, "auto")
"""The values of ``trainer.channels_last``."""


def resolve_device(device: str) -> torch.device:
    """``trainer.device`` as a ``torch.device`` that exists on this machine.

    ``"auto"`` is CUDA when available, else the CPU. A string torch does not parse, a CUDA
    device without CUDA, or a CUDA index past the last GPU raises ``ValueError`` naming
    ``trainer.device`` and the allowed values, so the CLI refuses it before any work.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    allowed = "cpu, cuda, cuda:<index> or auto"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):  # "tpu", "cuda:x", ...
        raise ValueError(f"trainer.device must be {allowed}, got {device!r}") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(
                f"trainer.device={device!r} but CUDA is not available; use 'cpu' or 'auto'"
            )
        if dev.index is not None and dev.index >= count:
            raise ValueError(
                f"trainer.device={device!r} but this machine has {count} CUDA device(s) "
                f"(cuda:0 to cuda:{count - 1}); allowed: {allowed}"
            )
    return dev


def check_channels_last(setting: object) -> None:
    """``ValueError`` naming the key unless ``setting`` is True, False or ``"auto"``."""
    if not isinstance(setting, bool | str) or setting not in CHANNELS_LAST_SETTINGS:
        raise ValueError(f"trainer.channels_last must be true, false or auto, got {setting!r}")


def channels_last_choice(
    setting: bool | str, model: nn.Module, device: torch.device
) -> tuple[bool, str]:
    """Whether a model trains in NHWC (``channels_last``), and why: ``True`` / ``False`` as
    given; ``"auto"`` on where it was measured faster and changes only the rounding.

    ``"auto"`` is on for a CPU model with 2-D convolutions and no BatchNorm: there NHWC
    computes the same sums in another order (first-step parameters 4e-8 apart) and LeNet's
    steps were measured 1.25-1.67x faster (``benchmarks/channels_last.py``; its max-pooling is
    slow in NCHW). It stays off elsewhere: with BatchNorm (ResNet-32 measured 1.09-1.15x, within
    the noise of a loaded machine, and the tangent tape cannot replay its NHWC forward, so L2RW
    and MW-Net fall back to a slower engine), without 2-D convolutions (nothing to change), and
    on a GPU (not measured here).

    >>> channels_last_choice("auto", nn.Sequential(nn.Conv2d(1, 2, 3)), torch.device("cpu"))[0]
    True
    >>> channels_last_choice("auto", nn.Linear(2, 2), torch.device("cpu"))
    (False, 'auto: off, no 2-D convolution (the memory format changes nothing)')
    """
    check_channels_last(setting)
    if isinstance(setting, bool):
        return setting, f"trainer.channels_last={str(setting).lower()} as given"
    modules = list(model.modules())
    if device.type != "cpu":
        return False, f"auto: off on {device.type} (NHWC not measured there; NCHW as given)"
    if not any(isinstance(m, nn.Conv2d) for m in modules):
        return False, "auto: off, no 2-D convolution (the memory format changes nothing)"
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules):
        return False, (
            "auto: off, BatchNorm (NHWC measured no clear gain for ResNet-32 on CPU, and the "
            "tangent tape cannot replay it); trainer.channels_last=true to force it"
        )
    return True, (
        "auto: on, a CPU model with 2-D convolutions and no BatchNorm (NHWC measured 1.25-1.67x "
        "faster per LeNet step; the same sums in another order, rounding only)"
    )


@dataclass(frozen=True)
class Placement:
    """Where a batch goes and in which precision it runs: the device, NHWC for 4-D inputs when
    ``channels_last``, bf16 autocast when ``bf16`` (the loop's, evaluation's and scoring's)."""

    device: torch.device
    channels_last: bool = False
    bf16: bool = False

    @classmethod
    def of(
        cls, model: nn.Module, device: str, channels_last: bool | str, bf16: bool
    ) -> tuple[Placement, nn.Module]:
        """The placement ``trainer.device``, ``trainer.channels_last`` and ``trainer.bf16`` ask
        for, and ``model`` moved there (logged: the memory format and why)."""
        where = resolve_device(device)
        if bf16 and where.type != "cuda":
            raise ValueError(f"trainer.bf16=true needs a CUDA device (trainer.device), got {where}")
        model = model.to(where)
        nhwc, why = channels_last_choice(channels_last, model, where)
        log.info("memory format: %s (%s)", "NHWC" if nhwc else "NCHW", why)
        if nhwc:
            model = model.to(memory_format=torch.channels_last)
        return cls(where, nhwc, bf16), model

    def inputs(self, x: Inputs) -> Inputs:
        """A batch of inputs on the device, NHWC when ``channels_last`` and the batch is 4-D."""
        x = to_device(x, self.device, non_blocking=True)
        if self.channels_last and isinstance(x, torch.Tensor) and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on the device, or nothing."""
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()
