"""CIFAR-10/100 datasets: a thin layer over ``torchvision.datasets.CIFAR10/CIFAR100``.

The protocols (meta split, noise, long tail) are the pure ``plan_*`` functions of
:mod:`reweight.data.splits`; this module only loads the torchvision datasets, applies a plan
through :class:`RelabeledSubset` and attaches the transforms:

* training and meta sets: pad 4 + random 32x32 crop, horizontal flip, per-channel normalisation
  (the augmentation of MW-Net, L2RW and most CIFAR work); ``augment=false`` keeps only the
  normalisation;
* test set: normalisation only.

Datasets: ``cifar10_noisy``/``cifar100_noisy`` (synthetic noise, clean class-balanced meta set
taken out of the training split), ``cifar10_lt``/``cifar100_lt`` (long-tailed) and ``cifar10n``
(real human labels of CIFAR-10N, Wei et al., ICLR 2022, from the user-supplied
``CIFAR-10_human.pt``).
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from reweight.data._validate import (
    check_at_least,
    check_bool,
    check_choice,
    check_int,
    check_rate,
)
from reweight.data.checksums import verify_md5
from reweight.data.core import DATA_DIR_ENV, DataBundle, download_atomically
from reweight.data.noise import NOISE_TYPES
from reweight.data.splits import SplitPlan, plan_human_noise, plan_long_tail, plan_noisy

if TYPE_CHECKING:
    import torchvision

__all__ = [
    "CIFAR10N_FILE",
    "CIFAR10N_KEYS",
    "CIFAR_STATS",
    "CIFAR_VARIANTS",
    "RelabeledSubset",
    "build_cifar10n",
    "build_cifar_lt",
    "build_cifar_noisy",
    "cifar_transform",
    "load_cifar",
    "load_cifar10n_labels",
]

logger = logging.getLogger(__name__)

CIFAR_VARIANTS = ("cifar10", "cifar100")

CIFAR_STATS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    # per-channel mean and std of the training images, in [0, 1]
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

CIFAR10N_FILE = "CIFAR-10_human.pt"
"""Name of CIFAR-10N's label file (https://github.com/UCSC-REAL/cifar-10-100n, folder data/)."""

CIFAR10N_KEYS = (
    "aggre_label",
    "worse_label",
    "random_label1",
    "random_label2",
    "random_label3",
    "clean_label",
)
"""Allowed ``label_key`` values: the label sets of ``CIFAR-10_human.pt``."""

_URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}


def _tv_class(variant: str) -> type[torchvision.datasets.CIFAR10]:
    check_choice("variant", variant, CIFAR_VARIANTS)
    import torchvision  # here, not at the top: its import alone takes seconds (MNIST runs skip it)

    return torchvision.datasets.CIFAR10 if variant == "cifar10" else torchvision.datasets.CIFAR100


def cifar_transform(variant: str, *, train: bool, augment: bool = True) -> Callable[[Any], Tensor]:
    """PIL image -> normalised float tensor (3, 32, 32); with pad-4 random crop and horizontal
    flip first when ``train and augment``."""
    from torchvision import transforms  # here: see _tv_class

    mean, std = CIFAR_STATS[check_choice("variant", variant, CIFAR_VARIANTS)]
    steps: list[Callable[[Any], Any]] = []
    if train and augment:
        steps += [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    return transforms.Compose(steps)


class RelabeledSubset(Dataset):
    """Items ``source_indices[i]`` of ``base`` with label ``labels[i]`` and ``transform``.

    ``base`` must yield ``(image, target)`` without its own transform; its target is ignored, so
    the corrupted labels of a plan replace the originals without copying any image.
    """

    def __init__(
        self,
        base: Dataset,
        source_indices: Tensor,
        labels: Tensor,
        transform: Callable[[Any], Any] | None = None,
    ) -> None:
        if source_indices.shape != labels.shape or labels.dim() != 1:
            raise ValueError(
                f"source_indices and labels must be 1-D of equal length; got "
                f"{tuple(source_indices.shape)} and {tuple(labels.shape)}"
            )
        self.base = base
        self.source_indices = source_indices.to(torch.int64)
        self.labels = labels.to(torch.int64)
        self.transform = transform

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, _ = self.base[int(self.source_indices[index])]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


def _known_md5s(cls: type[torchvision.datasets.CIFAR10]) -> dict[str, str]:
    """``{file name: MD5}`` of every file of ``cls``'s folder, from torchvision's own tables
    (``train_list``, ``test_list``, ``meta``: the same since torchvision 0.2, and what its
    download and ``_check_integrity`` use), so a torchvision update that fixes one reaches us."""
    pairs = [*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])]
    return {str(name): str(md5) for name, md5 in pairs}


