"""Pure functions for virtual steps on named weights."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

__all__ = ["sgd_step"]


def sgd_step(
    params: Mapping[str, Tensor],
    loss: Tensor,
    lr: float | Tensor,
    *,
    first_order: bool = False,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    momentum_buffers: Mapping[str, Tensor | None] | None = None,
    reduce_grads: Callable[[list[Tensor]], list[Tensor]] | None = None,
) -> dict[str, Tensor]:
    """θ′ = θ − lr·d for every named weight, differentiable through the gradient.

    d is the plain gradient ∇θ loss by default. With ``weight_decay``/``momentum``/``nesterov``
    it is the direction ``torch.optim.SGD`` would take from its current ``momentum_buffers``
    (detached, by name; a missing buffer means SGD's first step), so a virtual step can replay
    the real optimizer. ``create_graph`` is on unless ``first_order``, so θ′ carries
    second-order history back to whatever ``loss`` depends on (per-example weights ε, a
    weighting net). Weights that ``loss`` does not reach are returned unchanged.
    ``reduce_grads`` transforms the gradients first (e.g. a sum over data-parallel ranks).
    """
    names = [n for n, t in params.items() if t.requires_grad]
    grads = torch.autograd.grad(
        loss, [params[n] for n in names], create_graph=not first_order, allow_unused=True
    )
    if reduce_grads is not None:
        present = [i for i, g in enumerate(grads) if g is not None]
        reduced = reduce_grads([grads[i] for i in present])
        grads = list(grads)
        for i, g in zip(present, reduced, strict=True):
            grads[i] = g
    new = dict(params)
    buffers = momentum_buffers or {}
    for name, g in zip(names, grads, strict=True):
        if g is None:
            continue
        theta = params[name]
        d = g.detach() if first_order else g
        if weight_decay:
            d = d + weight_decay * theta.detach()
        if momentum:
            buf = buffers.get(name)
            buf = d if buf is None else momentum * buf.detach() + (1 - dampening) * d
            d = d + momentum * buf if nesterov else buf
        new[name] = keep_layout(theta - lr * d, theta)
    return new


def keep_layout(value: Tensor, template: Tensor) -> Tensor:
    """``value`` laid out with ``template``'s strides (differentiably), so that a channels-last
    weight stays channels-last after a virtual step and the twin's convolutions keep their
    memory format (autograd may return a gradient in another layout)."""
    if value.stride() == template.stride():
        return value
    out = torch.empty_strided(
        template.shape, template.stride(), dtype=value.dtype, device=value.device
    )
    return out.copy_(value)
