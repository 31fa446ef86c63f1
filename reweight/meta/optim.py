"""The real optimizer's next step, replayed as a function of the gradient.

A virtual step that replays ``torch.optim.SGD``, ``Adam`` or ``AdamW`` moves each weight θ to

    θ′(g) = c·θ − lr·d(g),

where g is the weight's gradient, d the direction the optimizer takes from g and its current
state (SGD's momentum buffer; Adam's moments and step count), lr its parameter group's
learning rate, and c = 1 − lr·wd for AdamW's decoupled weight decay (1 otherwise). Every rule
here acts elementwise, so the Jacobian of the step is diagonal:

    ∂θ′/∂g = −lr·D,     D = ∂d/∂g elementwise,

a float for SGD (κ of ``sgd_direction``: d is affine in g) and a tensor for Adam. Adam and
AdamW at step t + 1 (t the state's step count, 0 before the first step; Adam's L2 term first
replaces g by g + wd·θ, which moves D's point but not its value as a derivative in g):

    m′ = β₁m + (1−β₁)g,   v′ = β₂v + (1−β₂)g²,   m̂ = m′/(1−β₁ᵗ⁺¹),   √v̂ = √v′/√(1−β₂ᵗ⁺¹),
    d = m̂/(√v̂ + eps),
    D = (1−β₁)/(1−β₁ᵗ⁺¹)/(√v̂+eps) − m̂·(1−β₂)g/((1−β₂ᵗ⁺¹)·√v̂·(√v̂+eps)²),

the second term from ∂√v̂/∂g = (1−β₂)g/((1−β₂ᵗ⁺¹)·√v̂). Where v′ = 0 (g = 0 and no second
moment yet, e.g. a first step at zero gradient) it is 0, its limit (m̂ ∝ g there while g/√v̂
stays bounded), and the differentiable step takes the same limit (``_sqrt``: autograd's
1/(2√0)·0 would be NaN). With amsgrad the denominator uses max(vmax, v′), which moves with g
only where v′ > vmax (at a tie, where the step has no derivative, it is taken as not moving).
At L2RW's ε = 0 without weight decay (g = 0) this is D = (1−β₁)/(1−β₁ᵗ⁺¹)/(√(β₂v/(1−β₂ᵗ⁺¹))+eps).

A weight whose gradient is absent (``None``: the loss does not reach it) is replayed with a
zero gradient: it moves by its state alone (momentum, Adam's moments, weight decay). The real
optimizer skips a parameter whose ``.grad`` is None; the two differ only for weights the
training loss never reaches, which the meta loss of the same model does not reach either.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from reweight.meta.sgd import keep_layout, sgd_direction

__all__ = ["SUPPORTED_OPTIMIZERS", "OptimizerReplay", "check_replayable"]

SUPPORTED_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
_SUPPORTED = "torch.optim.SGD, torch.optim.Adam and torch.optim.AdamW"


def check_replayable(optimizer: torch.optim.Optimizer) -> None:
    """Raise ``ValueError`` (one line) unless ``OptimizerReplay`` replays ``optimizer`` exactly.

    ``foreach``, ``fused``, ``capturable`` and ``differentiable`` are other implementations of
    the same update and are accepted; ``maximize`` (a step uphill) is not.
    """
    name = type(optimizer).__name__
    if type(optimizer) not in SUPPORTED_OPTIMIZERS:
        raise ValueError(
            f"replay_optimizer cannot replay {name} in the virtual step; supported: {_SUPPORTED}"
        )
    for group in optimizer.param_groups:
        if group.get("maximize"):
            raise ValueError(
                f"replay_optimizer cannot replay {name}(maximize=True): the virtual step "
                "descends the training loss; use maximize=False"
            )
        if any(p.is_complex() for p in group["params"]):
            raise ValueError(f"replay_optimizer cannot replay {name} on complex parameters")


def _sqrt(v: Tensor) -> Tensor:
    """√v with derivative 0 where v = 0: Adam's limit there (module docstring), where
    autograd's own would be inf·0 = NaN."""
    pos = v > 0
    return torch.where(pos, torch.where(pos, v, 1).sqrt(), 0)


class _SGDRule:
    """One weight's ``torch.optim.SGD`` step (``sgd_direction``)."""

    def __init__(self, group: Mapping, state: Mapping) -> None:
        self.lr = float(group["lr"])
        self.buffer = state.get("momentum_buffer")
        self.kwargs = {k: group[k] for k in ("weight_decay", "momentum", "dampening", "nesterov")}

    def step(self, theta: Tensor, grad: Tensor) -> tuple[Tensor, float]:
        d, kappa = sgd_direction(grad, theta, self.buffer, **self.kwargs)
        return theta - self.lr * d, kappa


