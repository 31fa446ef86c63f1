"""MNIST datasets, held in memory as normalised float tensors.

* ``mnist_imbalanced``: L2RW's binary 4-vs-9 task with a proportion ``p`` of 9s
  (:func:`reweight.data.splits.plan_binary_imbalance`).
* ``mnist_noisy``: 10-class MNIST with synthetic label noise and a clean meta set of
  ``meta_per_class`` images per class (:func:`reweight.data.splits.plan_noisy`).

The IDX files (``root/MNIST/raw/``) are checked first (:func:`check_mnist_files`: header and
length every time, MD5 once per file), so a missing, truncated or damaged file is one error that
names it; they are then read once per process and root (checked, an IDX file is its header and
the bytes: no need for torchvision's reader, whose import alone takes seconds), and every bundle
indexes the cached uint8 tensors and normalises its own subsets. torchvision is imported only to
download.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from reweight.data._validate import (
    check_bool,
    check_choice,
    check_int,
    check_open_unit,
    check_rate,
)
from reweight.data.checksums import verify_md5
from reweight.data.core import DATA_DIR_ENV, DataBundle, TensorData, download_atomically
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
    "check_mnist_files",
    "load_mnist",
]

logger = logging.getLogger(__name__)

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
_FOLDER = "MNIST"


@dataclass(frozen=True)
class _IdxFile:
    """What one uncompressed MNIST IDX file must look like."""

    magic: int  # 0x00000803: unsigned bytes in 3 dimensions (images); 0x00000801: 1 (labels)
    shape: tuple[int, ...]  # the dimensions its header must give
    md5: str  # of the whole uncompressed file

    @property
    def size(self) -> int:
        return 4 + 4 * len(self.shape) + math.prod(self.shape)


# The four files torchvision reads from root/MNIST/raw. torchvision knows only the MD5s of the .gz
# archives it downloads (torchvision.datasets.MNIST.resources), not those of the uncompressed files
# it reads, so this table is our own: the MD5s of those archives' contents, the original MNIST
# files of LeCun, Cortes and Burges (the widely published checksums). The test
# test_real_mnist_md5s_match_the_table checks them against the real files.
_RAW_FILES: dict[str, _IdxFile] = {
    "train-images-idx3-ubyte": _IdxFile(
        0x803, (60_000, 28, 28), "6bbc9ace898e44ae57da46a324031adb"
    ),
    "train-labels-idx1-ubyte": _IdxFile(0x801, (60_000,), "a25bea736e30d166cdddb491f175f624"),
    "t10k-images-idx3-ubyte": _IdxFile(0x803, (10_000, 28, 28), "2646ac647ad5339dbf082846283269ea"),
    "t10k-labels-idx1-ubyte": _IdxFile(0x801, (10_000,), "27ae3e4e09519cfbb04c329615203637"),
}
_FIX = "delete it to download MNIST again, or replace it with the original uncompressed file"


def _not_found(raw: Path, missing: list[str], why: str) -> str:
    """The one-line message for MNIST files that are missing and cannot be downloaded."""
    which = "" if len(missing) == len(_RAW_FILES) else f" ({', '.join(missing)} missing)"
    return (
        f"MNIST not found at {raw.resolve()}{which} and {why}: put the four uncompressed IDX "
        f"files there ({', '.join(_RAW_FILES)}) or set dataset.root / {DATA_DIR_ENV}"
    )


def _check_idx(path: Path, spec: _IdxFile) -> None:
    """Raise ``ValueError`` naming ``path`` if its IDX header or length is not ``spec``'s: the
    torchvision reader would fail with a reshape error naming no file, or read garbage."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(4 + 4 * len(spec.shape))
    kind = "image" if len(spec.shape) == 3 else "label"
    if size == 0:
        raise ValueError(f"MNIST file {path} is empty: {_FIX}")
    if head[:2] == b"\x1f\x8b":
        raise ValueError(f"MNIST file {path} is gzip-compressed: gunzip it, or {_FIX}")
    magic = int.from_bytes(head[:4], "big")
    if len(head) < 4 or magic != spec.magic:
        raise ValueError(
            f"MNIST file {path} is not an IDX {kind} file (magic number 0x{magic:08x}, expected "
            f"0x{spec.magic:08x}): {_FIX}"
        )
    if len(head) < 4 + 4 * len(spec.shape):
        raise ValueError(
            f"MNIST file {path} is truncated: {size} bytes, expected {spec.size}: {_FIX}"
        )
    shape = tuple(int.from_bytes(head[i : i + 4], "big") for i in range(4, len(head), 4))
    if shape != spec.shape:
        raise ValueError(
            f"MNIST file {path} has the header of a {' x '.join(map(str, shape)) or 'no'} "
            f"{kind} array, expected {' x '.join(map(str, spec.shape))}: {_FIX}"
        )
    if size != spec.size:
        state = "truncated" if size < spec.size else "too long"
        raise ValueError(
            f"MNIST file {path} is {state}: {size} bytes, expected {spec.size}: {_FIX}"
        )


