"""Baselines that share the method interface: uniform, random and class-balanced weights."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from reweight.methods.base import Method, MethodOutput, StepInputs

__all__ = ["ERM", "ClassBalanced", "RandomWeights"]


class ERM(Method):
    """Empirical risk minimisation: every example weighs 1/B (the plain mean loss)."""

    name: ClassVar[str] = "erm"

    def step(self, batch: StepInputs) -> MethodOutput:
        n = len(batch.targets)
        return MethodOutput(
            weights=torch.full((n,), 1.0 / batch.n_global, device=batch.targets.device)
        )


class RandomWeights(Method):
    """L2RW's random-weight baseline: w = max(z, 0) / Σ max(z, 0), z ~ N(0, 1) per example.

    Draws from its own generator (seeded by ``seed``), saved with checkpoints.
    """

    name: ClassVar[str] = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def step(self, batch: StepInputs) -> MethodOutput:
        # draw for the whole global batch so every rank (and one process) sees the same numbers
        z = torch.randn(batch.n_global, generator=self.generator).clamp_(min=0)
        total = z.sum()
        w = z / total if total > 0 else z
        w = w[batch.offset : batch.offset + len(batch.targets)]
        return MethodOutput(weights=w.to(batch.targets.device), zero_sum=bool(total == 0))

    def weigh(self, batch: StepInputs) -> Tensor:
        state = self.generator.get_state()
        try:
            return self.step(batch).weights
        finally:
            self.generator.set_state(state)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    def __repr__(self) -> str:
        return f"RandomWeights(seed={self.seed})"


def effective_number_weights(counts: Tensor, beta: float) -> Tensor:
    """Class weights (1 − β) / (1 − βⁿᶜ) (Cui et al., CVPR 2019), scaled to sum to K.

    A class with no examples gets weight 0 before scaling.
    """
    if not 0 <= beta < 1:
        raise ValueError(f"method.beta must be in [0, 1), got {beta}")
    counts = counts.to(torch.float64)
    effective = (1 - torch.pow(beta, counts)) / (1 - beta)
    w = torch.where(counts > 0, 1 / effective.clamp(min=1e-12), torch.zeros_like(counts))
    return w * len(counts) / w.sum()


class ClassBalanced(Method):
    """Class-balanced loss by the effective number of samples (Cui et al., CVPR 2019).

    Example i weighs c[yᵢ] / B with c from ``effective_number_weights`` on the training label
    counts, so a balanced training set reduces to ERM.
    """

    name: ClassVar[str] = "class_balanced"

    def __init__(self, beta: float = 0.9999) -> None:
        effective_number_weights(torch.ones(1), beta)  # validate early
        self.beta = beta
        self.class_weights: Tensor | None = None

    def setup(
        self,
        *,
        model: nn.Module,
        train_labels: Tensor | None,
        num_classes: int | None,
        device: torch.device,
    ) -> None:
        if train_labels is None or num_classes is None:
            raise ValueError(
                "class_balanced needs the training labels and the number of classes: pass "
                "train_labels= and num_classes= to the Trainer or use a reweight dataset"
            )
        counts = torch.bincount(train_labels.cpu(), minlength=num_classes)
        self.class_weights = effective_number_weights(counts, self.beta).float().to(device)

    def step(self, batch: StepInputs) -> MethodOutput:
        if self.class_weights is None:
            raise RuntimeError("class_balanced: setup() was not called")
        w = self.class_weights[batch.targets] / batch.n_global
        return MethodOutput(weights=w)

    def __repr__(self) -> str:
        return f"ClassBalanced(beta={self.beta})"
