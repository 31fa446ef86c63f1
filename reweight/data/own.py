"""Your own data: a folder of images (``image_folder``) or a table / tensor file (``tensors``).

Why one file of ~570 lines: the two builders share the trusted set, the test split and the
corruption, and each bad-file message sits beside the read that can fail.

Both builders load everything into memory (:class:`TensorData`), take the trusted (meta) set from
where the user says it is, make a held-out test split when no test set is given (recorded in
``dataset.json``), and can add the synthetic corruption of the built-in datasets (label noise from
:mod:`reweight.data.noise`, a long tail from :func:`reweight.data.splits.subsample_per_class`),
seeded by ``dataset.seed``, so that a method can be measured on the user's data.

A bad file is a ``ValueError`` (or ``FileNotFoundError``) whose one-line message names the file
and the fix; the CLI prints it as ``error: ...`` with exit status 2.

Example::

    bundle = build_dataset("image_folder", train_dir="pets/train", meta_dir="pets/trusted")
    bundle = build_dataset("tensors", path="table.csv", label_column="label", meta_rows=[0, 5])
"""

from __future__ import annotations

import csv
import logging
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from reweight.data._validate import check_at_least, check_bool, check_choice, check_int, check_rate
from reweight.data.core import DataBundle, TensorData
from reweight.data.noise import NOISE_TYPES, corrupt_labels, noise_matrix
from reweight.data.splits import (
    class_counts,
    long_tail_counts,
    noise_info,
    subsample_per_class,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "build_image_folder",
    "build_tensors",
    "held_out_note",
    "make_bundle",
]

log = logging.getLogger(__name__)

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".webp")
"""Files read as images (by ``torchvision.io.decode_image``); other files are ignored."""

_DECODER_DEPRECATED = "The image decoding and encoding capabilities of TorchVision are deprecated"

_NO_META = (
    "no trusted set: give dataset.{pool} ({kind}) or dataset.{rows} (the training {what} whose "
    "labels you trust, e.g. dataset.{rows}={example}); reweight learns the weights from it"
)


# -- shared: trusted set, held-out test split, corruption, the bundle ----------------------------


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


def _check_common(
    test_fraction: float, noise_type: str, noise_rate: float, imbalance_factor: float
) -> None:
    check_rate("test_fraction", test_fraction)
    check_choice("noise_type", noise_type, NOISE_TYPES)
    check_rate("noise_rate", noise_rate)
    check_at_least("imbalance_factor", imbalance_factor, 1.0)


