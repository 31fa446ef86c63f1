"""``reweight.integrations.lightning``: the real ``lightning.Trainer`` on CPU, no mocks.

- LeNet's batches as Lightning's loop drew them, replayed through reweight's own
  ``Trainer.train_step`` from the same weights and optimizer: the same parameters (1e-6,
  float32), for l2rw and mwnet, SGD with momentum and AdamW.
- ``fit(ckpt_path=...)`` from a checkpoint at step 3 of 6 ends bit-identical to the
  uninterrupted run, the weighting net included; the weights' statistics reach Lightning's
  logger (its CSV logger, offline).
"""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from reweight import L2RW, MWNet, Trainer
from reweight.integrations.lightning import CHECKPOINT_KEY, ReweightingModule
from reweight.models import LeNet

from .helpers import quiet


def lenet() -> LeNet:
    torch.manual_seed(0)
    return LeNet(num_classes=2)


def data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 2, (n,), generator=g)
    )


def method(name: str):
    torch.manual_seed(1)
    return L2RW() if name == "l2rw" else MWNet(hidden=8, lr=1e-2)


def optimizer_factory(opt: str):
    if opt == "sgd":
        return lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)
    return lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.0)


class Classifier(ReweightingModule):
    def __init__(self, name: str, trusted: DataLoader, opt: str) -> None:
        super().__init__(method(name), trusted)
        self.net = lenet()
        self.opt = opt
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append((x, y))
        return self.reweigh(self.net, x, y).loss

    def configure_optimizers(self):
        return optimizer_factory(self.opt)(self.net.parameters())


def fit(module, steps: int, root: Path, ckpt_path: str | None = None, logger=False):
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        default_root_dir=str(root),
    )
    train = DataLoader(data(48, 1), batch_size=16)  # 3 batches a pass, in order
    trainer.fit(module, train, ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
@pytest.mark.parametrize("name", ["l2rw", "mwnet"])
def test_lightning_takes_reweights_own_updates(tmp_path: Path, name: str, opt: str):
    trusted = DataLoader(
        data(24, 2), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3)
    )
    module = Classifier(name, trusted, opt)
    fit(module, 5, tmp_path)
    assert len(module.seen) == 5
    ours = lenet()
    trainer = Trainer(
        ours,
        data(48, 1),
        meta_data=data(24, 2),
        method=method(name),
        optimizer=optimizer_factory(opt),
        config=quiet(channels_last=False),
    )
    replay = DataLoader(
        data(24, 2), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3)
    )
    metas = [b for _ in range(2) for b in replay]  # the trusted batches Lightning's run drew
    for (x, y), (mx, my) in zip(module.seen, metas, strict=False):
        trainer.train_step(x, y, mx, my)
    for a, b in zip(module.net.parameters(), ours.parameters(), strict=True):
        assert float((a - b).detach().abs().max()) <= 1e-6
    moved = max(
        float((a - b).detach().abs().max())
        for a, b in zip(module.net.parameters(), lenet().parameters(), strict=True)
    )
    assert moved > 1e-4
    # the weighting net is no parameter of the module: the model's optimizer never steps it
    assert all(p.requires_grad for p in module.parameters())
    assert {n.split(".")[0] for n, _ in module.named_parameters()} == {"net"}


def test_resume_from_a_checkpoint_is_bit_identical(tmp_path: Path):
    def trusted():
        return DataLoader(
            data(24, 2), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3)
        )

    whole = Classifier("mwnet", trusted(), "sgd")
    fit(whole, 6, tmp_path / "whole")
    first = Classifier("mwnet", trusted(), "sgd")
    trainer = fit(first, 3, tmp_path / "first")
    ckpt = tmp_path / "step3.ckpt"
    trainer.save_checkpoint(ckpt)
    assert CHECKPOINT_KEY in torch.load(ckpt, weights_only=False)
    resumed = Classifier("mwnet", trusted(), "sgd")
    logger = CSVLogger(str(tmp_path / "logs"), name="run")
    fit(resumed, 6, tmp_path / "resumed", ckpt_path=str(ckpt), logger=logger)
    for a, b in zip(whole.net.parameters(), resumed.net.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(
        whole.reweighter.method.vnet.parameters(),
        resumed.reweighter.method.vnet.parameters(),
        strict=True,
    ):
        assert torch.equal(a, b)
    assert resumed.reweighter.steps == 6
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("weight_mean")]
    assert [int(r["step"]) for r in rows] == [3, 4, 5]  # the resumed steps, each once
    assert all(0 < float(r["weight_mean"]) < 1 and float(r["meta_loss"]) > 0 for r in rows)


def test_manual_optimization_is_refused_with_one_line(tmp_path: Path):
    class Manual(Classifier):
        def __init__(self) -> None:
            super().__init__("l2rw", DataLoader(data(8, 2), batch_size=8), "sgd")
            self.automatic_optimization = False

    with pytest.raises(ValueError, match="runs in automatic optimization"):
        fit(Manual(), 1, tmp_path)
