"""The one meta step that every meta-reweighting method uses.

For a training batch with per-example losses ℓᵢ(θ), per-example weights w (the method's, with
their values at this step), a virtual step over a chosen set of parameters

    θ′(w) = θ − lr·d(Σᵢ wᵢ∇θℓᵢ(θ))      (plain SGD: d(g) = g; or the real optimizer replayed)

and the meta loss L(θ′) of a trusted batch, every method needs the same per-example quantity

    cᵢ = ∂L(θ′(w)) / ∂wᵢ          (plain SGD: −lr·⟨∇θℓᵢ(θ), ∇θL(θ′)⟩ over the moved parameters)

- **L2RW** takes c at w = 0 and turns it into weights: w = max(−c, 0) / Σ max(−c, 0).
- **MW-Net**, and any method whose weights come from a net f(ℓ, context; φ), follows
  ∂L/∂φ = Σᵢ cᵢ·∂sᵢ/∂φ, a vector-Jacobian product through the net, where s = ∂(Σᵢ wᵢℓᵢ)/∂ℓ
  are the *seeds* of the virtual step (s = w when the net sees ℓ detached): θ′ depends on φ only
  through s, so the chain rule splits there exactly, whatever the virtual step.

``MetaStep`` computes c by one of two routes that agree to rounding:

- ``meta_grad="fast"`` (the default): exact first-order identities, a forward-mode JVP of the
  training loss vector in the direction of the meta gradient at θ′ (``reweight.jvp``: the engine
  a ``Planner`` chooses per model and device), no second-order graph;
- ``meta_grad="unrolled"`` (the reference): a double backward through the virtual step, taken
  with respect to a leaf σ = s.

The parameters the virtual step moves are an argument (``params``: every trainable parameter,
the classifier head, or module-name patterns); the real update still trains every parameter.
A method is then a weight function and a use of c: ``reweight.methods``.

Example:
    >>> import torch, torch.nn as nn, torch.nn.functional as F
    >>> from reweight.metastep import MetaStep, StepInputs
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    >>> x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    >>> batch = StepInputs(model, x, y, x[:3], y[:3], 0.1, F.cross_entropy)
    >>> fast = MetaStep(at_zero=True)(batch, update=False).c
    >>> slow = MetaStep(at_zero=True, meta_grad="unrolled")(batch, update=False).c
    >>> bool(torch.allclose(fast, slow, rtol=0, atol=1e-12)), fast.shape
    (True, torch.Size([6]))
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from reweight.core import inputs as batch_inputs
from reweight.jvp import Planner
from reweight.jvp.base import zeros_for_none
from reweight.meta import (
    LossFn,
    OptimizerReplay,
    TwinCache,
    meta_gradient,
    sgd_step,
    sgd_values,
    trainable,
)
from reweight.meta.kernels import differentiable_kernels

if TYPE_CHECKING:  # a type only: the loop builds it
    from reweight.core.distributed import DistContext

__all__ = [
    "META_GRAD_MODES",
    "MetaGrad",
    "MetaStep",
    "SeedFn",
    "StepInputs",
    "check_meta_grad",
    "select_params",
    "virtual_step",
]

META_GRAD_MODES = ("fast", "unrolled")

# losses (B,), detached -> seeds s (B,) with graph to the method's own parameters
SeedFn = Callable[[Tensor], Tensor]


def check_meta_grad(meta_grad: str) -> str:
    if meta_grad not in META_GRAD_MODES:
        raise ValueError(f"meta_grad must be one of {list(META_GRAD_MODES)}, got {meta_grad!r}")
    return meta_grad


def select_params(model: nn.Module, params: str | Sequence[str] = "all") -> list[str]:
    """Names of the trainable parameters a virtual step moves, in ``named_parameters`` order.

    ``"all"``: every trainable parameter; ``"head"``: those of the last module that holds
    trainable parameters of its own (the classifier of a torchvision or HuggingFace model, the
    last layer of a ``Sequential``); a list of patterns (``fnmatch``): every parameter whose
    name, or whose module's name, matches one (``["fc*"]``, ``["layer3.*", "linear"]``).

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> select_params(net, "head"), select_params(net, ["0.weight"])
        (['2.weight', '2.bias'], ['0.weight'])
    """
    names, _ = trainable(model)
    if params == "all":
        return names
    if params == "head":
        owners = [
            prefix
            for prefix, m in model.named_modules()
            if any(p is not None and p.requires_grad for p in m._parameters.values())
        ]
        if not owners:
            raise ValueError(
                f"method.meta_params=head: {type(model).__name__} has no trainable layer"
            )
        head = owners[-1]
        return [n for n in names if n.rpartition(".")[0] == head]
    if isinstance(params, str):
        raise ValueError(
            f"method.meta_params must be 'all', 'head' or a list of module-name patterns, "
            f"got {params!r}"
        )
    patterns = list(params)
    chosen = [
        n
        for n in names
        if any(
            fnmatch.fnmatchcase(n, p) or fnmatch.fnmatchcase(n.rpartition(".")[0], p)
            for p in patterns
        )
    ]
    if not chosen:
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        raise ValueError(
            f"method.meta_params={patterns} matches no trainable parameter of "
            f"{type(model).__name__} (its parameters: {shown})"
        )
    return chosen


def virtual_step(
    params: Mapping[str, Tensor],
    loss: Tensor,
    lr: float | None,
    optimizer: torch.optim.Optimizer | None,
    *,
    reduce_grads: Callable[[list[Tensor]], list[Tensor]] | None = None,
) -> dict[str, Tensor]:
    """θ′ by name, differentiable through the gradient of ``loss``: a plain SGD step at ``lr``,
    or the real ``optimizer``'s next step replayed (``OptimizerReplay``; ``lr`` not read)."""
    if optimizer is None:
        return sgd_step(params, loss, _check_lr(lr), reduce_grads=reduce_grads)
    return OptimizerReplay(optimizer, params.items()).step(params, loss, reduce_grads=reduce_grads)


