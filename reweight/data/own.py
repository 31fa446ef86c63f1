"""Your own data: the split protocol that both builders share, from loaded tensors to a bundle.

The builders are :func:`reweight.data.own_images.build_image_folder` (a folder of images,
``image_folder``) and :func:`reweight.data.own_tables.build_tensors` (a table / tensor file,
``tensors``). Both load everything into memory (:class:`TensorData`) and hand it to
:func:`make_bundle`, which takes the trusted (meta) set from where the user says it is, makes a
held-out test split when no test set is given (recorded in ``dataset.json``), and can add the
synthetic corruption of the built-in datasets (label noise from :mod:`reweight.data.noise`, a
long tail from :func:`reweight.data.splits.subsample_per_class`), seeded by ``dataset.seed``, so
that a method can be measured on the user's data.

A bad file is a ``ValueError`` (or ``FileNotFoundError``) whose one-line message names the file
and the fix; the CLI prints it as ``error: ...`` with exit status 2.

Example::

    bundle = build_dataset("image_folder", train_dir="pets/train", meta_dir="pets/trusted")
    bundle = build_dataset("tensors", path="table.csv", label_column="label", meta_rows=[0, 5])
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from reweight.data._validate import check_at_least, check_bool, check_choice, check_int, check_rate
from reweight.data.core import DataBundle, TensorData
from reweight.data.noise import NOISE_TYPES, corrupt_labels, noise_matrix
from reweight.data.splits import class_counts, long_tail_counts, noise_info, subsample_per_class

__all__ = ["SplitProtocol", "held_out_note", "make_bundle"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitProtocol:
    """The keys both builders share: how the trusted set is drawn, the test set held out, the
    features standardised and the training labels corrupted (see :func:`make_bundle`)."""

    meta_per_class: int | None
    test_fraction: float
    standardize: bool
    noise_type: str
    noise_rate: float
    imbalance_factor: float

    def check(self) -> None:
        """A ``ValueError`` naming the first key out of its range."""
        check_rate("test_fraction", self.test_fraction)
        check_choice("noise_type", self.noise_type, NOISE_TYPES)
        check_rate("noise_rate", self.noise_rate)
        check_at_least("imbalance_factor", self.imbalance_factor, 1.0)
        check_bool("standardize", self.standardize)
        if self.meta_per_class is not None:
            check_int("meta_per_class", self.meta_per_class, minimum=1)


def no_trusted_set(name: str) -> ValueError:
    """The error of builder ``name`` (image_folder, tensors) given no trusted set."""
    pool, kind, rows, what, example = {
        "image_folder": (
            "meta_dir",
            "a folder with the same class folders",
            "meta_files",
            "images, paths relative to train_dir",
            "[cat/1.png,dog/7.png]",
        ),
        "tensors": (
            "meta_path",
            "a file like dataset.path",
            "meta_rows",
            "rows, 0-based",
            "[0,17,42]",
        ),
    }[name]
    return ValueError(
        f"no trusted set: give dataset.{pool} ({kind}) or dataset.{rows} (the training {what} "
        f"whose labels you trust, e.g. dataset.{rows}={example}); reweight learns the weights "
        "from it"
    )


def check_unique(key: str, items: Sequence[Any]) -> None:
    seen = set()
    for item in items:
        if item in seen:
            raise ValueError(f"{key} lists {item!r} twice: list each once")
        seen.add(item)


def held_out_note(name: str) -> str:
    """What a test set held out of the training data means for its accuracy (logged, and in
    ``dataset.json`` and ``summary.json``)."""
    key = "dataset.test_dir" if name == "image_folder" else "dataset.test_path"
    return (
        f"the test set is held out of the training data (no {key} given): its labels are as "
        "given there and carry whatever noise the training labels have (never the synthetic "
        f"dataset.noise_rate), so test accuracy is measured against them; give {key} with "
        "labels you trust for a clean test accuracy"
    )


def make_bundle(
    name: str,
    train: tuple[Tensor, Tensor, list[str]],
    meta: tuple[Tensor, Tensor] | Sequence[int],
    test: tuple[Tensor, Tensor] | None,
    class_names: list[str],
    protocol: SplitProtocol,
    *,
    generator: torch.Generator,
    info: dict[str, Any],
) -> DataBundle:
    """A :class:`DataBundle` from loaded tensors: the split protocol of every user dataset.

    ``train`` is ``(inputs, labels, ids)`` (ids: file paths or row numbers, kept per example in
    ``DataBundle.train_ids`` for ``suspects.csv``). ``meta`` is a trusted ``(inputs, labels)`` pool,
    or positions in ``train`` whose labels are trusted (taken out of training). Generator order:
    ``meta_per_class`` draw from the trusted pool, held-out test split (only when ``test`` is
    None: ``round(test_fraction * N)`` random examples), long tail (``imbalance_factor > 1``),
    noise matrix and corruption (``noise_rate > 0``). With ``standardize`` every feature (images:
    every channel) is shifted and scaled by the training set's mean and std.
    """
    x, y, ids = train
    k = len(class_names)
    keep = torch.ones(y.shape[0], dtype=torch.bool)  # the training examples left
    meta_x, meta_y = _trusted_pool(x, y, meta, keep)
    if protocol.meta_per_class is not None:
        chosen = _draw_trusted(meta_y, protocol.meta_per_class, class_names, generator)
        meta_x, meta_y = meta_x[chosen], meta_y[chosen]
    missing = [class_names[c] for c, m in enumerate(class_counts(meta_y, k)) if m == 0]
    if test is None:
        test_x, test_y, held = _hold_out_test(x, y, keep, protocol.test_fraction, generator)
        note = held_out_note(name)
        info["held_out_test"] = {"fraction": protocol.test_fraction, **held, "note": note}
        log.warning("%s", note)
    else:
        test_x, test_y = test
    pool = keep.nonzero().squeeze(1)
    if protocol.imbalance_factor > 1:
        pool = _long_tail(y, pool, k, protocol.imbalance_factor, generator, info)
    true = y[pool]
    observed = _corrupt(true, k, protocol, generator, info)
    train_x = x[pool]
    if protocol.standardize:
        train_x, meta_x, test_x = _standardize(train_x, meta_x, test_x, info)
    if missing:
        _warn_missing(missing, info)
    return DataBundle(
        name=name,
        train=TensorData(train_x, observed, pool),
        meta=TensorData(meta_x, meta_y),
        test=TensorData(test_x, test_y),
        num_classes=k,
        train_labels=observed,
        true_labels=true,
        corrupted=observed != true,
        class_names=list(class_names),
        in_channels=int(train_x.shape[1]) if train_x.dim() == 4 else 1,
        info=info,
        train_ids=[ids[i] for i in pool.tolist()],
    )


def _trusted_pool(
    x: Tensor, y: Tensor, meta: tuple[Tensor, Tensor] | Sequence[int], keep: Tensor
) -> tuple[Tensor, Tensor]:
    """The trusted ``(inputs, labels)``: ``meta`` itself, or the training rows it names (which
    leave the training set: ``keep`` is cleared there)."""
    if isinstance(meta, tuple):
        return meta
    rows = torch.as_tensor(list(meta), dtype=torch.int64)
    keep[rows] = False
    return x[rows], y[rows]


def _draw_trusted(
    meta_y: Tensor, meta_per_class: int, class_names: list[str], generator: torch.Generator
) -> Tensor:
    """Positions of ``meta_per_class`` random trusted examples of each class."""
    k = len(class_names)
    counts = class_counts(meta_y, k)
    short = [c for c in range(k) if counts[c] < meta_per_class]
    if short:
        raise ValueError(
            f"meta_per_class={meta_per_class} but the trusted set has {counts[short[0]]} "
            f"examples of class {class_names[short[0]]!r}; lower dataset.meta_per_class or "
            "set it to null to use the whole trusted set"
        )
    return subsample_per_class(meta_y, [meta_per_class] * k, generator)


def _hold_out_test(
    x: Tensor, y: Tensor, keep: Tensor, test_fraction: float, generator: torch.Generator
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """``round(test_fraction * N)`` random training examples (at least one) as the test set,
    with their labels as given (the synthetic corruption comes later); ``keep`` is cleared
    there. Returns the inputs, the labels and ``{"indices": ...}`` for ``dataset.json``."""
    pool = keep.nonzero().squeeze(1)
    n_test = round(test_fraction * pool.numel())
    if test_fraction > 0 and n_test == 0:
        n_test = 1
    if n_test == 0 or n_test >= pool.numel():
        raise ValueError(
            f"no test set and test_fraction={test_fraction} holds out {n_test} of "
            f"{pool.numel()} training examples; give dataset.test_* or a test_fraction in "
            "(0, 1) that leaves examples on both sides"
        )
    held = pool[torch.randperm(pool.numel(), generator=generator)[:n_test]].sort().values
    keep[held] = False
    return x[held], y[held], {"indices": held.tolist()}


def _long_tail(
    y: Tensor,
    pool: Tensor,
    k: int,
    imbalance_factor: float,
    generator: torch.Generator,
    info: dict[str, Any],
) -> Tensor:
    """The positions of ``pool`` a long tail keeps (``long_tail_counts`` from its rarest class)."""
    pool_y = y[pool]
    counts = long_tail_counts(min(class_counts(pool_y, k)), k, imbalance_factor)
    info["imbalance_factor"] = float(imbalance_factor)
    info["long_tail_counts"] = counts
    return pool[subsample_per_class(pool_y, counts, generator)]


def _corrupt(
    true: Tensor, k: int, protocol: SplitProtocol, generator: torch.Generator, info: dict[str, Any]
) -> Tensor:
    """The observed training labels: ``true``, corrupted when ``noise_rate > 0``."""
    if protocol.noise_rate <= 0:
        return true.clone()
    T = noise_matrix(protocol.noise_type, k, protocol.noise_rate, generator)
    observed = corrupt_labels(true, T, generator)
    info.update(noise_type=protocol.noise_type, noise_rate=float(protocol.noise_rate))
    info.update(noise_info(true, observed, T))
    return observed


def _standardize(
    train_x: Tensor, meta_x: Tensor, test_x: Tensor, info: dict[str, Any]
) -> tuple[Tensor, Tensor, Tensor]:
    """Every split shifted and scaled by the training set's mean and std (a constant feature
    keeps std 1)."""
    dims = [0, *range(2, train_x.dim())]  # per feature (tables), per channel (images)
    mean = train_x.mean(dim=dims, keepdim=True)
    std = train_x.std(dim=dims, keepdim=True).nan_to_num(1.0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    info["standardized"] = {"mean": mean.flatten().tolist(), "std": std.flatten().tolist()}
    return (train_x - mean) / std, (meta_x - mean) / std, (test_x - mean) / std


def _warn_missing(missing: list[str], info: dict[str, Any]) -> None:
    info["meta_classes_missing"] = missing
    log.warning(
        "the trusted set has no example of class %s: the weights learn nothing about %s; "
        "add trusted examples of %s",
        ", ".join(map(repr, missing)),
        "them" if len(missing) > 1 else "it",
        "each" if len(missing) > 1 else "it",
    )
