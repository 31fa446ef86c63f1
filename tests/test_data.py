"""reweight.data: public API, the MNIST datasets on the real IDX files, parameter errors,
data-root resolution, saved labels and the Hydra dataset configs.

The real MNIST files are expected in <repo>/../shared/data/MNIST/raw (as for the lead's
checkout at /work/main); tests that need them fail, never skip, if they are missing.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
from pathlib import Path

import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

import reweight.data
from reweight.data import (
    DATASETS,
    DataBundle,
    TensorData,
    build_dataset,
    resolve_data_root,
    save_labels,
)
from reweight.data.build import COMMON_KEYS, dataset_builder, dataset_defaults
from reweight.data.core import DATA_DIR_ENV, INFO_FILE, LABELS_FILE, tensor_hash
from reweight.data.mnist import MNIST_MEAN, MNIST_STD, load_mnist

# the real MNIST: $REWEIGHT_DATA_DIR (tests/conftest.py defaults it to ../shared/data)
SHARED_DATA = Path(os.environ["REWEIGHT_DATA_DIR"])
CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "dataset"
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _check_shared_mnist() -> Path:
    raw = SHARED_DATA / "MNIST" / "raw"
    missing = [name for name in MNIST_FILES if not (raw / name).is_file()]
    if missing:
        pytest.fail(
            f"the real MNIST IDX files {missing} are missing from {raw}; these tests use them "
            f"and never download. Put the four uncompressed IDX files there.",
            pytrace=False,
        )
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test in this file may touch the network."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a test tried to download data")

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", refuse)
    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", refuse)


@pytest.fixture
def mnist_env(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point REWEIGHT_DATA_DIR at the shared data folder (the datasets are built with root=None)."""
    root = _check_shared_mnist()
    monkeypatch.setenv(DATA_DIR_ENV, str(root))
    return root


@pytest.fixture(scope="module")
def mnist_targets() -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST's train and test labels read independently with torchvision."""
    root = _check_shared_mnist()
    train = torchvision.datasets.MNIST(root, train=True, download=False)
    test = torchvision.datasets.MNIST(root, train=False, download=False)
    return train.targets, test.targets


@pytest.fixture(scope="module")
def noisy_bundle() -> DataBundle:
    return build_dataset(
        "mnist_noisy", root=_check_shared_mnist(), seed=0, noise_type="flip", noise_rate=0.4
    )


# --- public surface ------------------------------------------------------------------------------


def test_public_names() -> None:
    for name in reweight.data.__all__:
        assert getattr(reweight.data, name) is not None
    expected = {
        "DataBundle",
        "build_dataset",
        "resolve_data_root",
        "save_labels",
        "noise_matrix",
        "corrupt_labels",
        "long_tail_counts",
        "DATASETS",
        "TensorData",
    }
    assert set(reweight.data.__all__) == expected
    assert DATASETS == (
        "mnist_imbalanced",
        "mnist_noisy",
        "cifar10_noisy",
        "cifar100_noisy",
        "cifar10_lt",
        "cifar100_lt",
        "cifar10n",
        "image_folder",
        "tensors",
        "clothing1m",
        "food101n",
        "animal10n",
        "mini_webvision",
    )


@pytest.mark.parametrize(
    "module", ["core", "noise", "splits", "build", "mnist", "cifar", "checksums", "own"]
)
def test_module_all(module: str) -> None:
    mod = importlib.import_module(f"reweight.data.{module}")
    for name in mod.__all__:
        assert hasattr(mod, name), name


# --- mnist_imbalanced on the real files ---------------------------------------------------------


