"""The maths of one meta step, as pure functions.

Learning to Reweight (Ren et al., 2018) asks how the meta (clean validation) loss would change
if training example i were up-weighted by εᵢ in a virtual SGD step:

    θ′(ε) = θ − lr·∇θ Σᵢ εᵢ ℓᵢ(θ),      gᵢ = ∂L_meta(θ′(ε)) / ∂εᵢ  at ε = 0,

and turns ``g`` into weights w = max(−g, 0) / Σ max(−g, 0). Meta-Weight-Net (Shu et al., 2019)
replaces ε by a small net v(ℓ; φ) and follows ∂L_meta(θ′(φ))/∂φ instead.

``meta_grad="unrolled"`` computes these by differentiating through the virtual step (a double
backward through the buffer-backed twin). ``meta_grad="fast"`` uses the exact first-order
identity of the virtual step (see ``reweight.fast``), when available.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reweight.meta import MetaModule, sgd_step, to_meta

__all__ = [
    "LossFn",
    "l2rw_eps_grad",
    "l2rw_eps_grad_from_losses",
    "l2rw_weights",
    "mwnet_meta_grads",
    "mwnet_weights",
    "normalize_l2rw",
]

LossFn = Callable[..., Tensor]
Reduce = Callable[[Tensor], Tensor]  # Σ over data-parallel ranks
META_GRAD_MODES = ("unrolled", "fast")


def check_meta_grad(meta_grad: str) -> str:
    if meta_grad not in META_GRAD_MODES:
        raise ValueError(f"meta_grad must be one of {list(META_GRAD_MODES)}, got {meta_grad!r}")
    return meta_grad


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
    lr: float,
    loss_fn: LossFn = F.cross_entropy,
) -> tuple[Tensor, Tensor]:
    """∂L_meta/∂ε at ε = 0 and the meta loss at θ′, given ``losses`` (B,) at the twin's weights.

    ``twin`` must hold the weights θ that ``losses`` were computed with (``twin.bind(model)``).
    On return it holds θ′ (with history); re-bind before using it again. The graph of
    ``losses`` is kept, so the caller may still backpropagate a weighted sum of them.
    """
    eps = torch.zeros_like(losses, requires_grad=True)
    params = dict(twin.named_params())
    new = sgd_step(params, (eps * losses).sum(), lr)
    twin.set_params(new)
    meta_loss = loss_fn(twin(meta_inputs), meta_targets)
    (grad,) = torch.autograd.grad(meta_loss, eps, retain_graph=True)
    return grad, meta_loss.detach()


def l2rw_eps_grad(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    meta_inputs: Tensor,
    meta_targets: Tensor,
    lr: float,
    loss_fn: LossFn = F.cross_entropy,
    *,
    meta_grad: str = "unrolled",
) -> Tensor:
    """The raw L2RW meta-gradient ∂L_meta(θ′(ε))/∂ε at ε = 0, shape (B,).

    ``loss_fn(outputs, targets, reduction="none")`` gives the training losses and
    ``loss_fn(outputs, targets)`` the (mean) meta loss. The model, its parameters, their
    ``.grad`` and its BatchNorm statistics are left unchanged; BatchNorm layers in training mode
    use batch statistics, so the examples of a batch are coupled exactly as in training.

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
        from reweight.fast import l2rw_eps_grad_fast

        return l2rw_eps_grad_fast(
            model, inputs, targets, meta_inputs, meta_targets, lr, loss_fn
        ).detach()
    twin = to_meta(model)
    losses = loss_fn(twin(inputs), targets, reduction="none")
    grad, _ = l2rw_eps_grad_from_losses(twin, losses, meta_inputs, meta_targets, lr, loss_fn)
    return grad.detach()


def l2rw_weights(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    meta_inputs: Tensor,
    meta_targets: Tensor,
    lr: float,
    loss_fn: LossFn = F.cross_entropy,
    *,
    meta_grad: str = "unrolled",
) -> Tensor:
    """Normalised L2RW weights for one batch: max(−g, 0) / Σ max(−g, 0), shape (B,).

    Arguments as for ``l2rw_eps_grad``; the model is left unchanged.

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
            model, inputs, targets, meta_inputs, meta_targets, lr, loss_fn, meta_grad=meta_grad
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


def mwnet_meta_grads(
    twin: MetaModule,
    losses: Tensor,
    vnet: nn.Module,
    meta_inputs: Tensor,
    meta_targets: Tensor,
    lr: float,
    loss_fn: LossFn = F.cross_entropy,
    *,
    normalize: str = "none",
    detach_loss: bool = True,
    sgd_kwargs: dict | None = None,
    n_global: int | None = None,
    reduce: Reduce | None = None,
    world_size: int = 1,
) -> tuple[list[Tensor], Tensor]:
    """∂L_meta(θ′(φ))/∂φ for the weighting net's parameters φ, and the meta loss.

    θ′(φ) = θ − lr·∇θ Σᵢ wᵢ(φ)ℓᵢ(θ), w from ``mwnet_weights``; ``losses`` computed at the twin's
    weights. ``sgd_kwargs`` (momentum, weight_decay, momentum_buffers, ...) make the virtual
    step replay the real SGD optimizer. On return the twin holds θ′; the graph of ``losses`` is
    kept for the caller's real update.

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
    new = sgd_step(
        dict(twin.named_params()),
        (w * losses).sum(),
        lr,
        reduce_grads=reduce_grads,
        **(sgd_kwargs or {}),
    )
    twin.set_params(new)
    meta_loss = loss_fn(twin(meta_inputs), meta_targets)
    grads = torch.autograd.grad(meta_loss / world_size, list(vnet.parameters()), retain_graph=True)
    return list(grads), meta_loss.detach()
