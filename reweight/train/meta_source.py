"""A trusted set found in the noisy training data: the small-loss meta source.

Where the meta batch comes from when there is no hand-checked clean set
(``dataset.meta_source=small_loss``). The Trainer asks its meta source for an iterator of meta
batches instead of drawing from the clean meta set; nothing else in the loop changes, except
that the training examples serving as meta examples are left out of the training batches
while they serve.

The rule (:func:`small_loss_selection`): per observed class, the ``per_class`` training
examples with the smallest loss under the current model. This is the small-loss criterion of
Co-teaching (Han et al., NeurIPS 2018: deep networks fit clean labels before noisy ones, so
early in training the small-loss examples are mostly clean), applied per class so that the
meta set stays class-balanced, as the clean meta sets of L2RW and MW-Net are. Building the
meta set from the training data itself, with no reward (clean) data, is what FSR (Zhang &
Pfister, ICCV 2021) and CMW-Net's noisy-label scripts (Shu et al., TPAMI 2023) do; the
selection there differs in detail (FSR ranks by a learnt reward, not the loss).

Schedule: for the first ``warmup`` steps the meta set is a seeded random draw of ``per_class``
examples per observed class (the noisy data as it is: the model is not yet fit to say which
labels are clean); at step ``warmup``, and every ``refresh`` steps after (0: never again), it
is re-selected by loss under the model of that moment (evaluation mode, no gradient: one
forward pass over the training set). The selection is part of the checkpoint, so a resumed
run serves the same meta batches.

Example:
    >>> import torch, torch.nn as nn
    >>> from torch.utils.data import TensorDataset
    >>> from reweight import SmallLossMetaSource, Trainer, TrainerConfig
    >>> g = torch.Generator().manual_seed(0)
    >>> x, y = torch.randn(200, 2, generator=g), torch.randint(0, 2, (200,), generator=g)
    >>> source = SmallLossMetaSource(y, num_classes=2, per_class=5, warmup=2, refresh=2)
    >>> trainer = Trainer(nn.Linear(2, 2), TensorDataset(x, y), None, TensorDataset(x, y),
    ...                   method="l2rw", meta_source=source,
    ...                   optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
    ...                   config=TrainerConfig(max_steps=5, batch_size=20, progress=False))
    >>> result = trainer.fit()
    >>> result.metrics["meta_source"], len(source.selected), source.selected_at
    ('small_loss', 10, 4)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from reweight.core.inputs import take
from reweight.data.build import META_SOURCES
from reweight.train.batches import Batched, collate, loader

__all__ = ["META_SOURCES", "SmallLossMetaSource", "drop_rows", "small_loss_selection"]

log = logging.getLogger(__name__)


def small_loss_selection(
    losses: Tensor, labels: Tensor, num_classes: int, per_class: int
) -> Tensor:
    """Indices of the ``per_class`` examples with the smallest loss among those labelled c, for
    each class c in order (all of a class that has fewer); ties go to the lower index.

    ``losses`` and ``labels`` are (N,); returns a 1-D int64 tensor, class 0's examples first,
    each class's in increasing loss.
    """
    chosen = []
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()  # increasing index
        order = torch.sort(losses[members], stable=True).indices  # stable: ties by index
        chosen.append(members[order[:per_class]])
    return torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.long)


class SmallLossMetaSource:
    """Meta batches from the training set's small-loss examples (module docstring).

    Args:
        train_labels: (N,) the observed (noisy) training labels.
        num_classes: the number of classes.
        per_class: meta examples per class (the clean meta set's ``meta_per_class``).
        warmup: steps before the first selection by loss (a seeded random draw serves until
            then).
        refresh: steps between selections after the first; 0: select once.
        seed: seeds the warm-up draw and the choice of meta batch when the selection is larger
            than ``meta_batch_size``.
        corrupted: (N,) optional mask of corrupted labels: only for the record (the share of
            each selection that is corrupted), never for the choice.
    """

    name = "small_loss"

    def __init__(
        self,
        train_labels: Tensor,
        num_classes: int,
        per_class: int,
        warmup: int = 200,
        refresh: int = 500,
        seed: int = 0,
        corrupted: Tensor | None = None,
    ) -> None:
        for key, value, minimum in (("per_class", per_class, 1), ("warmup", warmup, 0)):
            if value < minimum:
                raise ValueError(f"small-loss meta source: {key} must be >= {minimum}, got {value}")
        if refresh < 0:
            raise ValueError(f"small-loss meta source: refresh must be >= 0, got {refresh}")
        self.labels = torch.as_tensor(train_labels).cpu().long()
        self.num_classes, self.per_class = num_classes, per_class
        self.warmup, self.refresh, self.seed = warmup, refresh, seed
        self.corrupted = corrupted.bool().cpu() if corrupted is not None else None
        g = torch.Generator().manual_seed(seed)
        random_scores = torch.rand(len(self.labels), generator=g)
        self.selected = small_loss_selection(random_scores, self.labels, num_classes, per_class)
        self.selected_at = -1  # the step of the last selection by loss; -1: the warm-up draw
        self.history: list[dict[str, float]] = []  # one record per selection by loss

    # -- what the Trainer asks ---------------------------------------------------------------

    def batches(self, trainer: Any, stream: int, position: int) -> Iterator[tuple]:
        """Meta batches ``(indices, x, y)`` for the Trainer, one per ``next``.

        ``stream`` 1 is training: before each batch the selection is brought up to date with
        ``trainer.step`` (selecting by loss under ``trainer.model`` when the schedule says so);
        other streams (the final scoring of every example) read the current selection and
        change nothing. ``position`` is unused: the batch of a step depends on the step only.
        """
        while True:
            step = trainer.step
            if stream == 1:
                self._update(trainer, step)
            idx = self._meta_indices(trainer.config.meta_batch_size, stream, step)
            yield idx, *self._fetch(trainer.train_data, idx)

    def check_single_process(self, dist: Any) -> None:
        """``ValueError`` in data-parallel training (``dist`` not None), which it does not run."""
        if dist is not None:
            raise ValueError(
                "dataset.meta_source=small_loss does not run data-parallel yet (each rank would "
                "drop a different number of serving examples from its shard); use one process"
            )

    def serving(self) -> Tensor:
        """The training indices serving as meta examples now (left out of training batches)."""
        return self.selected

    def describe(self) -> dict[str, Any]:
        """What the run's summary records: the rule, its schedule, and each selection's size
        and share of corrupted labels (when known)."""
        out: dict[str, Any] = {
            "meta_source": self.name,
            "meta_source_per_class": self.per_class,
            "meta_source_warmup": self.warmup,
            "meta_source_refresh": self.refresh,
            "meta_source_selections": list(self.history),
            "meta_source_selected": self.selected.tolist(),
        }
        if self.corrupted is not None:
            out["meta_source_corrupted_frac"] = self._corrupted_frac()
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "selected": self.selected.clone(),
            "selected_at": self.selected_at,
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.selected = state["selected"].long().cpu()
        self.selected_at = int(state["selected_at"])
        self.history = list(state["history"])

    # -- helpers -----------------------------------------------------------------------------

    def _due(self, step: int) -> int:
        """The step of the selection by loss that should be in force at ``step`` (-1: none)."""
        if step < self.warmup:
            return -1
        if self.refresh == 0:
            return self.warmup
        return self.warmup + (step - self.warmup) // self.refresh * self.refresh

    def _update(self, trainer: Any, step: int) -> None:
        due = self._due(step)
        if due == self.selected_at:
            return
        start = time.perf_counter()
        losses = self.training_losses(trainer)
        self.selected = small_loss_selection(losses, self.labels, self.num_classes, self.per_class)
        self.selected_at = step
        record = {
            "step": float(step),
            "size": float(len(self.selected)),
            "seconds": time.perf_counter() - start,  # the cost: one forward over the training set
        }
        if self.corrupted is not None:
            record["corrupted_frac"] = self._corrupted_frac()
        self.history.append(record)
        log.info(
            "small-loss meta set at step %d: %d examples in %.2f s%s",
            step,
            len(self.selected),
            record["seconds"],
            f", {record['corrupted_frac']:.1%} with corrupted labels"
            if "corrupted_frac" in record
            else "",
        )

    @staticmethod
    @torch.no_grad()
    def training_losses(trainer: Any) -> Tensor:
        """(N,) each training example's loss under ``trainer.model`` in evaluation mode, in
        dataset order (one forward pass; the model's mode is restored)."""
        model, cfg = trainer.model, trainer.config
        batched = loader(
            trainer.train_data,
            batch_size=cfg.eval_batch_size,
            num_workers=cfg.num_workers,
            generator=torch.Generator().manual_seed(0),  # keep the global RNG intact
        )
        was_training = model.training
        model.eval()
        out = []
        try:
            for x, y in batched:
                y = torch.as_tensor(y).to(trainer.device)
                with trainer.placement.autocast():
                    logits = model(trainer.placement.inputs(x))
                out.append(trainer.loss_fn(logits, y, reduction="none").float().cpu())
        finally:
            model.train(was_training)
        return torch.cat(out)

    def _meta_indices(self, batch_size: int, stream: int, step: int) -> Tensor:
        """The whole selection when it fits in a meta batch, else a draw seeded by the step."""
        if len(self.selected) <= batch_size:
            return self.selected
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + stream * 10_007 + step)
        return self.selected[torch.randperm(len(self.selected), generator=g)[:batch_size]]

    @staticmethod
    def _fetch(data: Any, idx: Tensor) -> tuple[Any, Tensor]:
        x, y = collate(Batched(data).__getitems__(idx.tolist()))
        return x, torch.as_tensor(y)

    def _corrupted_frac(self) -> float:
        assert self.corrupted is not None
        return float(self.corrupted[self.selected].float().mean()) if len(self.selected) else 0.0


def meta_source_for(bundle: Any, seed: int) -> SmallLossMetaSource | None:
    """The meta source a ``DataBundle`` asks for (``bundle.info["meta_source"]``, which
    ``build_dataset`` records from ``dataset.meta_source``): None for the clean meta set."""
    source = bundle.info.get("meta_source", {"name": "clean"})
    if source["name"] != "small_loss":
        return None
    return SmallLossMetaSource(
        bundle.train_labels,
        bundle.num_classes,
        per_class=source["per_class"],
        warmup=source["warmup"],
        refresh=source["refresh"],
        seed=seed,
        corrupted=bundle.corrupted,
    )


def drop_rows(idx: Tensor, x: Any, y: Tensor, serving: Tensor) -> tuple[Tensor, Any, Tensor]:
    """The training batch less the examples in ``serving`` (the whole batch if none would be
    left)."""
    keep = ~torch.isin(idx, serving)
    if bool(keep.all()) or not bool(keep.any()):
        return idx, x, y
    return idx[keep], take(x, keep), y[keep]
