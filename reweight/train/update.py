"""The real update of a training step: backpropagate Σᵢ wᵢℓᵢ, sum the gradients across
processes, clip, step the optimizer and then the schedule."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from reweight.core.distributed import DistContext

__all__ = ["weighted_update"]


def weighted_update(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    weights: Tensor,
    losses: Tensor,
    *,
    grad_clip: float | None = None,
    dist: DistContext | None = None,
    check: Callable[[float], None] = lambda loss: None,
) -> tuple[float, Tensor]:
    """One update on Σᵢ wᵢℓᵢ (``weights`` and ``losses``: this process's (B,)).

    ``check`` sees the loss over the global batch before anything is stepped (the NaN check).
    In data-parallel training the gradients are summed over ranks, which equals the gradient of
    one process on the global batch. Returns Σ wᵢℓᵢ and Σ ℓᵢ over the global batch.
    """
    loss = (weights.to(losses.dtype) * losses).sum()
    loss_sum = losses.detach().sum()
    if dist is not None:  # the global loss, for logging and the NaN check
        loss_value = float(dist.all_reduce_sum(loss.detach()))
        loss_sum = dist.all_reduce_sum(loss_sum)
    else:
        loss_value = float(loss.detach())  # CPU-GPU sync, once per step
    check(loss_value)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if dist is not None:  # Σ over ranks = the single-process gradient
        dist.sum_gradients(list(model.parameters()))
    if grad_clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return loss_value, loss_sum
