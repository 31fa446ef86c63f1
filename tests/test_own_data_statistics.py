"""Your own data (reweight.data.own) from real .npz and .csv files: every split is standardised
with the statistics of the training set alone, and the held-out test set is
``round(test_fraction * N)`` examples of the training file, as documented."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from reweight.data import build_dataset


def write_npz(path: Path, x: torch.Tensor, y: torch.Tensor) -> str:
    np.savez(path, x=x.numpy(), y=y.numpy())
    return str(path)


def shifted(n: int, loc: float, scale: float, seed: int, shape=(3,)):
    """n examples of two classes whose features are loc + scale * N(0, 1) (per feature)."""
    g = torch.Generator().manual_seed(seed)
    x = loc + scale * torch.randn(n, *shape, generator=g, dtype=torch.float64)
    return x.float(), torch.arange(n) % 2


@pytest.mark.parametrize("shape", [(3,), (2, 4, 4)], ids=["table", "images"])
def test_meta_and_test_sets_use_the_training_statistics(tmp_path: Path, shape):
    """Three files of very different distributions: the meta and test inputs are shifted and
    scaled by the training set's per-feature (per-channel) mean and std, not their own."""
    train_x, train_y = shifted(80, 5.0, 2.0, seed=0, shape=shape)
    meta_x, meta_y = shifted(20, -3.0, 0.5, seed=1, shape=shape)
    test_x, test_y = shifted(30, 10.0, 4.0, seed=2, shape=shape)
    bundle = build_dataset(
        "tensors",
        path=write_npz(tmp_path / "train.npz", train_x, train_y),
        meta_path=write_npz(tmp_path / "meta.npz", meta_x, meta_y),
        test_path=write_npz(tmp_path / "test.npz", test_x, test_y),
        val_per_class=0,
    )
    dims = [0, *range(2, train_x.dim())]
    mean = train_x.mean(dim=dims, keepdim=True)
    std = train_x.std(dim=dims, keepdim=True)
    assert bundle.info["standardized"]["mean"] == pytest.approx(mean.flatten().tolist())
    assert bundle.info["standardized"]["std"] == pytest.approx(std.flatten().tolist())
    torch.testing.assert_close(bundle.train.inputs, (train_x - mean) / std)
    torch.testing.assert_close(bundle.meta.inputs, (meta_x - mean) / std)
    torch.testing.assert_close(bundle.test.inputs, (test_x - mean) / std)
    # what that means: the meta set keeps its offset from the training set (about -4 stds)
    assert float(bundle.meta.inputs.mean()) == pytest.approx(-4.0, abs=0.5)
    assert float(bundle.test.inputs.mean()) == pytest.approx(2.5, abs=0.7)


def test_standardize_false_leaves_every_split_as_read(tmp_path: Path):
    train_x, train_y = shifted(40, 5.0, 2.0, seed=0)
    meta_x, meta_y = shifted(10, -3.0, 0.5, seed=1)
    bundle = build_dataset(
        "tensors",
        path=write_npz(tmp_path / "train.npz", train_x, train_y),
        meta_path=write_npz(tmp_path / "meta.npz", meta_x, meta_y),
        test_fraction=0.25,
        standardize=False,
        val_per_class=0,
    )
    assert "standardized" not in bundle.info
    torch.testing.assert_close(bundle.meta.inputs, meta_x, rtol=0, atol=0)
    held = bundle.info["held_out_test"]["indices"]
    torch.testing.assert_close(bundle.test.inputs, train_x[held], rtol=0, atol=0)


def write_table(path: Path, n: int) -> str:
    g = torch.Generator().manual_seed(0)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "a", "b"])
        for i in range(n):
            w.writerow([i % 2, *(f"{v:.4f}" for v in torch.randn(2, generator=g).tolist())])
    return str(path)


@pytest.mark.parametrize(
    ("fraction", "held"),
    [(0.127, 13), (0.123, 12), (0.5, 50), (0.004, 1), (0.001, 1)],
    ids=["rounds-up", "rounds-down", "half", "rounds-to-zero", "tiny"],
)
def test_the_held_out_test_set_is_round_fraction_times_n(tmp_path: Path, fraction, held):
    """100 training rows (a separate trusted file): round(fraction * 100) are held out as the
    test set (12.7 -> 13, 12.3 -> 12), at least one when the fraction is positive; the rest
    train, and the two are disjoint."""
    bundle = build_dataset(
        "tensors",
        path=write_table(tmp_path / "train.csv", 100),
        meta_path=write_table(tmp_path / "meta.csv", 10),
        test_fraction=fraction,
        val_per_class=0,
    )
    indices = bundle.info["held_out_test"]["indices"]
    assert len(bundle.test) == len(indices) == held
    assert len(bundle.train) == 100 - held
    assert not set(indices) & set(bundle.train.source_indices.tolist())
    assert bundle.info["split_sizes"]["test"] == held


def test_a_fraction_that_holds_out_everything_is_refused(tmp_path: Path):
    with pytest.raises(ValueError, match=r"test_fraction=0.996 holds out 100 of 100 training"):
        build_dataset(
            "tensors",
            path=write_table(tmp_path / "train.csv", 100),
            meta_path=write_table(tmp_path / "meta.csv", 10),
            test_fraction=0.996,
            val_per_class=0,
        )
