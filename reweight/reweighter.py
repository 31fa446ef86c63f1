"""Per-example weights inside any training loop: ``Reweighter``.

The object every integration uses (and a hand-written loop uses directly): built from a method
and a trusted ("meta") data source, called once per training batch with the model, the batch,
the per-example loss and the real optimizer. It runs the method's meta step and returns the
weights and the losses to backpropagate; the model changes only through the loop's own update.

Example (a hand-written loop; LeNet, SGD and the trusted batches are yours):
    >>> import torch, torch.nn as nn
    >>> from reweight import Reweighter
    >>> g = torch.Generator().manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> trusted = [(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g))]
    >>> reweight = Reweighter("l2rw", trusted)
    >>> for step in range(3):
    ...     x, y = torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)
    ...     out = reweight(model, x, y, optimizer=optimizer)  # weights (32,), losses (32,)
    ...     optimizer.zero_grad()
    ...     out.loss.backward()  # Σ wᵢℓᵢ
    ...     optimizer.step()
    >>> out.weights.shape, reweight.steps
    (torch.Size([32]), 3)

Data-parallel (``torchrun``, each process a shard of the global batch): the same loop, with
the gradients summed over the processes between ``backward`` and ``step``::

    out = reweight(model, x_shard, y_shard, optimizer=optimizer)
    optimizer.zero_grad()
    out.loss.backward()
    reweight.sum_gradients(model.parameters())  # Σ over ranks; a no-op in one process
    optimizer.step()

Every rank must draw the same trusted batches (the same ``meta_data`` order: a seeded loader,
not a ``DistributedSampler``). The weights are then those of one process on the union of the
shards (rank order), and so is the summed gradient of Σᵢ wᵢℓᵢ: ``reweight.core.distributed`` says
what each rank computes. Leave the model unwrapped: ``DistributedDataParallel`` reduces only
after a forward through its own ``forward``, which the meta step does not take (so under HF's
wrapper nothing is reduced and the HF integration sums). Where the whole step runs inside the
wrapper's forward (Lightning's ``training_step`` under DDP), the wrapper averages the
gradients: set ``out.scale = reweight.world_size`` before taking ``out.loss`` and skip
``sum_gradients`` (``reweight.integrations.lightning`` does).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reweight.core.distributed import DistContext
from reweight.core.inputs import Inputs, to_device
from reweight.meta import LossFn
from reweight.methods import Method, MethodOutput, StepInputs, build_method

__all__ = ["Reweighted", "Reweighter"]


@dataclass
class Reweighted:
    """One batch's weights and the losses the real update backpropagates."""

    weights: Tensor  # (B,), detached; Σ wᵢ = 1 for L2RW, v/B for MW-Net
    losses: Tensor  # (B,), with the graph of the model's forward at θ
    output: MethodOutput  # the method's full output (meta loss, zero-sum flag)
    # the loss's factor: the number of ranks when the loop's gradients are averaged over
    # them (DistributedDataParallel), so that their mean is the global batch's Σ wᵢ∇ℓᵢ
    scale: int = 1

    @property
    def loss(self) -> Tensor:
        """Σᵢ wᵢℓᵢ (times ``scale``): the loss of the real update."""
        loss = (self.weights.to(self.losses.dtype) * self.losses).sum()
        return loss * self.scale if self.scale != 1 else loss