def _not_found(variant: str, root: Path, folder: Path, missing: list[str], why: str) -> str:
    """The one-line message for CIFAR files that are missing and cannot be downloaded."""
    which = f" ({', '.join(missing)} missing)" if folder.is_dir() else ""
    return (
        f"{variant} not found at {folder.resolve()}{which} and {why}: download {_URLS[variant]} "
        f"and extract it into {root.resolve()}, or set dataset.root / {DATA_DIR_ENV}"
    )


def load_cifar(
    variant: str, root: Path, *, download: bool, cache_dir: Path | None = None
) -> tuple[Dataset, Dataset]:
    """The torchvision (train, test) datasets of ``variant`` under ``root``, without transforms.

    Missing files are downloaded into a temporary folder next to ``root/<base folder>`` and
    moved into place only when complete; if that fails (e.g. offline) a one-line
    ``FileNotFoundError`` says where the files were expected and how to provide them. Every file
    is then checked against torchvision's MD5 once (the verdict is recorded in ``cache_dir``:
    :func:`reweight.data.checksums.verify_md5`), so a truncated or damaged batch file is a
    ``ValueError`` naming it rather than an unpickling traceback.
    """
    cls = _tv_class(variant)
    root = Path(root)
    folder = root / cls.base_folder
    known = _known_md5s(cls)
    missing = [name for name in known if not (folder / name).is_file()]
    if missing:
        if not download:
            raise FileNotFoundError(_not_found(variant, root, folder, missing, "download=false"))
        download_atomically(
            root,
            cls.base_folder,
            lambda tmp: cls(tmp, train=True, download=True),
            what=variant,
            not_found=lambda reason: _not_found(
                variant, root, folder, missing, f"the download failed ({reason})"
            ),
        )
    fix = f"delete it to download {variant} again, or replace it with the one in {_URLS[variant]}"
    for name, md5 in known.items():
        verify_md5(folder / name, md5, fix=fix, what=f"{variant} file", cache_dir=cache_dir)
    try:
        train = cls(root, train=True, download=False)
        test = cls(root, train=False, download=False)
    except (RuntimeError, pickle.UnpicklingError, EOFError, KeyError, ValueError) as err:
        # the files match the MD5s torchvision's own tables give, yet it cannot read them
        raise ValueError(
            f"torchvision cannot read {variant} from {folder.resolve()} "
            f"({type(err).__name__}: {err}): delete that folder to download it again"
        ) from err
    return train, test


def _targets(dataset: Dataset) -> Tensor:
    return torch.as_tensor(dataset.targets, dtype=torch.int64)


def _bundle(
    name: str,
    variant: str,
    plan: SplitPlan,
    train_base: Dataset,
    test_base: Dataset,
    augment: bool,
) -> DataBundle:
    train_tf = cifar_transform(variant, train=True, augment=augment)
    test_targets = _targets(test_base)
    return DataBundle(
        name=name,
        train=RelabeledSubset(train_base, plan.train_indices, plan.train_labels, train_tf),
        meta=RelabeledSubset(train_base, plan.meta_indices, plan.meta_labels, train_tf),
        test=RelabeledSubset(
            test_base,
            torch.arange(test_targets.shape[0]),
            test_targets,
            cifar_transform(variant, train=False),
        ),
        num_classes=plan.num_classes,
        train_labels=plan.train_labels,
        true_labels=plan.true_labels,
        corrupted=plan.corrupted,
        class_names=list(train_base.classes),
        in_channels=3,
        info={
            "source": f"torchvision.datasets.{type(train_base).__name__}",
            "augment": augment,
            **plan.info,
        },
    )


def build_cifar_noisy(
    root: Path,
    *,
    variant: str,
    generator: torch.Generator,
    download: bool,
    noise_type: str,
    noise_rate: float,
    meta_per_class: int,
    augment: bool,
) -> DataBundle:
    """CIFAR with synthetic noise (MW-Net's protocol): ``meta_per_class`` clean images per class
    are taken out of the training split as the meta set (1000 in all by default), and the rest is
    corrupted with ``noise_type`` at ``noise_rate`` (:mod:`reweight.data.noise`)."""
    check_choice("noise_type", noise_type, NOISE_TYPES)
    check_rate("noise_rate", noise_rate)
    check_int("meta_per_class", meta_per_class, minimum=1)
    plan = partial(
        plan_noisy,
        meta_per_class=meta_per_class,
        noise_type=noise_type,
        noise_rate=noise_rate,
        generator=generator,
    )
    return _load_and_plan(f"{variant}_noisy", variant, root, download, augment, plan)


