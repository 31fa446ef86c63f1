"""Meta-reweighting inside PyTorch Lightning (``pip install "reweight[lightning]"``).

``ReweightingModule`` is a ``LightningModule`` whose ``training_step`` weighs its batch in two
lines, in Lightning's automatic optimization: ``reweigh`` runs the method's meta step on the
network (``reweight.Reweighter``), logs the weights' statistics through ``self.log``, and
returns the weights with the losses whose ``loss`` (Σᵢ wᵢℓᵢ) the step returns. The method's
state is saved in Lightning's checkpoints and restored by ``Trainer.fit(ckpt_path=...)``.

Example::

    class Classifier(ReweightingModule):
        def __init__(self, trusted_loader):
            super().__init__("mwnet", trusted_loader)
            self.net = LeNet(num_classes=10)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.reweigh(self.net, x, y).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.net.parameters(), lr=0.1, momentum=0.9)

The network passed to ``reweigh`` is a plain ``nn.Module`` (the meta step keeps a
buffer-backed twin of it), and the trusted batches are ``(inputs, targets)`` pairs, moved to
its device. Only one optimizer, automatic optimization.

Data-parallel (``strategy="ddp"``, any number of processes): each rank's batch is its shard of
the global batch, the weights are those of one process on the global batch (the Reweighter sums
across the ranks what the meta step needs) and the returned loss is scaled by the number of
ranks, so that DDP's average of the gradients is the global Σᵢ wᵢ∇ℓᵢ. Every rank must draw the
same trusted batches: a seeded ``DataLoader``, which Lightning does not shard (it shards only
the training loader).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning as L
import torch.nn.functional as F
from torch import Tensor, nn

from reweight.core.inputs import Inputs
from reweight.meta import LossFn
from reweight.methods import Method
from reweight.reweighter import Reweighted, Reweighter

__all__ = ["CHECKPOINT_KEY", "ReweightingModule"]

CHECKPOINT_KEY = "reweight"  # the method's state in a Lightning checkpoint


class ReweightingModule(L.LightningModule):
    """A ``LightningModule`` that weighs its training batches by ``method``.

    Args:
        method: ``"l2rw"``, ``"mwnet"``, ``"cmwnet"`` or a reweight method object.
        meta_data: the trusted batches (a ``DataLoader`` of ``(inputs, targets)``), cycled.
        train_labels, num_classes: for methods that read them (``cmwnet``).
    """

    def __init__(
        self,
        method: str | Method,
        meta_data: Iterable[Any] | None,
        *,
        train_labels: Tensor | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        # a plain attribute, not a submodule: the weighting net is not among the parameters
        # that configure_optimizers hands the model's optimizer
        self.reweighter = Reweighter(
            method, meta_data, train_labels=train_labels, num_classes=num_classes
        )

    def reweigh(
        self, model: nn.Module, inputs: Inputs, targets: Tensor, loss_fn: LossFn = F.cross_entropy
    ) -> Reweighted:
        """Weights for this training batch; return its ``.loss`` from ``training_step``."""
        if not self.automatic_optimization:
            raise ValueError(
                "ReweightingModule.reweigh runs in automatic optimization; with manual "
                "optimization call self.reweighter(model, x, y, optimizer=...) yourself"
            )
        optimizer = self.optimizers()
        optimizer = getattr(optimizer, "optimizer", optimizer)  # Lightning's wrapper
        out = self.reweighter(model, inputs, targets, loss_fn=loss_fn, optimizer=optimizer)
        out.scale = self._gradient_scale()
        relative = out.weights.detach() * len(out.weights)
        stats = {
            "weight_mean": float(relative.mean()),
            "weight_zero_frac": float((relative == 0).float().mean()),
        }
        if out.output.meta_loss is not None:
            stats["meta_loss"] = out.output.meta_loss
        self.log_dict(stats, on_step=True, on_epoch=False, batch_size=len(out.weights))
        return out

    def _gradient_scale(self) -> int:
        """1 in one process; under a DDP strategy, which averages the ranks' gradients, the
        number of ranks (then the mean is the gradient of Σᵢ wᵢℓᵢ over the global batch,
        whose weights the Reweighter computed across the ranks)."""
        world = self.reweighter.world_size
        if world == 1:
            return 1
        from lightning.pytorch.strategies import DDPStrategy

        strategy = self.trainer.strategy
        if not isinstance(strategy, DDPStrategy):
            raise ValueError(
                f"ReweightingModule runs data-parallel under Lightning's DDP strategies "
                f"(strategy='ddp', 'ddp_spawn'), not {type(strategy).__name__}: the meta step "
                "needs every parameter whole on each rank"
            )
        return world

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = self.reweighter.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if CHECKPOINT_KEY not in checkpoint:
            raise KeyError(
                f"the checkpoint has no {CHECKPOINT_KEY!r} entry: it was not written by a "
                "ReweightingModule, so the method's state cannot be restored"
            )
        self.reweighter.load_state_dict(checkpoint[CHECKPOINT_KEY])
