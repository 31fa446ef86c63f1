"""The dataset registry and its single entry point, :func:`build_dataset`.

Example (with MNIST under ``$REWEIGHT_DATA_DIR/MNIST/raw``)::

    bundle = build_dataset("mnist_imbalanced", proportion=0.995, seed=0)
    bundle.train_labels.bincount().tolist()   # [20, 4970]
    len(bundle.meta), len(bundle.test)        # (10, 1964)

From a Hydra config (``conf/dataset/<name>.yaml`` has exactly these keys)::

    bundle = build_dataset(**cfg.dataset)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from reweight.data._validate import check_bool, check_choice, check_int
from reweight.data.cifar import build_cifar10n, build_cifar_lt, build_cifar_noisy
from reweight.data.core import DataBundle, resolve_data_root, tensor_hash
from reweight.data.mnist import build_mnist_imbalanced, build_mnist_noisy
from reweight.data.own import build_image_folder, build_tensors
from reweight.data.splits import class_counts

__all__ = ["COMMON_KEYS", "DATASETS", "build_dataset", "dataset_builder", "dataset_defaults"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Spec:
    builder: Callable[..., DataBundle]
    defaults: dict[str, Any]  # the dataset's own keys with the papers' defaults
    fixed: dict[str, Any] = field(default_factory=dict)  # bound arguments, not config keys


_NOISY = {"noise_type": "uniform", "noise_rate": 0.4}
_OWN_CORRUPTION = {"noise_type": "uniform", "noise_rate": 0.0, "imbalance_factor": 1.0}

_REGISTRY: dict[str, _Spec] = {
    "mnist_imbalanced": _Spec(
        build_mnist_imbalanced,
        {"proportion": 0.995, "n_train": 5000, "meta_per_class": 5, "test_balanced": True},
    ),
    "mnist_noisy": _Spec(build_mnist_noisy, {**_NOISY, "meta_per_class": 10}),
    "cifar10_noisy": _Spec(
        build_cifar_noisy,
        {**_NOISY, "meta_per_class": 100, "augment": True},
        {"variant": "cifar10"},
    ),
    "cifar100_noisy": _Spec(
        build_cifar_noisy,
        {**_NOISY, "meta_per_class": 10, "augment": True},
        {"variant": "cifar100"},
    ),
    "cifar10_lt": _Spec(
        build_cifar_lt,
        {"imbalance_factor": 100, "meta_per_class": 10, "augment": True},
        {"variant": "cifar10"},
    ),
    "cifar100_lt": _Spec(
        build_cifar_lt,
        {"imbalance_factor": 100, "meta_per_class": 10, "augment": True},
        {"variant": "cifar100"},
    ),
    "cifar10n": _Spec(
        build_cifar10n,
        {"label_key": "worse_label", "label_file": None, "meta_per_class": 100, "augment": True},
    ),
    # your own data (reweight/data/own.py): no corruption unless asked for
    "image_folder": _Spec(
        build_image_folder,
        {
            "train_dir": None,
            "meta_dir": None,
            "meta_files": None,
            "meta_per_class": None,
            "test_dir": None,
            "test_fraction": 0.2,
            "image_size": None,
            "grayscale": False,
            "standardize": True,
            **_OWN_CORRUPTION,
        },
    ),
    "tensors": _Spec(
        build_tensors,
        {
            "path": None,
            "label_column": "label",
            "id_column": None,
            "classes": None,
            "meta_path": None,
            "meta_rows": None,
            "meta_per_class": None,
            "test_path": None,
            "test_fraction": 0.2,
            "standardize": True,
            **_OWN_CORRUPTION,
        },
    ),
}

DATASETS: tuple[str, ...] = tuple(_REGISTRY)
"""Names accepted by :func:`build_dataset` (one Hydra config ``conf/dataset/<name>.yaml`` each)."""

COMMON_KEYS = ("name", "root", "seed", "download")
"""Keys every dataset accepts besides its own parameters."""


def dataset_defaults(name: str) -> dict[str, Any]:
    """The dataset-specific parameters of ``name`` and their defaults."""
    return dict(_REGISTRY[check_choice("name", name, DATASETS)].defaults)


def dataset_builder(name: str) -> Callable[..., DataBundle]:
    """The function that builds ``name``: the annotations of its keyword arguments named in
    :func:`dataset_defaults` type the dataset's own config keys (``reweight.cli.schema`` reads
    them there, so a new key is typed where it is defined)."""
    return _REGISTRY[check_choice("name", name, DATASETS)].builder


def build_dataset(
    name: str,
    *,
    root: str | os.PathLike | None = None,
    seed: int = 0,
    download: bool = True,
    **params: Any,
) -> DataBundle:
    """Build the dataset ``name`` (one of :data:`DATASETS`).

    ``root`` is the data folder (default: ``$REWEIGHT_DATA_DIR``, else ``data``); missing files
    are downloaded with torchvision when ``download`` is true. ``seed`` is the *dataset* seed: it
    alone fixes the splits, the noise matrix and the corrupted labels (a private
    ``torch.Generator``; the global RNG is neither read nor advanced), independently of the
    training seed. ``params`` are the dataset's own keys (see :func:`dataset_defaults`); an unknown
    key, or a value outside its allowed range, raises ``ValueError`` naming the key and the
    allowed values before any file is read.

    Example::

        bundle = build_dataset("cifar10_noisy", noise_type="flip", noise_rate=0.4, seed=1)
        bundle.info["noise_rate_measured"]  # the fraction of training labels actually changed
    """
    spec = _REGISTRY[check_choice("name", name, DATASETS)]
    unknown = sorted(set(params) - set(spec.defaults))
    if unknown:
        allowed = ", ".join([*COMMON_KEYS, *spec.defaults])
        raise ValueError(
            f"unknown parameter {unknown[0]!r} for dataset {name!r}; allowed keys: {allowed}"
        )
    check_int("seed", seed, minimum=0)
    check_bool("download", download)
    resolved = {**spec.defaults, **params}
    data_root = resolve_data_root(root)
    generator = torch.Generator().manual_seed(seed)
    bundle = spec.builder(
        data_root, generator=generator, download=download, **spec.fixed, **resolved
    )

    k = bundle.num_classes
    meta_labels, test_labels = bundle.meta.labels, bundle.test.labels
    bundle.info = {
        "name": name,
        "params": {
            k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in resolved.items()
        },
        "seed": seed,
        "root": str(data_root.resolve()),
        "num_classes": k,
        "class_names": bundle.class_names,
        "split_sizes": {
            "train": len(bundle.train),
            "meta": len(bundle.meta),
            "test": len(bundle.test),
        },
        "train_class_counts": class_counts(bundle.train_labels, k),
        "true_class_counts": class_counts(bundle.true_labels, k),
        "meta_class_counts": class_counts(meta_labels, k),
        "test_class_counts": class_counts(test_labels, k),
        "num_corrupted": int(bundle.corrupted.sum()),
        "indices_hash": tensor_hash(
            bundle.train.source_indices, bundle.meta.source_indices, bundle.test.source_indices
        ),
        "labels_hash": tensor_hash(bundle.train_labels, bundle.true_labels),
        **bundle.info,
    }
    logger.info(
        "dataset %s (seed %d): %d train (%d corrupted), %d meta, %d test",
        name,
        seed,
        len(bundle.train),
        bundle.info["num_corrupted"],
        len(bundle.meta),
        len(bundle.test),
    )
    return bundle