def make_bundle(
    name: str,
    train: tuple[Tensor, Tensor, list[str]],
    meta: tuple[Tensor, Tensor] | Sequence[int],
    test: tuple[Tensor, Tensor] | None,
    class_names: list[str],
    *,
    generator: torch.Generator,
    meta_per_class: int | None,
    test_fraction: float,
    noise_type: str,
    noise_rate: float,
    imbalance_factor: float,
    standardize: bool,
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
    n = y.shape[0]
    keep = torch.ones(n, dtype=torch.bool)
    if isinstance(meta, tuple):
        meta_x, meta_y = meta
    else:
        rows = torch.as_tensor(list(meta), dtype=torch.int64)
        keep[rows] = False
        meta_x, meta_y = x[rows], y[rows]
    if meta_per_class is not None:
        counts = class_counts(meta_y, k)
        short = [c for c in range(k) if counts[c] < meta_per_class]
        if short:
            raise ValueError(
                f"meta_per_class={meta_per_class} but the trusted set has {counts[short[0]]} "
                f"examples of class {class_names[short[0]]!r}; lower dataset.meta_per_class or "
                "set it to null to use the whole trusted set"
            )
        chosen = subsample_per_class(meta_y, [meta_per_class] * k, generator)
        meta_x, meta_y = meta_x[chosen], meta_y[chosen]
    missing = [class_names[c] for c, m in enumerate(class_counts(meta_y, k)) if m == 0]
    pool = keep.nonzero().squeeze(1)
    if test is None:
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
        test = (x[held], y[held])  # the labels as given: the synthetic corruption comes later
        note = held_out_note(name)
        info["held_out_test"] = {"fraction": test_fraction, "indices": held.tolist(), "note": note}
        log.warning("%s", note)
        pool = keep.nonzero().squeeze(1)
    if imbalance_factor > 1:
        pool_y = y[pool]
        counts = long_tail_counts(min(class_counts(pool_y, k)), k, imbalance_factor)
        pool = pool[subsample_per_class(pool_y, counts, generator)]
        info["imbalance_factor"] = float(imbalance_factor)
        info["long_tail_counts"] = counts
    true = y[pool]
    observed = true.clone()
    if noise_rate > 0:
        T = noise_matrix(noise_type, k, noise_rate, generator)
        observed = corrupt_labels(true, T, generator)
        info.update(noise_type=noise_type, noise_rate=float(noise_rate))
        info.update(noise_info(true, observed, T))
    train_x = x[pool]
    test_x, test_y = test
    if standardize:
        dims = [0, *range(2, train_x.dim())]  # per feature (tables), per channel (images)
        mean = train_x.mean(dim=dims, keepdim=True)
        std = train_x.std(dim=dims, keepdim=True).nan_to_num(1.0)
        std = torch.where(std > 0, std, torch.ones_like(std))
        train_x, meta_x, test_x = ((t - mean) / std for t in (train_x, meta_x, test_x))
        info["standardized"] = {"mean": mean.flatten().tolist(), "std": std.flatten().tolist()}
    if missing:
        info["meta_classes_missing"] = missing
        log.warning(
            "the trusted set has no example of class %s: the weights learn nothing about %s; "
            "add trusted examples of %s",
            ", ".join(map(repr, missing)),
            "them" if len(missing) > 1 else "it",
            "each" if len(missing) > 1 else "it",
        )
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


# -- image folders -------------------------------------------------------------------------------


def _class_folders(folder: Path, key: str) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(
            f"dataset.{key}={str(folder)!r} is not a folder: give a folder holding one "
            "subfolder of images per class"
        )
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(
            f"{folder} has no class folders: put the images of each class in a subfolder named "
            "after the class (ImageFolder layout)"
        )
    return classes


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _read_image(path: Path, grayscale: bool, size: int | None) -> Tensor:
    """(C, H, W) float32 in [0, 1] (an 8-bit or a 16-bit image alike); resized (bilinear,
    antialiased) to size x size if given."""
    from torchvision.io import ImageReadMode, decode_image

    try:
        data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
        mode = ImageReadMode.GRAY if grayscale else ImageReadMode.RGB
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its decoders in favour of torchcodec, which is not a
            # dependency; they still work, and warnings are errors under pytest
            warnings.filterwarnings("ignore", _DECODER_DEPRECATED, DeprecationWarning)
            image = decode_image(data, mode=mode)
    except (RuntimeError, ValueError, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(
            f"cannot read the image {path} ({reason}): replace or delete the file"
        ) from err
    # by the range of its own type: 8-bit / 255, 16-bit (PNG) / 65535
    x = image.to(torch.float32) / float(torch.iinfo(image.dtype).max)
    if size is not None and tuple(x.shape[1:]) != (size, size):
        x = F.interpolate(
            x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )[0]
    return x


def _load_folder(
    folder: Path,
    key: str,
    class_names: list[str] | None,
    grayscale: bool,
    size: int | None,
) -> tuple[Tensor, Tensor, list[str], list[str]]:
    """Images and labels of an ImageFolder tree; ``class_names`` (of the training folder) fixes
    the label of each class folder, and a class folder it does not know is an error."""
    folders = _class_folders(folder, key)
    names = class_names or [p.name for p in folders]
    images: list[Tensor] = []
    labels: list[int] = []
    ids: list[str] = []
    for sub in folders:
        if sub.name not in names:
            raise ValueError(
                f"{sub} is a class the training folder does not have (classes: "
                f"{', '.join(names)}): rename or remove it"
            )
        files = _image_files(sub)
        if not files and class_names is None:
            raise ValueError(
                f"the class folder {sub} holds no image ({', '.join(IMAGE_EXTENSIONS)}): add "
                "images or remove the folder"
            )
        for path in files:
            x = _read_image(path, grayscale, size)
            if images and x.shape != images[0].shape:
                raise ValueError(
                    f"the image {path} is {x.shape[2]}x{x.shape[1]} but {ids[0]} is "
                    f"{images[0].shape[2]}x{images[0].shape[1]}: set dataset.image_size to "
                    "resize every image"
                )
            images.append(x)
            labels.append(names.index(sub.name))
            ids.append(str(path))
    if not images:
        raise ValueError(f"{folder} holds no image: put the images in its class folders")
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64), ids, names


def build_image_folder(
    root: Path,
    *,
    generator: torch.Generator,
    download: bool,
    train_dir: str | None,
    meta_dir: str | None,
    meta_files: list[str] | None,
    meta_per_class: int | None,
    test_dir: str | None,
    test_fraction: float,
    image_size: int | None,
    grayscale: bool,
    standardize: bool,
    noise_type: str,
    noise_rate: float,
    imbalance_factor: float,
) -> DataBundle:
    """Images in class folders (``train_dir/<class>/<image>``): labels from the folder names.

    The trusted set is ``meta_dir`` (the same class folders) or ``meta_files`` (paths, relative
    to ``train_dir``, of training images whose labels you trust: they leave the training set).
    ``test_dir`` is the test set; without it ``test_fraction`` of the training images are held
    out. Images are read with ``torchvision.io`` (PNG, JPEG, GIF, WebP) as grayscale (1 channel)
    or RGB (3), resized to ``image_size`` squares if given (else they must share one size).
    ``root`` and ``download`` are unused (paths are as given, relative to the working folder).
    """
    _check_common(test_fraction, noise_type, noise_rate, imbalance_factor)
    check_bool("grayscale", grayscale)
    check_bool("standardize", standardize)
    if image_size is not None:
        check_int("image_size", image_size, minimum=1)
    if meta_per_class is not None:
        check_int("meta_per_class", meta_per_class, minimum=1)
    if train_dir is None:
        raise ValueError(
            "dataset.train_dir is not set: give the folder of training images, one subfolder "
            "per class (dataset.train_dir=path/to/train)"
        )
    if meta_dir is None and not meta_files:
        raise ValueError(
            _NO_META.format(
                pool="meta_dir",
                kind="a folder with the same class folders",
                rows="meta_files",
                what="images, paths relative to train_dir",
                example="[cat/1.png,dog/7.png]",
            )
        )
    train = Path(train_dir)
    x, y, ids, names = _load_folder(train, "train_dir", None, grayscale, image_size)
    shape = (int(x.shape[-2]), int(x.shape[-1]))

    def load(folder: str, key: str) -> tuple[Tensor, Tensor]:
        fx, fy, fids, _ = _load_folder(Path(folder), key, names, grayscale, image_size)
        if tuple(fx.shape[-2:]) != shape:
            raise ValueError(
                f"the image {fids[0]} is {fx.shape[-1]}x{fx.shape[-2]} but the training images "
                f"are {shape[1]}x{shape[0]}: set dataset.image_size to resize every image"
            )
        return fx, fy

    meta: tuple[Tensor, Tensor] | list[int]
    if meta_dir is not None:
        meta = load(meta_dir, "meta_dir")
    else:
        position = {Path(p).resolve(): i for i, p in enumerate(ids)}
        meta = []
        _check_unique("dataset.meta_files", list(meta_files or []))
        for name in meta_files or []:
            found = position.get((train / name).resolve())
            if found is None:
                raise ValueError(
                    f"dataset.meta_files names {train / name}, which is not an image of "
                    f"dataset.train_dir={train_dir}: give paths relative to train_dir"
                )
            meta.append(found)
    test = load(test_dir, "test_dir") if test_dir is not None else None
    info: dict[str, Any] = {
        "source": "image_folder",
        "train_dir": str(train.resolve()),
        "image_shape": list(x.shape[1:]),
    }
    return make_bundle(
        "image_folder",
        (x, y, ids),
        meta,
        test,
        names,
        generator=generator,
        meta_per_class=meta_per_class,
        test_fraction=test_fraction,
        noise_type=noise_type,
        noise_rate=noise_rate,
        imbalance_factor=imbalance_factor,
        standardize=standardize,
        info=info,
    )


# -- tables and tensor files ---------------------------------------------------------------------


def _read_table(
    path: Path, key: str, label_column: str, id_column: str | None
) -> tuple[Tensor, list[str], list[str]]:
    """A CSV file: float32 features (N, F) of every column but the label (and id) column, the
    labels as strings, and the ids (``id_column``'s values, else ``row <i>``)."""
    if not path.is_file():
        raise FileNotFoundError(f"dataset.{key}={str(path)!r} is not a file: give a CSV file")
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"cannot read the CSV file {path} ({err}): fix or replace it") from err
    if not rows:
        raise ValueError(f"the CSV file {path} is empty: it needs a header row and data rows")
    header, body = rows[0], [r for r in rows[1:] if r]
    if label_column not in header:
        raise ValueError(
            f"the CSV file {path} has no column {label_column!r} (columns: "
            f"{', '.join(header[:10])}{', ...' if len(header) > 10 else ''}): set "
            "dataset.label_column to the column holding the labels"
        )
    if id_column is not None and id_column not in header:
        raise ValueError(
            f"the CSV file {path} has no column {id_column!r} (dataset.id_column): name one of "
            f"its columns or set it to null"
        )
    if not body:
        raise ValueError(f"the CSV file {path} has a header but no data rows")
    li = header.index(label_column)
    ii = header.index(id_column) if id_column is not None else None
    features = [j for j in range(len(header)) if j not in (li, ii)]
    values = np.empty((len(body), len(features)), dtype=np.float32)
    for r, row in enumerate(body):
        if len(row) != len(header):
            raise ValueError(
                f"the CSV file {path} has {len(row)} fields on line {r + 2}, the header "
                f"{len(header)}: fix that line"
            )
        for c, j in enumerate(features):
            try:
                values[r, c] = float(row[j])
            except ValueError:
                raise ValueError(
                    f"the CSV file {path} has a non-numeric value {row[j]!r} in column "
                    f"{header[j]!r} on line {r + 2}: feature columns must be numbers (name an "
                    "identifier column with dataset.id_column)"
                ) from None
    if not np.isfinite(values).all():
        r = int(np.argwhere(~np.isfinite(values))[0][0])
        raise ValueError(f"the CSV file {path} has NaN or infinity on line {r + 2}: fix it")
    labels = [row[li].strip() for row in body]
    if "" in labels:
        raise ValueError(
            f"the CSV file {path} has an empty label in column {label_column!r} on line "
            f"{labels.index('') + 2}: give every row its label, or remove the row"
        )
    ids = [row[ii] for row in body] if ii is not None else [f"row {r}" for r in range(len(body))]
    if ii is not None:
        seen: dict[str, int] = {}
        for r, v in enumerate(ids):
            if v in seen:
                raise ValueError(
                    f"the CSV file {path} has the id {v!r} on lines {seen[v] + 2} and {r + 2} "
                    f"(column {id_column!r}): every row needs its own id"
                )
            seen[v] = r
    return torch.from_numpy(values), labels, ids


