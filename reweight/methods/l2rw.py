"""Learning to Reweight Examples (Ren et al., ICML 2018)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from reweight.functional import (
    check_meta_grad,
    l2rw_eps_grad,
    l2rw_eps_grad_fast,
    l2rw_eps_grad_from_losses,
    normalize_l2rw,
)
from reweight.jvp import Planner
from reweight.meta.kernels import differentiable_kernels
from reweight.methods.base import Method, MethodOutput, StepInputs, replayed_optimizer

__all__ = ["L2RW"]


class L2RW(Method):
    """Weights from the meta-gradient of a clean batch's loss after a virtual step.

    Per step: ε = 0; θ′ = θ − lr·∇θ Σ εᵢℓᵢ(θ) through the model's twin (or, with
    ``replay_optimizer``, the real optimizer's step replayed); g = ∂L_meta(θ′)/∂ε;
    w = max(−g, 0)/Σ max(−g, 0). A batch whose clamped weights are all zero contributes no
    gradient (as in the reference code) and is counted in ``zero_sum_batches``.

    The training forward at θ runs on the real model (it is the real step's forward, so
    BatchNorm statistics move once per step, as in plain training); the virtual step and the
    meta forward run on the buffer-backed twin.

    Args:
        meta_grad: ``"fast"`` (the default: the exact identity g = −lr·⟨∇θℓᵢ, ∇θL_meta⟩, a
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
            it moves θ to θ′₀, where the optimizer's state alone takes it
            (``reweight.functional``). False (the default, as in the paper): a plain SGD step at
            the optimizer's current lr.
    """

    name: ClassVar[str] = "l2rw"
    needs_meta: ClassVar[bool] = True

    def __init__(
        self,
        meta_grad: str = "fast",
        engine: str = "auto",
        engine_policy: str = "auto",
        replay_optimizer: bool = False,
    ) -> None:
        self.meta_grad = check_meta_grad(meta_grad)
        self.replay_optimizer = replay_optimizer
        if meta_grad != "fast" and (engine, engine_policy) != ("auto", "auto"):
            raise ValueError(
                f"method.engine={engine} / method.engine_policy={engine_policy} choose how "
                "meta_grad=fast computes its JVPs; with meta_grad=unrolled leave them 'auto'"
            )
        self.planner = Planner("l2rw", engine, engine_policy, twins=self.twins)
        self.zero_sum_batches = 0

    def setup(self, *, model: nn.Module, device: torch.device, **_: Any) -> None:
        if self.meta_grad == "fast":
            self.planner.check(model, device)

    def step(self, batch: StepInputs) -> MethodOutput:
        assert batch.meta_inputs is not None and batch.meta_targets is not None
        if self.meta_grad == "fast":
            eps_grad, recording, meta_loss_t = l2rw_eps_grad_fast(
                batch.model,
                batch.inputs,
                batch.targets,
                batch.meta_inputs,
                batch.meta_targets,
                batch.lr,
                batch.loss_fn,
                planner=self.planner,
                update=True,
                optimizer=replayed_optimizer(self.replay_optimizer, batch),
            )
            losses = recording.update_losses()
        else:
            twin = self.bound_twin(batch.model)
            # the training forward is differentiated twice, through the virtual step
            with differentiable_kernels(batch.model):
                losses = batch.loss_fn(batch.model(batch.inputs), batch.targets, reduction="none")
                eps_grad, meta_loss_t = l2rw_eps_grad_from_losses(
                    twin,
                    losses,
                    batch.meta_inputs,
                    batch.meta_targets,
                    batch.lr,
                    batch.loss_fn,
                    optimizer=replayed_optimizer(self.replay_optimizer, batch),
                )
            twin.bind(batch.model)  # drop θ′ and its graph
        weights = normalize_l2rw(eps_grad, reduce=batch.global_sum if batch.dist else None)
        zero_sum = not bool(batch.global_sum(weights.sum()) > 0)
        self.zero_sum_batches += int(zero_sum)
        return MethodOutput(
            weights=weights,
            losses=losses,
            meta_loss=float(meta_loss_t),
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
            planner=self.planner,
            optimizer=replayed_optimizer(self.replay_optimizer, batch),
        )
        return normalize_l2rw(g)

    def describe(self) -> dict[str, Any]:
        if self.meta_grad == "unrolled":
            engine = {"engine": "unrolled", "reason": "meta_grad=unrolled: double backward"}
        else:
            engine = self.planner.describe()
        return {"meta_engine": engine}

    def state_dict(self) -> dict[str, Any]:
        return {"zero_sum_batches": self.zero_sum_batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.zero_sum_batches = int(state["zero_sum_batches"])

    def __repr__(self) -> str:
        return (
            f"L2RW(meta_grad={self.meta_grad!r}, engine={self.planner.engine!r}, "
            f"engine_policy={self.planner.policy!r}, replay_optimizer={self.replay_optimizer})"
        )
