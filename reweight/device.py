"""``trainer.device`` as a device that exists on this machine."""

from __future__ import annotations

import torch

__all__ = ["resolve_device"]


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
