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
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from reweight.data._validate import check_bool, check_choice, check_int
from reweight.data.cifar import build_cifar10n, build_cifar_lt, build_cifar_noisy
from reweight.data.core import DataBundle, TensorData, resolve_data_root, tensor_hash
from reweight.data.mnist import build_mnist_imbalanced, build_mnist_noisy
from reweight.data.own_images import build_image_folder
from reweight.data.own_tables import build_tensors
from reweight.data.realnoise import build_realnoise
from reweight.data.splits import class_counts

__all__ = [
    "COMMON_KEYS",
    "DATASETS",
    "META_SOURCES",
    "build_dataset",
    "dataset_builder",
    "dataset_defaults",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Spec:
    builder: Callable[..., DataBundle]
    defaults: dict[str, Any]  # the dataset's own keys with the papers' defaults
    fixed: dict[str, Any] = field(default_factory=dict)  # bound arguments, not config keys
    # the default dataset.val_per_class; native: the builder draws the validation set itself
    # (mnist_imbalanced: from the undrawn pool, so its 20 training fours stay 20), else it is
    # held out of the meta draw (meta_per_class + val_per_class per class, split in two)
    val_per_class: int = 10
    native_val: bool = False
    # whether the builder knows every training example's true label (a built-in dataset, whose
    # corruption is synthetic or recorded), or only the labels as given (your own data)
    true_labels_known: bool = True


_NOISY = {"noise_type": "uniform", "noise_rate": 0.4}
_OWN_CORRUPTION = {"noise_type": "uniform", "noise_rate": 0.0, "imbalance_factor": 1.0}


def _real_noise(
    dataset: str, meta_per_class: int | None, image_size: int, own: Any = None, **spec: Any
) -> _Spec:
    """A real-noise dataset: :func:`build_realnoise` bound to ``dataset``, and its defaults
    (``own``: the keys only this dataset takes)."""
    defaults = {"meta_per_class": meta_per_class, "image_size": image_size, "augment": True}
    defaults.update(own or {})
    return _Spec(build_realnoise, defaults, {"dataset": dataset}, **spec)


_REGISTRY: dict[str, _Spec] = {
    "mnist_imbalanced": _Spec(
        build_mnist_imbalanced,
        {"proportion": 0.995, "n_train": 5000, "meta_per_class": 5, "test_balanced": True},
        val_per_class=5,
        native_val=True,
    ),
    "mnist_noisy": _Spec(
        build_mnist_noisy, {**_NOISY, "meta_per_class": 10, "train_per_class": None}
    ),
    "cifar10_noisy": _Spec(
        build_cifar_noisy,
        {**_NOISY, "meta_per_class": 100, "augment": True},
        {"variant": "cifar10"},
    ),
    "cifar100_noisy": _Spec(
        build_cifar_noisy,
        {**_NOISY, "meta_per_class": 10, "augment": True},
        {"variant": "cifar100"},
        val_per_class=2,
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
        val_per_class=2,
    ),
    "cifar10n": _Spec(
        build_cifar10n,
        {"label_key": "worse_label", "label_file": None, "meta_per_class": 100, "augment": True},
    ),
    # your own data (reweight/data/own*.py): no corruption unless asked for; the validation set
    # comes out of the trusted pool (2 per class: trusted sets are small)
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
        val_per_class=2,
        true_labels_known=False,
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
        val_per_class=2,
        true_labels_known=False,
    ),
    # real-world noise, streamed from disk (reweight/data/realnoise*.py); meta_per_class null:
    # the whole trusted pool (Clothing1M's clean validation keys, MW-Net's meta set)
    "clothing1m": _real_noise("clothing1m", None, 224),
    "food101n": _real_noise("food101n", 10, 224),
    "animal10n": _real_noise("animal10n", 10, 64),
    "mini_webvision": _real_noise(
        "mini_webvision", 10, 224, {"imagenet_val_dir": None}, val_per_class=5
    ),
}

DATASETS: tuple[str, ...] = tuple(_REGISTRY)
"""Names accepted by :func:`build_dataset` (one Hydra config ``conf/dataset/<name>.yaml`` each)."""

COMMON_KEYS = (
    "name",
    "root",
    "seed",
    "download",
    "val_per_class",
    "meta_source",
    "meta_warmup",
    "meta_refresh",
)
"""Keys every dataset accepts besides its own parameters."""