def _batch_norms(model: nn.Module, training: bool = False) -> list[str]:
    """The names of the model's BatchNorm layers (``training``: those in training mode): they
    couple the examples of a batch, so a batch taken in slices would change what they compute."""
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not training)
    ]


def _check_lr(lr: float | None) -> float:
    if lr is None:
        raise ValueError("lr is needed for a plain SGD virtual step (no optimizer to replay)")
    return lr


@dataclass
class StepInputs:
    """What a method sees of one training step."""

    model: nn.Module
    inputs: Tensor
    targets: Tensor  # (B,)
    meta_inputs: Tensor | None
    meta_targets: Tensor | None
    lr: float  # the real optimizer's current learning rate
    loss_fn: LossFn
    optimizer: torch.optim.Optimizer | None = None
    step: int = 0
    # Data-parallel training: this rank holds ``inputs`` = global batch[offset : offset + B_local]
    dist: DistContext | None = None
    global_batch_size: int | None = None  # None: the batch is the whole global batch
    offset: int = 0

    @property
    def n_global(self) -> int:
        return self.global_batch_size or len(self.targets)

    def global_sum(self, tensor: Tensor, differentiable: bool = False) -> Tensor:
        """Σ over ranks (the tensor itself in one process)."""
        if self.dist is None:
            return tensor
        return self.dist.all_reduce_sum(tensor, differentiable)

    def global_sum_all(self, tensors: list[Tensor]) -> list[Tensor]:
        """Σ over ranks of each tensor (values only), in one all-reduce of a flat buffer."""
        if self.dist is None or not tensors:
            return tensors
        flat = self.dist.all_reduce_sum(torch.cat([t.reshape(-1) for t in tensors]))
        return [
            part.view_as(t)
            for part, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)
        ]


@dataclass
class MetaGrad:
    """What one meta step gives a method."""

    c: Tensor  # (B,) ∂L_meta(θ′)/∂sᵢ at the batch's seeds, detached
    seeds: Tensor | None  # (B,) s with graph to the method's parameters; None at w = 0
    losses: Tensor | None  # (B,) the real update's losses (graph to every trainable weight)
    meta_loss: Tensor  # L_meta(θ′), detached (θ′₀ at w = 0 by the fast route)