def build_cifar_lt(
    root: Path,
    *,
    variant: str,
    generator: torch.Generator,
    download: bool,
    imbalance_factor: float,
    meta_per_class: int,
    augment: bool,
) -> DataBundle:
    """Long-tailed CIFAR (MW-Net's protocol): a clean meta set of ``meta_per_class`` per class is
    removed first, then class ``i`` keeps ``int(n * rho ** (-i / (K - 1)))`` images
    (:func:`reweight.data.splits.long_tail_counts`); the test set stays balanced."""
    check_at_least("imbalance_factor", imbalance_factor, 1.0)
    check_int("meta_per_class", meta_per_class, minimum=1)
    plan = partial(
        plan_long_tail,
        meta_per_class=meta_per_class,
        imbalance_factor=imbalance_factor,
        generator=generator,
    )
    return _load_and_plan(f"{variant}_lt", variant, root, download, augment, plan)


def _load_and_plan(
    name: str,
    variant: str,
    root: Path,
    download: bool,
    augment: bool,
    plan: Callable[[Tensor, int], SplitPlan],
) -> DataBundle:
    """CIFAR ``variant`` loaded, its training split planned by ``plan(targets, num_classes)``."""
    check_bool("augment", augment)
    check_bool("download", download)
    train, test = load_cifar(variant, root, download=download)
    return _bundle(name, variant, plan(_targets(train), len(train.classes)), train, test, augment)


def _numpy_safe_globals() -> list[Any]:
    """What ``torch.load(weights_only=True)`` must accept to read pickled numpy integer arrays,
    under the module names of both numpy 1 (which wrote CIFAR-N's files) and numpy 2."""
    reconstruct = np.arange(1).__reduce__()[0]
    dtypes = [
        type(np.dtype(t))
        for t in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64)
    ]
    return [
        (reconstruct, "numpy.core.multiarray._reconstruct"),
        (reconstruct, "numpy._core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        *dtypes,
    ]


def load_cifar10n_labels(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read CIFAR-10N's ``CIFAR-10_human.pt`` into a dict of int64 tensors.

    The file is a ``torch.save``d dict of numpy arrays (or lists or tensors); it is read with
    ``weights_only=True`` and only numpy's array-rebuilding globals allowed, so a tampered file
    cannot run code.
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path} is not a CIFAR-10N label file of integer arrays: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a dict of label arrays; got {type(raw).__name__}")
    return {str(k): torch.as_tensor(np.asarray(v), dtype=torch.int64) for k, v in raw.items()}


def build_cifar10n(
    root: Path,
    *,
    generator: torch.Generator,
    download: bool,
    label_key: str,
    label_file: str | os.PathLike | None,
    meta_per_class: int,
    augment: bool,
) -> DataBundle:
    """CIFAR-10N: CIFAR-10 images with the human labels ``label_key`` of ``CIFAR-10_human.pt``
    (expected at ``root/CIFAR-10_human.pt`` unless ``label_file`` is given). The meta set is
    ``meta_per_class`` images per class chosen by the clean labels, with clean labels."""
    check_choice("label_key", label_key, CIFAR10N_KEYS)
    check_int("meta_per_class", meta_per_class, minimum=1)
    check_bool("augment", augment)
    check_bool("download", download)
    path = Path(root) / CIFAR10N_FILE if label_file is None else Path(label_file).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"CIFAR-10N label file not found: expected {path.resolve()}. Download "
            f"{CIFAR10N_FILE} from https://github.com/UCSC-REAL/cifar-10-100n (folder data/) and "
            f"put it there, or set dataset.label_file to its path."
        )
    train, test = load_cifar("cifar10", root, download=download)
    clean = _targets(train)
    labels = load_cifar10n_labels(path)
    if label_key not in labels:
        raise ValueError(f"label_key={label_key!r} is not in {path}; it holds {sorted(labels)}")
    noisy = labels[label_key]
    if noisy.shape != clean.shape:
        raise ValueError(
            f"{path}[{label_key!r}] has {noisy.numel()} labels; CIFAR-10's training "
            f"split has {clean.numel()}"
        )
    if "clean_label" in labels and not torch.equal(labels["clean_label"], clean):
        raise ValueError(
            f"{path}['clean_label'] differs from torchvision's CIFAR-10 training "
            f"labels: the file does not follow the training split's order"
        )
    plan = plan_human_noise(clean, noisy, 10, meta_per_class=meta_per_class, generator=generator)
    logger.info(
        "CIFAR-10N %s from %s: %.2f%% of training labels differ from the clean ones",
        label_key,
        path,
        100 * plan.info["noise_rate_measured"],
    )
    plan.info.update(label_key=label_key, label_file=str(path.resolve()))
    return _bundle("cifar10n", "cifar10", plan, train, test, augment)
