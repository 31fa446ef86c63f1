"""dataset.meta_source=small_loss: the meta batch is chosen from the noisy training data by loss.

The selection is checked in float64 against a reference written here (the per-example cross
entropy by hand, the per-class ranking by Python's ``sorted``); the clean meta split is never
read; the key is checked on the command line; and the reference check is shown to fail when
the rule is broken (largest loss instead of smallest)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

import reweight.train.meta_source as meta_source_module
from reweight import Trainer, TrainerConfig
from reweight.data import build_dataset
from reweight.methods import L2RW
from reweight.train.meta_source import SmallLossMetaSource, small_loss_selection
from tests.test_cli import run_cli

N, D, K, PER_CLASS, WARMUP = 120, 5, 3, 4, 3


def _data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (N,), generator=g)
    return x, y


def reference_selection(model: nn.Linear, x: Tensor, y: Tensor) -> list[int]:
    """Per class, the PER_CLASS examples with the smallest cross entropy under ``model``, by
    hand: logits, a log-sum-exp written out, Python's sort on (loss, index)."""
    with torch.no_grad():
        logits = x @ model.weight.T + model.bias  # (N, K)
        top = logits.max(1, keepdim=True).values
        lse = top.squeeze(1) + (logits - top).exp().sum(1).log()
        losses = (lse - logits[torch.arange(N), y]).tolist()
    chosen: list[int] = []
    for c in range(K):
        members = [i for i in range(N) if int(y[i]) == c]
        chosen += sorted(members, key=lambda i: (losses[i], i))[:PER_CLASS]
    return chosen


class Recording(L2RW):
    """L2RW that keeps each step's meta batch and training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.meta: list[tuple[Tensor, Tensor]] = []
        self.train: list[Tensor] = []

    def step(self, batch):
        self.meta.append((batch.meta_inputs.clone(), batch.meta_targets.clone()))
        self.train.append(batch.inputs.clone())
        return super().step(batch)


class Untouchable(Dataset):
    """A clean meta split that fails the test if anything reads it."""

    def __len__(self) -> int:
        raise AssertionError("the clean meta split was read (len)")

    def __getitem__(self, i: int):
        raise AssertionError("the clean meta split was read (getitem)")


def _trainer(method: Recording, meta_data: Dataset | None = None) -> tuple[Trainer, Tensor, Tensor]:
    torch.manual_seed(0)
    x, y = _data()
    model = nn.Linear(D, K).double()
    source = SmallLossMetaSource(y, K, per_class=PER_CLASS, warmup=WARMUP, refresh=0, seed=0)
    config = TrainerConfig(
        max_steps=WARMUP,
        batch_size=20,
        meta_batch_size=K * PER_CLASS,
        progress=False,
        final_weights=0,
        eval_every=0,
    )
    trainer = Trainer(
        model,
        TensorDataset(x, y),
        meta_data,
        None,
        method=method,
        meta_source=source,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
        config=config,
    )
    return trainer, x, y


def check_selection_matches_reference() -> None:
    """Train to the warm-up's end, compute the reference from the model of that moment, take
    one more step: its meta batch is exactly the reference's examples, and none of them is in
    that step's training batch."""
    method = Recording()
    trainer, x, y = _trainer(method)
    trainer.fit()
    expected = reference_selection(trainer.model, x, y)
    trainer.config.max_steps = WARMUP + 1
    trainer.fit()
    source = trainer.meta_source
    assert source.selected.tolist() == expected
    assert source.selected_at == WARMUP
    meta_x, meta_y = method.meta[-1]
    assert meta_x.dtype == torch.float64
    assert torch.equal(meta_x, x[expected]) and torch.equal(meta_y, y[expected])
    served = x[expected]
    assert not (method.train[-1][:, None, :] == served[None]).all(-1).any()  # excluded


def test_selection_is_the_float64_reference():
    check_selection_matches_reference()


def test_warmup_draw_is_random_per_class_and_seeded():
    _, y = _data()
    a = SmallLossMetaSource(y, K, per_class=PER_CLASS, seed=3).selected
    b = SmallLossMetaSource(y, K, per_class=PER_CLASS, seed=3).selected
    assert torch.equal(a, b)
    assert torch.bincount(y[a], minlength=K).tolist() == [PER_CLASS] * K


def test_mutation_largest_loss_fails_the_reference_check(monkeypatch):
    """The check above is not vacuous: with the rule reversed it fails."""

    def largest(losses, labels, num_classes, per_class):
        return small_loss_selection(-losses, labels, num_classes, per_class)

    monkeypatch.setattr(meta_source_module, "small_loss_selection", largest)
    with pytest.raises(AssertionError):
        check_selection_matches_reference()


