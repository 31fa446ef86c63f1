"""Learning to Reweight Examples (Ren et al., ICML 2018)."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from reweight.functional import (
    check_meta_grad,
    l2rw_eps_grad,
    l2rw_eps_grad_from_losses,
    normalize_l2rw,
)
from reweight.methods.base import Method, MethodOutput, StepInputs

__all__ = ["L2RW"]


class L2RW(Method):
    """Weights from the meta-gradient of a clean batch's loss after a virtual step.

    Per step: ε = 0; θ′ = θ − lr·∇θ Σ εᵢℓᵢ(θ) through the model's twin; g = ∂L_meta(θ′)/∂ε;
    w = max(−g, 0)/Σ max(−g, 0). A batch whose clamped weights are all zero contributes no
    gradient (as in the reference code) and is counted in ``zero_sum_batches``.

    The training forward at θ runs on the real model (it is the real step's forward, so
    BatchNorm statistics move once per step, as in plain training); the virtual step and the
    meta forward run on the buffer-backed twin.
    """

    name: ClassVar[str] = "l2rw"
    needs_meta: ClassVar[bool] = True

    def __init__(self, meta_grad: str = "unrolled") -> None:
        self.meta_grad = check_meta_grad(meta_grad)
        self.zero_sum_batches = 0

    def step(self, batch: StepInputs) -> MethodOutput:
        assert batch.meta_inputs is not None and batch.meta_targets is not None
        if self.meta_grad == "fast":
            from reweight.fast import l2rw_fast_step

            eps_grad, losses, meta_loss = l2rw_fast_step(batch)
        else:
            twin = self.bound_twin(batch.model)
            losses = batch.loss_fn(batch.model(batch.inputs), batch.targets, reduction="none")
            eps_grad, meta_loss_t = l2rw_eps_grad_from_losses(
                twin, losses, batch.meta_inputs, batch.meta_targets, batch.lr, batch.loss_fn
            )
            twin.bind(batch.model)  # drop θ′ and its graph
            meta_loss = float(meta_loss_t)
        weights = normalize_l2rw(eps_grad, reduce=batch.global_sum if batch.dist else None)
        zero_sum = not bool(batch.global_sum(weights.sum()) > 0)
        self.zero_sum_batches += int(zero_sum)
        return MethodOutput(
            weights=weights,
            losses=losses,
            meta_loss=meta_loss,
            zero_sum=zero_sum,
        )

    def weigh(self, batch: StepInputs) -> Tensor:
        assert batch.meta_inputs is not None and batch.meta_targets is not None
        g = l2rw_eps_grad(
            batch.model,
            batch.inputs,
            batch.targets,
            batch.meta_inputs,
            batch.meta_targets,
            batch.lr,
            batch.loss_fn,
            meta_grad=self.meta_grad,
        )
        return normalize_l2rw(g)

    def state_dict(self) -> dict[str, Any]:
        return {"zero_sum_batches": self.zero_sum_batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.zero_sum_batches = int(state["zero_sum_batches"])

    def __repr__(self) -> str:
        return f"L2RW(meta_grad={self.meta_grad!r})"
