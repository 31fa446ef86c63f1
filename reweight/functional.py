"""The maths of one meta step, as pure functions.

Learning to Reweight (Ren et al., 2018) asks how the meta (clean validation) loss would change
if training example i were up-weighted by εᵢ in a virtual SGD step:

    θ′(ε) = θ − lr·∇θ Σᵢ εᵢ ℓᵢ(θ),      gᵢ = ∂L_meta(θ′(ε)) / ∂εᵢ  at ε = 0,

and turns ``g`` into weights w = max(−g, 0) / Σ max(−g, 0). Meta-Weight-Net (Shu et al., 2019)
replaces ε by a small net v(ℓ; φ) and follows ∂L_meta(θ′(φ))/∂φ instead.

``meta_grad="unrolled"`` (the reference) computes these by differentiating through the virtual
step: a double backward through the buffer-backed twin. ``meta_grad="fast"`` (the default) uses
exact first-order identities. L2RW's virtual step is the identity at ε = 0, so

    ∂L_meta(θ′)/∂εᵢ |ε=0 = −lr·⟨∇θℓᵢ(θ), ∇θL_meta(θ)⟩,

a Jacobian-vector product (JVP) of the per-example loss vector ℓ(θ) (B,) in the direction of
the meta gradient. Replaying a real optimizer (``optimizer=``: SGD with momentum or weight
decay, Adam, AdamW; ``reweight.meta.optim``) the step at ε = 0 is not the identity: it moves θ to
θ′₀, where the optimizer's state alone takes it, and its Jacobian in the gradient is −lr·D
elementwise, so

    ∂L_meta(θ′)/∂εᵢ |ε=0 = −⟨∇θℓᵢ(θ), lr·D ⊙ ∇θL_meta(θ′₀)⟩,

the same JVP in the direction lr·D ⊙ v′₀ (lr and D per weight: each from its parameter group).
MW-Net's virtual step θ′(φ) = θ − lr·κ·Σⱼ sⱼ(φ)∇θℓⱼ(θ), with
s = ∂(Σᵢ wᵢ(φ, ℓ)·ℓᵢ)/∂ℓ (s = w when the net sees ℓ detached; κ = 1 for plain SGD, or the
replayed optimizer's elementwise lr·D/lr, ``reweight.meta.optim``), likewise gives

    ∂L_meta(θ′)/∂φ = −lr·Σⱼ cⱼ·∂sⱼ/∂φ,     cⱼ = ⟨∇θℓⱼ(θ), κ·∇θL_meta(θ′)⟩,

a JVP at θ in the direction of the meta gradient *at θ′*, then a vector-Jacobian product
through the weighting net. Both equal the unrolled values up to rounding. The JVP is taken of
the whole batch's loss vector, so BatchNorm's batch statistics couple the examples exactly as in
the unrolled step. Which forward-mode engine computes it is the business of ``reweight.jvp``
(a ``Planner``: the tangent tape, dual numbers, or per layer).

Example:
    >>> import torch, torch.nn as nn
    >>> from reweight import l2rw_eps_grad
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    >>> x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    >>> fast = l2rw_eps_grad(model, x, y, x[:3], y[:3], lr=0.1)  # meta_grad="fast"
    >>> slow = l2rw_eps_grad(model, x, y, x[:3], y[:3], lr=0.1, meta_grad="unrolled")
    >>> bool(torch.allclose(fast, slow, rtol=0, atol=1e-12))
    True
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reweight.jvp import Planner, Recording
from reweight.meta import (
    LossFn,
    MetaModule,
    OptimizerReplay,
    meta_gradient,
    sgd_step,
    to_meta,
    trainable,
)
from reweight.meta.kernels import differentiable_kernels

__all__ = [
    "LossFn",
    "l2rw_eps_grad",
    "l2rw_eps_grad_fast",
    "l2rw_eps_grad_from_losses",
    "l2rw_weights",
    "mwnet_meta_grads",
    "mwnet_seeds",
    "mwnet_weights",
    "normalize_l2rw",
]

Reduce = Callable[[Tensor], Tensor]  # Σ over data-parallel ranks
META_GRAD_MODES = ("fast", "unrolled")


def check_meta_grad(meta_grad: str) -> str:
    if meta_grad not in META_GRAD_MODES:
        raise ValueError(f"meta_grad must be one of {list(META_GRAD_MODES)}, got {meta_grad!r}")
    return meta_grad


def _check_lr(lr: float | None) -> float:
    if lr is None:
        raise ValueError("lr is needed for a plain SGD virtual step (no optimizer to replay)")
    return lr


def _virtual_step(
    params: dict[str, Tensor],
    loss: Tensor,
    lr: float | None,
    optimizer: torch.optim.Optimizer | None,
    *,
    reduce_grads: Callable[[list[Tensor]], list[Tensor]] | None = None,
    sgd_kwargs: dict | None = None,
) -> dict[str, Tensor]:
    """θ′ by name, differentiable: a plain SGD step at ``lr`` (with ``sgd_kwargs``), or the
    real ``optimizer`` replayed (``OptimizerReplay.step``; ``lr`` then not read)."""
    if optimizer is None:
        kwargs = sgd_kwargs or {}
        return sgd_step(params, loss, _check_lr(lr), reduce_grads=reduce_grads, **kwargs)
    if sgd_kwargs:
        raise ValueError("mwnet_meta_grads: give sgd_kwargs or optimizer, not both")
    return OptimizerReplay(optimizer, params.items()).step(params, loss, reduce_grads=reduce_grads)


def normalize_l2rw(eps_grad: Tensor, reduce: Reduce | None = None) -> Tensor:
    """w = max(−g, 0) / Σ max(−g, 0); all zeros when every clamped weight is 0.

    The zero-sum rule follows the L2RW reference code: such a batch contributes no gradient.
    ``reduce`` sums the denominator over ranks in data-parallel training.
    """
    w = torch.clamp(-eps_grad.detach(), min=0)
    total = w.sum() if reduce is None else reduce(w.sum())
    return torch.where(total > 0, w / torch.where(total > 0, total, 1), w)


def l2rw_eps_grad_from_losses(
    twin: MetaModule,
    losses: Tensor,
    meta_inputs: Tensor,
    meta_targets: Tensor,
    lr: float | None,
    loss_fn: LossFn = F.cross_entropy,
    *,
    optimizer: torch.optim.Optimizer | None = None,
) -> tuple[Tensor, Tensor]:
    """∂L_meta/∂ε at ε = 0 and the meta loss at θ′, given ``losses`` (B,) at the twin's weights.

    ``twin`` must hold the weights θ that ``losses`` were computed with (``twin.bind(model)``).
    On return it holds θ′ (with history); re-bind before using it again. The graph of
    ``losses`` is kept, so the caller may still backpropagate a weighted sum of them.
    ``optimizer`` (over the model's parameters, which a bound twin holds) makes the virtual
    step replay it, differentiably (``OptimizerReplay.step``); ``lr`` is then not read.
    """
    eps = torch.zeros_like(losses, requires_grad=True)
    new = _virtual_step(dict(twin.named_params()), (eps * losses).sum(), lr, optimizer)
    twin.set_params(new)
    meta_loss = loss_fn(twin(meta_inputs), meta_targets)
    (grad,) = torch.autograd.grad(meta_loss, eps, retain_graph=True)
    return grad, meta_loss.detach()


def l2rw_eps_grad_fast(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    meta_inputs: Tensor,
    meta_targets: Tensor,
    lr: float | None,
    loss_fn: LossFn = F.cross_entropy,
    *,
    planner: Planner,
    update: bool = False,
    optimizer: torch.optim.Optimizer | None = None,
) -> tuple[Tensor, Recording, Tensor]:
    """(∂L_meta/∂ε (B,), the training forward's recording, L_meta(θ′₀)) by the exact identity.

    1. v = ∇θL_meta(θ): a forward and backward of the meta batch through the twin (batch
       statistics, no running-statistics writes, nothing into ``.grad``); done first, so its
       activations are freed before the training forward's are made.
    2. The training forward, recorded by the engine ``planner`` chooses (v is known, so the
       dual-number engines take it in that forward).
    3. g = −lr·⟨∇θℓᵢ, v⟩ for every i.

    Replaying ``optimizer`` (``lr`` then not read): θ′₀ and D are the replayed step's at a zero
    gradient (they do not depend on the batch), v = ∇θL_meta(θ′₀) and the JVP is taken in the
    direction lr·D ⊙ v, per weight with its group's lr: g = −⟨∇θℓᵢ, lr·D ⊙ v⟩.

    With ``update`` the recorded forward is the real model's and ``recording.update_losses()``
    carries the real update's graph (``L2RW.step``); without, it runs through the twin and the
    model is left unchanged (``l2rw_eps_grad``).
    """
    _, weights = trainable(model)
    start = replay = None
    if optimizer is not None:  # θ′₀ and D at a zero gradient (they do not depend on the batch)
        replay = OptimizerReplay(optimizer, model)
        start, scales = replay.values(weights, [None] * len(weights))
    v, meta_loss = meta_gradient(
        planner.twins.bound(model), weights, start, meta_inputs, meta_targets, loss_fn
    )
    del start
    if replay is None:
        direction, step = v, _check_lr(lr)
    else:  # lr·D ⊙ v′, each weight at its group's lr
        direction = [k * d * s for k, d, s in zip(replay.lrs, v, scales, strict=True)]
        step = 1.0
        del v, scales
    recording = planner.record(model, inputs, targets, loss_fn, direction=direction, update=update)
    return -step * recording.jvp(direction), recording, meta_loss


def l2rw_eps_grad(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    meta_inputs: Tensor,
    meta_targets: Tensor,
    lr: float | None,
    loss_fn: LossFn = F.cross_entropy,
    *,
    meta_grad: str = "fast",
    planner: Planner | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> Tensor:
    """The raw L2RW meta-gradient ∂L_meta(θ′(ε))/∂ε at ε = 0, shape (B,).

    The virtual step is plain SGD at ``lr`` (``optimizer`` None), or the real ``optimizer``
    (over ``model``'s parameters: SGD with momentum, dampening, nesterov, weight decay; Adam;
    AdamW) replayed from its current state, each weight at its own parameter group's lr, and
    ``lr`` is then not read (pass None, or the optimizer's lr). The optimizer is read, never
    stepped. A weight the training loss does not reach is replayed with a zero gradient.

    ``loss_fn(outputs, targets, reduction="none")`` gives the training losses and
    ``loss_fn(outputs, targets)`` the (mean) meta loss. The model, its parameters, their
    ``.grad`` and its BatchNorm statistics are left unchanged; BatchNorm layers in training mode
    use batch statistics, so the examples of a batch are coupled exactly as in training.
    ``meta_grad="fast"`` takes the JVP by the engine ``planner`` chooses (a new
    ``Planner("l2rw")`` by default: the choice ``L2RW().step`` makes for this model and device;
    ``L2RW.weigh`` passes its own); ``"unrolled"`` differentiates through the virtual step.

    Example:
        >>> import torch, torch.nn as nn
        >>> from reweight import l2rw_eps_grad
        >>> model = nn.Linear(4, 3)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> g = l2rw_eps_grad(model, x, y, x[:2], y[:2], lr=0.1)
        >>> g.shape
        torch.Size([8])
    """
    if check_meta_grad(meta_grad) == "fast":
        planner = planner if planner is not None else Planner("l2rw")
        grad, _, _ = l2rw_eps_grad_fast(
            model,
            inputs,
            targets,
            meta_inputs,
            meta_targets,
            lr,
            loss_fn,
            planner=planner,
            optimizer=optimizer,
        )
        return grad.detach()
    twin = to_meta(model)
    with differentiable_kernels(model):  # the forward is differentiated twice
        losses = loss_fn(twin(inputs), targets, reduction="none")
        grad, _ = l2rw_eps_grad_from_losses(
            twin, losses, meta_inputs, meta_targets, lr, loss_fn, optimizer=optimizer
        )
    return grad.detach()


def l2rw_weights(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    meta_inputs: Tensor,
    meta_targets: Tensor,
    lr: float | None,
    loss_fn: LossFn = F.cross_entropy,
    *,
    meta_grad: str = "fast",
    planner: Planner | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> Tensor:
    """Normalised L2RW weights for one batch: max(−g, 0) / Σ max(−g, 0), shape (B,).

    Arguments as for ``l2rw_eps_grad`` (``optimizer``: replay the real optimizer in the virtual
    step); the model and the optimizer are left unchanged.

    Example:
        >>> import torch, torch.nn as nn
        >>> from reweight import l2rw_weights
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Linear(4, 3)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> w = l2rw_weights(model, x, y, x[:2], y[:2], lr=0.1)
        >>> bool(w.min() >= 0), round(float(w.sum()), 6)
        (True, 1.0)
    """
    return normalize_l2rw(
        l2rw_eps_grad(
            model,
            inputs,
            targets,
            meta_inputs,
            meta_targets,
            lr,
            loss_fn,
            meta_grad=meta_grad,
            planner=planner,
            optimizer=optimizer,
        )
    )


def mwnet_weights(
    vnet: nn.Module,
    losses: Tensor,
    normalize: str = "none",
    *,
    n_global: int | None = None,
    reduce: Reduce | None = None,
) -> Tensor:
    """Per-example weights from a weighting net, scaled so that the training loss is Σ wᵢℓᵢ.

    v = vnet(ℓ) of shape (B,); ``normalize="none"`` gives w = v / B (the mean weighted loss of
    MW-Net's reference code), ``"sum"`` gives w = v / Σv (all zeros if Σv = 0). In
    data-parallel training B is the global batch size (``n_global``) and ``reduce`` sums Σv
    over ranks (differentiably, when the weights are differentiated).
    """
    v = vnet(losses.reshape(-1, 1)).reshape(-1)
    if normalize == "none":
        return v / (n_global or len(v))
    if normalize == "sum":
        total = v.sum() if reduce is None else reduce(v.sum())
        return torch.where(total > 0, v / torch.where(total > 0, total, 1), v)
    raise ValueError(f"normalize must be one of ['none', 'sum'], got {normalize!r}")


def mwnet_seeds(
    vnet: nn.Module,
    losses: Tensor,
    normalize: str = "none",
    *,
    detach_loss: bool = True,
    n_global: int | None = None,
    reduce: Reduce | None = None,
) -> Tensor:
    """s = ∂(Σᵢ wᵢℓᵢ)/∂ℓ (B,), with graph to the weighting net: ∇θ Σᵢ wᵢℓᵢ = Σⱼ sⱼ∇θℓⱼ.

    The weights w of ``mwnet_weights`` at the values of ``losses``, and with ``detach_loss``
    (the net sees ℓ detached) s = w. Without, w also depends on ℓ, and s = w + Σᵢ ℓᵢ·∂wᵢ/∂ℓ,
    taken at a detached leaf with ``create_graph`` so that ∂s/∂φ exists. In data-parallel
    training ``reduce`` must be differentiable: Σᵢ runs over the global batch, so sⱼ gets the
    other ranks' ∂wᵢ/∂ℓⱼ through the normalisation (each rank calls this).
    """
    values = losses.detach()
    if detach_loss:
        return mwnet_weights(vnet, values, normalize, n_global=n_global, reduce=reduce)
    leaf = values.requires_grad_()
    with torch.enable_grad():
        w = mwnet_weights(vnet, leaf, normalize, n_global=n_global, reduce=reduce)
        (s,) = torch.autograd.grad((w * leaf).sum(), leaf, create_graph=True)
    return s


def mwnet_meta_grads(
    twin: MetaModule,
    losses: Tensor,
    vnet: nn.Module,
    meta_inputs: Tensor,
    meta_targets: Tensor,
    lr: float | None,
    loss_fn: LossFn = F.cross_entropy,
    *,
    normalize: str = "none",
    detach_loss: bool = True,
    sgd_kwargs: dict | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    n_global: int | None = None,
    reduce: Reduce | None = None,
    world_size: int = 1,
) -> tuple[list[Tensor], Tensor]:
    """∂L_meta(θ′(φ))/∂φ for the weighting net's parameters φ, and the meta loss.

    θ′(φ) = θ − lr·∇θ Σᵢ wᵢ(φ)ℓᵢ(θ), w from ``mwnet_weights``; ``losses`` computed at the twin's
    weights. ``sgd_kwargs`` (momentum, weight_decay, momentum_buffers, ...) make the virtual
    step an SGD step with those settings; ``optimizer`` (the real one, over the parameters the
    bound twin holds) makes it replay that optimizer differentiably (``OptimizerReplay``, each
    weight at its group's lr; ``lr`` is then not read). On return the twin holds θ′; the graph
    of ``losses`` is kept for the caller's real update.

    Data-parallel: ``reduce`` is a *differentiable* sum over ranks, applied to the virtual
    step's gradient (θ′ needs the global Σ wᵢ∇θℓᵢ) and to Σv; every rank evaluates the same
    meta batch, so the meta loss is divided by ``world_size`` and the returned gradients are
    this rank's share: their sum over ranks is the single-process hypergradient.
    """
    w = mwnet_weights(
        vnet,
        losses.detach() if detach_loss else losses,
        normalize,
        n_global=n_global,
        reduce=reduce,
    )
    reduce_grads = None if reduce is None else (lambda gs: [reduce(g) for g in gs])
    new = _virtual_step(
        dict(twin.named_params()),
        (w * losses).sum(),
        lr,
        optimizer,
        reduce_grads=reduce_grads,
        sgd_kwargs=sgd_kwargs,
    )
    twin.set_params(new)
    meta_loss = loss_fn(twin(meta_inputs), meta_targets)
    grads = torch.autograd.grad(meta_loss / world_size, list(vnet.parameters()), retain_graph=True)
    return list(grads), meta_loss.detach()
