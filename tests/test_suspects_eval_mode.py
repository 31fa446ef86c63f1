"""The suspects of a run are scored in eval mode (reweight.outputs.suspects): a model with dropout
and BatchNorm, trained by the real Trainer and left in training mode, gets the losses, predictions
and probabilities of its eval-mode forward, and is handed back as it was (training mode, the
BatchNorm running statistics untouched)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from reweight.data.core import TensorData
from reweight.outputs.suspects import score_examples, suspects_table
from reweight.train.trainer import Trainer, TrainerConfig


def trained_in_training_mode() -> Trainer:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(90, 5, generator=g), torch.arange(90) % 3
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)
    )
    trainer = Trainer(
        model,
        TensorData(x[:70], y[:70]),
        TensorData(x[70:], y[70:]),
        method="l2rw",
        config=TrainerConfig(
            max_steps=5, batch_size=10, eval_every=0, progress=False, eval_batch_size=16
        ),
        train_labels=y[:70],
    )
    trainer.fit()
    trainer.model.train()  # as a user's model may be when they ask for suspects
    return trainer


def test_suspects_are_scored_in_eval_mode_and_the_model_is_handed_back():
    trainer = trained_in_training_mode()
    model = trainer.model
    before = copy.deepcopy(model.state_dict())
    x, y = trainer.train_data.inputs, trainer.train_data.labels
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        logits = reference(x)
    want_loss = F.cross_entropy(logits, y, reduction="none")
    want_prob, want_pred = logits.softmax(1).max(1)

    scores = score_examples(trainer)  # five batches of 16 (the last one of 6)
    torch.testing.assert_close(scores["loss"], want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores["probability"], want_prob, rtol=1e-5, atol=1e-6)
    assert torch.equal(scores["predicted"], want_pred)
    assert model.training and all(m.training for m in model.modules())
    for name, value in model.state_dict().items():  # running mean/var, batches tracked
        assert torch.equal(value, before[name]), name

    rows, _, losses = suspects_table(trainer)
    torch.testing.assert_close(losses, want_loss, rtol=1e-5, atol=1e-6)
    by_index = {r["index"]: r for r in rows}
    for i in range(len(y)):
        assert by_index[i]["loss"] == f"{float(losses[i]):.6g}"
        assert by_index[i]["predicted_label"] == str(int(want_pred[i]))
