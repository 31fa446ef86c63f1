"""Meta-reweighting inside ``transformers.Trainer`` (``pip install "reweight[nlp]"``).

``ReweightingTrainer`` is a ``transformers.Trainer`` that weighs every training batch: each
training step draws a trusted batch from ``meta_dataset`` (collated by the same data collator,
its unused columns removed as the training set's), runs the method's meta step on the model
(``reweight.Reweighter``) and backpropagates Σᵢ wᵢℓᵢ through HuggingFace's own backward,
gradient accumulation, mixed precision, clipping, optimizer and schedule. Evaluation is HF's.

Example (a tiny BERT with random weights; ``texts`` and ``trusted`` are tokenized datasets of
dicts with ``input_ids``, ``attention_mask`` and ``labels``)::

    from transformers import TrainingArguments
    from reweight.integrations.huggingface import ReweightingTrainer

    trainer = ReweightingTrainer(
        model=model, args=TrainingArguments("out", max_steps=100),
        train_dataset=texts, meta_dataset=trusted, method="mwnet",
    )
    trainer.train()  # or trainer.train(resume_from_checkpoint=True)

Supported heads, whose per-example loss is known: ``...ForSequenceClassification`` and
``...ForImageClassification`` (the cross-entropy of each example's logits) and
``...ForCausalLM`` (the mean token loss of each sequence, labels of -100 and padding
ignored); pass ``loss_fn`` for any other. Gradient
accumulation: each micro-batch is weighed on its own, with its own trusted batch, and the
update is HF's mean over the micro-batches of their Σᵢ wᵢℓᵢ. The method's state (a weighting
net, its optimizer, the counters) is saved beside each HF checkpoint (``reweight_state.pt``)
and restored by ``resume_from_checkpoint``. Under ``torchrun`` (DDP), each rank weighs its
shard of the global batch as one process would weigh the whole (the trusted batches are the
same on every rank) and the gradients are summed over the ranks after each micro-batch's
backward; HF's DistributedDataParallel wrapper is bypassed (the meta step runs on the model
inside it, so the wrapper's own reduction never runs). At each logging step HF's log gets the
weights' mean relative weight (1 is uniform), their spread and zero fraction, and the meta loss.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from transformers import Trainer

from reweight.methods import Method
from reweight.models.hf import SequenceClassifier
from reweight.reweighter import Reweighter

__all__ = ["STATE_FILE", "ReweightingTrainer", "per_example_loss"]

STATE_FILE = "reweight_state.pt"  # beside HF's files in each checkpoint folder
_HEADS = ("ForSequenceClassification", "ForImageClassification", "ForCausalLM")


def per_example_loss(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Per-example losses of a HuggingFace head (``reduction="none"``: (B,)), or their mean.

    (B, C) logits: cross-entropy per example. (B, T, V) logits of a causal LM: the next-token
    cross-entropy averaged over each sequence's labelled tokens (label -100 ignored).
    """
    if logits.dim() == 2:
        return F.cross_entropy(logits, labels, reduction=reduction)
    if logits.dim() != 3:
        raise ValueError(
            f"per_example_loss reads (B, C) or (B, T, V) logits, got shape {tuple(logits.shape)}"
        )
    shifted, targets = logits[:, :-1], labels[:, 1:]
    tokens = F.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), reduction="none",
        ignore_index=-100,
    ).view_as(targets)  # fmt: skip
    counts = (targets != -100).sum(1).clamp(min=1)
    losses = tokens.sum(1) / counts
    return losses if reduction == "none" else losses.mean()


class _Trusted:
    """The trusted batches as ``(inputs, labels)``, one shuffled pass after another (pass p
    shuffled by seed + p, so a resumed run draws them again in the same order)."""

    def __init__(self, dataset: Any, batch_size: int, collate: Callable, seed: int) -> None:
        self.dataset, self.batch_size, self.collate, self.seed = dataset, batch_size, collate, seed
        self.passes = 0

    def restart(self) -> None:
        self.passes = 0

    def __iter__(self) -> Iterator[tuple[dict[str, Tensor], Tensor]]:
        gen = torch.Generator().manual_seed(self.seed + self.passes)
        self.passes += 1
        loader = DataLoader(
            self.dataset, self.batch_size, shuffle=True, generator=gen, collate_fn=self.collate
        )
        for batch in loader:
            inputs = dict(batch)
            yield inputs, inputs.pop("labels")