@pytest.mark.parametrize(("p", "n_fours", "n_nines"), [(0.995, 20, 4970), (0.9, 495, 4495)])
def test_mnist_imbalanced_counts(
    mnist_env: Path,
    mnist_targets: tuple[torch.Tensor, torch.Tensor],
    p: float,
    n_fours: int,
    n_nines: int,
) -> None:
    bundle = build_dataset("mnist_imbalanced", proportion=p)
    train_targets, test_targets = mnist_targets
    assert bundle.num_classes == 2 and bundle.class_names == ["4", "9"]
    assert bundle.in_channels == 1
    assert torch.bincount(bundle.train_labels, minlength=2).tolist() == [n_fours, n_nines]
    assert round(5000 * (1 - p)) - 5 == n_fours and round(5000 * p) - 5 == n_nines

    # meta: 5 + 5 and clean; test: every test 4 and as many 9s
    assert bundle.meta.labels.tolist().count(0) == 5 and bundle.meta.labels.tolist().count(1) == 5
    n_test_fours = int((test_targets == 4).sum())
    assert n_test_fours == 982
    assert torch.bincount(bundle.test.labels).tolist() == [n_test_fours, n_test_fours]

    # labels agree with MNIST's own: 0 is digit 4, 1 is digit 9
    digits = torch.tensor([4, 9])
    for ds, targets in (
        (bundle.train, train_targets),
        (bundle.meta, train_targets),
        (bundle.test, test_targets),
    ):
        assert torch.equal(targets[ds.source_indices], digits[ds.labels])

    # disjoint: meta and training come from MNIST's training split, test from its test split
    train_idx = set(bundle.train.source_indices.tolist())
    meta_idx = set(bundle.meta.source_indices.tolist())
    assert len(train_idx) == 4990 and len(meta_idx) == 10 and not train_idx & meta_idx
    assert len(set(bundle.test.source_indices.tolist())) == len(bundle.test) == 2 * n_test_fours
    assert bundle.info["source"] == "MNIST IDX files"

    # nothing is corrupted in a pure imbalance set
    assert torch.equal(bundle.true_labels, bundle.train_labels)
    assert not bundle.corrupted.any()
    assert bundle.info["split_sizes"] == {
        "train": 4990,
        "meta": 10,
        "test": 2 * n_test_fours,
        "val": 10,
    }
    assert bundle.info["train_class_counts"] == [n_fours, n_nines]
    assert bundle.info["meta_class_counts"] == [5, 5]
    assert bundle.info["params"]["proportion"] == p
    json.dumps(bundle.info)  # serialisable


def test_mnist_imbalanced_unbalanced_test(mnist_env: Path) -> None:
    bundle = build_dataset("mnist_imbalanced", test_balanced=False)
    assert torch.bincount(bundle.test.labels).tolist() == [982, 1009]


def test_mnist_is_read_as_torchvision_reads_it(mnist_env: Path) -> None:
    """The package reads the checked IDX files itself (torchvision's import takes seconds):
    every image and label as torchvision's own reader gives them."""
    ours = load_mnist(mnist_env, download=False)
    train = torchvision.datasets.MNIST(mnist_env, train=True, download=False)
    test = torchvision.datasets.MNIST(mnist_env, train=False, download=False)
    theirs = (train.data, train.targets, test.data, test.targets)
    for a, b, dtype in zip(ours, theirs, (torch.uint8, torch.int64) * 2, strict=True):
        assert a.dtype == dtype and torch.equal(a, b.to(dtype))


def test_mnist_inputs_are_normalised_images(
    mnist_env: Path, mnist_targets: tuple[torch.Tensor, torch.Tensor]
) -> None:
    bundle = build_dataset("mnist_imbalanced")
    raw = torchvision.datasets.MNIST(mnist_env, train=True, download=False).data
    x = bundle.meta.inputs
    assert x.shape == (10, 1, 28, 28) and x.dtype == torch.float32
    ref = (raw[bundle.meta.source_indices].to(torch.float64) / 255 - MNIST_MEAN) / MNIST_STD
    torch.testing.assert_close(x.squeeze(1).to(torch.float64), ref, rtol=0, atol=1e-5)


