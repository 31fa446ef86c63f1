"""The interface every method implements: one batch in, per-example weights out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from reweight.meta import MetaModule, TwinCache
from reweight.metastep import StepInputs

__all__ = ["Method", "MethodOutput", "StepInputs"]


@dataclass
class MethodOutput:
    """Per-example weights for the real update, whose loss is Σᵢ wᵢℓᵢ.

    ``losses``, when set, are the per-example training losses from a forward of the *real*
    model at θ in the current mode: that forward was the real step's forward (it has updated
    BatchNorm statistics once), and the Trainer backpropagates through it instead of running
    another.
    """

    weights: Tensor  # (B,), detached
    losses: Tensor | None = None  # (B,), with graph to the model's parameters
    meta_loss: float | None = None
    zero_sum: bool = False  # every weight is zero: the batch contributes no gradient
    extra: dict[str, float] = field(default_factory=dict)


class Method(ABC):
    """Turns a batch into per-example weights; the Trainer does the real weighted update.

    Subclasses set ``name`` and ``needs_meta`` and implement ``step``. Methods with state (a
    weighting net, a generator) override ``state_dict``/``load_state_dict`` so checkpoints can
    resume them exactly.
    """

    name: ClassVar[str] = "method"
    needs_meta: ClassVar[bool] = False

    def setup(  # noqa: B027 (an optional hook, not abstract)
        self,
        *,
        model: nn.Module,
        train_labels: Tensor | None,
        num_classes: int | None,
        device: torch.device,
    ) -> None:
        """Called once by the Trainer before the first step."""

    @abstractmethod
    def step(self, batch: StepInputs) -> MethodOutput:
        """Weights for one batch (may update the method's state, e.g. a weighting net)."""

    def weigh(self, batch: StepInputs) -> Tensor:
        """The weights this method would give ``batch`` now, changing nothing: not the
        method's state, not the model, not its BatchNorm statistics. For diagnostics."""
        return self.step(batch).weights

    @property
    def twins(self) -> TwinCache:
        """This method's twin cache (``reweight.meta.TwinCache``), shared with its engines."""
        cache = self.__dict__.get("_twins")
        if cache is None:
            cache = self._twins = TwinCache()
        return cache

    def bound_twin(self, model: nn.Module) -> MetaModule:
        """The model's buffer-backed twin, built on first use and bound to its current weights."""
        return self.twins.bound(model)

    def describe(self) -> dict[str, Any]:
        """What a run's summary should say about how this method computed its steps
        (``Trainer.final_result`` merges it); e.g. the meta-gradient engine and why."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{self.name} has no state, got keys {sorted(state)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
