"""Containers and file handling shared by every dataset: ``DataBundle``, ``TensorData``,
data-root resolution, atomic downloads and the saved label record.

Example::

    >>> import torch
    >>> from torch.utils.data import DataLoader
    >>> data = TensorData(torch.zeros(6, 1, 2, 2), torch.tensor([0, 1, 0, 1, 0, 1]))
    >>> x, y = next(iter(DataLoader(data, batch_size=4)))
    >>> tuple(x.shape), y.tolist()
    ((4, 1, 2, 2), [0, 1, 0, 1])
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from reweight.core.files import INFO_FILE, LABELS_FILE, atomic_write

__all__ = [
    "DATA_DIR_ENV",
    "INFO_FILE",
    "LABELS_FILE",
    "DataBundle",
    "TensorData",
    "download_atomically",
    "resolve_data_root",
    "save_labels",
    "tensor_hash",
]

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "REWEIGHT_DATA_DIR"
"""Environment variable that overrides the default data root ``data/``."""


class TensorData(Dataset):
    """An in-memory dataset: an inputs tensor ``(N, ...)`` and an int64 labels tensor ``(N,)``.

    Items are ``(x, y)`` with ``y`` a Python int. ``__getitems__`` serves a whole batch with one
    tensor index (``torch.utils.data``'s map-style fetcher calls it with the batch's index list when
    it exists), and returns a list of ``(x, y)`` pairs so that the default collate still yields
    ``(x_batch, y_batch)`` tensors.

    ``source_indices`` records, for each item, its index in the split it was taken from (e.g. the
    MNIST training split), which is what disjointness checks and the recorded hashes use.
    """

    def __init__(
        self, inputs: Tensor, labels: Tensor, source_indices: Tensor | None = None
    ) -> None:
        if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(
                f"labels must be a 1-D integer tensor; got dtype {labels.dtype}, "
                f"shape {tuple(labels.shape)}"
            )
        if inputs.shape[0] != labels.shape[0]:
            raise ValueError(
                f"inputs and labels must have the same length; got {inputs.shape[0]} inputs "
                f"and {labels.shape[0]} labels"
            )
        if source_indices is None:
            source_indices = torch.arange(labels.shape[0])
        if source_indices.shape != labels.shape:
            raise ValueError(
                f"source_indices must have shape {tuple(labels.shape)}; "
                f"got {tuple(source_indices.shape)}"
            )
        self.inputs = inputs
        self.labels = labels.to(torch.int64)
        self.source_indices = source_indices.to(torch.int64)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.inputs[index], int(self.labels[index])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, int]]:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        xs = self.inputs[idx]  # (B, ...): one gather instead of B small copies
        return list(zip(xs.unbind(0), self.labels[idx].tolist(), strict=True))


@dataclass
class DataBundle:
    """Everything a run needs from a dataset config.

    ``train`` yields ``(x, y)`` with ``y`` the observed (possibly corrupted) label, and
    ``train_labels`` is exactly that label sequence, in order. ``true_labels`` are the original
    labels of the same examples and ``corrupted = train_labels != true_labels``. ``meta`` is the
    clean meta set, disjoint from ``train``; ``test`` is never corrupted. ``val`` (or None) is
    a clean validation set from the same trusted pool as ``meta``, disjoint from all three.
    ``info`` is a JSON-serialisable record of the parameters, seed, split sizes, class counts,
    noise matrix and measured noise rate, and hashes of the source indices and labels.
    """

    name: str
    train: Dataset
    meta: Dataset
    test: Dataset
    num_classes: int
    train_labels: Tensor
    true_labels: Tensor
    corrupted: Tensor
    class_names: list[str]
    in_channels: int
    info: dict
    # what names each training example in suspects.csv (file paths, CSV ids); None: its index
    train_ids: list[str] | None = None
    val: Dataset | None = None  # clean validation set, disjoint from train, meta and test
    # more test sets, by name, evaluated beside ``test`` (mini_webvision: ``imagenet``,
    # ILSVRC2012's validation images of its 50 classes); never corrupted
    extra_tests: dict[str, Dataset] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.train)
        if self.train_ids is not None and len(self.train_ids) != n:
            raise ValueError(
                f"DataBundle.train_ids must have {n} entries; got {len(self.train_ids)}"
            )
        for key in ("train_labels", "true_labels", "corrupted"):
            value = getattr(self, key)
            if value.shape != (n,):
                raise ValueError(
                    f"DataBundle.{key} must have shape ({n},); got {tuple(value.shape)}"
                )
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"DataBundle.class_names must have num_classes={self.num_classes} entries; "
                f"got {len(self.class_names)}"
            )


def resolve_data_root(root: str | os.PathLike | None = None) -> Path:
    """The data folder: ``root`` if given, else ``$REWEIGHT_DATA_DIR``, else ``data`` (relative
    to the working directory). An empty string counts as not given (so an empty environment
    variable behind ``${oc.env:REWEIGHT_DATA_DIR,data}`` falls back to ``data``). Never creates
    the folder."""
    if root is not None and str(root) != "":
        return Path(root).expanduser()
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path("data")


def tensor_hash(*tensors: Tensor) -> str:
    """SHA-256 of the dtypes, shapes and contents of ``tensors`` (hex digest)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def save_labels(bundle: DataBundle, out_dir: str | os.PathLike) -> Path:
    """Save the observed labels, original labels and corrupted mask of ``bundle``'s training set.

    Writes ``out_dir/labels.pt`` (a dict of tensors ``train_labels``, ``true_labels``,
    ``corrupted``; loadable with ``torch.load(..., weights_only=True)``) and
    ``out_dir/dataset.json`` (``bundle.info``), each atomically. Returns the path of labels.pt.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {  # clone: never serialise a larger storage that a view may point into
        "train_labels": bundle.train_labels.detach().cpu().clone(),
        "true_labels": bundle.true_labels.detach().cpu().clone(),
        "corrupted": bundle.corrupted.detach().cpu().clone(),
    }
    path = atomic_write(out / LABELS_FILE, lambda f: torch.save(payload, f))
    text = json.dumps(bundle.info, indent=2, sort_keys=True).encode()
    atomic_write(out / INFO_FILE, lambda f: f.write(text))
    logger.info(
        "saved %d training labels (%d corrupted) to %s",
        payload["train_labels"].numel(),
        int(payload["corrupted"].sum()),
        path,
    )
    return path


# Errors a torchvision download raises when offline or interrupted: URLError and socket errors
# are OSErrors, torchvision reports failed mirrors and bad checksums as RuntimeError, and a
# truncated archive fails in tarfile or gzip (EOFError).
_DOWNLOAD_ERRORS = (OSError, RuntimeError, tarfile.TarError, EOFError)


def _download_failure(err: BaseException) -> str:
    """A short reason for a failed download, e.g. ``offline? [Errno 111] Connection refused``.

    torchvision's MNIST joins the error of every mirror into one multi-line RuntimeError
    ("Error downloading x:\nTried m, got:\n<urlopen error ...>"): its last line that is not a
    heading is the cause. The full error stays chained to the raised one."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    lines = [line for line in lines if not line.endswith(":")] or [type(err).__name__]
    reason = lines[-1].strip("<>").removeprefix("urlopen error ").strip()
    if isinstance(err, OSError) or "urlopen error" in str(err):  # the network, not the data
        reason = f"offline? {reason}"
    return reason if len(reason) <= 120 else reason[:117] + "..."


