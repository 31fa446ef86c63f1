"""Meta-Weight-Net (Shu et al., NeurIPS 2019)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from reweight.functional import check_meta_grad, mwnet_meta_grads, mwnet_seeds, mwnet_weights
from reweight.jvp import Planner
from reweight.jvp.base import zeros_for_none
from reweight.meta import OptimizerReplay, meta_gradient, sgd_values, trainable
from reweight.meta.kernels import differentiable_kernels
from reweight.methods.base import Method, MethodOutput, StepInputs, replayed_optimizer

__all__ = ["MWNet", "WeightNet"]


class WeightNet(nn.Module):
    """The weighting function v(ℓ; φ): an MLP 1 → hidden → 1 with ReLU and a sigmoid output."""

    def __init__(self, hidden: int = 100) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, loss: Tensor) -> Tensor:  # (B, 1) -> (B, 1)
        return torch.sigmoid(self.net(loss))


class MWNet(Method):
    """Learn a weighting net on the per-example loss by a meta step on a clean batch.

    Per step (as in the reference code): losses ℓ(θ) on the training batch; a virtual step
    θ′ = θ − lr·∇θ Σ wᵢ(φ)ℓᵢ at the real optimizer's current learning rate (or the real
    optimizer's step replayed, ``replay_optimizer``); the meta loss at θ′; one Adam step on φ;
    then the real step uses weights from the *updated* net.

    Switches (defaults as in the reference code):
        normalize: ``"none"`` (w = v/B, the mean weighted loss) or ``"sum"`` (w = v/Σv).
        detach_loss: feed ℓ.detach() to the net (True), or let the virtual step also
            differentiate through the net's input.
        replay_optimizer: the virtual step replays the real optimizer's next step from its
            state (``reweight.meta.OptimizerReplay``: SGD with momentum, dampening, nesterov and
            weight decay; Adam; AdamW; every parameter group at its own lr and settings).
            False: a plain SGD step at the optimizer's current lr, as in the reference code.
        meta_grad: ``"fast"`` (the default: the exact identity ∂L_meta/∂φ = −lr·Σⱼ cⱼ·∂sⱼ/∂φ,
            ``reweight.functional``; a forward-mode JVP, no double backward) or ``"unrolled"``
            (the reference: a double backward through the virtual step). Both support every
            switch here and data-parallel training, and agree to rounding.
        meta_chunks: with ``meta_grad="fast"``, run the meta step's two batch passes, the
            training forward it records and the meta gradient at θ′, in this many slices of
            the batch. The result is the same (a mean loss is a weighted sum of the slices'
            means) while only one slice's activations are alive at a time: the step's peak
            memory falls to about a plain step's at k = 2 (LeNet: 0.96×, against 1.40× in
            one piece; ~5 % more time). Exact only for a model whose examples do not
            interact, so an integer k > 1 refuses models with BatchNorm layers. ``"auto"``
            (the default) takes 2 when the planner runs the per-layer path (the model was
            verified to treat the examples of a batch independently), else 1.
        engine, engine_policy: with ``meta_grad="fast"``, the forward-mode engine and the
            planner's device policy, as for ``L2RW`` (``dual`` is refused: MW-Net's JVP
            direction exists only after the training forward).
    """

    name: ClassVar[str] = "mwnet"
    needs_meta: ClassVar[bool] = True

    def __init__(
        self,
        hidden: int = 100,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        normalize: str = "none",
        detach_loss: bool = True,
        replay_optimizer: bool = False,
        meta_grad: str = "fast",
        meta_chunks: int | str = "auto",
        engine: str = "auto",
        engine_policy: str = "auto",
    ) -> None:
        if normalize not in ("none", "sum"):
            raise ValueError(f"method.normalize must be one of ['none', 'sum'], got {normalize!r}")
        if lr <= 0:
            raise ValueError(f"method.lr must be > 0, got {lr}")
        self.meta_grad = check_meta_grad(meta_grad)
        if meta_chunks != "auto" and (
            isinstance(meta_chunks, bool) or not isinstance(meta_chunks, int) or meta_chunks < 1
        ):
            raise ValueError(
                f"method.meta_chunks must be 'auto' or an integer >= 1, got {meta_chunks!r}"
            )
        if meta_chunks != "auto" and meta_chunks > 1 and self.meta_grad != "fast":
            raise ValueError(
                f"method.meta_chunks={meta_chunks} needs meta_grad=fast (the unrolled meta "
                "gradient differentiates through the whole virtual step); use meta_chunks=1"
            )
        if meta_grad != "fast" and (engine, engine_policy) != ("auto", "auto"):
            raise ValueError(
                f"method.engine={engine} / method.engine_policy={engine_policy} choose how "
                "meta_grad=fast computes its JVPs; with meta_grad=unrolled leave them 'auto'"
            )
        self.planner = Planner("mwnet", engine, engine_policy, twins=self.twins)
        self.meta_chunks = meta_chunks
        self.hidden, self.lr, self.weight_decay = hidden, lr, weight_decay
        self.normalize, self.detach_loss = normalize, detach_loss
        self.replay_optimizer = replay_optimizer
        self.vnet = WeightNet(hidden)
        self.optimizer = torch.optim.Adam(self.vnet.parameters(), lr=lr, weight_decay=weight_decay)

    def setup(self, *, model: nn.Module, device: torch.device, **_: Any) -> None:
        dtype = next(model.parameters()).dtype
        self.vnet.to(device=device, dtype=dtype)
        if self.meta_grad == "fast":
            self.planner.check(model, device)
        if self.meta_chunks != "auto" and self.meta_chunks > 1:
            coupled = [
                name
                for name, m in model.named_modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm)
            ]
            if coupled:
                raise ValueError(
                    f"method.meta_chunks={self.meta_chunks} would change the meta gradient of "
                    f"this model: its BatchNorm layers ({', '.join(coupled[:3])}) couple the "
                    "examples of a batch through the batch statistics; use meta_chunks=1"
                )

    def step(self, batch: StepInputs) -> MethodOutput:
        assert batch.meta_inputs is not None and batch.meta_targets is not None
        grads, losses, meta_loss = self.meta_grads(batch)
        self.optimizer.zero_grad(set_to_none=True)
        for p, g in zip(self.vnet.parameters(), grads, strict=True):
            p.grad = g.detach()
        self.optimizer.step()
        with torch.no_grad():
            weights = mwnet_weights(
                self.vnet,
                losses.detach(),
                self.normalize,
                n_global=batch.n_global,
                reduce=batch.global_sum if batch.dist else None,
            )
        return MethodOutput(
            weights=weights,
            losses=losses,
            meta_loss=float(meta_loss),
            zero_sum=not bool(batch.global_sum(weights.sum()) > 0),
        )

    def meta_grads(self, batch: StepInputs) -> tuple[list[Tensor], Tensor, float]:
        """(∂L_meta(θ′)/∂φ per net parameter, losses (B,) with the real update's graph,
        L_meta(θ′)) by this method's ``meta_grad`` mode; the net is not stepped. In
        data-parallel training the gradients are already summed over ranks."""
        if self.meta_grad == "fast":
            return self._fast_meta_grads(batch)
        return self._unrolled_meta_grads(batch)

    def _unrolled_meta_grads(self, batch: StepInputs) -> tuple[list[Tensor], Tensor, float]:
        """(∂L_meta(θ′)/∂φ, losses (B,), L_meta(θ′)) by a double backward through the twin."""
        assert batch.meta_inputs is not None and batch.meta_targets is not None
        twin = self.bound_twin(batch.model)
        with differentiable_kernels(batch.model):  # the forward is differentiated twice
            losses = batch.loss_fn(batch.model(batch.inputs), batch.targets, reduction="none")
            grads, meta_loss = mwnet_meta_grads(
                twin,
                losses,
                self.vnet,
                batch.meta_inputs,
                batch.meta_targets,
                batch.lr,
                batch.loss_fn,
                normalize=self.normalize,
                detach_loss=self.detach_loss,
                optimizer=replayed_optimizer(self.replay_optimizer, batch),
                n_global=batch.n_global,
                reduce=(lambda t: batch.global_sum(t, differentiable=True)) if batch.dist else None,
                world_size=batch.dist.world_size if batch.dist else 1,
            )
        twin.bind(batch.model)
        if batch.dist is not None:  # each rank holds its share of the hypergradient
            grads = [batch.global_sum(g) for g in grads]
        return grads, losses, float(meta_loss)

    def _fast_meta_grads(self, batch: StepInputs) -> tuple[list[Tensor], Tensor, float]:
        """(∂L_meta(θ′)/∂φ, losses (B,), L_meta(θ′)) by the exact identity.

        1. ℓ: the real step's forward, recorded by the planner's engine (per layer in
           ``meta_chunks`` slices, on a tangent tape, or for dual numbers through the twin).
        2. s = ∂(Σᵢ wᵢℓᵢ)/∂ℓ with graph to φ (s = w when the net sees ℓ detached).
        3. θ′ = θ − lr·d(g), g = Σⱼ sⱼ∇θℓⱼ summed over ranks: plain SGD (d = g), or the real
           optimizer replayed when ``replay_optimizer`` says so (values, and D = ∂d/∂g per
           weight, elementwise; each weight's lr its group's).
        4. v′ = ∇θL_meta(θ′): the meta batch through the twin at θ′ (the same on every rank).
        5. cⱼ = ⟨∇θℓⱼ(θ), lr·D ⊙ v′⟩ for this rank's examples; ∂L_meta/∂φ = −Σⱼ cⱼ·∂sⱼ/∂φ, a
           vector-Jacobian product through the weighting net, summed over ranks.
        """
        assert batch.meta_inputs is not None and batch.meta_targets is not None
        model, lr, loss_fn = batch.model, batch.lr, batch.loss_fn
        names, weights = trainable(model)
        # 1. the real step's forward; "auto" slices once the model is known to keep its
        #    examples apart (the per-layer path records it: after its check, on a first step)
        chunks = self.meta_chunks
        recording = self.planner.record(
            model, batch.inputs, batch.targets, loss_fn, chunks=2 if chunks == "auto" else chunks
        )
        if chunks == "auto":
            chunks = 2 if recording.engine == "per_layer" else 1
        # 2. the virtual step's seeds, with graph to φ
        reduce = (lambda t: batch.global_sum(t, differentiable=True)) if batch.dist else None
        seeds = mwnet_seeds(
            self.vnet,
            recording.values,
            self.normalize,
            detach_loss=self.detach_loss,
            n_global=batch.n_global,
            reduce=reduce,
        )  # (B,)
        # 3. the virtual step θ′ from the global weighted gradient
        grads = recording.weighted_grads(seeds.detach())
        if batch.dist is not None:
            grads = batch.global_sum_all(zeros_for_none(grads, weights))
        optimizer = replayed_optimizer(self.replay_optimizer, batch)
        if optimizer is None:  # plain SGD: κ = 1 (0 for a weight without gradient)
            new, kappa = sgd_values(weights, grads, names, lr)
            step_size = lr
        else:  # the replayed optimizer: lr·D per weight, its lr folded into the direction
            replay = OptimizerReplay(optimizer, model)
            new, scales = replay.values(weights, grads)
            kappa = [k * s for k, s in zip(replay.lrs, scales, strict=True)]
            step_size = 1.0
        del grads
        # 4. the meta gradient at θ′
        v, meta_loss = meta_gradient(
            self.bound_twin(model),
            weights,
            new,
            batch.meta_inputs,
            batch.meta_targets,
            loss_fn,
            chunks,
        )
        del new
        # 5. c = J(θ)·(κ v′), then the VJP into φ
        c = recording.jvp([k * d for k, d in zip(kappa, v, strict=True)])
        phi = list(self.vnet.parameters())
        phi_grads = torch.autograd.grad(
            seeds, phi, grad_outputs=(-step_size * c).to(seeds.dtype), allow_unused=True
        )
        grads_phi = zeros_for_none(phi_grads, phi)
        if batch.dist is not None:
            grads_phi = batch.global_sum_all(grads_phi)
        return grads_phi, recording.update_losses(), float(meta_loss)

    @torch.no_grad()
    def weigh(self, batch: StepInputs) -> Tensor:
        twin = self.bound_twin(batch.model)  # its BatchNorm never writes running statistics
        losses = batch.loss_fn(twin(batch.inputs), batch.targets, reduction="none")
        return mwnet_weights(self.vnet, losses, self.normalize)

    def describe(self) -> dict[str, Any]:
        if self.meta_grad == "unrolled":
            engine = {"engine": "unrolled", "reason": "meta_grad=unrolled: double backward"}
        else:
            engine = self.planner.describe()
        return {"meta_engine": engine}

    def state_dict(self) -> dict[str, Any]:
        return {"vnet": self.vnet.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.vnet.load_state_dict(state["vnet"])
        self.optimizer.load_state_dict(state["optimizer"])

    def __repr__(self) -> str:
        return (
            f"MWNet(normalize={self.normalize!r}, detach_loss={self.detach_loss}, "
            f"replay_optimizer={self.replay_optimizer}, meta_grad={self.meta_grad!r}, "
            f"meta_chunks={self.meta_chunks}, engine={self.planner.engine!r}, "
            f"engine_policy={self.planner.policy!r})"
        )
