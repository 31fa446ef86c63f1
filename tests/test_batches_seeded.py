"""BatchStream seeds each batch's random transforms from the batch's key: the same augmented
batches with or without DataLoader workers and after a resume mid-epoch, and the global RNG
stream untouched by them. Tensors in memory are gathered a batch at once, into the batches
torch's default collate makes."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from reweight.data.core import TensorData
from reweight.train.batches import BatchStream, loader


class Augmented(Dataset):
    """Item i is i plus a random draw, as a random crop or flip draws from torch's RNG."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.tensor([float(index)]) + torch.rand(1), index % 3


def draw(num_workers: int, position: int, count: int) -> list[torch.Tensor]:
    stream = BatchStream(Augmented(), 5, 7, 0, True, num_workers, False).iterate(position)
    return [next(stream)[1] for _ in range(count)]


def test_workers_and_resume_give_the_same_augmented_batches():
    torch.manual_seed(0)
    plain = draw(0, 0, 9)  # 4 batches per epoch: nearly three epochs
    state = torch.get_rng_state()
    torch.manual_seed(0)
    assert torch.equal(state, torch.get_rng_state())  # the draws left the global RNG alone
    workers = draw(2, 0, 9)
    resumed = draw(2, 6, 3)  # mid-epoch: batch 6 is epoch 1, position 2
    for a, b in zip(plain, workers, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(plain[6:], resumed, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(plain[0] - plain[0].floor(), plain[4] - plain[4].floor())


def test_a_batch_draws_from_the_cpu_generator_seeded_with_its_key(monkeypatch):
    """A batch's draws are those of torch's CPU generator seeded with the batch's key (worked
    out here a second way: seed 7, stream 0, epoch e, position j in it); no GPU generator is
    seeded on the way (``torch.manual_seed`` would re-seed every CUDA device to the key)."""
    seeded = []
    monkeypatch.setattr("torch.cuda.manual_seed_all", seeded.append)
    batches = BatchStream(Augmented(), 5, 7, 0, True, 0, False).iterate(0)
    for position in range(6):  # 4 batches per epoch: into the second epoch
        idx, x, _ = next(batches)
        epoch, j = divmod(position, 4)
        epoch_seed = (7 * 1_000_003 + epoch * 104_729) % 2**62
        g = torch.Generator().manual_seed((epoch_seed * 15_485_863 + 2 * j + 1) % 2**62)
        draws = torch.cat([torch.rand(1, generator=g) for _ in idx])
        assert torch.equal(x[:, 0], idx.float() + draws), position
    assert seeded == []


class Shifted(TensorDataset):
    """A TensorDataset whose items are fetched otherwise (its inputs plus one)."""

    def __getitem__(self, index: int):
        return self.tensors[0][index] + 1, self.tensors[1][index]


def _refuse(*args):
    raise AssertionError("fetched item by item")


@pytest.mark.parametrize("workers", [0, 2])
def test_tensors_in_memory_are_gathered_into_the_default_collates_batches(monkeypatch, workers):
    x, y = torch.randn(23, 3, 4, dtype=torch.float64), torch.arange(23) % 5
    order = torch.randperm(23, generator=torch.Generator().manual_seed(1)).tolist()
    batches = [order[i : i + 5] for i in range(0, 23, 5)]  # the last one of 3
    cases = [TensorDataset(x, y), TensorData(x, y), Shifted(x, y)]
    expected = [list(DataLoader(data, batch_sampler=batches)) for data in cases]
    # gathered whole: never item by item (the subclass's own __getitem__ stays)
    for kind, method in ((TensorDataset, "__getitem__"), (TensorData, "__getitem__")):
        monkeypatch.setattr(kind, method, _refuse)
    monkeypatch.setattr(TensorData, "__getitems__", _refuse)
    for data, want in zip(cases, expected, strict=True):
        got = list(loader(data, batch_sampler=batches, num_workers=workers))
        assert len(got) == len(want) == 5
        for (a, b), (c, d) in zip(want, got, strict=True):
            assert torch.equal(a, c) and a.dtype == c.dtype and a.is_contiguous()
            assert torch.equal(torch.as_tensor(b), torch.as_tensor(d))
    assert torch.equal(expected[2][0][0], x[batches[0]] + 1)  # the subclass's own fetch