def _read_arrays(path: Path, key: str) -> tuple[Tensor, list[str], list[str]]:
    """A ``.pt`` file (a dict with tensors ``x`` and ``y``) or ``.npz`` (arrays ``x``, ``y``)."""
    if not path.is_file():
        raise FileNotFoundError(f"dataset.{key}={str(path)!r} is not a file")
    try:
        with warnings.catch_warnings():  # torch warns of pickle protocols before it refuses
            warnings.simplefilter("ignore")
            if path.suffix == ".npz":
                with np.load(path, allow_pickle=False) as z:
                    data = {k: z[k] for k in z.files}
            else:
                data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file: zip, pickle and torch errors differ
        raise ValueError(f"cannot read {path} ({_why(err)}): fix or replace it") from err
    if not isinstance(data, dict) or "x" not in data or "y" not in data:
        raise ValueError(
            f"{path} must hold a dict of a features tensor 'x' (N, ...) and a labels tensor 'y' "
            "(N,): e.g. torch.save({'x': x, 'y': y}, path) or numpy.savez(path, x=x, y=y)"
        )
    x, y = _as_tensor(data["x"], path, "x"), _as_tensor(data["y"], path, "y")
    if x.dim() == 0:
        raise ValueError(
            f"{path}: 'x' is a single number; it needs one row per example, shape (N, ...)"
        )
    if x.dtype == torch.bool or x.dtype.is_complex:
        raise ValueError(f"{path}: 'x' must be numbers (float or integer); got dtype {x.dtype}")
    if x.dtype.is_floating_point and not bool(torch.isfinite(x).all()):
        row = int((~torch.isfinite(x.reshape(x.shape[0], -1))).any(1).nonzero()[0])
        raise ValueError(f"{path} has NaN or infinity in 'x' at row {row} (0-based): fix it")
    if y.dim() != 1 or y.shape[0] != x.shape[0] or y.dtype.is_floating_point:
        raise ValueError(
            f"{path}: 'y' must be integer labels of shape ({x.shape[0]},); got dtype {y.dtype}, "
            f"shape {tuple(y.shape)}"
        )
    return (
        x.to(torch.float32),
        [str(int(v)) for v in y.tolist()],
        [f"row {r}" for r in range(y.shape[0])],
    )