class MetaStep:
    """cᵢ = ∂L_meta(θ′(w))/∂wᵢ for a training batch (module docstring), by any engine.

    Args:
        meta_grad: ``"fast"`` (exact first-order identities, forward-mode JVPs) or
            ``"unrolled"`` (a double backward through the virtual step).
        engine, engine_policy: with ``"fast"``, the forward-mode engine (``"auto"``: the
            planner's choice; or forced: ``tape``, ``dual``, ``dual_twin``, ``per_layer``) and
            the planner's device policy (``reweight.jvp.planner``).
        params: the parameters the virtual step moves (``select_params``): ``"all"`` (the
            default), ``"head"``, or module-name patterns. An approximation of the full step
            when not ``"all"``; the meta-gradient is exact for the step it describes.
        replay_optimizer: the virtual step replays the real optimizer's next step from its
            state (``StepInputs.optimizer``) instead of a plain SGD step at ``StepInputs.lr``.
        chunks: with ``"fast"``, take the training forward and the meta gradient at θ′ in
            this many slices of the batch (less memory; only for models whose examples do not
            interact). ``"auto"``: under the planner's cuda policy (least memory) 2 when the
            per-layer path records the batch, else 1; under the cpu policy (least time) 1.
        at_zero: the method takes c at w = 0 (L2RW): its seeds are zero, the virtual step's
            direction is known before the training forward (so the ``dual`` engine can run),
            and ``__call__`` takes no seed function.
        label: the method's name, for log lines.
        twins: the method's twin cache.
    """

    def __init__(
        self,
        *,
        meta_grad: str = "fast",
        engine: str = "auto",
        engine_policy: str = "auto",
        params: str | Sequence[str] = "all",
        replay_optimizer: bool = False,
        chunks: int | str = 1,
        at_zero: bool = False,
        label: str = "meta step",
        twins: TwinCache | None = None,
    ) -> None:
        self.meta_grad = check_meta_grad(meta_grad)
        if meta_grad != "fast" and (engine, engine_policy) != ("auto", "auto"):
            raise ValueError(
                f"method.engine={engine} / method.engine_policy={engine_policy} choose how "
                "meta_grad=fast computes its JVPs; with meta_grad=unrolled leave them 'auto'"
            )
        if chunks != "auto" and (
            isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1
        ):
            raise ValueError(
                f"method.meta_chunks must be 'auto' or an integer >= 1, got {chunks!r}"
            )
        if chunks != "auto" and chunks > 1 and meta_grad != "fast":
            raise ValueError(
                f"method.meta_chunks={chunks} needs meta_grad=fast (the unrolled meta "
                "gradient differentiates through the whole virtual step); use meta_chunks=1"
            )
        if isinstance(params, str) and params not in ("all", "head"):
            select_params(nn.Identity(), params)  # raises, naming what is allowed
        self.params = params if isinstance(params, str) else [str(p) for p in params]
        self.replay_optimizer, self.chunks, self.at_zero = replay_optimizer, chunks, at_zero
        self.twins = twins if twins is not None else TwinCache()
        self.planner = Planner(
            engine, engine_policy, direction_first=at_zero, label=label, twins=self.twins
        )

    def setup(self, model: nn.Module, device: torch.device) -> None:
        """Refuse, before the first step, what this model rules out (a forced engine, a
        parameter pattern that matches nothing, slices of a batch that BatchNorm couples)."""
        _, moved = self._moved(model)  # a pattern that matches nothing is refused here
        if self.meta_grad == "fast":
            self.planner.check(model, device, moved)
        if self.chunks != "auto" and self.chunks > 1:
            coupled = _batch_norms(model)
            if coupled:
                raise ValueError(
                    f"method.meta_chunks={self.chunks} would change the meta gradient of "
                    f"this model: its BatchNorm layers ({', '.join(coupled[:3])}) couple the "
                    "examples of a batch through the batch statistics; use meta_chunks=1"
                )

    def __call__(
        self, batch: StepInputs, seeds: SeedFn | None = None, *, update: bool = True
    ) -> MetaGrad:
        """c for ``batch``. ``seeds`` maps the batch's losses (detached) to s (B,) with graph
        to the method's parameters; None (only with ``at_zero``) for w = 0.

        With ``update`` the training forward is the real model's (the step's one train-mode
        forward: BatchNorm statistics move once) and ``losses`` carry the real update's graph;
        without, it runs through the twin and the model is left unchanged (``losses`` None).
        """
        assert batch.meta_inputs is not None and batch.meta_targets is not None
        if (seeds is None) != self.at_zero:
            raise ValueError("MetaStep: give a seed function unless at_zero (then none)")
        if self.meta_grad == "fast":
            if seeds is None:
                return self._fast_at_zero(batch, update)
            return self._fast(batch, seeds)
        return self._unrolled(batch, seeds, update)

    # -- the moved parameters -----------------------------------------------------------------

    def _moved(self, model: nn.Module) -> tuple[list[str], list[Tensor]]:
        """Names and tensors of the weights the virtual step moves, in the model's order."""
        names, weights = trainable(model)
        if self.params == "all":
            return names, weights
        chosen = set(select_params(model, self.params))
        pairs = [(n, w) for n, w in zip(names, weights, strict=True) if n in chosen]
        return [n for n, _ in pairs], [w for _, w in pairs]

    def _optimizer(self, batch: StepInputs) -> torch.optim.Optimizer | None:
        """The optimizer the virtual step replays, or None (plain SGD at ``batch.lr``)."""
        if not self.replay_optimizer:
            return None
        if batch.optimizer is None:
            raise ValueError(
                "method.replay_optimizer=true needs the real optimizer (StepInputs.optimizer), "
                "got None"
            )
        return batch.optimizer

    # -- the fast route -----------------------------------------------------------------------

    def _fast_at_zero(self, batch: StepInputs, update: bool) -> MetaGrad:
        """c at w = 0 by the exact identity.

        1. v = ∇θL_meta(θ′₀): a forward and backward of the meta batch through the twin, done
           first so that its activations are freed before the training forward's are made.
           θ′₀ = θ for plain SGD; replaying an optimizer, θ′₀ and D = ∂d/∂g are its step at a
           zero gradient (they do not depend on the batch).
        2. The training forward, recorded by the planner's engine (the direction is known, so
           the dual-number engines take it in that forward).
        3. c = −lr·⟨∇θℓᵢ, D ⊙ v⟩ for every i, each weight at its parameter group's lr.
        """
        model = batch.model
        names, weights = self._moved(model)
        start = replay = None
        optimizer = self._optimizer(batch)
        if optimizer is not None:
            replay = OptimizerReplay(optimizer, zip(names, weights, strict=True))
            start, scales = replay.values(weights, [None] * len(weights))
        v, meta_loss = meta_gradient(
            self.twins.bound(model), weights, start, batch.meta_inputs, batch.meta_targets,
            batch.loss_fn,
        )  # fmt: skip
        del start
        if replay is None:
            direction, step = v, _check_lr(batch.lr)
        else:  # lr·D ⊙ v′, each weight at its group's lr
            direction = [k * d * s for k, d, s in zip(replay.lrs, v, scales, strict=True)]
            step = 1.0
            del v, scales
        recording = self.planner.record(
            model, batch.inputs, batch.targets, batch.loss_fn, direction=direction,
            update=update, weights=weights,
        )  # fmt: skip
        c = -step * recording.jvp(direction)
        return MetaGrad(c, None, recording.update_losses() if update else None, meta_loss)

    def _fast(self, batch: StepInputs, seeds_of: SeedFn) -> MetaGrad:
        """c at the method's seeds s by the exact identity.

        1. ℓ: the real step's forward, recorded by the planner's engine (per layer in
           ``chunks`` slices, on a tangent tape, or for dual numbers through the twin).
        2. s = seeds_of(ℓ), with graph to the method's parameters.
        3. θ′ = θ − lr·d(g), g = Σⱼ sⱼ∇θℓⱼ over the moved weights, summed over ranks: plain
           SGD (d = g), or the real optimizer replayed (values, and D = ∂d/∂g elementwise).
        4. v′ = ∇θL_meta(θ′): the meta batch through the twin at θ′ (the same on every rank).
        5. cⱼ = −⟨∇θℓⱼ(θ), lr·D ⊙ v′⟩ for this rank's examples.
        """
        model = batch.model
        names, weights = self._moved(model)
        chunks = self.chunks
        if chunks == "auto" and (
            self.planner.policy_for(batch_inputs.device(batch.inputs)) != "cuda"
            or _batch_norms(model, training=True)  # slices would change the batch statistics
        ):  # the cpu policy's least time is one piece (the cuda policy's least memory: two)
            chunks = 1
        recording = self.planner.record(
            model, batch.inputs, batch.targets, batch.loss_fn,
            chunks=2 if chunks == "auto" else chunks, weights=weights,
        )  # fmt: skip
        if chunks == "auto":
            chunks = 2 if recording.engine == "per_layer" else 1
        seeds = seeds_of(recording.values)
        grads = recording.weighted_grads(seeds.detach())
        if batch.dist is not None:
            grads = batch.global_sum_all(zeros_for_none(grads, weights))
        optimizer = self._optimizer(batch)
        if optimizer is None:  # plain SGD: κ = 1 (0 for a weight without gradient)
            new, kappa = sgd_values(weights, grads, names, batch.lr)
            step = batch.lr
        else:  # the replayed optimizer: lr·D per weight, its lr folded into the direction
            replay = OptimizerReplay(optimizer, zip(names, weights, strict=True))
            new, scales = replay.values(weights, grads)
            kappa = [k * s for k, s in zip(replay.lrs, scales, strict=True)]
            step = 1.0
        del grads
        v, meta_loss = meta_gradient(
            self.twins.bound(model), weights, new, batch.meta_inputs, batch.meta_targets,
            batch.loss_fn, chunks,
        )  # fmt: skip
        del new
        # plain SGD's κ is 1.0 for each weight with a gradient: its d as it is (1·d, a copy)
        direction = [
            d if isinstance(k, float) and k == 1.0 else k * d for k, d in zip(kappa, v, strict=True)
        ]
        c = -step * recording.jvp(direction)
        return MetaGrad(c, seeds, recording.update_losses(), meta_loss)

    # -- the unrolled route -------------------------------------------------------------------

    def _unrolled(self, batch: StepInputs, seeds_of: SeedFn | None, update: bool) -> MetaGrad:
        """c by a double backward through the virtual step, with respect to a leaf σ at the
        seeds' values (zero at w = 0): θ′ = step(Σⱼ σⱼℓⱼ) through the twin, L_meta(θ′), ∂/∂σ.

        Data-parallel with seeds: θ′ takes the gradient summed over ranks (differentiably), and
        each rank's meta loss counts 1/world_size of the one they share. At w = 0 the step is
        taken on this rank's batch alone: at σ = 0 the other ranks' terms do not move c.
        """
        model = batch.model
        moved = set(self._moved(model)[0])
        twin = self.twins.bound(model)
        dist = batch.dist if seeds_of is not None else None
        with differentiable_kernels(model):  # the forward is differentiated twice
            losses = batch.loss_fn(
                (model if update else twin)(batch.inputs), batch.targets, reduction="none"
            )
            if seeds_of is None:
                seeds, sigma = None, torch.zeros_like(losses, requires_grad=True)
            else:
                seeds = seeds_of(losses.detach())
                sigma = seeds.detach().to(losses.dtype).requires_grad_()
            reduce_grads = None
            if dist is not None:
                reduce_grads = lambda gs: [batch.global_sum(g, differentiable=True) for g in gs]  # noqa: E731
            params = {n: t for n, t in twin.named_params() if n in moved}
            new = virtual_step(
                params, (sigma * losses).sum(), batch.lr, self._optimizer(batch),
                reduce_grads=reduce_grads,
            )  # fmt: skip
            twin.set_params(new)
            meta_loss = batch.loss_fn(twin(batch.meta_inputs), batch.meta_targets)
            scale = dist.world_size if dist is not None else 1
            (c,) = torch.autograd.grad(
                meta_loss / scale if scale > 1 else meta_loss, sigma, retain_graph=update
            )
        twin.bind(model)  # drop θ′ and its graph
        return MetaGrad(c.detach(), seeds, losses if update else None, meta_loss.detach())

    # -- state and reporting -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the JVPs computed per engine (a resumed run's summary
        counts every session's)."""
        return {"jvps": dict(self.planner.jvps)}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state:  # a checkpoint from before the meta step kept its counts has none
            self.planner.jvps = {str(k): int(v) for k, v in state.get("jvps", {}).items()}

    def describe(self) -> dict[str, Any]:
        """The meta-gradient engine and why, the JVPs per engine, the moved parameters."""
        if self.meta_grad == "unrolled":
            out = {"engine": "unrolled", "reason": "meta_grad=unrolled: double backward"}
        else:
            out = self.planner.describe()
        if self.params != "all":
            out["params"] = self.params
        return out

    def __repr__(self) -> str:
        return (
            f"MetaStep(meta_grad={self.meta_grad!r}, engine={self.planner.engine!r}, "
            f"engine_policy={self.planner.policy!r}, params={self.params!r}, "
            f"replay_optimizer={self.replay_optimizer}, chunks={self.chunks!r}, "
            f"at_zero={self.at_zero})"
        )
