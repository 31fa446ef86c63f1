"""The CIFAR datasets through the torchvision layer, without the real files or the network.

Small fake CIFAR folders in torchvision's pickle format stand in for the real ones (torchvision's
md5 check is replaced by an existence check), and torchvision's download function is replaced by
one that writes such a folder, or by one that fails like an offline machine. Every image encodes
its own index in the source split, so the tests can check which image each item is.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch.utils.data import DataLoader

from reweight.data import DataBundle, build_dataset, noise_matrix
from reweight.data.cifar import CIFAR10N_FILE, CIFAR_STATS, load_cifar10n_labels
from reweight.data.core import DATA_DIR_ENV, download_atomically

PER_CLASS_TRAIN = 30  # CIFAR-10 fake: 300 training images; CIFAR-100 fake: 3000
PER_CLASS_TEST = 2


def _images(indices: np.ndarray) -> np.ndarray:
    """(N, 3072) uint8 rows: channel 0 is index % 256 everywhere, channel 1 is index // 256."""
    data = np.zeros((indices.size, 3, 1024), dtype=np.uint8)
    data[:, 0, :] = (indices % 256)[:, None]
    data[:, 1, :] = (indices // 256)[:, None]
    return data.reshape(indices.size, 3072)


def write_fake_cifar(root: Path, variant: str) -> Path:
    """A CIFAR folder in torchvision's format with tiny balanced splits (labels interleaved)."""
    cls = torchvision.datasets.CIFAR10 if variant == "cifar10" else torchvision.datasets.CIFAR100
    k = 10 if variant == "cifar10" else 100
    label_key = "labels" if variant == "cifar10" else "fine_labels"
    folder = root / cls.base_folder
    folder.mkdir(parents=True)

    def dump(name: str, obj: object) -> None:
        with open(folder / name, "wb") as f:
            pickle.dump(obj, f)

    train_labels = np.tile(np.arange(k), PER_CLASS_TRAIN)
    chunks = np.array_split(np.arange(train_labels.size), len(cls.train_list))
    for (name, _), idx in zip(cls.train_list, chunks, strict=True):
        dump(name, {"data": _images(idx), label_key: train_labels[idx].tolist()})
    test_labels = np.tile(np.arange(k), PER_CLASS_TEST)
    dump(
        cls.test_list[0][0],
        {"data": _images(np.arange(test_labels.size)), label_key: test_labels.tolist()},
    )
    dump(cls.meta["filename"], {cls.meta["key"]: [f"class{c}" for c in range(k)]})
    return folder


def source_index(x: torch.Tensor, variant: str) -> int:
    """Invert _images on an un-augmented, normalised (3, 32, 32) tensor."""
    mean, std = CIFAR_STATS[variant]
    low = round((x[0, 0, 0].item() * std[0] + mean[0]) * 255)
    high = round((x[1, 0, 0].item() * std[1] + mean[1]) * 255)
    return low + 256 * high


@pytest.fixture(autouse=True)
def fake_torchvision(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Checksums become existence checks; a download writes a fake folder (and is recorded)."""
    calls: list[str] = []

    def exists(fpath: str, md5: str | None = None) -> bool:
        return os.path.isfile(fpath)

    def fake_download(
        url: str,
        download_root: str,
        filename: str | None = None,
        md5: str | None = None,
        **kwargs: object,
    ) -> None:
        calls.append(url)
        write_fake_cifar(Path(download_root), "cifar100" if "100" in url else "cifar10")

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", exists)
    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", fake_download)
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    return calls


@pytest.fixture
def cifar10_root(tmp_path: Path) -> Path:
    write_fake_cifar(tmp_path, "cifar10")
    return tmp_path


def check_bundle(bundle: DataBundle, variant: str) -> None:
    """Invariants of every CIFAR bundle, checked against the images themselves."""
    k = 10 if variant == "cifar10" else 100
    assert bundle.num_classes == k and bundle.in_channels == 3
    assert bundle.class_names == [f"class{c}" for c in range(k)]
    source_labels = torch.arange(k).repeat(PER_CLASS_TRAIN)  # the fake's training labels
    train_idx, meta_idx = bundle.train.source_indices, bundle.meta.source_indices
    assert not set(train_idx.tolist()) & set(meta_idx.tolist())
    assert torch.equal(bundle.true_labels, source_labels[train_idx])
    assert torch.equal(bundle.meta.labels, source_labels[meta_idx])  # meta is clean
    assert torch.equal(bundle.corrupted, bundle.train_labels != bundle.true_labels)
    assert len(bundle.test) == k * PER_CLASS_TEST
    assert bundle.info["split_sizes"] == {
        "train": len(bundle.train),
        "meta": len(bundle.meta),
        "test": len(bundle.test),
    }
    json.dumps(bundle.info)  # serialisable
    # items: the right image (identified by its pixels) with the observed label
    for i in (0, len(bundle.train) // 2, len(bundle.train) - 1):
        x, y = bundle.train[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert y == int(bundle.train_labels[i])
        if not bundle.info["augment"]:
            assert source_index(x, variant) == int(train_idx[i])
    x, y = bundle.test[5]
    assert source_index(x, variant) == 5 and y == 5 % k  # test: normalised, never augmented


# --- the torchvision layer on fake files --------------------------------------------------------


def test_cifar10_noisy(cifar10_root: Path) -> None:
    bundle = build_dataset(
        "cifar10_noisy",
        root=cifar10_root,
        seed=0,
        noise_type="flip",
        noise_rate=0.4,
        meta_per_class=5,
        augment=False,
    )
    check_bundle(bundle, "cifar10")
    assert len(bundle.meta) == 50 and len(bundle.train) == 250
    assert torch.bincount(bundle.meta.labels).tolist() == [5] * 10
    assert bundle.info["noise_rate_measured"] == bundle.corrupted.to(torch.float64).mean().item()
    assert (
        bundle.info["noise_matrix"]
        == noise_matrix("flip", 10, 0.4, torch.Generator().manual_seed(0)).tolist()
    )
    assert bundle.info["source"] == "torchvision.datasets.CIFAR10"
    # a DataLoader yields exactly train_labels, in order
    ys = torch.cat([y for _, y in DataLoader(bundle.train, batch_size=64)])
    assert torch.equal(ys, bundle.train_labels)


def test_cifar_augmentation_on_train_and_meta_only(cifar10_root: Path) -> None:
    bundle = build_dataset("cifar10_noisy", root=cifar10_root, meta_per_class=5)
    assert bundle.info["augment"] is True
    check_bundle(bundle, "cifar10")
    for ds in (bundle.train, bundle.meta):
        names = [type(t).__name__ for t in ds.transform.transforms]
        assert names == ["RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
        crop = ds.transform.transforms[0]
        assert crop.size == (32, 32) and crop.padding == 4
    assert [type(t).__name__ for t in bundle.test.transform.transforms] == ["ToTensor", "Normalize"]
    # a padded crop of a constant non-black image shows the zero padding in some draws
    last = len(bundle.train) - 1
    assert int(bundle.train.source_indices[last]) % 256 != 0
    torch.manual_seed(0)
    crops = torch.stack([bundle.train[last][0] for _ in range(20)])
    assert (crops.std(dim=0) > 0).any()


def test_cifar10_lt(cifar10_root: Path) -> None:
    bundle = build_dataset(
        "cifar10_lt", root=cifar10_root, imbalance_factor=10, meta_per_class=5, augment=False
    )
    check_bundle(bundle, "cifar10")
    expected = [int(25 * 10 ** (-i / 9)) for i in range(10)]
    assert torch.bincount(bundle.train_labels, minlength=10).tolist() == expected
    assert bundle.info["train_class_counts"] == expected
    assert not bundle.corrupted.any()
    assert torch.bincount(bundle.test.labels).tolist() == [PER_CLASS_TEST] * 10  # balanced


def test_cifar100_noisy_and_lt_download_once(tmp_path: Path, fake_torchvision: list[str]) -> None:
    noisy = build_dataset(
        "cifar100_noisy",
        root=tmp_path,
        noise_type="pair",
        noise_rate=0.2,
        meta_per_class=3,
        augment=False,
    )
    check_bundle(noisy, "cifar100")
    assert fake_torchvision == ["https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"]
    lt = build_dataset("cifar100_lt", root=tmp_path, imbalance_factor=20, meta_per_class=3)
    assert fake_torchvision == ["https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"]
    assert torch.bincount(lt.train_labels, minlength=100).tolist() == [
        int(27 * 20 ** (-i / 99)) for i in range(100)
    ]
    # only the dataset folder is left: no archive, no temporary folder
    assert [p.name for p in tmp_path.iterdir()] == ["cifar-100-python"]


def test_meta_set_larger_than_the_fake_class(cifar10_root: Path) -> None:
    with pytest.raises(
        ValueError,
        match=r"meta_per_class=100 is larger than what is available: "
        r"class 0 has 30 examples",
    ):
        build_dataset("cifar10_noisy", root=cifar10_root)  # the default 100 per class


# --- download: atomic, and a clear message offline ----------------------------------------------


def test_download_moves_a_complete_folder_into_place(
    tmp_path: Path, fake_torchvision: list[str]
) -> None:
    root = tmp_path / "new" / "data"  # does not exist yet
    bundle = build_dataset("cifar10_noisy", root=root, meta_per_class=5)
    assert len(fake_torchvision) == 1 and len(bundle.train) == 250
    assert [p.name for p in root.iterdir()] == ["cifar-10-batches-py"]


def test_download_completes_a_partial_folder(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(b"truncated")
    bundle = build_dataset("cifar10_lt", root=tmp_path, meta_per_class=5, imbalance_factor=10)
    assert len(bundle.meta) == 50
    assert (folder / "data_batch_1").stat().st_size > 9
    assert [p.name for p in tmp_path.iterdir()] == ["cifar-10-batches-py"]


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's download writes half an archive, then loses the network."""

    def fail(url: str, download_root: str, filename: str | None = None, **kwargs: object) -> None:
        Path(download_root).mkdir(parents=True, exist_ok=True)
        (Path(download_root) / (filename or "archive")).write_bytes(b"half an archive")
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", fail)
    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", fail)


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize(
    ("name", "folder", "archive"),
    [
        ("cifar10_noisy", "cifar-10-batches-py", "cifar-10-python.tar.gz"),
        ("cifar100_lt", "cifar-100-python", "cifar-100-python.tar.gz"),
    ],
)
def test_offline_download_fails_cleanly(
    tmp_path: Path, name: str, folder: str, archive: str
) -> None:
    root = tmp_path / "data"
    root.mkdir()
    expected = str((root / folder).resolve())
    with pytest.raises(FileNotFoundError) as info:
        build_dataset(name, root=root)
    message = str(info.value)
    assert re.search(
        rf"not found at {re.escape(expected)} and the download failed "
        rf"\(URLError: .*Temporary failure",
        message,
    ), message
    assert archive in message and "REWEIGHT_DATA_DIR" in message  # how to provide the files
    assert list(root.iterdir()) == []  # no archive, no temporary folder, no partial dataset


@pytest.mark.usefixtures("offline")
def test_offline_download_removes_the_folders_it_created(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"not found at .*nested.*cifar-10-batches-py"):
        build_dataset("cifar10_lt", root=tmp_path / "nested" / "data")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.usefixtures("offline")
def test_offline_mnist(tmp_path: Path) -> None:
    expected = re.escape(str((tmp_path / "MNIST").resolve()))
    with pytest.raises(
        FileNotFoundError,
        match=rf"MNIST not found at {expected} and the "
        rf"download failed \(RuntimeError",
    ):
        build_dataset("mnist_imbalanced", root=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_no_download_when_disallowed(tmp_path: Path, fake_torchvision: list[str]) -> None:
    expected = re.escape(str((tmp_path / "cifar-10-batches-py").resolve()))
    with pytest.raises(
        FileNotFoundError,
        match=rf"cifar10 not found at {expected} and "
        rf"download=false",
    ):
        build_dataset("cifar10_noisy", root=tmp_path, download=False)
    assert fake_torchvision == [] and list(tmp_path.iterdir()) == []


def test_download_atomically_propagates_interrupts(tmp_path: Path) -> None:
    def interrupted(tmp: Path) -> None:
        (tmp / "target").mkdir()
        (tmp / "target" / "file").write_text("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        download_atomically(tmp_path, "target", interrupted, what="x", instructions="")
    assert list(tmp_path.iterdir()) == []


def test_data_root_from_environment(cifar10_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(cifar10_root))
    bundle = build_dataset("cifar10_lt", meta_per_class=5, imbalance_factor=10)
    assert bundle.info["root"] == str(cifar10_root.resolve())


# --- CIFAR-10N ---------------------------------------------------------------------------------


def write_human_labels(path: Path, clean: np.ndarray, **extra: np.ndarray) -> np.ndarray:
    worse = clean.copy()
    worse[::3] = (worse[::3] + 1) % 10  # a third of the labels wrong
    torch.save(
        {"clean_label": clean, "worse_label": worse, "aggre_label": clean.copy(), **extra}, path
    )
    return worse


def test_cifar10n(cifar10_root: Path) -> None:
    clean = np.tile(np.arange(10), PER_CLASS_TRAIN)
    worse = write_human_labels(cifar10_root / CIFAR10N_FILE, clean)
    bundle = build_dataset("cifar10n", root=cifar10_root, meta_per_class=5, augment=False)
    check_bundle(bundle, "cifar10")
    idx = bundle.train.source_indices
    assert torch.equal(bundle.train_labels, torch.as_tensor(worse)[idx])
    assert torch.equal(bundle.corrupted, torch.as_tensor(worse != clean)[idx])
    assert bundle.corrupted.any()
    assert bundle.info["noise_rate_measured"] == bundle.corrupted.to(torch.float64).mean().item()
    assert bundle.info["label_key"] == "worse_label"
    aggre = build_dataset("cifar10n", root=cifar10_root, label_key="aggre_label", meta_per_class=5)
    assert not aggre.corrupted.any()


def test_cifar10n_label_file_option(
    cifar10_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    elsewhere = tmp_path_factory.mktemp("labels") / "human.pt"
    write_human_labels(elsewhere, np.tile(np.arange(10), PER_CLASS_TRAIN))
    bundle = build_dataset(
        "cifar10n", root=cifar10_root, label_file=str(elsewhere), meta_per_class=5
    )
    assert bundle.info["label_file"] == str(elsewhere.resolve())


def test_cifar10n_missing_label_file(tmp_path: Path, fake_torchvision: list[str]) -> None:
    expected = re.escape(str((tmp_path / CIFAR10N_FILE).resolve()))
    with pytest.raises(
        FileNotFoundError,
        match=rf"CIFAR-10N label file not found: expected "
        rf"{expected}\. Download CIFAR-10_human\.pt from "
        rf"https://github\.com/UCSC-REAL/cifar-10-100n",
    ):
        build_dataset("cifar10n", root=tmp_path)
    assert fake_torchvision == []  # checked before any download


def test_cifar10n_bad_label_key(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError,
        match=r"label_key must be one of aggre_label, worse_label, "
        r"random_label1, random_label2, random_label3, "
        r"clean_label; got 'noisy_label'",
    ):
        build_dataset("cifar10n", root=tmp_path, label_key="noisy_label")


def test_cifar10n_file_checks(cifar10_root: Path) -> None:
    clean = np.tile(np.arange(10), PER_CLASS_TRAIN)
    path = cifar10_root / CIFAR10N_FILE
    torch.save({"worse_label": clean[:-1]}, path)
    with pytest.raises(ValueError, match=r"has 299 labels; CIFAR-10's training split has 300"):
        build_dataset("cifar10n", root=cifar10_root, meta_per_class=5)
    with pytest.raises(
        ValueError,
        match=r"label_key='random_label1' is not in .*it holds "
        r"\['worse_label'\]",
    ):
        build_dataset("cifar10n", root=cifar10_root, label_key="random_label1", meta_per_class=5)
    write_human_labels(path, np.roll(clean, 1))
    with pytest.raises(
        ValueError,
        match=r"\['clean_label'\] differs from torchvision's CIFAR-10 "
        r"training labels",
    ):
        build_dataset("cifar10n", root=cifar10_root, meta_per_class=5)


def test_cifar10n_labels_load_safely(tmp_path: Path) -> None:
    path = tmp_path / CIFAR10N_FILE
    torch.save({"a": np.arange(4, dtype=np.int64), "b": [1, 2], "c": torch.tensor([3])}, path)
    labels = load_cifar10n_labels(path)
    assert {k: v.tolist() for k, v in labels.items()} == {"a": [0, 1, 2, 3], "b": [1, 2], "c": [3]}
    assert all(v.dtype == torch.int64 for v in labels.values())
    torch.save({"a": np.arange(3, dtype=np.float32)}, path)  # float32 dtype is not allowlisted
    with pytest.raises(ValueError, match=r"is not a CIFAR-10N label file of integer arrays"):
        load_cifar10n_labels(path)