class ReweightingTrainer(Trainer):
    """A ``transformers.Trainer`` whose training loss is Σᵢ wᵢℓᵢ with weights from ``method``.

    Args:
        meta_dataset: the trusted set, in the training set's format (with ``labels``).
        method: ``"l2rw"``, ``"mwnet"``, ``"cmwnet"``, or a ``reweight`` method object (e.g.
            ``L2RW(replay_optimizer=True)`` to replay HF's AdamW in the virtual step).
        meta_batch_size: trusted examples per step (default: the training batch size).
        loss_fn: ``loss_fn(logits, labels, reduction=...)`` for a head other than the two
            supported ones.
        *args, **kwargs: ``transformers.Trainer``'s.
    """

    def __init__(
        self,
        *args: Any,
        meta_dataset: Any,
        method: str | Method = "l2rw",
        meta_batch_size: int | None = None,
        loss_fn: Callable[..., Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        _check_supported(self.model, self.args, loss_fn)
        self.loss_fn = loss_fn or per_example_loss
        self.model_accepts_loss_kwargs = False  # HF divides our loss by the accumulation steps
        if self.args.remove_unused_columns and hasattr(meta_dataset, "column_names"):
            # a datasets.Dataset: its columns as the training set's (HF's own rule)
            meta_dataset = self._remove_unused_columns(meta_dataset, description="meta")
        trusted = _Trusted(
            meta_dataset,
            meta_batch_size or self.args.per_device_train_batch_size,
            self.data_collator,
            self.args.seed,
        )
        self.reweighter = Reweighter(method, trusted)
        self._wrapped: tuple[nn.Module, SequenceClassifier] | None = None
        self._window: list[tuple[Tensor, float | None]] = []

    def _logits_model(self, model: nn.Module) -> SequenceClassifier:
        """The model as ``forward(dict) -> logits``, one wrapper per model object (the meta
        step keeps its twin per module)."""
        if self._wrapped is None or self._wrapped[0] is not model:
            self._wrapped = (model, SequenceClassifier(model))
        return self._wrapped[1]

    def compute_loss(
        self,
        model: nn.Module,
        inputs: Mapping[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        if not model.training:  # evaluation: HF's own loss
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        # under torchrun HF hands us its DistributedDataParallel wrapper: the meta step runs on
        # the model inside, and training_step sums the gradients (the wrapper never reduces)
        model = self.accelerator.unwrap_model(model)
        out = self.reweighter(
            self._logits_model(model), inputs, labels, loss_fn=self.loss_fn,
            optimizer=self.optimizer,
        )  # fmt: skip
        self._window.append((out.weights.detach() * len(out.weights), out.output.meta_loss))
        loss = out.loss
        return (loss, None) if return_outputs else loss

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> Tensor:
        """HF's step; data-parallel, then the gradients summed over the ranks (each rank's
        Σᵢ wᵢℓᵢ holds its shard of the global batch, weighted as one process would)."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.reweighter.sum_gradients(model.parameters())
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._window and "loss" in logs:  # a training log row: the weights since the last
            w = torch.cat([w for w, _ in self._window]).float()
            logs["weight_mean"] = float(w.mean())
            logs["weight_std"] = float(w.std()) if len(w) > 1 else 0.0
            logs["weight_zero_frac"] = float((w == 0).float().mean())
            metas = [m for _, m in self._window if m is not None]
            if metas:
                logs["meta_loss"] = sum(metas) / len(metas)
            self._window = []
        super().log(logs, start_time)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self._get_output_dir(trial), f"checkpoint-{self.state.global_step}")
        if self.args.should_save and os.path.isdir(folder):
            torch.save(self.reweighter.state_dict(), os.path.join(folder, STATE_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} is missing: {resume_from_checkpoint} was not written by a "
                "ReweightingTrainer, so the method's state cannot be restored"
            )
        self.reweighter.meta_data.restart()  # type: ignore[union-attr]
        self.reweighter.load_state_dict(torch.load(path, weights_only=True))


def _check_supported(model: nn.Module, args: Any, loss_fn: Any) -> None:
    """One line for what the meta step cannot run, before the first step."""
    name = type(model).__name__
    if loss_fn is None and not name.endswith(_HEADS):
        raise ValueError(
            f"ReweightingTrainer knows the per-example loss of ...ForSequenceClassification, "
            f"...ForImageClassification and ...ForCausalLM models, not {name}: pass "
            "loss_fn=f(logits, labels, reduction=...)"
        )
    if getattr(args, "gradient_checkpointing", False) or getattr(
        args, "activation_checkpointing", False
    ):
        raise ValueError(
            "ReweightingTrainer: gradient_checkpointing=True is not supported (the meta step "
            "differentiates the forward itself); set gradient_checkpointing=False"
        )
    if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
        raise ValueError(
            "ReweightingTrainer: DeepSpeed and FSDP shard the parameters the meta step's "
            "virtual step moves, which it does not support; train with DDP (torchrun) instead"
        )
