"""MNIST datasets, held in memory as normalised float tensors.

* ``mnist_imbalanced``: L2RW's binary 4-vs-9 task with a proportion ``p`` of 9s
  (:func:`reweight.data.splits.plan_binary_imbalance`).
* ``mnist_noisy``: 10-class MNIST with synthetic label noise and a clean meta set of
  ``meta_per_class`` images per class (:func:`reweight.data.splits.plan_noisy`).

torchvision reads the IDX files (``root/MNIST/raw/``) once per process and root; every bundle
then indexes the cached uint8 tensors and normalises its own subsets.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
import torchvision
from torch import Tensor

from reweight.data._validate import (
    check_bool,
    check_choice,
    check_int,
    check_open_unit,
    check_rate,
)
from reweight.data.core import DataBundle, TensorData, download_atomically
from reweight.data.noise import NOISE_TYPES
from reweight.data.splits import (
    SplitPlan,
    binary_imbalance_counts,
    plan_binary_imbalance,
    plan_noisy,
)

__all__ = [
    "MNIST_MEAN",
    "MNIST_STD",
    "build_mnist_imbalanced",
    "build_mnist_noisy",
    "load_mnist",
]

logger = logging.getLogger(__name__)

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
_FOLDER = "MNIST"
_RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _mnist_present(root: Path) -> bool:
    return all((root / _FOLDER / "raw" / name).is_file() for name in _RAW_FILES)


@functools.lru_cache(maxsize=4)
def _read_mnist(root: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # Shared between bundles: callers index (copy) these tensors, never modify them.
    logger.info("reading MNIST from %s", root)
    train = torchvision.datasets.MNIST(root, train=True, download=False)
    test = torchvision.datasets.MNIST(root, train=False, download=False)
    return train.data, train.targets.to(torch.int64), test.data, test.targets.to(torch.int64)


def load_mnist(root: Path, *, download: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(train_images, train_targets, test_images, test_targets)``: uint8 ``(N, 28, 28)`` images
    and int64 targets, from ``root/MNIST/raw``; downloaded (atomically) if missing and allowed."""
    root = Path(root)
    expected = (root / _FOLDER / "raw").resolve()
    if not _mnist_present(root):
        instructions = (
            f"Put the four uncompressed IDX files ({', '.join(_RAW_FILES)}) in {expected}, or "
            f"set dataset.root (or the REWEIGHT_DATA_DIR environment variable) to a folder that "
            f"contains MNIST/raw/."
        )
        if not download:
            raise FileNotFoundError(
                f"MNIST not found at {expected} and download=false. {instructions}"
            )
        download_atomically(
            root,
            _FOLDER,
            lambda tmp: torchvision.datasets.MNIST(tmp, train=True, download=True),
            what="MNIST",
            instructions=instructions,
        )
    return _read_mnist(str(root.resolve()))


def _normalise(images: Tensor) -> Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28) standardised with MNIST's mean and std."""
    x = images.to(torch.float32)
    x.mul_(1.0 / (255.0 * MNIST_STD)).add_(-MNIST_MEAN / MNIST_STD)  # in place: 3x faster
    return x.unsqueeze(1)


def _bundle(
    name: str,
    plan: SplitPlan,
    images: tuple[Tensor, Tensor],
    test_targets: Tensor,
    class_names: list[str],
) -> DataBundle:
    train_images, test_images = images
    test_idx = (
        plan.test_indices if plan.test_indices is not None else torch.arange(test_targets.shape[0])
    )
    test_labels = plan.test_labels if plan.test_labels is not None else test_targets
    return DataBundle(
        name=name,
        train=TensorData(
            _normalise(train_images[plan.train_indices]), plan.train_labels, plan.train_indices
        ),
        meta=TensorData(
            _normalise(train_images[plan.meta_indices]), plan.meta_labels, plan.meta_indices
        ),
        test=TensorData(_normalise(test_images[test_idx]), test_labels, test_idx),
        num_classes=plan.num_classes,
        train_labels=plan.train_labels,
        true_labels=plan.true_labels,
        corrupted=plan.corrupted,
        class_names=class_names,
        in_channels=1,
        info={"source": "torchvision.datasets.MNIST", **plan.info},
    )


def build_mnist_imbalanced(
    root: Path,
    *,
    generator: torch.Generator,
    download: bool,
    proportion: float,
    n_train: int,
    meta_per_class: int,
    test_balanced: bool,
) -> DataBundle:
    """L2RW's imbalanced MNIST: digit 4 (label 0, minority) vs digit 9 (label 1, majority).

    See :func:`reweight.data.splits.plan_binary_imbalance` for the protocol.
    """
    # Check every parameter before touching the files.
    check_open_unit("proportion", proportion)
    check_int("n_train", n_train, minimum=2)
    check_int("meta_per_class", meta_per_class, minimum=1)
    check_bool("test_balanced", test_balanced)
    check_bool("download", download)
    binary_imbalance_counts(  # too few examples for the meta set: say so before reading files
        n_train, proportion, meta_per_class, minority="digit 4", majority="digit 9"
    )
    train_x, train_y, test_x, test_y = load_mnist(root, download=download)
    plan = plan_binary_imbalance(
        train_y,
        test_y,
        minority=4,
        majority=9,
        n_train=n_train,
        proportion=proportion,
        meta_per_class=meta_per_class,
        test_balanced=test_balanced,
        generator=generator,
    )
    return _bundle("mnist_imbalanced", plan, (train_x, test_x), test_y, ["4", "9"])


def build_mnist_noisy(
    root: Path,
    *,
    generator: torch.Generator,
    download: bool,
    noise_type: str,
    noise_rate: float,
    meta_per_class: int,
) -> DataBundle:
    """10-class MNIST: a clean meta set of ``meta_per_class`` images per class is held out of the
    training split, the rest is corrupted with ``noise_type`` at ``noise_rate`` (see
    :mod:`reweight.data.noise`); the test split is used whole."""
    check_choice("noise_type", noise_type, NOISE_TYPES)
    check_rate("noise_rate", noise_rate)
    check_int("meta_per_class", meta_per_class, minimum=1)
    check_bool("download", download)
    train_x, train_y, test_x, test_y = load_mnist(root, download=download)
    plan = plan_noisy(
        train_y,
        10,
        meta_per_class=meta_per_class,
        noise_type=noise_type,
        noise_rate=noise_rate,
        generator=generator,
    )
    return _bundle("mnist_noisy", plan, (train_x, test_x), test_y, [str(d) for d in range(10)])
