"""Deterministic, resumable batch streams for the training loop."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate

from reweight.data.core import TensorData

__all__ = ["BatchStream", "Batched", "Gathered", "collate", "loader", "shuffled_pass"]


class Gathered(tuple):
    """A batch fetched whole, one gather per tensor: ``collate`` passes it on as it is."""

    __slots__ = ()


def collate(samples: Any) -> Any:
    """A DataLoader's collate: a ``Gathered`` batch as it is, else torch's default collate."""
    return samples if isinstance(samples, Gathered) else default_collate(samples)


class Batched(Dataset):
    """``dataset`` served a batch at a time (``collate`` its DataLoader's collate): one index
    per tensor where its examples are tensors in memory (torch's ``TensorDataset``, this
    package's ``TensorData``; the same tensors the default collate stacks, without a copy per
    example), else its own ``__getitems__`` or item by item."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def _tensors(self) -> tuple[Tensor, ...] | None:
        kind = type(self.dataset)  # a subclass may fetch otherwise: item by item
        if kind is TensorDataset:
            return self.dataset.tensors  # type: ignore[attr-defined]
        if kind is TensorData:
            return self.dataset.inputs, self.dataset.labels  # type: ignore[attr-defined]
        return None

    def __getitems__(self, indices: Sequence[int]) -> Any:
        tensors = self._tensors()
        if tensors is not None:
            idx = torch.as_tensor(indices, dtype=torch.int64)
            return Gathered(t[idx] for t in tensors)
        fetch = getattr(self.dataset, "__getitems__", None)
        if fetch is not None:
            return list(fetch(indices))
        return [self.dataset[i] for i in indices]


def loader(dataset: Dataset, **options: Any) -> DataLoader:
    """``DataLoader(dataset, **options)`` that serves ``dataset`` a batch at a time
    (``Batched``): the same batches, in memory without a copy per example."""
    return DataLoader(Batched(dataset), collate_fn=collate, **options)


class _SeededBatches(Batched):
    """``dataset`` fetched a batch at a time, torch's CPU generator seeded from the batch's key
    first.

    The batch sampler yields ``[(key, index), ...]``. Random transforms (crops, flips) then draw
    the same numbers for a batch wherever it is fetched: in any DataLoader worker, in the main
    process, in a run resumed mid-epoch. In the main process the CPU generator is forked, so the
    training stream (dropout, the weighting net) does not see the augmentation's draws; the
    generators of a GPU are left alone (``torch.manual_seed`` would re-seed them to each batch's
    key, and, before CUDA starts, format a traceback for each: 2 ms of every batch on CPU).
    Tensors in memory draw nothing: they are gathered at once.
    """

    def __getitems__(self, keyed: Sequence[tuple[int, int]]) -> Any:
        indices = [i for _, i in keyed]
        if self._tensors() is not None:  # nothing drawn: no seed, no fork
            return super().__getitems__(indices)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(keyed[0][0])
            return super().__getitems__(indices)


class BatchStream:
    """Deterministic, resumable batches: epoch e is a permutation seeded by (seed, stream, e).

    The position is the number of batches drawn so far, so a resumed run continues with
    exactly the batches an uninterrupted one would have drawn.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int,
        stream: int,
        drop_last: bool,
        num_workers: int,
        pin_memory: bool,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        self.dataset = dataset
        self.rank, self.world = shard
        self.n = len(dataset)  # type: ignore[arg-type]
        self.batch_size = min(batch_size, self.n)
        self.seed, self.stream = seed, stream
        self.per_epoch = (
            self.n // self.batch_size if drop_last else math.ceil(self.n / self.batch_size)
        )
        self.num_workers, self.pin_memory = num_workers, pin_memory

    def _seed(self, epoch: int, offset: int = 0) -> int:
        key = self.seed * 1_000_003 + self.stream * 7_919 + epoch * 104_729 + offset
        return key % 2**62

    def _generator(self, epoch: int, offset: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self._seed(epoch, offset))

    def _batch_key(self, epoch: int, position: int) -> int:
        key = self._seed(epoch) * 15_485_863 + position * 2 + 1
        return (key * self.world + self.rank) % 2**62

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        perm = torch.randperm(self.n, generator=self._generator(epoch)).tolist()
        b = self.batch_size
        return [perm[i * b : (i + 1) * b] for i in range(self.per_epoch)]

    def iterate(self, position: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        epoch, offset = divmod(position, self.per_epoch)
        while True:
            global_batches = self._epoch_batches(epoch)[offset:]
            k = self.batch_size // self.world  # this rank's contiguous slice of each batch
            batches = [b[self.rank * k : (self.rank + 1) * k] for b in global_batches]
            # The loader's own generator (not the global RNG) seeds its workers, so starting
            # a loader mid-epoch on resume leaves the global RNG stream untouched.
            # each batch carries a key fixed by (seed, stream, epoch, position, rank): its
            # random transforms are the same with or without workers, and after a resume
            keys = [self._batch_key(epoch, offset + j) for j in range(len(batches))]
            keyed = [[(key, i) for i in b] for key, b in zip(keys, batches, strict=True)]
            batched = DataLoader(
                _SeededBatches(self.dataset),
                batch_sampler=keyed,
                collate_fn=collate,
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                generator=self._generator(epoch, offset + 1),
            )
            for idx, (x, y) in zip(batches, batched, strict=True):
                yield torch.as_tensor(idx), x, torch.as_tensor(y)
            epoch, offset = epoch + 1, 0


def shuffled_pass(
    dataset: Dataset, batch_size: int, seed: int, num_workers: int = 0
) -> Iterator[tuple[list[int], Tensor, Tensor]]:
    """One pass over ``dataset``, every example once, in batches of a permutation seeded by
    ``seed`` (the last one smaller): ``(indices, x, y)``. Its own generator orders the batches
    and seeds the loader's workers, so the global RNG stream is untouched."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=gen).tolist()  # type: ignore[arg-type]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    batched = loader(dataset, batch_sampler=batches, num_workers=num_workers, generator=gen)
    for idx, (x, y) in zip(batches, batched, strict=True):
        yield idx, x, torch.as_tensor(y)