def test_tensor_data_batches_with_one_index(
    mnist_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = build_dataset("mnist_imbalanced")
    first = bundle.train[3]
    assert isinstance(first[1], int)

    def one_by_one(self: TensorData, index: int) -> None:
        raise AssertionError("the DataLoader fetched a batch item by item")

    monkeypatch.setattr(TensorData, "__getitem__", one_by_one)
    xs, ys = [], []
    for x, y in DataLoader(bundle.train, batch_size=512, shuffle=False):
        assert x.shape[1:] == (1, 28, 28) and y.dtype == torch.int64
        xs.append(x)
        ys.append(y)
    assert torch.equal(torch.cat(ys), bundle.train_labels)  # exactly what `train` yields
    assert torch.equal(torch.cat(xs), bundle.train.inputs)
    assert torch.equal(xs[0][3], first[0])


def test_tensor_data_rejects_mismatched_lengths() -> None:
    with pytest.raises(
        ValueError,
        match=r"inputs and labels must have the same length; got 3 "
        r"inputs and 2 labels",
    ):
        TensorData(torch.zeros(3, 1), torch.zeros(2, dtype=torch.int64))


# --- mnist_noisy on the real files -------------------------------------------------------------


def test_mnist_noisy(
    noisy_bundle: DataBundle, mnist_targets: tuple[torch.Tensor, torch.Tensor]
) -> None:
    b = noisy_bundle
    train_targets, _ = mnist_targets
    assert b.num_classes == 10 and len(b.meta) == 100 and len(b.test) == 10_000
    assert len(b.train) == 60_000 - 100 - 100  # the meta set and the validation set (10 per class)
    assert len(b.val) == 100 and torch.bincount(b.val.labels).tolist() == [10] * 10
    assert torch.bincount(b.meta.labels).tolist() == [10] * 10
    assert torch.equal(b.meta.labels, train_targets[b.meta.source_indices])  # meta is clean
    assert torch.equal(b.true_labels, train_targets[b.train.source_indices])
    assert torch.equal(b.train.labels, b.train_labels)
    assert torch.equal(b.corrupted, b.train_labels != b.true_labels)
    assert not set(b.meta.source_indices.tolist()) & set(b.train.source_indices.tolist())
    # the recorded rate is the measured one, and flip at 0.4 changes ~40% of the labels
    measured = b.corrupted.to(torch.float64).mean().item()
    assert b.info["noise_rate_measured"] == measured
    assert abs(measured - 0.4) < 5 * (0.4 * 0.6 / len(b.train)) ** 0.5
    assert b.info["noise_type"] == "flip" and b.info["noise_rate"] == 0.4
    assert len(b.info["noise_matrix"]) == 10
    json.dumps(b.info)  # serialisable


def test_same_seed_same_labels(noisy_bundle: DataBundle) -> None:
    root = _check_shared_mnist()
    state = torch.get_rng_state()
    again = build_dataset("mnist_noisy", root=root, seed=0, noise_type="flip", noise_rate=0.4)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is neither used nor advanced
    assert tensor_hash(again.train_labels) == tensor_hash(noisy_bundle.train_labels)
    assert again.info["labels_hash"] == noisy_bundle.info["labels_hash"]
    assert again.info["indices_hash"] == noisy_bundle.info["indices_hash"]
    other = build_dataset("mnist_noisy", root=root, seed=1, noise_type="flip", noise_rate=0.4)
    assert tensor_hash(other.train_labels) != tensor_hash(noisy_bundle.train_labels)
    assert other.info["indices_hash"] != noisy_bundle.info["indices_hash"]
    assert other.info["noise_matrix"] != noisy_bundle.info["noise_matrix"]  # flip targets differ


def test_mnist_noisy_train_per_class(noisy_bundle: DataBundle) -> None:
    """A balanced training subset drawn before the noise: its true labels count
    ``train_per_class`` per class, disjoint from the meta and validation sets, noise as asked."""
    root = _check_shared_mnist()
    small = build_dataset("mnist_noisy", root=root, seed=0, noise_type="flip", noise_rate=0.4,
                          train_per_class=300)  # fmt: skip
    assert len(small.train) == 3000 and torch.bincount(small.true_labels).tolist() == [300] * 10
    assert torch.equal(small.meta.labels, noisy_bundle.meta.labels)  # drawn before the subset
    held = set(small.meta.source_indices.tolist()) | set(small.val.source_indices.tolist())
    assert not held & set(small.train.source_indices.tolist())
    measured = small.corrupted.to(torch.float64).mean().item()
    assert abs(measured - 0.4) < 5 * (0.4 * 0.6 / 3000) ** 0.5
    # drawn from what the whole split trains on (same meta and validation draws before it)
    whole = set(noisy_bundle.train.source_indices.tolist())
    assert set(small.train.source_indices.tolist()) <= whole
    assert torch.equal(small.val.source_indices, noisy_bundle.val.source_indices)
    with pytest.raises(ValueError, match=r"train_per_class=9999 is not in \[1, \d+\]"):
        build_dataset("mnist_noisy", root=root, train_per_class=9999)
    with pytest.raises(ValueError, match=r"train_per_class must be an integer >= 1; got 0"):
        build_dataset("mnist_noisy", root=root, train_per_class=0)


def test_mnist_imbalanced_seed(mnist_env: Path) -> None:
    a = build_dataset("mnist_imbalanced", seed=3)
    b = build_dataset("mnist_imbalanced", seed=3)
    c = build_dataset("mnist_imbalanced", seed=4)
    assert a.info["indices_hash"] == b.info["indices_hash"] != c.info["indices_hash"]


# --- bad parameters (checked before any file is read) ------------------------------------------


@pytest.fixture
def empty_root(tmp_path: Path) -> Path:
    """An empty data root: a missing check would end in a FileNotFoundError, not the ValueError."""
    return tmp_path


@pytest.mark.parametrize("name", ["mnist_noisy", "cifar10_noisy", "cifar100_noisy"])
@pytest.mark.parametrize("rate", [-0.1, 1.0, 2])
def test_bad_noise_rate(empty_root: Path, name: str, rate: float) -> None:
    with pytest.raises(ValueError, match=rf"noise_rate must be a number in \[0, 1\); got {rate}"):
        build_dataset(name, root=empty_root, download=False, noise_rate=rate)


@pytest.mark.parametrize("name", ["mnist_noisy", "cifar10_noisy", "cifar100_noisy"])
def test_bad_noise_type(empty_root: Path, name: str) -> None:
    with pytest.raises(
        ValueError,
        match=r"noise_type must be one of uniform, symmetric, flip, "
        r"flip2, pair; got 'asymmetric'",
    ):
        build_dataset(name, root=empty_root, download=False, noise_type="asymmetric")


@pytest.mark.parametrize("name", ["cifar10_lt", "cifar100_lt"])
@pytest.mark.parametrize("rho", [0.5, 0])
def test_bad_imbalance_factor(empty_root: Path, name: str, rho: float) -> None:
    with pytest.raises(ValueError, match=rf"imbalance_factor must be a number >= 1; got {rho}"):
        build_dataset(name, root=empty_root, download=False, imbalance_factor=rho)


@pytest.mark.parametrize("p", [0, 1, 1.5, -0.2])
def test_bad_proportion(empty_root: Path, p: float) -> None:
    with pytest.raises(ValueError, match=rf"proportion must be a number in \(0, 1\); got {p}"):
        build_dataset("mnist_imbalanced", root=empty_root, download=False, proportion=p)


def test_meta_set_larger_than_available(mnist_env: Path) -> None:
    # p = 0.995 draws 25 fours: a meta set of 25 per class leaves none to train on
    with pytest.raises(ValueError) as info:
        build_dataset("mnist_imbalanced", meta_per_class=25)
    assert str(info.value) == (
        "proportion=0.995 with n_train=5000 draws 25 images of digit 4 (the minority class), "
        "but the meta set takes meta_per_class=25 of them and at least one must stay for "
        "training; use proportion <= 0.9948 or meta_per_class <= 24"
    )
    with pytest.raises(
        ValueError,
        match=r"meta_per_class=6000 \+ val_per_class=10 is larger than what is available: "
        r"class 5 has 5421 examples",
    ):
        build_dataset("mnist_noisy", meta_per_class=6000)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (
            {"proportion": 0.9999},
            "proportion=0.9999 with n_train=5000 draws 0 images of digit 4 (the minority class), "
            "but the meta set takes meta_per_class=5 of them and at least one must stay for "
            "training; use proportion <= 0.9988",
        ),
        (
            {"proportion": 0.0004, "meta_per_class": 2},
            "proportion=0.0004 with n_train=5000 draws 2 images of digit 9 (the majority class), "
            "but the meta set takes meta_per_class=2 of them and at least one must stay for "
            "training; use proportion >= 0.0006 or meta_per_class <= 1",
        ),
        (
            {"proportion": 0.999},
            "proportion=0.999 with n_train=5000 draws 5 images of digit 4 (the minority class), "
            "but the meta set takes meta_per_class=5 of them and at least one must stay for "
            "training; use proportion <= 0.9988 or meta_per_class <= 4",
        ),
        (
            {"n_train": 10},
            "n_train=10 is too small for meta_per_class=5: each of the two classes needs 5 meta "
            "images and at least one training image; use n_train >= 12",
        ),
    ],
)
def test_too_few_examples_for_the_meta_set(empty_root: Path, params: dict, message: str) -> None:
    """Said in the task's terms (which digit, how many drawn, which proportions work), with
    bounds that are never empty or negative, and before any file is read (empty_root)."""
    with pytest.raises(ValueError) as info:
        build_dataset("mnist_imbalanced", root=empty_root, download=False, **params)
    assert str(info.value) == message


