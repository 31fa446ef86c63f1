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
(a ``Planner``: the tangent tape, dual numbers, or per layer); ``reweight.metastep`` holds the
one meta step that computes both, for every method.

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

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reweight.meta import LossFn, MetaModule
from reweight.metastep import MetaStep, StepInputs, check_meta_grad, virtual_step

__all__ = [
    "LossFn",
    "l2rw_eps_grad",
    "l2rw_weights",
    "mwnet_meta_grads",
    "mwnet_seeds",
    "mwnet_weights",
    "normalize_l2rw",
    "scale_weights",
    "seeds_of",
]

Reduce = Callable[[Tensor], Tensor]  # Σ over data-parallel ranks

log = logging.getLogger(__name__)


def normalize_l2rw(eps_grad: Tensor, reduce: Reduce | None = None) -> Tensor:
    """w = max(−g, 0) / Σ max(−g, 0); all zeros when every clamped weight is 0.

    The zero-sum rule follows the L2RW reference code: such a batch contributes no gradient.
    ``reduce`` sums the denominator over ranks in data-parallel training.
    """
    w = torch.clamp(-eps_grad.detach(), min=0)
    total = w.sum() if reduce is None else reduce(w.sum())
    return torch.where(total > 0, w / torch.where(total > 0, total, 1), w)


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
    engine: str = "auto",
    params: str | Sequence[str] = "all",
    optimizer: torch.optim.Optimizer | None = None,
    step: MetaStep | None = None,
) -> Tensor:
    """The raw L2RW meta-gradient ∂L_meta(θ′(ε))/∂ε at ε = 0, shape (B,).

    The virtual step is plain SGD at ``lr``, or the real ``optimizer`` (SGD, Adam, AdamW over
    ``model``'s parameters; read, never stepped) replayed from its state, each weight at its
    group's lr (``lr`` then not read). ``params``: the parameters it moves (``select_params``).
    ``loss_fn(outputs, targets, reduction="none")`` gives the training losses and
    ``loss_fn(outputs, targets)`` the mean meta loss. The model, its ``.grad`` and its BatchNorm
    statistics are left unchanged; BatchNorm in training mode couples the batch as in training.
    ``meta_grad="fast"`` takes the JVP by the engine a planner chooses (``engine="auto"``: the
    choice ``L2RW().step`` makes); ``"unrolled"`` differentiates through the virtual step.
    ``step``: a ``MetaStep(at_zero=True)`` reused across calls (its settings then apply).

    Example:
        >>> import torch, torch.nn as nn
        >>> from reweight import l2rw_eps_grad
        >>> model = nn.Linear(4, 3)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> g = l2rw_eps_grad(model, x, y, x[:2], y[:2], lr=0.1)
        >>> g.shape
        torch.Size([8])
    """
    if step is None:
        step = MetaStep(
            meta_grad=meta_grad,
            engine=engine,
            params=params,
            replay_optimizer=optimizer is not None,
            at_zero=True,
            label="l2rw",
        )
    elif (check_meta_grad(meta_grad), engine, params) != ("fast", "auto", "all"):
        raise ValueError("l2rw_eps_grad: give step= or meta_grad/engine/params, not both")
    elif step.replay_optimizer != (optimizer is not None):
        raise ValueError(
            f"l2rw_eps_grad: step.replay_optimizer is {step.replay_optimizer} but optimizer is "
            f"{'given' if optimizer is not None else 'None'}"
        )
    batch = (model, inputs, targets, meta_inputs, meta_targets, lr, loss_fn, optimizer)
    return step(StepInputs(*batch), update=False).c  # type: ignore[arg-type]