class Reweighter:
    """Weights for each training batch of a loop of your own.

    Args:
        method: a name (``l2rw``, ``mwnet``, ``cmwnet``, ...) or a ``Method``.
        meta_data: the trusted batches: an iterable of ``(inputs, targets)`` (a ``DataLoader``
            over the trusted set), cycled; moved to the model's device. None for methods that
            need none.
        train_labels, num_classes: the training set's labels and class count, for methods that
            read them (``cmwnet`` groups the classes by size; ``class_balanced``).
        process_group: data-parallel training over this ``torch.distributed`` group; by
            default the default group when ``torch.distributed`` is initialised with more
            than one process (read at the first call, so a loop may join it after building
            the Reweighter), else one process. Each call's batch is then this rank's shard.

    Each call: the next trusted batch, the method's step (a meta step for meta methods) on the
    model in training mode, and the weights with the losses of the model's forward, whose
    ``loss`` the loop backpropagates before stepping its optimizer. ``state_dict`` holds the
    method's state (a weighting net and its optimizer), the number of batches weighted and of
    trusted batches drawn; ``load_state_dict`` restores them (the trusted batches then resume
    where they were when their iterable yields the same order each pass).
    """

    def __init__(
        self,
        method: str | Method,
        meta_data: Iterable[Any] | None = None,
        *,
        train_labels: Tensor | None = None,
        num_classes: int | None = None,
        process_group: Any = None,
    ) -> None:
        self.method = build_method(method) if isinstance(method, str) else method
        if self.method.needs_meta and meta_data is None:
            raise ValueError(f"method {self.method.name!r} needs trusted batches (meta_data)")
        self.meta_data = meta_data
        self.train_labels, self.num_classes = train_labels, num_classes
        self.steps = 0  # batches weighted
        self.meta_drawn = 0  # trusted batches drawn
        self._meta: Iterator[Any] | None = None
        self._model: nn.Module | None = None
        self.process_group = process_group
        self._dist: DistContext | bool | None = False  # False: not looked up yet

    @property
    def dist(self) -> DistContext | None:
        """The data-parallel group (None: one process), looked up at the first call."""
        if self._dist is False:
            self._dist = DistContext.for_training(self.process_group)
        return self._dist  # type: ignore[return-value]

    @property
    def world_size(self) -> int:
        return 1 if self.dist is None else self.dist.world_size

    def sum_gradients(self, params: Iterable[nn.Parameter]) -> None:
        """Σ over ranks of the ``.grad`` of ``params`` (one all-reduce of a flat buffer),
        between the loop's ``backward`` and its ``step``: then every rank holds the gradient
        of Σᵢ wᵢℓᵢ over the global batch. Nothing to do in one process."""
        if self.dist is not None:
            self.dist.sum_gradients(list(params))

    def __call__(
        self,
        model: nn.Module,
        inputs: Inputs,
        targets: Tensor,
        *,
        loss_fn: LossFn = F.cross_entropy,
        optimizer: torch.optim.Optimizer | None = None,
        lr: float | None = None,
    ) -> Reweighted:
        """Weights for one batch. ``lr``: the virtual step's (default: the optimizer's first
        group's current lr; the optimizer itself is read, never stepped)."""
        if lr is None:
            if optimizer is None:
                raise ValueError("Reweighter: give the real optimizer, or the virtual step's lr")
            lr = float(optimizer.param_groups[0]["lr"])
        device = next(model.parameters()).device
        self._setup(model, device)
        mx = my = None
        if self.method.needs_meta:
            mx, my = self._next_meta()
            mx, my = to_device(mx, device), my.to(device)
        model.train()
        targets = targets.to(device)
        batch = StepInputs(
            model, to_device(inputs, device), targets, mx, my, lr, loss_fn, optimizer,
            self.steps, **self._shard(len(targets), device),
        )  # fmt: skip
        out = self.method.step(batch)
        losses = out.losses
        if losses is None:
            losses = loss_fn(model(batch.inputs), batch.targets, reduction="none")
        self.steps += 1
        return Reweighted(out.weights, losses, out)

    def _shard(self, n: int, device: torch.device) -> dict[str, Any]:
        """This rank's place in the global batch: the shards' sizes (one all-gather of an
        int, so shards may differ in size), the global size and this shard's offset."""
        dist = self.dist
        if dist is None:
            return {}
        sizes = dist.all_gather_cat(torch.tensor([n], dtype=torch.int64, device=device))
        sizes = sizes.tolist()
        return {
            "dist": dist,
            "global_batch_size": int(sum(sizes)),
            "offset": int(sum(sizes[: dist.rank])),
        }

    def _setup(self, model: nn.Module, device: torch.device) -> None:
        if self._model is not model:
            self.method.setup(
                model=model,
                train_labels=self.train_labels,
                num_classes=self.num_classes,
                device=device,
            )
            self._model = model

    def _next_meta(self) -> tuple[Inputs, Tensor]:
        assert self.meta_data is not None
        if self._meta is None:
            self._meta = iter(self.meta_data)
        try:
            batch = next(self._meta)
        except StopIteration:  # a new pass over the trusted set
            self._meta = iter(self.meta_data)
            batch = next(self._meta)
        self.meta_drawn += 1
        return batch[0], batch[1]

    def state_dict(self) -> dict[str, Any]:
        return {
            "method": self.method.state_dict(),
            "steps": self.steps,
            "meta_drawn": self.meta_drawn,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.method.load_state_dict(state["method"])
        self.steps = int(state["steps"])
        drawn = int(state["meta_drawn"])
        self._meta, self.meta_drawn = None, 0
        for _ in range(drawn):  # the trusted batches where they were
            self._next_meta()