def download_atomically(
    root: Path,
    target: str,
    fetch: Callable[[Path], Any],
    *,
    what: str,
    not_found: Callable[[str], str],
) -> Path:
    """Download a dataset folder ``root/target`` without ever leaving a partial one behind.

    ``fetch(tmp)`` must create ``tmp/target`` (e.g. a torchvision dataset constructed with
    ``root=tmp, download=True``). ``tmp`` is a fresh directory inside ``root``, next to the
    target, so the final move is a rename on one filesystem. If the target folder already exists
    (a concurrent run finished first, or an incomplete copy), the files are moved one by one, each
    with an atomic ``os.replace``. Whatever happens, the temporary directory is removed, and so are
    the folders this call created if nothing was put in them.

    A failed download (or a ``root`` that cannot be written) raises ``FileNotFoundError`` with the
    one-line message ``not_found(reason)``, ``reason`` being short (e.g. ``offline? [Errno 111]
    Connection refused``): the caller says where the files were expected and how to provide them.
    """
    dest = root / target
    created = []  # folders above the target that this call creates, deepest first
    parent = root
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{Path(target).name}.download-", dir=root))
    except OSError as err:  # e.g. a read-only data root: nowhere to download into
        _remove_empty(created)
        raise FileNotFoundError(
            not_found(f"cannot write into {root.resolve()}: {err.strerror or err}")
        ) from err
    try:
        logger.info("downloading %s into %s", what, dest)
        try:
            fetch(tmp)
        except _DOWNLOAD_ERRORS as err:
            logger.debug("downloading %s failed: %s", what, err)
            raise FileNotFoundError(not_found(_download_failure(err))) from err
        staged = tmp / target
        if not staged.is_dir():
            raise RuntimeError(f"downloading {what} did not produce the folder {target!r}")
        _move_into_place(staged, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
    return dest


def _remove_empty(folders: list[Path]) -> None:
    """Remove each of ``folders`` (deepest first) that exists and is empty."""
    for folder in folders:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _move_into_place(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists():
        try:
            os.rename(src, dest)  # atomic: the folder appears complete or not at all
            return
        except OSError:
            if not dest.is_dir():  # not the race with a concurrent download: a real error
                raise
    for path in sorted(src.rglob("*")):
        if path.is_file():
            out = dest / path.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, out)