@pytest.mark.parametrize("name", ["mnist_noisy", "cifar10_noisy", "cifar10_lt", "cifar10n"])
def test_bad_meta_per_class(empty_root: Path, name: str) -> None:
    with pytest.raises(ValueError, match=r"meta_per_class must be an integer >= 1; got 0"):
        build_dataset(name, root=empty_root, download=False, meta_per_class=0)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("svhn", {}, "name must be one of mnist_imbalanced, mnist_noisy, cifar10_noisy, "
         "cifar100_noisy, cifar10_lt, cifar100_lt, cifar10n, image_folder, tensors, clothing1m, "
         "food101n, animal10n, mini_webvision; got 'svhn'"),
        ("cifar10_noisy", {"noise_rat": 0.2}, "unknown parameter 'noise_rat' for dataset "
         "'cifar10_noisy'; allowed keys: name, root, seed, download, val_per_class, "
         "meta_source, meta_warmup, meta_refresh, noise_type, noise_rate, meta_per_class, "
         "augment"),
        # a key of another dataset
        ("cifar10_lt", {"noise_rate": 0.2}, "unknown parameter 'noise_rate' for dataset "
         "'cifar10_lt'"),
    ],
    ids=["dataset", "parameter", "another-datasets-parameter"],
)  # fmt: skip
def test_unknown_dataset_or_parameter(empty_root: Path, name: str, params: dict, message: str):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_dataset(name, root=empty_root, **params)