def l2rw_weights(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    meta_inputs: Tensor,
    meta_targets: Tensor,
    lr: float | None,
    loss_fn: LossFn = F.cross_entropy,
    **options,
) -> Tensor:
    """Normalised L2RW weights for one batch: max(−g, 0) / Σ max(−g, 0), shape (B,).

    ``options`` as for ``l2rw_eps_grad`` (``optimizer``: replay the real optimizer in the
    virtual step; ``meta_grad``, ``engine``, ``params``, ``step``); the model and the optimizer
    are left unchanged.

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
    g = l2rw_eps_grad(model, inputs, targets, meta_inputs, meta_targets, lr, loss_fn, **options)
    w = normalize_l2rw(g)
    if not bool(w.sum() > 0):
        log.warning(
            "l2rw_weights: every weight of this batch is 0: up-weighting any of its %d examples "
            "would raise the meta loss (e.g. a batch of one class against a balanced meta "
            "batch), so under L2RW's rule it contributes no gradient",
            len(w),
        )
    return w


def scale_weights(
    v: Tensor,
    normalize: str = "none",
    *,
    n_global: int | None = None,
    reduce: Reduce | None = None,
) -> Tensor:
    """A weighting net's outputs v (B,) as weights, so that the training loss is Σ wᵢℓᵢ.

    ``normalize="none"`` gives w = v / B (the mean weighted loss of MW-Net's reference code),
    ``"sum"`` gives w = v / Σv (all zeros if Σv = 0). In data-parallel training B is the
    global batch size (``n_global``) and ``reduce`` sums Σv over ranks (differentiably, when
    the weights are differentiated).
    """
    if normalize == "none":
        return v / (n_global or len(v))
    if normalize == "sum":
        total = v.sum() if reduce is None else reduce(v.sum())
        return torch.where(total > 0, v / torch.where(total > 0, total, 1), v)
    raise ValueError(f"normalize must be one of ['none', 'sum'], got {normalize!r}")


def mwnet_weights(
    vnet: nn.Module,
    losses: Tensor,
    normalize: str = "none",
    *,
    n_global: int | None = None,
    reduce: Reduce | None = None,
) -> Tensor:
    """Per-example weights from MW-Net's weighting net: ``scale_weights`` of v = vnet(ℓ)."""
    v = vnet(losses.reshape(-1, 1)).reshape(-1)
    return scale_weights(v, normalize, n_global=n_global, reduce=reduce)


def seeds_of(
    weights_fn: Callable[[Tensor], Tensor], losses: Tensor, *, detach_loss: bool = True
) -> Tensor:
    """s = ∂(Σᵢ wᵢℓᵢ)/∂ℓ (B,), with graph to the weighting net: ∇θ Σᵢ wᵢℓᵢ = Σⱼ sⱼ∇θℓⱼ.

    ``weights_fn(ℓ)`` gives the weights w (B,) at the values of ``losses``; with ``detach_loss``
    (the net sees ℓ detached) s = w. Without, w also depends on ℓ, and s = w + Σᵢ ℓᵢ·∂wᵢ/∂ℓ,
    taken at a detached leaf with ``create_graph`` so that ∂s/∂φ exists. In data-parallel
    training a normalisation inside ``weights_fn`` must sum differentiably over ranks: Σᵢ
    runs over the global batch, so sⱼ gets the other ranks' ∂wᵢ/∂ℓⱼ (each rank calls this).
    """
    values = losses.detach()
    if detach_loss:
        return weights_fn(values)
    leaf = values.requires_grad_()
    with torch.enable_grad():
        w = weights_fn(leaf)
        (s,) = torch.autograd.grad((w * leaf).sum(), leaf, create_graph=True)
    return s


def mwnet_seeds(
    vnet: nn.Module,
    losses: Tensor,
    normalize: str = "none",
    *,
    detach_loss: bool = True,
    n_global: int | None = None,
    reduce: Reduce | None = None,
) -> Tensor:
    """MW-Net's seeds s = ∂(Σᵢ wᵢℓᵢ)/∂ℓ (``seeds_of`` with ``mwnet_weights``)."""

    def weights(values: Tensor) -> Tensor:
        return mwnet_weights(vnet, values, normalize, n_global=n_global, reduce=reduce)

    return seeds_of(weights, losses, detach_loss=detach_loss)


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
    optimizer: torch.optim.Optimizer | None = None,
    n_global: int | None = None,
    reduce: Reduce | None = None,
    world_size: int = 1,
) -> tuple[list[Tensor], Tensor]:
    """∂L_meta(θ′(φ))/∂φ for the weighting net's parameters φ, and the meta loss, by a double
    backward straight into φ: a reference for the meta step's route through c.

    θ′(φ) = θ − lr·∇θ Σᵢ wᵢ(φ)ℓᵢ(θ), w from ``mwnet_weights``; ``losses`` computed at the twin's
    weights. ``optimizer`` (the real one, over the parameters the bound twin holds) makes the
    virtual step replay it differentiably (``OptimizerReplay``, each weight at its group's lr;
    ``lr`` is then not read). On return the twin holds θ′; the graph of ``losses`` is kept.

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
    new = virtual_step(
        dict(twin.named_params()), (w * losses).sum(), lr, optimizer, reduce_grads=reduce_grads
    )
    twin.set_params(new)
    meta_loss = loss_fn(twin(meta_inputs), meta_targets)
    grads = torch.autograd.grad(meta_loss / world_size, list(vnet.parameters()), retain_graph=True)
    return list(grads), meta_loss.detach()
