"""CMW-Net: the class-aware Meta-Weight-Net (Shu et al., TPAMI 2023).

The weighting net sees the loss *and the group of the example's class*: the classes are
clustered into ``groups`` (3 in the paper) by their number of training examples (k-means on
the class sizes, computed once from the training labels), a shared layer reads the loss, and
each group has its own output head. The official code's net is ``ACVNet(1, 100, 100, 1, 3)``:
a shared Linear(1, 100) + ReLU, then per group a Linear(100, 1) + sigmoid, trained by Adam
(lr 1e-4, weight decay 1e-4 in its CIFAR noisy-label script, ``cmwn.py``), and the class of
an example is its *observed* (possibly noisy) label. Here the heads are the columns of one
Linear(hidden, groups), the same function and initialisation per head, in one matrix product.

Everything else (the meta step, the net's update, ``meta_every``, data-parallel training) is
``reweight.methods.weighting.WeightingNetMethod``'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from reweight.methods.base import StepInputs
from reweight.methods.weighting import WeightingNetMethod

__all__ = ["CMWNet", "ClassAwareWeightNet", "size_groups"]


class ClassAwareWeightNet(nn.Module):
    """v(ℓ, g; φ) = sigmoid(head_g(ReLU(W ℓ + b))): a shared layer, one head per group."""

    def __init__(self, groups: int = 3, hidden: int = 100) -> None:
        super().__init__()
        self.shared = nn.Sequential(nn.Linear(1, hidden), nn.ReLU())
        self.heads = nn.Linear(hidden, groups)

    def forward(self, loss: Tensor, group: Tensor) -> Tensor:  # (B, 1), (B,) -> (B, 1)
        return torch.sigmoid(self.heads(self.shared(loss)).gather(1, group.reshape(-1, 1)))


def size_groups(counts: Sequence[int], groups: int = 3) -> list[int]:
    """Each class's group: an exact 1-D k-means of the class sizes into ``groups`` clusters
    (fewer when there are fewer classes), numbered by size, 0 the smallest classes.

    Exact by dynamic programming over the sorted sizes (the optimal 1-D clustering is made of
    contiguous runs), so the grouping is deterministic, unlike Lloyd's algorithm from a random
    start. Ties in the cost go to the earlier split.

    Example:
        >>> size_groups([5000, 4800, 50, 60, 500, 450, 5100])
        [2, 2, 0, 0, 1, 1, 2]
    """
    n = len(counts)
    k = max(1, min(groups, n))
    order = sorted(range(n), key=lambda i: (counts[i], i))
    x = [float(counts[i]) for i in order]
    s1, s2 = [0.0], [0.0]
    for v in x:
        s1.append(s1[-1] + v)
        s2.append(s2[-1] + v * v)

    def sse(i: int, j: int) -> float:  # of x[i:j]
        m = j - i
        total = s1[j] - s1[i]
        return s2[j] - s2[i] - total * total / m

    inf = float("inf")
    cost = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    cost[0][0] = 0.0
    for c in range(1, k + 1):
        for j in range(c, n + 1):
            for i in range(c - 1, j):
                value = cost[c - 1][i] + sse(i, j)
                if value < cost[c][j]:  # strict: a tie keeps the earlier split
                    cost[c][j], cut[c][j] = value, i
    labels = [0] * n
    j = n
    for c in range(k, 0, -1):
        i = cut[c][j]
        for pos in range(i, j):
            labels[order[pos]] = c - 1
        j = i
    return labels


class CMWNet(WeightingNetMethod):
    """Class-aware Meta-Weight-Net: MW-Net whose weighting net also sees the class's group.

    Args:
        groups: how many groups the classes are clustered into by size (3, as in the paper).
        hidden: the shared layer's width (100, as in the official code).
        lr, weight_decay: the weighting net's Adam (1e-4 and 1e-4: the official CIFAR
            noisy-label script).
        meta_every: the meta step runs on every k-th batch (1, as in the paper's algorithm;
            the official noisy-label scripts use 10); the batches between are weighted by the
            current net at a plain step's cost.
        normalize, detach_loss, replay_optimizer, meta_grad, meta_chunks, meta_params, engine,
        engine_policy: as for ``MWNet``.

    ``setup`` computes the class groups from the training labels (``size_groups``); they are
    in ``describe()`` (a run's ``summary.json``) and in the method's state.
    """

    name: ClassVar[str] = "cmwnet"

    def __init__(
        self,
        groups: int = 3,
        hidden: int = 100,
        lr: float = 1e-4,
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
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"method.groups must be an integer >= 1, got {groups!r}")
        self.groups, self.hidden = groups, hidden
        self.class_groups: Tensor | None = None  # (num_classes,), set by setup
        super().__init__(
            ClassAwareWeightNet(groups, hidden),
            lr=lr,
            weight_decay=weight_decay,
            normalize=normalize,
            detach_loss=detach_loss,
            replay_optimizer=replay_optimizer,
            meta_grad=meta_grad,
            meta_every=meta_every,
            meta_chunks=meta_chunks,
            meta_params=meta_params,
            engine=engine,
            engine_policy=engine_policy,
        )

    def setup(
        self,
        *,
        model: nn.Module,
        device: torch.device,
        train_labels: Tensor | None = None,
        num_classes: int | None = None,
        **rest: Any,
    ) -> None:
        if train_labels is None or num_classes is None:
            raise ValueError(
                "method=cmwnet needs the training labels and the number of classes to group "
                "the classes by size (Trainer(train_labels=..., num_classes=...))"
            )
        counts = torch.bincount(train_labels.to(torch.int64).cpu(), minlength=num_classes)
        self.class_groups = torch.tensor(size_groups(counts.tolist(), self.groups), device=device)
        super().setup(model=model, device=device, **rest)

    def net_output(self, losses: Tensor, batch: StepInputs) -> Tensor:
        if self.class_groups is None:
            raise RuntimeError(
                "CMWNet.setup must run before its first step (it groups the classes)"
            )
        group = self.class_groups[batch.targets.to(self.class_groups.device)]
        return self.vnet(losses.reshape(-1, 1), group).reshape(-1)

    def describe(self) -> dict[str, Any]:
        groups = None if self.class_groups is None else self.class_groups.tolist()
        return {**super().describe(), "class_groups": groups}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "class_groups": self.class_groups}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state.get("class_groups") is not None:
            self.class_groups = state["class_groups"]
