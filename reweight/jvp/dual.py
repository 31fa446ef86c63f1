"""Dual numbers: the JVP from one forward with weights θ + u·dθ (``torch.autograd.forward_ad``).

Two engines:

- ``dual``: through the module that runs, in the same forward that gives the losses. For a
  training step that is the real model with its reverse graph kept, so while the dual level
  lasts autograd also records the tangent computation: the most time-efficient off CPU but the
  most memory (measured on ResNet-32: 3.95× a plain step's peak, above the unrolled step's).
  It needs the direction before the forward (L2RW; not MW-Net, whose direction exists only
  after its virtual step).
- ``dual_twin``: through the model's twin without graph, a separate forward that keeps nothing:
  L2RW runs it before the real forward; MW-Net takes its virtual step's gradient from a forward
  of the twin whose graph the backward frees, runs the JVP later, and the real forward last, so
  no training graph is held across the meta pass (ResNet-32: 1.30× a plain step's peak).

Every extra forward of the batch replays the random state of the first (``RngState``), so
dropout draws the same masks in all of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from reweight.core import inputs as batch_inputs
from reweight.jvp.base import Forward, Recording, load_forward_ad
from reweight.meta import LossFn
from reweight.meta.kernels import differentiable_kernels
from reweight.meta.twins import substituted

__all__ = ["DualRecording", "DualTwinRecording", "dual_forward", "dual_twin_jvp"]


def dual_forward(
    module: nn.Module,
    weights: Sequence[Tensor],
    direction: Sequence[Tensor],
    inputs: Tensor,
    targets: Tensor,
    loss_fn: LossFn,
) -> tuple[Tensor, Tensor]:
    """Per-example losses (B,) of ``module`` and their JVP in ``direction``: one forward with
    dual-number weights. The primal losses keep whatever reverse graph grad mode lets the
    forward build (on the real model, the graph of the real update)."""
    load_forward_ad()
    with fwAD.dual_level(), differentiable_kernels(module):
        duals = [  # a weight without a direction (None) stays a plain tensor
            p if d is None else fwAD.make_dual(p, d.to(p.dtype))
            for p, d in zip(weights, direction, strict=True)
        ]
        with substituted(module, weights, duals):
            dual = loss_fn(module(inputs), targets, reduction="none")
        losses, jvp = fwAD.unpack_dual(dual)
    return losses, torch.zeros_like(losses) if jvp is None else jvp.detach()


def _same_direction(given: Sequence[Tensor], recorded: Sequence[Tensor]) -> None:
    if len(given) != len(recorded) or any(a is not b for a, b in zip(given, recorded, strict=True)):
        raise RuntimeError(
            "internal error: this recording computed its JVP in the direction given when it "
            "was recorded; jvp() was called with another"
        )


class DualRecording(Recording):
    """One dual-number forward of the module that runs: its losses and their JVP together."""

    engine = "dual"

    def __init__(self, fwd: Forward, direction: Sequence[Tensor]) -> None:
        self.weights, self.direction = fwd.weights, direction
        grad = torch.enable_grad() if fwd.update else torch.no_grad()
        with grad:
            self.losses, self._jvp = dual_forward(
                fwd.module, fwd.weights, direction, fwd.inputs, fwd.targets, fwd.loss_fn
            )
        self.values = self.losses.detach()

    def jvp(self, direction: Sequence[Tensor]) -> Tensor:
        _same_direction(direction, self.direction)
        return self._jvp

    def weighted_grads(self, seeds: Tensor) -> list[Tensor | None]:
        raise RuntimeError("internal error: the dual engine serves L2RW only")

    def update_losses(self) -> Tensor:
        return self.losses


class DualTwinRecording(Recording):
    """JVPs by dual numbers through the twin without graph; the real forward kept apart.

    With ``direction`` (L2RW): the JVP first, then the forward whose losses the real update
    backpropagates (none when the model is left unchanged: the dual forward's primal losses
    are the values). Without (MW-Net): the twin's forward with graph, freed by the one
    ``weighted_grads`` it serves; each ``jvp`` a dual forward of the twin; ``update_losses`` the
    real model's forward, run then (both drawing the random numbers the first forward drew).
    """

    engine = "dual_twin"

    def __init__(self, fwd: Forward, direction: Sequence[Tensor] | None = None) -> None:
        self.fwd, self.direction = fwd, direction
        self.losses: Tensor | None = None  # losses with graph, while they have one
        self._update: Tensor | None = None  # the real update's losses, once they exist
        self._jvp: Tensor | None = None
        if direction is not None:
            with torch.no_grad(), fwd.rng.replay():
                values, self._jvp = dual_forward(
                    fwd.twin(), fwd.weights, direction, fwd.inputs, fwd.targets, fwd.loss_fn
                )
            if fwd.update:
                with torch.enable_grad():
                    self.losses = self._update = fwd.run()
                values = self.losses.detach()
        else:
            if not fwd.update:
                raise RuntimeError("internal error: a JVP without graph needs its direction first")
            with torch.enable_grad():  # the batch's first forward: it draws as the real one
                self.losses = fwd.run(fwd.twin())
            values = self.losses.detach()
        self.values = values

    def jvp(self, direction: Sequence[Tensor]) -> Tensor:
        if self._jvp is not None:
            assert self.direction is not None
            _same_direction(direction, self.direction)
            return self._jvp
        return dual_twin_jvp(self.fwd, direction)

    def weighted_grads(self, seeds: Tensor) -> list[Tensor | None]:
        losses = self.losses
        if losses is None:
            raise RuntimeError("internal error: these losses have no graph (left)")
        keep = losses is self._update  # the real update's graph stays; the twin's is freed
        if not keep:
            self.losses = None
        return list(
            torch.autograd.grad(
                (seeds.to(losses.dtype) * losses).sum(),
                self.fwd.weights,
                retain_graph=keep,
                allow_unused=True,
            )
        )

    def update_losses(self) -> Tensor:
        if self._update is None:
            with torch.enable_grad(), self.fwd.rng.replay():
                self._update = self.fwd.run()
        return self._update


def dual_twin_jvp(fwd: Forward, direction: Sequence[Tensor], chunks: int = 1) -> Tensor:
    """⟨∇θℓᵢ, u⟩ by a dual-number forward of the bound twin, without graph, drawing the
    random numbers the recorded forward drew; with ``chunks`` > 1, one forward per consecutive
    slice of the batch, one after another, drawing them as a per-layer recording in as many
    slices does (dropout's masks are drawn per slice)."""
    with torch.no_grad(), fwd.rng.replay():
        twin = fwd.twin()
        slices = zip(
            batch_inputs.split(fwd.inputs, chunks), fwd.targets.tensor_split(chunks), strict=True
        )
        parts = [
            dual_forward(twin, fwd.weights, direction, x, y, fwd.loss_fn)[1]
            for x, y in slices
            if len(y)
        ]
    return torch.cat(parts) if len(parts) > 1 else parts[0]