META_SOURCES = ("clean", "small_loss")
"""``dataset.meta_source``: ``clean``, the hand-checked meta split; ``small_loss``, meta
examples chosen from the noisy training set by their loss (``reweight.train.meta_source``)."""


def dataset_defaults(name: str) -> dict[str, Any]:
    """The dataset-specific parameters of ``name`` and their defaults."""
    return dict(_REGISTRY[check_choice("name", name, DATASETS)].defaults)


def default_val_per_class(name: str) -> int:
    """The default ``dataset.val_per_class`` of ``name`` (``conf/dataset/<name>.yaml`` says
    the same; a test keeps them equal)."""
    return _REGISTRY[check_choice("name", name, DATASETS)].val_per_class


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
    val_per_class: int | None = None,
    meta_source: str = "clean",
    meta_warmup: int = 200,
    meta_refresh: int = 500,
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

    Example: ``build_dataset("cifar10_noisy", noise_type="flip", noise_rate=0.4, seed=1)``.

    ``val_per_class`` (default: :func:`default_val_per_class`; 0: none) clean examples per class
    form ``bundle.val``, the validation set a sweep optimises: from the trusted pool the meta set
    comes from, disjoint from train, meta and test, evaluated without augmentation.

    ``meta_source="small_loss"``: no clean image serves the meta step. The splits are drawn as
    for ``clean``, then ``bundle.meta`` is emptied; the Trainer takes ``meta_per_class`` meta
    examples per class from the noisy training set by their loss after ``meta_warmup`` steps,
    again every ``meta_refresh`` (``reweight.train.meta_source``). The validation set stays clean.
    """
    spec = _REGISTRY[check_choice("name", name, DATASETS)]
    _check_keys(name, spec, params, seed, download)
    resolved = {**spec.defaults, **params}
    n_val = spec.val_per_class if val_per_class is None else val_per_class
    check_int("val_per_class", n_val, minimum=0)
    check_choice("meta_source", meta_source, META_SOURCES)
    check_int("meta_warmup", meta_warmup, minimum=0)
    check_int("meta_refresh", meta_refresh, minimum=0)
    data_root = resolve_data_root(root)
    generator = torch.Generator().manual_seed(seed)
    bundle = _build(spec, data_root, generator, download, resolved, n_val)
    source = _meta_source(bundle, meta_source, resolved, meta_warmup, meta_refresh)
    bundle.info = {
        **_describe(bundle, name, resolved, seed, data_root, n_val, spec.true_labels_known),
        **bundle.info,
        "meta_source": source,
    }
    sizes = (len(bundle.train), bundle.info["num_corrupted"], len(bundle.meta))
    sizes += (bundle.info["split_sizes"]["val"], len(bundle.test))
    logger.info(
        "dataset %s (seed %d): %d train (%d corrupted), %d meta, %d val, %d test",
        name,
        seed,
        *sizes,
    )
    return bundle


def _meta_source(
    bundle: DataBundle, name: str, resolved: dict[str, Any], warmup: int, refresh: int
) -> dict[str, Any]:
    """What ``bundle.info["meta_source"]`` records; with ``small_loss`` nothing of the clean
    meta split is handed on (``bundle.meta`` emptied)."""
    source: dict[str, Any] = {"name": name}
    if name == "small_loss":
        per_class = resolved.get("meta_per_class") or 10
        bundle.meta = _subset(bundle.meta, torch.zeros(len(bundle.meta), dtype=torch.bool), None)
        source.update(per_class=per_class, warmup=warmup, refresh=refresh)
    return source


def _check_keys(name: str, spec: _Spec, params: dict[str, Any], seed: Any, download: Any) -> None:
    """``ValueError`` for a key ``name`` does not take, a bad ``seed`` or ``download``."""
    unknown = sorted(set(params) - set(spec.defaults))
    if unknown:
        allowed = ", ".join([*COMMON_KEYS, *spec.defaults])
        raise ValueError(
            f"unknown parameter {unknown[0]!r} for dataset {name!r}; allowed keys: {allowed}"
        )
    check_int("seed", seed, minimum=0)
    check_bool("download", download)


def _build(
    spec: _Spec,
    data_root: Path,
    generator: torch.Generator,
    download: bool,
    resolved: dict[str, Any],
    n_val: int,
) -> DataBundle:
    """The bundle from the dataset's builder, with ``n_val`` validation examples per class."""
    if spec.native_val:
        return spec.builder(
            data_root,
            generator=generator,
            download=download,
            val_per_class=n_val,
            **spec.fixed,
            **resolved,
        )
    # meta_per_class None (your own data): the whole trusted pool, less the validation set
    n_meta = resolved["meta_per_class"]
    if n_meta is not None:
        n_meta = check_int("meta_per_class", n_meta, minimum=1)
    drawn = {**resolved, "meta_per_class": None if n_meta is None else n_meta + n_val}
    try:
        bundle = spec.builder(
            data_root, generator=generator, download=download, **spec.fixed, **drawn
        )
    except ValueError as err:
        if n_val and "meta_per_class" in str(err):
            together = f"meta_per_class={n_meta} + val_per_class={n_val}"
            message = str(err).replace(f"meta_per_class={n_meta + n_val}", together)
            raise ValueError(
                f"{message} (the meta and validation sets are drawn together from the "
                "same pool: lower dataset.val_per_class or dataset.meta_per_class)"
            ) from err
        raise
    if n_val:
        bundle.meta, bundle.val = split_validation(
            bundle.meta, bundle.test, bundle.num_classes, n_meta, n_val
        )
    return bundle