@pytest.mark.parametrize("seed", [-1, 1.5, "0", True])
def test_bad_seed(empty_root: Path, seed: object) -> None:
    with pytest.raises(ValueError, match=r"seed must be an integer >= 0; got"):
        build_dataset("mnist_noisy", root=empty_root, seed=seed)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("n_train", 1, r"n_train must be an integer >= 2; got 1"),
        ("test_balanced", "no", r"test_balanced must be true or false; got 'no'"),
    ],
)
def test_bad_mnist_imbalanced_keys(empty_root: Path, key: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_dataset("mnist_imbalanced", root=empty_root, **{key: value})


def test_n_train_beyond_the_split(mnist_env: Path) -> None:
    with pytest.raises(
        ValueError,
        match=r"n_train=20000 with proportion=0.5 needs 10000 minority "
        r"images \(digit 4\) but the training split has 5842; use n_train <= 11684$",
    ):
        build_dataset("mnist_imbalanced", n_train=20_000, proportion=0.5)


def test_missing_mnist_without_download(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        build_dataset("mnist_noisy", root=tmp_path, download=False)
    assert str(info.value) == (
        f"MNIST not found at {(tmp_path / 'MNIST' / 'raw').resolve()} and download=false: put "
        f"the four uncompressed IDX files there (train-images-idx3-ubyte, "
        f"train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte) or set "
        f"dataset.root / REWEIGHT_DATA_DIR"
    )
    assert list(tmp_path.iterdir()) == []


# --- data root and saved labels ------------------------------------------------------------------


def test_resolve_data_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert resolve_data_root() == Path("data")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "env"))
    assert resolve_data_root() == tmp_path / "env"
    assert resolve_data_root(tmp_path / "explicit") == tmp_path / "explicit"
    assert resolve_data_root(str(tmp_path / "s")) == tmp_path / "s"
    assert not (tmp_path / "env").exists() and not (tmp_path / "explicit").exists()


