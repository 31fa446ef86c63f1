"""The CIFAR datasets through the torchvision layer, without the real files or the network.

Small fake CIFAR folders in torchvision's pickle format stand in for the real ones (torchvision's
table of known MD5s, which both torchvision and our check read, is replaced by the fakes' MD5s),
and torchvision's download function is replaced by one that writes such a folder, or by one that
fails like an offline machine. Every image encodes its own index in the source split, so the
tests can check which image each item is.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import urllib.error
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch.utils.data import DataLoader

from reweight.data import DataBundle, build_dataset, checksums, core, noise_matrix
from reweight.data.checksums import file_md5
from reweight.data.cifar import CIFAR10N_FILE, CIFAR_STATS, load_cifar10n_labels
from reweight.data.core import DATA_DIR_ENV, download_atomically

PER_CLASS_TRAIN = 30  # CIFAR-10 fake: 300 training images; CIFAR-100 fake: 3000
PER_CLASS_TEST = 2


def _tv_class(variant: str) -> type[torchvision.datasets.CIFAR10]:
    return torchvision.datasets.CIFAR10 if variant == "cifar10" else torchvision.datasets.CIFAR100


def _images(indices: np.ndarray) -> np.ndarray:
    """(N, 3072) uint8 rows: channel 0 is index % 256 everywhere, channel 1 is index // 256."""
    data = np.zeros((indices.size, 3, 1024), dtype=np.uint8)
    data[:, 0, :] = (indices % 256)[:, None]
    data[:, 1, :] = (indices // 256)[:, None]
    return data.reshape(indices.size, 3072)


def write_fake_cifar(root: Path, variant: str) -> Path:
    """A CIFAR folder in torchvision's format with tiny balanced splits (labels interleaved)."""
    cls = _tv_class(variant)
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


@pytest.fixture(scope="session")
def fake_md5s(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """``{variant: {file name: MD5}}`` of the fake folders (write_fake_cifar is deterministic)."""
    md5s = {}
    for variant in ("cifar10", "cifar100"):
        folder = write_fake_cifar(tmp_path_factory.mktemp(variant), variant)
        md5s[variant] = {path.name: file_md5(path) for path in folder.iterdir()}
    return md5s


@pytest.fixture(autouse=True)
def fake_torchvision(
    monkeypatch: pytest.MonkeyPatch, fake_md5s: dict[str, dict[str, str]]
) -> list[str]:
    """torchvision's known MD5s become the fakes'; a download writes a fake folder (and is
    recorded)."""
    calls: list[str] = []
    for variant, md5s in fake_md5s.items():
        cls = _tv_class(variant)
        for table in ("train_list", "test_list"):
            entries = [[name, md5s[name]] for name, _ in getattr(cls, table)]
            monkeypatch.setattr(cls, table, entries)
        monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5s[cls.meta["filename"]]})

    def fake_download(
        url: str,
        download_root: str,
        filename: str | None = None,
        md5: str | None = None,
        **kwargs: object,
    ) -> None:
        calls.append(url)
        write_fake_cifar(Path(download_root), "cifar100" if "100" in url else "cifar10")

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
        "val": len(bundle.val) if bundle.val is not None else 0,
    }
    if bundle.val is not None:  # the clean validation set: the test transform, true labels
        val_idx = bundle.val.source_indices
        assert not set(val_idx.tolist()) & (set(train_idx.tolist()) | set(meta_idx.tolist()))
        assert torch.equal(bundle.val.labels, source_labels[val_idx])
        assert bundle.val.transform is bundle.test.transform
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
    # 30 per class: 5 meta, 10 validation (cifar10_noisy's default val_per_class), 15 train
    assert len(bundle.meta) == 50 and len(bundle.val) == 100 and len(bundle.train) == 150
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
    # 30 per class less 5 meta and 10 validation (the default val_per_class): head class 15
    expected = [int(15 * 10 ** (-i / 9)) for i in range(10)]
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
        int(25 * 20 ** (-i / 99))
        for i in range(100)  # 30 less 3 meta, 2 validation
    ]
    # only the dataset folder is left: no archive, no temporary folder
    assert [p.name for p in tmp_path.iterdir()] == ["cifar-100-python"]


