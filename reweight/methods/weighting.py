"""Methods whose weights come from a net learned by the meta step: the shared machinery.

A weighting net f(ℓ, context; φ) gives each training example a weight; the meta step
(``reweight.metastep``) gives c = ∂L_meta(θ′)/∂s at the virtual step's seeds s, and the net
learns from ∂L_meta/∂φ = Σᵢ cᵢ·∂sᵢ/∂φ. A method is its net and what it feeds the net
(``net_output``): MW-Net feeds the loss (``reweight.methods.mwnet``); a subclass that feeds the
loss and the label, or the class's group, overrides ``net_output`` and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from reweight.functional import scale_weights, seeds_of
from reweight.jvp.base import zeros_for_none
from reweight.metastep import MetaStep
from reweight.methods.base import Method, MethodOutput, StepInputs

__all__ = ["WeightingNetMethod"]


class WeightingNetMethod(Method):
    """Learn a weighting net by a meta step on a clean batch (MW-Net's loop, any net).

    Per step: the training losses ℓ; the seeds s of the virtual step from the net's weights
    w = scale(f(ℓ, context; φ)); c from the meta step; one step of the net's optimizer (Adam)
    on Σᵢ cᵢ·∂sᵢ/∂φ; then the real step uses weights from the *updated* net.

    Args:
        net: the weighting net; ``net_output`` says what it is fed.
        lr, weight_decay: its Adam optimizer's.
        normalize: ``"none"`` (w = v/B, the mean weighted loss) or ``"sum"`` (w = v/Σv).
        detach_loss: feed ℓ.detach() to the net (True), or let the virtual step also
            differentiate through the net's input.
        meta_every: the meta step runs on every k-th batch (the Trainer's step count, so a
            resumed run keeps the rhythm); the batches between are weighted by the current net
            at a plain step's cost (one forward and backward, no meta step).
        replay_optimizer, meta_grad, engine, engine_policy, meta_params, meta_chunks: the meta
            step's (``reweight.metastep.MetaStep``: ``meta_chunks`` is its ``chunks``,
            ``meta_params`` its ``params``).
    """

    name: ClassVar[str] = "weighting_net"
    needs_meta: ClassVar[bool] = True

    def __init__(
        self,
        net: nn.Module,
        *,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        normalize: str = "none",
        detach_loss: bool = True,
        replay_optimizer: bool = False,
        meta_grad: str = "fast",
        meta_every: int = 1,
        meta_chunks: int | str = "auto",
        meta_params: str | Sequence[str] = "all",
        engine: str = "auto",
        engine_policy: str = "auto",
    ) -> None:
        if isinstance(meta_every, bool) or not isinstance(meta_every, int) or meta_every < 1:
            raise ValueError(f"method.meta_every must be an integer >= 1, got {meta_every!r}")
        if normalize not in ("none", "sum"):
            raise ValueError(f"method.normalize must be one of ['none', 'sum'], got {normalize!r}")
        if lr <= 0:
            raise ValueError(f"method.lr must be > 0, got {lr}")
        self.metastep = MetaStep(
            meta_grad=meta_grad,
            engine=engine,
            engine_policy=engine_policy,
            params=meta_params,
            replay_optimizer=replay_optimizer,
            chunks=meta_chunks,
            label=self.name,
            twins=self.twins,
        )
        self.lr, self.weight_decay, self.meta_every = lr, weight_decay, meta_every
        self.normalize, self.detach_loss = normalize, detach_loss
        self.vnet = net
        self.optimizer = torch.optim.Adam(self.vnet.parameters(), lr=lr, weight_decay=weight_decay)

    def net_output(self, losses: Tensor, batch: StepInputs) -> Tensor:
        """v (B,), the net's unscaled weights for the batch's losses (B,); override to feed the
        net more than the loss (``batch.targets``, this rank's slice of a data-parallel batch)."""
        return self.vnet(losses.reshape(-1, 1)).reshape(-1)

    def weights(self, losses: Tensor, batch: StepInputs, differentiable: bool = False) -> Tensor:
        """The weights w (B,) for ``losses``: ``net_output`` scaled (``scale_weights``) over the
        global batch; ``differentiable``: Σv summed over ranks with graph (the meta step)."""
        reduce = None
        if batch.dist is not None:
            reduce = lambda t: batch.global_sum(t, differentiable=differentiable)  # noqa: E731
        return scale_weights(
            self.net_output(losses, batch), self.normalize, n_global=batch.n_global, reduce=reduce
        )

    def setup(self, *, model: nn.Module, device: torch.device, **_: Any) -> None:
        dtype = next(model.parameters()).dtype
        self.vnet.to(device=device, dtype=dtype)
        self.metastep.setup(model, device)

    def meta_grads(self, batch: StepInputs) -> tuple[list[Tensor], Tensor, float]:
        """(∂L_meta(θ′)/∂φ per net parameter, losses (B,) with the real update's graph,
        L_meta(θ′)); the net is not stepped. Data-parallel: summed over ranks."""
        out = self.metastep(
            batch,
            lambda values: seeds_of(
                lambda v: self.weights(v, batch, differentiable=True),
                values,
                detach_loss=self.detach_loss,
            ),
        )
        assert out.seeds is not None and out.losses is not None
        phi = list(self.vnet.parameters())
        grads = torch.autograd.grad(
            out.seeds, phi, grad_outputs=out.c.to(out.seeds.dtype), allow_unused=True
        )
        grads_phi = zeros_for_none(grads, phi)
        if batch.dist is not None:
            grads_phi = batch.global_sum_all(grads_phi)
        return grads_phi, out.losses, float(out.meta_loss)

    def step(self, batch: StepInputs) -> MethodOutput:
        if batch.step % self.meta_every:  # between meta steps: the current net, a plain step
            losses = batch.loss_fn(batch.model(batch.inputs), batch.targets, reduction="none")
            with torch.no_grad():
                weights = self.weights(losses.detach(), batch)
            zero_sum = not bool(batch.global_sum(weights.sum()) > 0)
            return MethodOutput(weights=weights, losses=losses, zero_sum=zero_sum)
        grads, losses, meta_loss = self.meta_grads(batch)
        self.optimizer.zero_grad(set_to_none=True)
        for p, g in zip(self.vnet.parameters(), grads, strict=True):
            p.grad = g.detach()
        self.optimizer.step()
        with torch.no_grad():
            weights = self.weights(losses.detach(), batch)
        return MethodOutput(
            weights=weights,
            losses=losses,
            meta_loss=meta_loss,
            zero_sum=not bool(batch.global_sum(weights.sum()) > 0),
        )

    @torch.no_grad()
    def weigh(self, batch: StepInputs) -> Tensor:
        twin = self.bound_twin(batch.model)  # its BatchNorm never writes running statistics
        losses = batch.loss_fn(twin(batch.inputs), batch.targets, reduction="none")
        return self.weights(losses, batch)

    def describe(self) -> dict[str, Any]:
        return {"meta_engine": self.metastep.describe()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "vnet": self.vnet.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "meta_step": self.metastep.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        first = next(iter(state["vnet"].values()), None)
        if first is not None:  # the saved precision, even before setup casts to the model's
            self.vnet.to(dtype=first.dtype)
        self.vnet.load_state_dict(state["vnet"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.metastep.load_state_dict(state.get("meta_step"))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(normalize={self.normalize!r}, "
            f"detach_loss={self.detach_loss}, {self.metastep!r})"
        )
