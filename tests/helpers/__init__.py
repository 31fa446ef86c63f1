"""What several test files build alike: a tiny BERT's config, a quiet TrainerConfig."""

from __future__ import annotations

from typing import Any

from reweight import TrainerConfig

__all__ = ["quiet", "tiny_bert_config"]


def tiny_bert_config(dropout: float = 0.0, **overrides: Any):
    """A 2-layer BERT of width 16 (vocabulary 40, 3 labels, sequences up to 16), random weights
    when built: nothing is downloaded."""
    from transformers import BertConfig

    options = {
        "vocab_size": 40,
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "max_position_embeddings": 16,
        "num_labels": 3,
        "hidden_dropout_prob": dropout,
        "attention_probs_dropout_prob": dropout,
    }
    return BertConfig(**{**options, **overrides})


def quiet(**settings: Any) -> TrainerConfig:
    """A TrainerConfig without a progress bar or final weight scoring (the tests' usual)."""
    return TrainerConfig(**{"progress": False, "final_weights": 0, **settings})
