"""A tiny ``ViTForImageClassification`` (random init) through ``ReweightingTrainer``.

An image head is a known head (the per-example cross-entropy of its logits, no ``loss_fn``
needed). The batches HF's loop drew, replayed through reweight's own ``Trainer.train_step``
from the same weights and optimizer, give the same parameters after 5 steps (float32, 1e-6),
for L2RW and MW-Net.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset
from transformers import ViTConfig, ViTForImageClassification

from reweight import Trainer
from reweight.models.hf import SequenceClassifier

from .helpers import quiet
from .test_integration_hf import Recorded, args, method


def tiny_vit() -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16, patch_size=8, num_channels=1, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, num_labels=3,
    )  # fmt: skip
    return ViTForImageClassification(config)


def images(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 1, 16, 16, generator=g), torch.randint(0, 3, (n,), generator=g)
    return [{"pixel_values": x[i], "labels": int(y[i])} for i in range(n)]


class Pairs(Dataset):
    def __init__(self, data: list[dict]) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return {"pixel_values": self.data[i]["pixel_values"]}, self.data[i]["labels"]


@pytest.mark.parametrize("name", ["l2rw", "mwnet"])
def test_a_tiny_vit_takes_reweights_own_updates(tmp_path: Path, name: str):
    train, trusted = images(40, 1), images(12, 2)
    theirs, ours = tiny_vit(), tiny_vit()
    make = lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)  # noqa: E731
    hf = Recorded(
        model=theirs, args=args(tmp_path, per_device_train_batch_size=8), train_dataset=train,
        meta_dataset=trusted, method=method(name), meta_batch_size=4,
        optimizers=(make(theirs.parameters()), None),
    )  # fmt: skip
    hf.train()
    assert len(hf.seen) == len(hf.trusted) == 5
    trainer = Trainer(
        SequenceClassifier(ours), Pairs(train), meta_data=Pairs(trusted), method=method(name),
        optimizer=make, config=quiet(),
    )  # fmt: skip
    for (x, y), (mx, my) in zip(hf.seen, hf.trusted, strict=True):
        trainer.train_step(x, y, mx, my)
    start = tiny_vit().state_dict()
    moved = max(float((v - start[k]).abs().max()) for k, v in ours.state_dict().items())
    assert moved > 1e-3
    for (key, a), b in zip(theirs.state_dict().items(), ours.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=key)
