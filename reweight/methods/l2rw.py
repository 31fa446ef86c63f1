"""Learning to Reweight Examples (Ren et al., ICML 2018)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from reweight.functional import normalize_l2rw
from reweight.metastep import MetaStep
from reweight.methods.base import Method, MethodOutput, StepInputs

__all__ = ["L2RW"]


class L2RW(Method):
    """Weights from the meta-gradient of a clean batch's loss after a virtual step.

    Per step: c = ∂L_meta(θ′(ε))/∂ε at ε = 0 (``reweight.metastep.MetaStep``), with θ′ a
    plain SGD step at the optimizer's lr (or, with ``replay_optimizer``, the real optimizer's
    step replayed); w = max(−c, 0)/Σ max(−c, 0). A batch whose clamped weights are all zero
    contributes no gradient (as in the reference code) and is counted in ``zero_sum_batches``.

    The training forward at θ runs on the real model (it is the real step's forward, so
    BatchNorm statistics move once per step, as in plain training); the virtual step and the
    meta forward run on the buffer-backed twin.

    Args:
        meta_grad: ``"fast"`` (the default: the exact identity c = −lr·⟨∇θℓᵢ, ∇θL_meta⟩, a
            forward-mode JVP, no double backward) or ``"unrolled"`` (the reference: a double
            backward through the virtual step). They agree to rounding.
        engine: with ``"fast"``, the forward-mode engine: ``"auto"`` (the planner's choice,
            ``reweight.jvp.planner``), or forced: ``"tape"``, ``"dual"``, ``"dual_twin"``,
            ``"per_layer"`` (an engine that cannot run the model is an error).
        engine_policy: the device policy of ``"auto"``: ``"auto"`` (the batch's device),
            ``"cpu"`` or ``"cuda"`` (e.g. to run on a CPU what would run on a GPU: the tape or
            dual numbers through the twin, whichever its first steps time faster).
        replay_optimizer: the virtual step replays the real optimizer's next step from its
            state (``reweight.meta.OptimizerReplay``: SGD with momentum, dampening, nesterov and
            weight decay; Adam; AdamW; every parameter group at its own lr), so that at ε = 0
            it moves θ to θ′₀, where the optimizer's state alone takes it. False (the default,
            as in the paper): a plain SGD step at the optimizer's current lr.
        meta_params: the parameters the virtual step moves: ``"all"`` (the default, as in the
            paper), ``"head"`` (the last layer with parameters) or module-name patterns
            (``reweight.metastep.select_params``); the real update trains every parameter.
    """

    name: ClassVar[str] = "l2rw"
    needs_meta: ClassVar[bool] = True

    def __init__(
        self,
        meta_grad: str = "fast",
        engine: str = "auto",
        engine_policy: str = "auto",
        replay_optimizer: bool = False,
        meta_params: str | Sequence[str] = "all",
    ) -> None:
        self.metastep = MetaStep(
            meta_grad=meta_grad,
            engine=engine,
            engine_policy=engine_policy,
            params=meta_params,
            replay_optimizer=replay_optimizer,
            at_zero=True,
            label=self.name,
            twins=self.twins,
        )
        self.zero_sum_batches = 0

    def setup(self, *, model: nn.Module, device: torch.device, **_: Any) -> None:
        self.metastep.setup(model, device)

    def step(self, batch: StepInputs) -> MethodOutput:
        out = self.metastep(batch)
        weights = normalize_l2rw(out.c, reduce=batch.global_sum if batch.dist else None)
        zero_sum = not bool(batch.global_sum(weights.sum()) > 0)
        self.zero_sum_batches += int(zero_sum)
        return MethodOutput(
            weights=weights,
            losses=out.losses,
            meta_loss=float(out.meta_loss),
            zero_sum=zero_sum,
        )

    def weigh(self, batch: StepInputs) -> Tensor:
        return normalize_l2rw(self.metastep(batch, update=False).c)

    def describe(self) -> dict[str, Any]:
        return {"meta_engine": self.metastep.describe()}

    def state_dict(self) -> dict[str, Any]:
        return {"zero_sum_batches": self.zero_sum_batches, "meta_step": self.metastep.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.zero_sum_batches = int(state["zero_sum_batches"])
        self.metastep.load_state_dict(state.get("meta_step"))

    def __repr__(self) -> str:
        return f"L2RW({self.metastep!r})"