def check_mnist_files(raw: Path, *, cache_dir: Path | None = None) -> None:
    """Check the four IDX files in ``raw``: headers and lengths (each time: a ``stat`` and 16
    bytes per file), then MD5s (once per file: see :func:`reweight.data.checksums.verify_md5`;
    about 0.1 s for the 55 MB). Raises ``ValueError`` naming the first bad file and what to do."""
    raw = Path(raw).resolve()
    for name, spec in _RAW_FILES.items():
        _check_idx(raw / name, spec)  # first, so a truncated file is called truncated
    for name, spec in _RAW_FILES.items():
        verify_md5(raw / name, spec.md5, fix=_FIX, what="MNIST file", cache_dir=cache_dir)


def _read_idx(path: Path) -> Tensor:
    """The uint8 array of an IDX file whose header and length ``check_mnist_files`` checked."""
    spec = _RAW_FILES[path.name]
    header = 4 + 4 * len(spec.shape)
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8, offset=header).view(
        spec.shape
    )


@functools.lru_cache(maxsize=4)
def _read_mnist(root: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # Shared between bundles: callers index (copy) these tensors, never modify them.
    logger.info("reading MNIST from %s", root)
    raw = Path(root) / _FOLDER / "raw"
    train, train_labels, test, test_labels = (_read_idx(raw / name) for name in _RAW_FILES)
    return train, train_labels.to(torch.int64), test, test_labels.to(torch.int64)


def load_mnist(
    root: Path, *, download: bool, cache_dir: Path | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(train_images, train_targets, test_images, test_targets)``: uint8 ``(N, 28, 28)`` images
    and int64 targets, from ``root/MNIST/raw``; downloaded (atomically) if missing and allowed.

    The files are checked first (:func:`check_mnist_files`, MD5 records in ``cache_dir``), so
    that a missing, truncated or damaged file is one error naming it and the fix."""
    root = Path(root)
    raw = root / _FOLDER / "raw"
    missing = [name for name in _RAW_FILES if not (raw / name).is_file()]
    if missing:
        if not download:
            raise FileNotFoundError(_not_found(raw, missing, "download=false"))
        download_atomically(
            root,
            _FOLDER,
            _download,
            what="MNIST",
            not_found=lambda reason: _not_found(raw, missing, f"the download failed ({reason})"),
        )
    check_mnist_files(raw, cache_dir=cache_dir)
    return _read_mnist(str(root.resolve()))


def _download(folder: Path) -> None:
    """torchvision's MNIST download into ``folder`` (imported here: seconds of start-up that a
    run reading files already on disk does without)."""
    import torchvision

    torchvision.datasets.MNIST(folder, train=True, download=True)


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
        val=None
        if plan.val_indices is None or plan.val_labels is None
        else TensorData(
            _normalise(train_images[plan.val_indices]), plan.val_labels, plan.val_indices
        ),
        num_classes=plan.num_classes,
        train_labels=plan.train_labels,
        true_labels=plan.true_labels,
        corrupted=plan.corrupted,
        class_names=class_names,
        in_channels=1,
        info={"source": "MNIST IDX files", **plan.info},
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
    val_per_class: int = 0,
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
        val_per_class=check_int("val_per_class", val_per_class, minimum=0),
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
    train_per_class: int | None = None,
) -> DataBundle:
    """10-class MNIST: a clean meta set of ``meta_per_class`` images per class is held out of the
    training split, ``train_per_class`` random images per class of the rest are kept (None: all),
    and they are corrupted with ``noise_type`` at ``noise_rate`` (see :mod:`reweight.data.noise`);
    the test split is used whole."""
    check_choice("noise_type", noise_type, NOISE_TYPES)
    check_rate("noise_rate", noise_rate)
    check_int("meta_per_class", meta_per_class, minimum=1)
    if train_per_class is not None:
        check_int("train_per_class", train_per_class, minimum=1)
    check_bool("download", download)
    train_x, train_y, test_x, test_y = load_mnist(root, download=download)
    plan = plan_noisy(
        train_y,
        10,
        meta_per_class=meta_per_class,
        noise_type=noise_type,
        noise_rate=noise_rate,
        generator=generator,
        train_per_class=train_per_class,
    )
    return _bundle("mnist_noisy", plan, (train_x, test_x), test_y, [str(d) for d in range(10)])
