"""A batch's inputs: one tensor, or a mapping of tensors (a tokenizer's ``input_ids``,
``attention_mask``, ...) whose first dimension is the batch.

Every place that moves, slices or counts a batch of inputs goes through these functions, so a
model whose ``forward`` takes one dict of tensors trains like one that takes a tensor: the
dict is passed as the forward's one argument (``model(batch)``). A HuggingFace model, whose
forward takes the tensors as keyword arguments and returns an output object, is wrapped by
``reweight.models.hf.SequenceClassifier``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["Inputs", "batch_size", "device", "split", "take", "to_device"]

Inputs = Tensor | Mapping[str, Tensor]


def batch_size(x: Inputs) -> int:
    """The number of examples in ``x``."""
    if isinstance(x, Mapping):
        return len(next(iter(x.values())))
    return len(x)


def device(x: Inputs) -> torch.device:
    """The device ``x`` is on (its first tensor's, for a mapping)."""
    if isinstance(x, Mapping):
        return next(iter(x.values())).device
    return x.device


def take(x: Inputs, rows: slice | Tensor) -> Inputs:
    """The examples ``rows`` of ``x`` (a slice or an index tensor)."""
    if isinstance(x, Mapping):
        return {k: v[rows] for k, v in x.items()}
    return x[rows]


def split(x: Inputs, chunks: int) -> list[Inputs]:
    """``x`` in ``chunks`` consecutive slices (``Tensor.tensor_split``; some may be empty)."""
    if isinstance(x, Mapping):
        parts = {k: v.tensor_split(chunks) for k, v in x.items()}
        return [{k: p[i] for k, p in parts.items()} for i in range(chunks)]
    return list(x.tensor_split(chunks))


def to_device(x: Inputs, device: torch.device | str, non_blocking: bool = False) -> Inputs:
    """``x`` on ``device``."""
    if isinstance(x, Mapping):
        return {k: v.to(device, non_blocking=non_blocking) for k, v in x.items()}
    return x.to(device, non_blocking=non_blocking)
