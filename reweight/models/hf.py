"""HuggingFace sequence classifiers as reweight models (optional: ``pip install "reweight[nlp]"``).

A HuggingFace model's ``forward`` takes the tokenizer's tensors as keyword arguments and
returns an output object; the Trainer, the methods and the meta-gradient engines call a model
with one batch of inputs and read logits. ``SequenceClassifier`` adapts one to the other: its
forward takes the batch as one dict of tensors (``input_ids``, ``attention_mask``, ...; the
dataset yields ``(dict, label)`` and the default collate stacks the dicts) and returns the
logits. Nothing else changes: the twin of a wrapped model is the twin of the HuggingFace model
inside it, attention runs the math kernel inside a meta step (``reweight.meta.kernels``) and the
fast kernel in the real step.

Example (a tiny BERT with random weights, nothing downloaded):
    >>> import torch
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> config = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1,
    ...                     num_attention_heads=2, intermediate_size=32, num_labels=3)
    >>> model = SequenceClassifier(BertForSequenceClassification(config))
    >>> batch = {"input_ids": torch.randint(0, 30, (4, 7)),
    ...          "attention_mask": torch.ones(4, 7, dtype=torch.long)}
    >>> model(batch).shape
    torch.Size([4, 3])
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

__all__ = ["SequenceClassifier"]


class SequenceClassifier(nn.Module):
    """``model(**batch).logits`` as ``forward(batch)``: a HuggingFace
    ``...ForSequenceClassification`` (or any module whose output has ``logits``) for the Trainer."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        if not isinstance(batch, Mapping):
            raise TypeError(
                "SequenceClassifier takes a dict of tensors (input_ids, attention_mask, ...), "
                f"got {type(batch).__name__}"
            )
        return self.model(**batch).logits