def test_save_labels(noisy_bundle: DataBundle, tmp_path: Path) -> None:
    out = tmp_path / "run" / "0"
    path = save_labels(noisy_bundle, out)
    assert path == out / LABELS_FILE
    saved = torch.load(path, weights_only=True)
    assert set(saved) == {"train_labels", "true_labels", "corrupted"}
    assert torch.equal(saved["train_labels"], noisy_bundle.train_labels)
    assert torch.equal(saved["true_labels"], noisy_bundle.true_labels)
    assert torch.equal(saved["corrupted"], noisy_bundle.corrupted)
    assert saved["corrupted"].dtype == torch.bool
    assert json.loads((out / INFO_FILE).read_text()) == json.loads(json.dumps(noisy_bundle.info))
    save_labels(noisy_bundle, out)  # overwriting is fine
    assert sorted(p.name for p in out.iterdir()) == sorted([LABELS_FILE, INFO_FILE])  # no temp


def test_save_labels_failure_leaves_nothing(
    noisy_bundle: DataBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_save(obj: object, f: object) -> None:
        f.write(b"half a file")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_labels(noisy_bundle, tmp_path)
    assert list(tmp_path.iterdir()) == []


# --- Hydra configs -------------------------------------------------------------------------------


def test_one_config_per_dataset() -> None:
    assert sorted(p.stem for p in CONF_DIR.glob("*.yaml")) == sorted(DATASETS)


@pytest.mark.parametrize("name", DATASETS)
def test_config_keys_match_build_dataset(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = CONF_DIR / f"{name}.yaml"
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    assert cfg["root"] == "data"
    monkeypatch.setenv(DATA_DIR_ENV, "/somewhere/else")
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    assert cfg["root"] == "/somewhere/else"
    # the real-noise datasets are fetched by hand (their licences): nothing to download
    downloads = name not in ("clothing1m", "food101n", "animal10n", "mini_webvision")
    assert cfg["name"] == name and cfg["seed"] == 0 and cfg["download"] is downloads
    assert list(cfg)[: len(COMMON_KEYS)] == list(COMMON_KEYS)  # the common keys come first
    # the dataset's own keys are its builder's keyword arguments (the schema types them there)
    builder_keys = set(inspect.signature(dataset_builder(name)).parameters)
    assert set(dataset_defaults(name)) <= builder_keys
    for line in path.read_text().splitlines():  # every key has a one-line comment
        if line and not line.startswith("#"):
            assert " # " in line, line


def test_papers_defaults() -> None:
    assert dataset_defaults("mnist_imbalanced")["proportion"] == 0.995
    assert dataset_defaults("cifar10_noisy") == {
        "noise_type": "uniform",
        "noise_rate": 0.4,
        "meta_per_class": 100,
        "augment": True,
    }
    assert dataset_defaults("cifar100_noisy")["meta_per_class"] * 100 == 1000
    assert dataset_defaults("cifar10_lt")["imbalance_factor"] == 100


@pytest.mark.parametrize("name", ["mnist_imbalanced", "mnist_noisy"])
def test_compose_and_build(name: str, mnist_env: Path) -> None:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR.parent), version_base=None):
        cfg = compose(overrides=[f"+dataset={name}", "dataset.seed=2"])
    assert cfg.dataset.root == str(mnist_env)
    bundle = build_dataset(**cfg.dataset)
    assert bundle.name == name and bundle.info["seed"] == 2
    assert bundle.info["params"] == dataset_defaults(name)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_write_gives_the_usual_permissions(tmp_path: Path, umask: int) -> None:
    """Run outputs are readable as a plain open() would make them, not mkstemp's 0600."""
    import os
    import stat

    from reweight.core.files import atomic_write

    old = os.umask(umask)
    try:
        path = atomic_write(tmp_path / "out.bin", lambda f: f.write(b"x"))
        plain = tmp_path / "plain.bin"
        plain.write_bytes(b"x")
    finally:
        os.umask(old)
    assert path.read_bytes() == b"x"
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