def test_meta_set_larger_than_the_fake_class(cifar10_root: Path) -> None:
    with pytest.raises(
        ValueError,
        match=r"meta_per_class=100 \+ val_per_class=10 is larger than what is available: "
        r"class 0 has 30 examples",
    ):
        build_dataset("cifar10_noisy", root=cifar10_root)  # the default 100 per class


# --- download: atomic, and a clear message offline ----------------------------------------------


def test_download_moves_a_complete_folder_into_place(
    tmp_path: Path, fake_torchvision: list[str]
) -> None:
    root = tmp_path / "new" / "data"  # does not exist yet
    bundle = build_dataset("cifar10_noisy", root=root, meta_per_class=5)
    assert len(fake_torchvision) == 1 and len(bundle.train) == 150  # 300 - 50 meta - 100 val
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
    ("name", "variant", "folder", "archive"),
    [
        ("cifar10_noisy", "cifar10", "cifar-10-batches-py", "cifar-10-python.tar.gz"),
        ("cifar100_lt", "cifar100", "cifar-100-python", "cifar-100-python.tar.gz"),
    ],
)
def test_offline_download_fails_cleanly(
    tmp_path: Path, name: str, variant: str, folder: str, archive: str
) -> None:
    root = tmp_path / "data"
    root.mkdir()
    with pytest.raises(FileNotFoundError) as info:
        build_dataset(name, root=root)
    assert str(info.value) == (  # one line: where, why in short, and how to provide the files
        f"{variant} not found at {(root / folder).resolve()} and the download failed (offline? "
        f"[Errno -3] Temporary failure in name resolution): download "
        f"https://www.cs.toronto.edu/~kriz/{archive} and extract it into {root.resolve()}, or "
        f"set dataset.root / REWEIGHT_DATA_DIR"
    )
    assert isinstance(info.value.__cause__, urllib.error.URLError)  # the full error, chained
    assert list(root.iterdir()) == []  # no archive, no temporary folder, no partial dataset


@pytest.mark.usefixtures("offline")
def test_offline_download_removes_the_folders_it_created(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"not found at .*nested.*cifar-10-batches-py"):
        build_dataset("cifar10_lt", root=tmp_path / "nested" / "data")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.usefixtures("offline")
def test_offline_mnist(tmp_path: Path) -> None:
    """torchvision's MNIST joins the errors of its two mirrors into a multi-line RuntimeError:
    the message keeps one line of it (it used to end in a dangling 'got: )')."""
    with pytest.raises(FileNotFoundError) as info:
        build_dataset("mnist_imbalanced", root=tmp_path)
    assert str(info.value) == (
        f"MNIST not found at {(tmp_path / 'MNIST' / 'raw').resolve()} and the download failed "
        f"(offline? [Errno -3] Temporary failure in name resolution): put the four uncompressed "
        f"IDX files there (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        f"t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte) or set dataset.root / REWEIGHT_DATA_DIR"
    )
    assert "Tried https://" in str(info.value.__cause__)  # torchvision's own report, chained
    assert list(tmp_path.iterdir()) == []


