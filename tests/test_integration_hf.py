"""``reweight.integrations.huggingface``: the real ``transformers.Trainer``, on CPU, no mocks.

- The same batches, seeds and initial weights through HF's Trainer and through reweight's own
  ``Trainer`` give the same parameters after 5 steps (float32, 1e-6), for l2rw and mwnet, with
  SGD and with AdamW.
- ``resume_from_checkpoint`` at step 3 of 6 ends bit-identical to the uninterrupted run, the
  weighting net included.
- What the meta step cannot run is refused at construction with one line.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset
from transformers import (
    BertForMaskedLM,
    BertForSequenceClassification,
    TrainingArguments,
)

from reweight import L2RW, MWNet, Trainer
from reweight.integrations.huggingface import STATE_FILE, ReweightingTrainer, per_example_loss
from reweight.models.hf import SequenceClassifier

from .helpers import quiet, tiny_bert_config

VOCAB, CLASSES = 40, 3


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config())


def rows(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, 8), generator=g)
    mask = (torch.arange(8) < torch.randint(3, 9, (n,), generator=g)[:, None]).long()
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    return [
        {"input_ids": ids[i] * mask[i], "attention_mask": mask[i], "labels": int(labels[i])}
        for i in range(n)
    ]


class Pairs(Dataset):
    """The same rows as (dict, label) pairs, for reweight's own Trainer."""

    def __init__(self, data: list[dict]) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        row = self.data[i]
        return {k: v for k, v in row.items() if k != "labels"}, row["labels"]


def method(name: str):
    torch.manual_seed(1)
    return L2RW() if name == "l2rw" else MWNet(hidden=8, lr=1e-2)


def args(tmp: Path, **kw) -> TrainingArguments:
    base = {
        "output_dir": str(tmp),
        "per_device_train_batch_size": 16,
        "max_steps": 5,
        "learning_rate": 0.05,
        "lr_scheduler_type": "constant",
        "max_grad_norm": 0.0,
        "weight_decay": 0.0,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
        "dataloader_num_workers": 0,
    }
    return TrainingArguments(**{**base, **kw})