def _describe(
    bundle: DataBundle,
    name: str,
    resolved: dict[str, Any],
    seed: int,
    data_root: Path,
    n_val: int,
    true_labels_known: bool,
) -> dict[str, Any]:
    """What ``dataset.json`` records of a built bundle (its own ``info`` is added after)."""
    k = bundle.num_classes
    val = bundle.val
    return {
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
            "val": len(val) if val is not None else 0,
        },
        "val_per_class": n_val,
        "train_class_counts": class_counts(bundle.train_labels, k),
        "true_class_counts": class_counts(bundle.true_labels, k),
        "meta_class_counts": class_counts(bundle.meta.labels, k),
        "test_class_counts": class_counts(bundle.test.labels, k),
        "val_class_counts": class_counts(val.labels, k) if val is not None else [],
        "num_corrupted": int(bundle.corrupted.sum()),
        # False for your own data: its labels are as given, and num_corrupted counts only
        # the synthetic corruption (dataset.noise_rate), not the noise the labels may carry
        "true_labels_known": true_labels_known,
        "indices_hash": tensor_hash(
            bundle.train.source_indices, bundle.meta.source_indices, bundle.test.source_indices
        ),
        "labels_hash": tensor_hash(bundle.train_labels, bundle.true_labels),
    }


def split_validation(
    meta: Any, test: Any, num_classes: int, meta_per_class: int | None, val_per_class: int
) -> tuple[Any, Any]:
    """Split a meta set drawn with ``meta_per_class + val_per_class`` per class: per class, the
    first ``meta_per_class`` (in source order; the draw was random) stay meta, the rest become
    the validation set, which gets the test set's transform (no augmentation) where there is
    one. ``meta_per_class=None`` (a trusted pool taken whole): the last ``val_per_class`` of
    each class become the validation set, and at least one must stay. Works on ``TensorData``
    and on CIFAR's ``RelabeledSubset``."""
    labels = meta.labels
    rank = torch.zeros_like(labels)
    keep = torch.zeros_like(labels, dtype=torch.bool)
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        rank[members] = torch.arange(members.numel())
        n_keep = meta_per_class if meta_per_class is not None else members.numel() - val_per_class
        if meta_per_class is None and members.numel() and n_keep < 1:
            raise ValueError(
                f"the trusted set has {members.numel()} example(s) of class {c}, but "
                f"val_per_class={val_per_class} of them would go to the validation set and at "
                "least one must stay trusted: lower dataset.val_per_class (0: no validation set) "
                "or give more trusted examples"
            )
        keep[members] = rank[members] < n_keep
    return _subset(meta, keep, None), _subset(meta, ~keep, getattr(test, "transform", None))


def _subset(data: Any, mask: Tensor, transform: Any) -> Any:
    if isinstance(data, TensorData):
        return TensorData(data.inputs[mask], data.labels[mask], data.source_indices[mask])
    kind = type(data)  # RelabeledSubset(base, source_indices, labels, transform)
    return kind(
        data.base,
        data.source_indices[mask],
        data.labels[mask],
        transform if transform is not None else data.transform,
    )