class _AdamRule:
    """One weight's ``torch.optim.Adam`` / ``AdamW`` step (module docstring)."""

    def __init__(self, group: Mapping, state: Mapping, decoupled: bool) -> None:
        self.lr, self.eps = float(group["lr"]), float(group["eps"])
        self.wd, self.decoupled = float(group["weight_decay"]), decoupled
        self.b1, self.b2 = (float(b) for b in group["betas"])
        self.amsgrad = bool(group["amsgrad"])
        t = float(state["step"]) + 1 if "step" in state else 1.0  # the step about to be taken
        self.bc1, self.bc2 = 1 - self.b1**t, 1 - self.b2**t
        self.m, self.v = state.get("exp_avg"), state.get("exp_avg_sq")
        self.vmax = state.get("max_exp_avg_sq")

    def step(self, theta: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
        """θ′ (differentiable in ``grad``) and D = ∂d/∂g (detached)."""
        b1, b2 = self.b1, self.b2
        g = grad + self.wd * theta.detach() if self.wd and not self.decoupled else grad
        m = (1 - b1) * g if self.m is None else b1 * self.m.detach() + (1 - b1) * g
        v = (1 - b2) * g * g if self.v is None else b2 * self.v.detach() + (1 - b2) * g * g
        moving = v > 0  # where the denominator moves with g (and √v′ has a derivative)
        if self.amsgrad and self.vmax is not None:
            vmax = self.vmax.detach()
            moving = v > vmax
            v = torch.where(moving, v, vmax)  # max(vmax, v′), moving with g only where v′ wins
        root = _sqrt(v) / math.sqrt(self.bc2)  # √v̂
        denom = root + self.eps
        m_hat = m / self.bc1
        shrunk = theta * (1 - self.lr * self.wd) if self.wd and self.decoupled else theta
        new = shrunk - self.lr * (m_hat / denom)
        with torch.no_grad():
            scale = (1 - b1) / self.bc1 / denom
            safe = torch.where(moving, root, 1)
            second = m_hat * (1 - b2) * g / (self.bc2 * safe * denom * denom)
            scale = scale - torch.where(moving, second, 0)
        return new, scale.detach()


class OptimizerReplay:
    """The next step of a real optimizer for a model's trainable weights, as a function of
    their gradients (module docstring): θ′ = c·θ − lr·d(g) and ∂θ′/∂g = −lr·D elementwise.

    Built from ``optimizer`` and the weights it steps (``model``, or ``(name, tensor)`` pairs
    such as a bound twin's ``named_params()``, which are the model's own tensors), it reads
    each weight's parameter group (its lr and hyperparameters) and state as they are now, and
    never changes them: build one per meta step, after the last real step and scheduler step.
    Weights that do not require grad are not replayed; a trainable weight the optimizer does
    not hold, or an optimizer ``check_replayable`` refuses, raises ``ValueError``.

    Example (the replayed values are where the real step lands):
        >>> import torch, torch.nn as nn
        >>> model = nn.Linear(3, 2)
        >>> opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        >>> grads = [torch.randn_like(p) for p in model.parameters()]
        >>> new, scales = OptimizerReplay(opt, model).values(list(model.parameters()), grads)
        >>> for p, g in zip(model.parameters(), grads):
        ...     p.grad = g
        >>> opt.step()
        >>> all(torch.allclose(a, p) for a, p in zip(new, model.parameters()))
        True
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module | Iterable[tuple[str, Tensor]],
    ) -> None:
        check_replayable(optimizer)
        group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        decoupled = isinstance(optimizer, torch.optim.AdamW)
        named = model.named_parameters() if isinstance(model, nn.Module) else model
        self.names: list[str] = []
        self._rules: list[_SGDRule | _AdamRule] = []
        for name, p in named:
            if not p.requires_grad:
                continue
            group = group_of.get(id(p))
            if group is None:
                raise ValueError(
                    f"replay_optimizer: weight {name!r} is trainable but in none of "
                    f"{type(optimizer).__name__}'s parameter groups, so its step is unknown"
                )
            state = optimizer.state.get(p, {})
            self.names.append(name)
            if isinstance(optimizer, torch.optim.SGD):
                self._rules.append(_SGDRule(group, state))
            else:
                self._rules.append(
                    _AdamRule(group, state, group.get("decoupled_weight_decay", decoupled))
                )
        self.lrs: list[float] = [rule.lr for rule in self._rules]
        """Each replayed weight's learning rate (its group's), in ``names`` order."""

    def step(
        self,
        params: Mapping[str, Tensor],
        loss: Tensor,
        *,
        reduce_grads: Callable[[list[Tensor]], list[Tensor]] | None = None,
    ) -> dict[str, Tensor]:
        """θ′ for every named weight, differentiable through the gradient of ``loss``.

        As ``sgd_step``: ``params`` by name (those not replayed are returned unchanged), with
        ``create_graph``, ``reduce_grads`` applied to the gradients first (a differentiable
        sum over data-parallel ranks). A weight ``loss`` does not reach takes its step with a
        zero gradient.
        """
        weights = [params[n] for n in self.names]
        grads = torch.autograd.grad(loss, weights, create_graph=True, allow_unused=True)
        grads = [
            torch.zeros_like(w) if g is None else g for g, w in zip(grads, weights, strict=True)
        ]
        if reduce_grads is not None:
            grads = reduce_grads(grads)
        new = dict(params)
        for name, rule, theta, g in zip(self.names, self._rules, weights, grads, strict=True):
            new[name] = keep_layout(rule.step(theta, g)[0], theta)
        return new

    @torch.no_grad()
    def values(
        self, weights: Sequence[Tensor], grads: Sequence[Tensor | None]
    ) -> tuple[list[Tensor], list[float | Tensor]]:
        """θ′ (values, no graph) and D per weight, for ``weights`` in ``names`` order and their
        gradients (``None``: a zero gradient). ∂θ′/∂g = −lr·D with lr from ``lrs``."""
        if len(weights) != len(self.names):
            raise ValueError(f"expected {len(self.names)} weights, got {len(weights)}")
        new, scales = [], []
        for rule, theta, g in zip(self._rules, weights, grads, strict=True):
            theta = theta.detach()
            value, scale = rule.step(theta, torch.zeros_like(theta) if g is None else g)
            new.append(keep_layout(value, theta))
            scales.append(scale)
        return new, scales