class Recorded(ReweightingTrainer):
    """The real HF Trainer, keeping each training batch and trusted batch it used."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[dict, torch.Tensor]] = []
        self.trusted: list[tuple[dict, torch.Tensor]] = []
        source = self.reweighter.meta_data
        recorded = self.trusted

        class Keep:  # the trusted batches as drawn
            def __iter__(self):
                for batch in source:
                    recorded.append(batch)
                    yield batch

            def restart(self):
                source.restart()

        self.reweighter.meta_data = Keep()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            inputs = dict(inputs)
            self.seen.append(({k: v for k, v in inputs.items() if k != "labels"}, inputs["labels"]))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
@pytest.mark.parametrize("name", ["l2rw", "mwnet"])
def test_hf_trainer_takes_reweights_own_updates(tmp_path: Path, name: str, opt: str):
    """The batches HF's loop drew (its sampler, its collator), replayed through reweight's
    Trainer.train_step from the same initial weights and optimizer: the same parameters."""
    train, trusted = rows(32, 1), rows(16, 2)
    theirs, ours = tiny_bert(), tiny_bert()
    if opt == "sgd":
        make = lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)  # noqa: E731
    else:
        make = lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.0)  # noqa: E731
    hf = Recorded(
        model=theirs,
        args=args(tmp_path, per_device_train_batch_size=8),
        train_dataset=train,
        meta_dataset=trusted,
        method=method(name),
        meta_batch_size=4,
        optimizers=(make(theirs.parameters()), None),
    )
    hf.train()
    assert len(hf.seen) == len(hf.trusted) == 5
    trainer = Trainer(
        SequenceClassifier(ours),
        Pairs(train),
        meta_data=Pairs(trusted),
        method=method(name),
        optimizer=make,
        config=quiet(),
    )
    for (x, y), (mx, my) in zip(hf.seen, hf.trusted, strict=True):
        trainer.train_step(x, y, mx, my)
    worst = max(
        float((a - b).detach().abs().max())
        for a, b in zip(theirs.parameters(), ours.parameters(), strict=True)
    )
    assert worst <= 1e-6
    moved = max(
        float((a - b).detach().abs().max())
        for a, b in zip(theirs.parameters(), tiny_bert().parameters(), strict=True)
    )
    assert moved > 1e-3
    if name == "mwnet":  # the weighting nets learned alike
        for a, b in zip(
            hf.reweighter.method.vnet.parameters(), trainer.method.vnet.parameters(), strict=True
        ):
            assert float((a - b).detach().abs().max()) <= 1e-6
    logged = [r for r in hf.state.log_history if "weight_mean" in r]
    assert len(logged) == 5  # one row per logging step, with the weights' statistics
    for row in logged:  # relative weights: L2RW's average 1 (or 0), MW-Net's are v in (0, 1)
        mean = row["weight_mean"]
        assert mean in (pytest.approx(1.0, abs=1e-5), 0.0) if name == "l2rw" else 0 < mean < 1


def test_resume_from_checkpoint_is_bit_identical(tmp_path: Path):
    """MW-Net, 4 batches per epoch, 6 steps: a checkpoint at step 3, resumed by a new trainer,
    ends where the uninterrupted run ends (model, weighting net, its optimizer)."""
    train, trusted = rows(32, 1), rows(12, 2)

    def run(out: Path, resume: str | None = None) -> ReweightingTrainer:
        model = tiny_bert()
        t = ReweightingTrainer(
            model=model,
            args=args(
                out, per_device_train_batch_size=8, max_steps=6, save_strategy="steps", save_steps=3
            ),
            train_dataset=train,
            meta_dataset=trusted,
            method=method("mwnet"),
            meta_batch_size=4,
        )
        t.train(resume_from_checkpoint=resume)
        return t

    whole = run(tmp_path / "whole")
    assert (tmp_path / "whole" / "checkpoint-3" / STATE_FILE).is_file()
    resumed = run(tmp_path / "whole", resume=str(tmp_path / "whole" / "checkpoint-3"))
    for a, b in zip(whole.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    net_a, net_b = whole.reweighter.method.vnet, resumed.reweighter.method.vnet
    for a, b in zip(net_a.parameters(), net_b.parameters(), strict=True):
        assert torch.equal(a, b)
    assert resumed.reweighter.steps == whole.reweighter.steps == 6


def test_what_it_cannot_run_is_refused_at_construction(tmp_path: Path):
    config = copy.deepcopy(tiny_bert().config)
    with pytest.raises(ValueError, match="not BertForMaskedLM: pass loss_fn="):
        ReweightingTrainer(
            model=BertForMaskedLM(config), args=args(tmp_path), train_dataset=rows(4, 1),
            meta_dataset=rows(4, 2),
        )  # fmt: skip
    checkpointed = args(tmp_path)
    checkpointed.gradient_checkpointing = True
    with pytest.raises(ValueError, match="gradient_checkpointing=True is not supported"):
        ReweightingTrainer(
            model=tiny_bert(), args=checkpointed, train_dataset=rows(4, 1),
            meta_dataset=rows(4, 2),
        )  # fmt: skip


def test_the_causal_lm_loss_is_each_sequences_mean_token_loss():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 7, (3, 5), generator=g)
    labels[1, 3:] = -100  # padding
    got = per_example_loss(logits, labels, reduction="none")
    for i in range(3):
        keep = labels[i, 1:] != -100
        want = torch.nn.functional.cross_entropy(logits[i, :-1][keep], labels[i, 1:][keep])
        assert torch.allclose(got[i], want, rtol=0, atol=1e-12)
    assert torch.allclose(per_example_loss(logits, labels), got.mean())