def _why(err: Exception) -> str:
    """A few words on why a tensor file could not be read (never torch's advice to load it
    with ``weights_only=False``, i.e. to run the code it may hold)."""
    if "weights_only" in str(err) or type(err).__name__ == "UnpicklingError":
        return "it holds Python objects other than arrays and plain containers"
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _as_tensor(value: Any, path: Path, name: str) -> Tensor:
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"{path}: {name!r} is not an array of numbers ({type(value).__name__}: {err}): "
            "save a tensor or a numpy array"
        ) from None


def _check_unique(key: str, items: Sequence[Any]) -> None:
    seen = set()
    for item in items:
        if item in seen:
            raise ValueError(f"{key} lists {item!r} twice: list each once")
        seen.add(item)


def _read_any(
    path: Path, key: str, label_column: str, id_column: str | None
) -> tuple[Tensor, list[str], list[str]]:
    if path.suffix.lower() in (".pt", ".pth", ".npz"):
        return _read_arrays(path, key)
    return _read_table(path, key, label_column, id_column)


def build_tensors(
    root: Path,
    *,
    generator: torch.Generator,
    download: bool,
    path: str | None,
    label_column: str,
    id_column: str | None,
    classes: list[str] | None,
    meta_path: str | None,
    meta_rows: list[int] | None,
    meta_per_class: int | None,
    test_path: str | None,
    test_fraction: float,
    standardize: bool,
    noise_type: str,
    noise_rate: float,
    imbalance_factor: float,
) -> DataBundle:
    """Feature vectors and labels from a file: a CSV with a header (``label_column`` holds the
    label, ``id_column`` optionally an identifier, every other column is a numeric feature), or
    a ``.pt`` / ``.npz`` file with ``x`` (N, ...) and integer ``y`` (N,).

    The classes are ``classes`` if given (labels must be among them), else the sorted distinct
    training labels (numerically when they are all integers). The trusted set is ``meta_path``
    (a file of the same kind) or ``meta_rows`` (0-based data rows of ``path``, which leave the
    training set); ``test_path`` is the test set, else ``test_fraction`` is held out. With
    ``standardize`` each feature is standardised with the training set's mean and std.
    """
    _check_common(test_fraction, noise_type, noise_rate, imbalance_factor)
    check_bool("standardize", standardize)
    if meta_per_class is not None:
        check_int("meta_per_class", meta_per_class, minimum=1)
    if path is None:
        raise ValueError("dataset.path is not set: give a .csv, .pt or .npz file of examples")
    if meta_path is None and not meta_rows:
        raise ValueError(
            _NO_META.format(
                pool="meta_path",
                kind="a file like dataset.path",
                rows="meta_rows",
                what="rows, 0-based",
                example="[0,17,42]",
            )
        )
    x, raw, ids = _read_any(Path(path), "path", label_column, id_column)
    if classes is not None:
        names = [str(c) for c in classes]
    else:
        distinct = sorted(set(raw))
        numeric = all(v.lstrip("-").isdigit() for v in distinct)
        names = sorted(distinct, key=int) if numeric else distinct
    if len(names) < 2:
        raise ValueError(f"{path} has {len(names)} class ({', '.join(names)}): need at least 2")

    def encode(labels: list[str], file: str) -> Tensor:
        index = {name: i for i, name in enumerate(names)}
        for r, v in enumerate(labels):
            if v not in index:
                raise ValueError(
                    f"{file} has the label {v!r} on data row {r}, not one of the classes "
                    f"({', '.join(names[:10])}{', ...' if len(names) > 10 else ''}): fix the "
                    "label or list every class in dataset.classes"
                )
        return torch.tensor([index[v] for v in labels], dtype=torch.int64)

    y = encode(raw, path)

    def load(file: str, key: str) -> tuple[Tensor, Tensor]:
        fx, fraw, _ = _read_any(Path(file), key, label_column, id_column)
        if tuple(fx.shape[1:]) != tuple(x.shape[1:]):
            raise ValueError(
                f"{file} has examples of shape {tuple(fx.shape[1:])}, {path} of shape "
                f"{tuple(x.shape[1:])}: both need the same feature columns"
            )
        return fx, encode(fraw, file)

    meta: tuple[Tensor, Tensor] | list[int]
    if meta_path is not None:
        meta = load(meta_path, "meta_path")
    else:
        meta = list(meta_rows or [])
        _check_unique("dataset.meta_rows", meta)
        bad = [r for r in meta if not isinstance(r, int) or not 0 <= r < len(ids)]
        if bad:
            raise ValueError(
                f"dataset.meta_rows has {bad[0]!r}, not a data row of {path} (0 to {len(ids) - 1})"
            )
    test = load(test_path, "test_path") if test_path is not None else None
    info: dict[str, Any] = {"source": "tensors", "path": str(Path(path).resolve())}
    if math.prod(x.shape[1:]) == 0:
        raise ValueError(f"{path} has no feature column besides {label_column!r}")
    return make_bundle(
        "tensors",
        (x, y, ids),
        meta,
        test,
        names,
        generator=generator,
        meta_per_class=meta_per_class,
        test_fraction=test_fraction,
        noise_type=noise_type,
        noise_rate=noise_rate,
        imbalance_factor=imbalance_factor,
        standardize=standardize,
        info=info,
    )
