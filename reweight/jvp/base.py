"""The interface every forward-mode engine implements: record a forward, then its JVPs.

An engine records one training batch's forward through a model whose trainable weights are θ
and returns a ``Recording``:

- ``values``: the per-example losses ℓ (B,), detached;
- ``jvp(u)``: ⟨∇θℓᵢ(θ), u⟩ for every example i (B,), u given per weight: the Jacobian-vector
  product of the loss vector, which the exact meta-gradient identities need;
- ``weighted_grads(s)``: ∇θ Σᵢ sᵢℓᵢ per weight (MW-Net's virtual step);
- ``update_losses()``: ℓ with the graph the real update backpropagates (the real model's
  forward at θ, the step's one train-mode forward: BatchNorm statistics move once).

What is recorded is a ``Forward``: a module, the weights, a batch and the loss. For a training
step the module is the real model; for the functional entry points, which leave the model
unchanged, it is the model's bound twin (its BatchNorm never writes running statistics) and
nothing is kept for an update.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from reweight.core import inputs as batch_inputs
from reweight.core.inputs import Inputs
from reweight.meta import LossFn, MetaModule

__all__ = [
    "ENGINES",
    "ENGINE_SPECS",
    "EngineSpec",
    "Forward",
    "Recording",
    "RngState",
    "Stale",
    "Unsupported",
    "load_forward_ad",
    "zeros_for_none",
]


@dataclass(frozen=True)
class EngineSpec:
    """What an engine can run: the planner and the chooser read these, not method names."""

    name: str  # what a method's ``engine`` argument (and the config key) calls it
    summary: str
    direction_first: bool = False  # needs the JVP's direction before the training forward
    recurrent: bool = True  # replays recurrent cells (their in-place gate ops)


ENGINE_SPECS = {
    spec.name: spec
    for spec in (
        EngineSpec("tape", "the tangent tape", recurrent=False),
        EngineSpec("dual", "dual numbers through the real model", direction_first=True),
        EngineSpec("dual_twin", "dual numbers through the twin"),
        # exact only for models whose examples do not interact: verified on a model's first step
        EngineSpec("per_layer", "per-layer inner products"),
    )
}
ENGINES = tuple(ENGINE_SPECS)


class Unsupported(Exception):
    """An engine cannot compute this forward's JVP; the reason is the message."""


class Stale(Unsupported):
    """A forward did not follow the tape program recorded for its model and signature (its ops
    or the tensors they read differ): this step's JVP is computed another way, and the next
    forward is recorded afresh. Not a reason to give up on the tape."""


@functools.cache
def load_forward_ad() -> None:
    """Trigger torch's one-time set-up of forward AD with its known deprecation warning muted.

    The first ``make_dual`` imports ``torch._decomp.decompositions_for_jvp``, which calls the
    deprecated ``torch.jit.script`` (a warning that is torch's business, not the user's).
    """
    with warnings.catch_warnings():
        # FutureWarning on torch 2.14, DeprecationWarning on 2.13
        warnings.filterwarnings("ignore", r"`torch.jit.script` is deprecated", Warning)
        with fwAD.dual_level():
            fwAD.make_dual(torch.zeros(()), torch.zeros(()))


class RngState:
    """The random-number state at the start of a recorded forward, to replay it.

    A second forward of the same batch (a dual-number JVP, a recomputed forward) run under
    ``replay()`` draws the same dropout masks as the first; the generator is restored after,
    so the run's random stream is as if the batch had gone through the model once.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def _set(self, cpu: Tensor, cuda: Tensor | None) -> None:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.device)

    def rewind(self) -> None:
        """Back to the recorded state (the next forward redraws the same numbers)."""
        self._set(self.cpu, self.cuda)

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run from the recorded state; afterwards the generator is where it was before."""
        saved = (
            torch.get_rng_state(),
            torch.cuda.get_rng_state(self.device) if self.cuda is not None else None,
        )
        self.rewind()
        try:
            yield
        finally:
            self._set(*saved)


@dataclass
class Forward:
    """One batch through one module with per-example losses: what an engine records."""

    module: nn.Module  # what runs: the real model, or its bound twin (model left unchanged)
    weights: list[Tensor]  # the model's trainable weights θ (the twin holds the same tensors)
    inputs: Inputs  # a tensor, or a mapping of tensors (``reweight.core.inputs``)
    targets: Tensor
    loss_fn: LossFn
    twin: Callable[[], MetaModule]  # the model's twin, bound to θ (for dual-number JVPs)
    update: bool = True  # the losses feed the real update (module is the real model)
    rng: RngState = field(init=False)

    def __post_init__(self) -> None:
        self.rng = RngState(batch_inputs.device(self.inputs))

    def run(self, module: nn.Module | None = None, rows: slice | None = None) -> Tensor:
        """Per-example losses (B,) of ``module`` (default: ``self.module``) on the batch."""
        x, y = self.inputs, self.targets
        if rows is not None:
            x, y = batch_inputs.take(x, rows), y[rows]
        return self.loss_fn((module or self.module)(x), y, reduction="none")


class Recording(ABC):
    """One recorded forward: its per-example losses and their derivatives (module docstring)."""

    engine: str  # the engine that computes ``jvp``: one of ENGINES
    values: Tensor  # (B,), detached

    @abstractmethod
    def jvp(self, direction: Sequence[Tensor | None]) -> Tensor:
        """⟨∇θℓᵢ(θ), u⟩ for every example i: (B,), detached; u given per weight (None: that
        weight does not move, and the engine skips what only it would reach)."""

    @abstractmethod
    def weighted_grads(self, seeds: Tensor) -> list[Tensor | None]:
        """∇θ Σᵢ sᵢℓᵢ per weight (None for a weight the losses do not reach)."""

    @abstractmethod
    def update_losses(self) -> Tensor:
        """The losses (B,) with the graph of the real update."""


def zeros_for_none(grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, like, strict=True)]