def test_selection_ties_and_small_classes():
    losses = torch.tensor([0.5, 0.1, 0.1, 0.3, 0.2], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1, 2])
    assert small_loss_selection(losses, labels, 4, 2).tolist() == [1, 2, 3, 4]


def test_clean_meta_split_is_never_read():
    """The Trainer with a small-loss source never touches its meta_data, through training,
    the final weights and a checkpoint round trip; and the dataset builder hands on none."""
    method = Recording()
    trainer, _, _ = _trainer(method, meta_data=Untouchable())
    trainer.config.max_steps = WARMUP + 2
    trainer.config.final_weights = 1
    trainer.fit()
    trainer.final_result()
    state = trainer.state_dict()
    assert torch.equal(state["meta_source"]["selected"], trainer.meta_source.selected)


def test_builder_hands_on_no_clean_meta_image(data_root):
    bundle = build_dataset(
        "mnist_noisy",
        root=data_root,
        train_per_class=50,
        meta_per_class=3,
        val_per_class=2,
        meta_source="small_loss",
        meta_warmup=5,
        meta_refresh=0,
    )
    clean = build_dataset(
        "mnist_noisy", root=data_root, train_per_class=50, meta_per_class=3, val_per_class=2
    )
    assert len(bundle.meta) == 0 and len(clean.meta) == 30
    assert torch.equal(bundle.train_labels, clean.train_labels)  # the same training set
    assert bundle.info["meta_source"] == {
        "name": "small_loss",
        "per_class": 3,
        "warmup": 5,
        "refresh": 0,
    }
    assert clean.info["meta_source"] == {"name": "clean"}
    with pytest.raises(ValueError, match="meta_source must be one of clean, small_loss"):
        build_dataset("mnist_noisy", root=data_root, meta_source="smallest")


def test_resume_serves_the_same_selection(tmp_path):
    """A checkpoint carries the selection: resumed between refreshes, the run continues with
    the meta set the model of the selection step chose."""
    a, _, _ = _trainer(Recording())
    a.config.max_steps = WARMUP + 2
    a.fit()
    b, _, _ = _trainer(Recording())
    b.config.max_steps = WARMUP + 1
    b.checkpoint_path = tmp_path / "c.pt"
    b.fit()
    c_method = Recording()
    c, _, _ = _trainer(c_method)
    c.config.max_steps = WARMUP + 2
    c.checkpoint_path = tmp_path / "c.pt"
    c.fit(resume=True)
    assert torch.equal(c.meta_source.selected, a.meta_source.selected)
    assert len(c_method.meta) == 1  # one step after the resume, and no new selection
    for p, q in zip(a.model.parameters(), c.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_cli_key(tmp_path, data_root):
    """A bad value: one line naming the key and the choices, exit 2, nothing written; a good
    one runs and records the source in summary.json and dataset.json."""
    bad = run_cli(["dataset=mnist_noisy", "dataset.meta_source=smallest"], tmp_path, check=False)
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == [
        "error: dataset.meta_source must be one of clean, small_loss; got 'smallest'"
    ]
    assert not (tmp_path / "outputs").exists()
    bad = run_cli(["dataset=mnist_noisy", "dataset.meta_warmup=-1"], tmp_path, check=False)
    assert bad.returncode == 2 and "dataset.meta_warmup" in bad.stderr
    args = [
        "experiment=mwnet_mnist_noisy",
        "method=l2rw",
        "dataset.meta_source=small_loss",
        "dataset.train_per_class=30",
        "dataset.meta_warmup=2",
        "dataset.meta_refresh=2",
        "trainer.max_steps=5",
        "trainer.batch_size=30",
        "trainer.meta_batch_size=100",
        "trainer.final_weights=0",
        "hydra.run.dir=run",
    ]
    run_cli(args, tmp_path)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["meta_source"] == "small_loss"
    assert [s["step"] for s in summary["meta_source_selections"]] == [2.0, 4.0]
    assert len(summary["meta_source_selected"]) == 100
    assert 0.0 <= summary["meta_source_corrupted_frac"] <= 1.0
    assert summary["dataset_info"]["split_sizes"]["meta"] == 0
    dataset = json.loads((Path(tmp_path) / "run" / "dataset.json").read_text())
    assert dataset["meta_source"]["name"] == "small_loss"
    assert not math.isnan(summary["test_accuracy"])
