"""The virtual SGD step, one source of truth for its values and its linearisation.

A virtual step replays ``torch.optim.SGD``: θ′ = θ − lr·d with d the direction SGD would take
from the gradient g, its weight decay and its current momentum buffer. ``sgd_direction`` is that
rule for one weight, and also returns κ = ∂d/∂g, the factor by which the direction moves when
the gradient does (d is affine in g). Everything else calls it:

- ``sgd_step`` takes the step differentiably (``create_graph``), for the unrolled meta-gradients;
- ``sgd_values`` takes it on given gradients, values only, with κ per weight, for the exact
  first-order identities of ``meta_grad="fast"`` (∂θ′/∂g = −lr·κ).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["keep_layout", "sgd_direction", "sgd_step", "sgd_values"]


def sgd_direction(
    grad: Tensor,
    theta: Tensor,
    buffer: Tensor | None = None,
    *,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
) -> tuple[Tensor, float]:
    """(d, κ): ``torch.optim.SGD``'s step direction for one weight, and κ = ∂d/∂g.

    d₀ = g + wd·θ; with momentum, buf′ = m·buf + (1 − dampening)·d₀, or buf′ = d₀ on SGD's first
    step (``buffer`` None); d = d₀ + m·buf′ with nesterov, else buf′ (d = d₀ without momentum).
    So κ = 1 without momentum, 1 − dampening with a buffer (1 on the first step), and
    1 + m·κ_buf with nesterov. d is differentiable in ``grad``; θ and the buffer are read
    detached (the real optimizer's state, not something a meta-gradient flows into).
    """
    d = grad + weight_decay * theta.detach() if weight_decay else grad
    kappa = 1.0
    if momentum:
        if buffer is None:
            buf, k_buf = d, 1.0
        else:
            buf, k_buf = momentum * buffer.detach() + (1 - dampening) * d, 1.0 - dampening
        d, kappa = (d + momentum * buf, 1 + momentum * k_buf) if nesterov else (buf, k_buf)
    return d, kappa


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
    the real optimizer (``sgd_direction``). ``create_graph`` is on unless ``first_order``, so
    θ′ carries second-order history back to whatever ``loss`` depends on (per-example weights
    ε, a weighting net). Weights that ``loss`` does not reach are returned unchanged.
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
    if first_order:
        grads = [None if g is None else g.detach() for g in grads]
    rule = (weight_decay, momentum, dampening, nesterov)
    weights = [params[n] for n in names]
    new = dict(params)
    for i, theta, d, _ in _moved(names, weights, grads, momentum_buffers, rule):
        new[names[i]] = keep_layout(theta - lr * d, theta)
    return new


@torch.no_grad()
def sgd_values(
    weights: Sequence[Tensor],
    grads: Sequence[Tensor | None],
    names: Sequence[str],
    lr: float,
    *,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    momentum_buffers: Mapping[str, Tensor | None] | None = None,
) -> tuple[list[Tensor], list[float]]:
    """θ′ = θ − lr·d for given gradients, values only (no graph), and κ = ∂d/∂g per weight.

    The same rule as ``sgd_step`` (``sgd_direction``); a weight without gradient keeps θ
    (κ = 0). κ is per weight because momentum buffers are: a weight whose buffer does not
    exist yet takes SGD's first step.
    """
    rule = (weight_decay, momentum, dampening, nesterov)
    new = [theta.detach() for theta in weights]  # a weight without gradient keeps θ
    kappa = [0.0] * len(new)
    for i, theta, d, k in _moved(names, weights, grads, momentum_buffers, rule):
        # θ − lr·d in one pass, as torch.optim.SGD writes its step (no lr·d in between)
        new[i], kappa[i] = keep_layout(theta.sub(d, alpha=lr), theta), k
    return new, kappa


def _moved(
    names: Sequence[str],
    weights: Sequence[Tensor],
    grads: Sequence[Tensor | None],
    momentum_buffers: Mapping[str, Tensor | None] | None,
    rule: tuple[float, float, float, bool],
) -> Iterator[tuple[int, Tensor, Tensor, float]]:
    """``(i, θ, d, κ)`` for each weight ``i`` with a gradient, d and κ from ``sgd_direction``
    with ``rule`` = (weight_decay, momentum, dampening, nesterov)."""
    weight_decay, momentum, dampening, nesterov = rule
    buffers = momentum_buffers or {}
    for i, (name, theta, g) in enumerate(zip(names, weights, grads, strict=True)):
        if g is None:
            continue
        d, k = sgd_direction(
            g,
            theta,
            buffers.get(name),
            weight_decay=weight_decay,
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
        )
        yield i, theta, d, k


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