def test_failed_download_that_is_not_the_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bad archive is not called offline."""

    def corrupted(url: str, download_root: str, **kwargs: object) -> None:
        raise RuntimeError("File not found or corrupted.")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", corrupted)
    with pytest.raises(
        FileNotFoundError,
        match=r"cifar-10-batches-py and the download failed \(File not found or corrupted\.\): "
        r"download https://",
    ):
        build_dataset("cifar10_lt", root=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nowhere to download into (a read-only data root) is the same one-line error, not a
    PermissionError traceback. (Simulated: the tests run as root, which ignores chmod.)"""

    def read_only(*args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(core.tempfile, "mkdtemp", read_only)
    with pytest.raises(FileNotFoundError) as info:
        build_dataset("cifar10_lt", root=tmp_path / "data")
    assert str(info.value).startswith(
        f"cifar10 not found at {(tmp_path / 'data' / 'cifar-10-batches-py').resolve()} and the "
        f"download failed (cannot write into {(tmp_path / 'data').resolve()}: Permission "
        f"denied): download https://"
    )
    assert list(tmp_path.iterdir()) == []  # the data folder it had to create is removed


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
        download_atomically(tmp_path, "target", interrupted, what="x", not_found=str)
    assert list(tmp_path.iterdir()) == []


def test_data_root_from_environment(cifar10_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(cifar10_root))
    bundle = build_dataset("cifar10_lt", meta_per_class=5, imbalance_factor=10)
    assert bundle.info["root"] == str(cifar10_root.resolve())


# --- damaged files: torchvision's MD5s, checked once --------------------------------------------

CIFAR10_FIX = (
    "delete it to download cifar10 again, or replace it with the one in "
    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
)
# torchvision's own table, read at import, before the autouse fixture replaces it
TORCHVISION_CIFAR10_MD5S = {
    "train_list": torchvision.datasets.CIFAR10.train_list,
    "test_list": torchvision.datasets.CIFAR10.test_list,
    "meta": torchvision.datasets.CIFAR10.meta,
}


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _garble(path: Path) -> None:
    """Same size, 1 kB of inverted bytes in the middle: unpickles to garbage or fails."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 1000] = bytes(b ^ 0xFF for b in data[middle : middle + 1000])
    path.write_bytes(bytes(data))


def _empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize(
    ("name", "damage"),
    [("data_batch_1", _truncate), ("test_batch", _garble), ("batches.meta", _empty)],
)
def test_damaged_batch_file_is_named(
    cifar10_root: Path,
    fake_md5s: dict[str, dict[str, str]],
    name: str,
    damage: Callable[[Path], None],
) -> None:
    path = cifar10_root / "cifar-10-batches-py" / name
    damage(path)
    with pytest.raises(ValueError) as info:
        build_dataset("cifar10_noisy", root=cifar10_root, meta_per_class=5)
    assert str(info.value) == (
        f"cifar10 file {path} is damaged: its MD5 is {file_md5(path)} ({path.stat().st_size} "
        f"bytes), expected {fake_md5s['cifar10'][name]}: {CIFAR10_FIX}"
    )


def test_torchvision_md5s_are_the_reference(
    cifar10_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With torchvision's real table the fake files are damaged, and its MD5 is the one quoted."""
    for attribute, value in TORCHVISION_CIFAR10_MD5S.items():
        monkeypatch.setattr(torchvision.datasets.CIFAR10, attribute, value)
    first, md5 = TORCHVISION_CIFAR10_MD5S["train_list"][0]
    with pytest.raises(ValueError, match=rf"{first} is damaged: its MD5 is .*, expected {md5}: "):
        build_dataset("cifar10_noisy", root=cifar10_root, meta_per_class=5)


def test_cifar_md5s_are_computed_once(cifar10_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = checksums.file_md5
    monkeypatch.setattr(checksums, "file_md5", lambda path: calls.append(path.name) or real(path))
    build_dataset("cifar10_noisy", root=cifar10_root, meta_per_class=5)
    assert len(calls) == 7  # 5 training batches, the test batch, the meta file
    build_dataset("cifar10_lt", root=cifar10_root, meta_per_class=5, imbalance_factor=10)
    assert len(calls) == 7


def test_unreadable_files_with_the_known_md5(
    cifar10_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If torchvision's table ever vouched for a file it cannot read, the error still names the
    folder and the fix (not an unpickling traceback)."""
    folder = cifar10_root / "cifar-10-batches-py"
    (folder / "data_batch_1").write_bytes(b"not a pickle")
    table = [list(entry) for entry in torchvision.datasets.CIFAR10.train_list]
    table[0][1] = file_md5(folder / "data_batch_1")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "train_list", table)
    with pytest.raises(ValueError) as info:
        build_dataset("cifar10_noisy", root=cifar10_root, meta_per_class=5)
    assert str(info.value).startswith(f"torchvision cannot read cifar10 from {folder} (")
    assert str(info.value).endswith("): delete that folder to download it again")


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
