"""Pure functions for virtual steps on named weights."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["sgd_step"]


def sgd_step(
    params: Mapping[str, Tensor],
    loss: Tensor,
    lr: float | Tensor,
    *,
    first_order: bool = False,
) -> dict[str, Tensor]:
    """θ′ = θ − lr·∇θ loss for every named weight, differentiable through the gradient.

    ``create_graph`` is on unless ``first_order``, so θ′ carries second-order history back to
    whatever ``loss`` depends on (per-example weights ε, a weighting net). Weights that ``loss``
    does not reach are returned unchanged.
    """
    names = list(params)
    tensors = [params[n] for n in names]
    grads = torch.autograd.grad(
        loss,
        [t for t in tensors if t.requires_grad],
        create_graph=not first_order,
        allow_unused=True,
    )
    it = iter(grads)
    new: dict[str, Tensor] = {}
    for name, theta in zip(names, tensors, strict=True):
        g = next(it) if theta.requires_grad else None
        if g is None:
            new[name] = theta
        else:
            new[name] = theta - lr * (g.detach() if first_order else g)
    return new
