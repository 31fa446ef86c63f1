"""Your own table or tensor file (``tensors``): a CSV, ``.pt`` or ``.npz`` file read into memory,
then split by :func:`reweight.data.own.make_bundle`.

Example::

    bundle = build_dataset("tensors", path="table.csv", label_column="label", meta_rows=[0, 5])
"""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from reweight.data.core import DataBundle
from reweight.data.own import SplitProtocol, check_unique, make_bundle, no_trusted_set

__all__ = ["build_tensors"]


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
    protocol = SplitProtocol(
        meta_per_class, test_fraction, standardize, noise_type, noise_rate, imbalance_factor
    )
    protocol.check()
    if path is None:
        raise ValueError("dataset.path is not set: give a .csv, .pt or .npz file of examples")
    if meta_path is None and not meta_rows:
        raise no_trusted_set("tensors")
    x, raw, ids = _read_any(Path(path), "path", label_column, id_column)
    names = _class_names(raw, classes, path)
    y = _encode(raw, names, path)

    def load(file: str, key: str) -> tuple[Tensor, Tensor]:
        return _load_like(x, path, file, key, names, (label_column, id_column))

    meta: tuple[Tensor, Tensor] | list[int]
    if meta_path is not None:
        meta = load(meta_path, "meta_path")
    else:
        meta = _trusted_rows(list(meta_rows or []), len(ids), path)
    test = load(test_path, "test_path") if test_path is not None else None
    info: dict[str, Any] = {"source": "tensors", "path": str(Path(path).resolve())}
    if math.prod(x.shape[1:]) == 0:
        raise ValueError(f"{path} has no feature column besides {label_column!r}")
    return make_bundle(
        "tensors", (x, y, ids), meta, test, names, protocol, generator=generator, info=info
    )


def _load_like(
    x: Tensor, path: str, file: str, key: str, names: list[str], columns: tuple[str, str | None]
) -> tuple[Tensor, Tensor]:
    """The examples and encoded labels of ``file``, whose examples must have the shape of those
    of ``path`` (``x``); ``columns``: the label and id columns."""
    fx, fraw, _ = _read_any(Path(file), key, *columns)
    if tuple(fx.shape[1:]) != tuple(x.shape[1:]):
        raise ValueError(
            f"{file} has examples of shape {tuple(fx.shape[1:])}, {path} of shape "
            f"{tuple(x.shape[1:])}: both need the same feature columns"
        )
    return fx, _encode(fraw, names, file)


def _class_names(raw: list[str], classes: list[str] | None, path: str) -> list[str]:
    """``classes`` as strings, else the distinct labels of ``raw`` sorted (as numbers when they
    are all integers)."""
    if classes is not None:
        names = [str(c) for c in classes]
    else:
        distinct = sorted(set(raw))
        numeric = all(v.lstrip("-").isdigit() for v in distinct)
        names = sorted(distinct, key=int) if numeric else distinct
    if len(names) < 2:
        raise ValueError(f"{path} has {len(names)} class ({', '.join(names)}): need at least 2")
    return names


def _encode(labels: list[str], names: list[str], file: str) -> Tensor:
    """Each label's index in ``names`` (int64); a label not in it is an error naming ``file``."""
    index = {name: i for i, name in enumerate(names)}
    for r, v in enumerate(labels):
        if v not in index:
            raise ValueError(
                f"{file} has the label {v!r} on data row {r}, not one of the classes "
                f"({', '.join(names[:10])}{', ...' if len(names) > 10 else ''}): fix the "
                "label or list every class in dataset.classes"
            )
    return torch.tensor([index[v] for v in labels], dtype=torch.int64)


def _trusted_rows(rows: list[int], n: int, path: str) -> list[int]:
    """``dataset.meta_rows`` checked: each once, each a data row of the ``n`` in ``path``."""
    check_unique("dataset.meta_rows", rows)
    bad = [r for r in rows if not isinstance(r, int) or not 0 <= r < n]
    if bad:
        raise ValueError(
            f"dataset.meta_rows has {bad[0]!r}, not a data row of {path} (0 to {n - 1})"
        )
    return rows


def _read_any(
    path: Path, key: str, label_column: str, id_column: str | None
) -> tuple[Tensor, list[str], list[str]]:
    if path.suffix.lower() in (".pt", ".pth", ".npz"):
        return _read_arrays(path, key)
    return _read_table(path, key, label_column, id_column)


# -- CSV files -----------------------------------------------------------------------------------


def _read_table(
    path: Path, key: str, label_column: str, id_column: str | None
) -> tuple[Tensor, list[str], list[str]]:
    """A CSV file: float32 features (N, F) of every column but the label (and id) column, the
    labels as strings, and the ids (``id_column``'s values, else ``row <i>``)."""
    header, body = _csv_rows(path, key)
    li, ii = _columns(path, header, label_column, id_column)
    if not body:
        raise ValueError(f"the CSV file {path} has a header but no data rows")
    features = [j for j in range(len(header)) if j not in (li, ii)]
    values = _feature_values(path, header, body, features)
    labels = [row[li].strip() for row in body]
    if "" in labels:
        raise ValueError(
            f"the CSV file {path} has an empty label in column {label_column!r} on line "
            f"{labels.index('') + 2}: give every row its label, or remove the row"
        )
    if ii is None:
        return torch.from_numpy(values), labels, [f"row {r}" for r in range(len(body))]
    return torch.from_numpy(values), labels, _unique_ids(path, body, ii, id_column)


def _csv_rows(path: Path, key: str) -> tuple[list[str], list[list[str]]]:
    """The header and the non-empty data rows of a CSV file."""
    if not path.is_file():
        raise FileNotFoundError(f"dataset.{key}={str(path)!r} is not a file: give a CSV file")
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"cannot read the CSV file {path} ({err}): fix or replace it") from err
    if not rows:
        raise ValueError(f"the CSV file {path} is empty: it needs a header row and data rows")
    return rows[0], [r for r in rows[1:] if r]


def _columns(
    path: Path, header: list[str], label_column: str, id_column: str | None
) -> tuple[int, int | None]:
    """The positions of the label column and of the id column (None: no id column)."""
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
    return header.index(label_column), header.index(id_column) if id_column is not None else None


def _feature_values(
    path: Path, header: list[str], body: list[list[str]], features: list[int]
) -> np.ndarray:
    """The ``features`` columns of ``body`` as float32 (rows, features), all finite."""
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
    return values


def _unique_ids(path: Path, body: list[list[str]], ii: int, id_column: str | None) -> list[str]:
    """The id column's values, each on one row only."""
    ids = [row[ii] for row in body]
    seen: dict[str, int] = {}
    for r, v in enumerate(ids):
        if v in seen:
            raise ValueError(
                f"the CSV file {path} has the id {v!r} on lines {seen[v] + 2} and {r + 2} "
                f"(column {id_column!r}): every row needs its own id"
            )
        seen[v] = r
    return ids


# -- tensor files --------------------------------------------------------------------------------


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
