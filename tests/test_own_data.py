"""Your own data (reweight/data/own.py) and the suspects of a run (reweight/outputs/suspects.py,
reweight/outputs/inspect.py): real files made from the shared MNIST in a temporary folder (PNGs
in class folders with 30 % of them in a wrong folder, a CSV of pooled pixel features), the real
CLI in a subprocess, and the bad-file rule: one ``error:`` line naming the file, exit 2, nothing
written.
"""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torchvision.io import write_png as _write_png

from reweight.data import build_dataset
from reweight.outputs.inspect import main as inspect_main
from reweight.outputs.suspects import (
    SUSPECT_COLUMNS,
    precision_recall_at_k,
    ranking_metrics,
    suspect_order,
    suspects_table,
    write_suspects,
)
from tests.helpers import run_command, tiny_l2rw_trainer

N_TRAIN, N_META, N_TEST = 240, 60, 60


def write_png(image: torch.Tensor, path: str) -> None:
    """torchvision's PNG encoder, minus its deprecation warning (torchcodec is not installed)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The image decoding and encoding", DeprecationWarning)
        _write_png(image, path)


@pytest.fixture(scope="module")
def files(tmp_path_factory, data_root: Path) -> dict:
    """train/<digit>/<i>.png (30 % in a wrong folder), meta/, test/; table.csv and trusted.csv
    (7x7 average-pooled pixels, an id column); the wrongly filed images' paths."""
    root = tmp_path_factory.mktemp("own")
    mnist = torchvision.datasets.MNIST(str(data_root), train=True, download=False)
    n = N_TRAIN + N_META + N_TEST
    x, y = mnist.data[:n], mnist.targets[:n]
    g = torch.Generator().manual_seed(0)
    wrong = torch.rand(N_TRAIN, generator=g) < 0.3
    shift = torch.randint(1, 10, (N_TRAIN,), generator=g)
    misfiled = []
    for i in range(n):
        split = "train" if i < N_TRAIN else "meta" if i < N_TRAIN + N_META else "test"
        label = int(y[i])
        if split == "train" and wrong[i]:
            label = (label + int(shift[i])) % 10
        folder = root / "images" / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        write_png(x[i][None], str(folder / f"{i}.png"))
        if split == "train" and wrong[i]:
            misfiled.append(str(folder / f"{i}.png"))
    pooled = torch.nn.functional.avg_pool2d(x[:, None].float(), 4).flatten(1)  # (n, 49)
    header = ["id", "digit", *(f"p{j}" for j in range(pooled.shape[1]))]
    for name, rows in (("table.csv", range(N_TRAIN)), ("trusted.csv", range(N_TRAIN, n))):
        with (root / name).open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            for i in rows:
                w.writerow([f"img{i}", int(y[i]), *(f"{v:.2f}" for v in pooled[i].tolist())])
    return {"root": root, "misfiled": misfiled}


def run(args: list[str], cwd: Path, module: str = "reweight") -> subprocess.CompletedProcess:
    return run_command([sys.executable, "-m", module, *args], cwd, timeout=900)


TINY = ["trainer.batch_size=20", "trainer.eval_every=0", "threads=1", "trainer.max_steps=30"]


def image_args(root: Path) -> list[str]:
    d = root / "images"
    return [
        "dataset=image_folder",
        f"dataset.train_dir={d / 'train'}",
        f"dataset.meta_dir={d / 'meta'}",
        "dataset.grayscale=true",
        "dataset.image_size=14",
        "model=lenet",
    ]


def csv_args(root: Path) -> list[str]:
    return [
        "dataset=tensors",
        f"dataset.path={root / 'table.csv'}",
        f"dataset.meta_path={root / 'trusted.csv'}",
        "dataset.label_column=digit",
        "dataset.id_column=id",
        "dataset.noise_rate=0.3",  # synthetic corruption, so precision@k is known
        "model=mlp",
        "model.hidden=[32]",
    ]


# -- the CLI on real files -----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("method", ["l2rw", "mwnet"])
@pytest.mark.parametrize("kind", ["images", "csv"])
def test_own_data_trains_and_lists_suspects(files, tmp_path, kind, method):
    root = files["root"]
    run_dir = tmp_path / "run"
    args = image_args(root) if kind == "images" else csv_args(root)
    proc = run([*args, f"method={method}", *TINY, f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    with (run_dir / "suspects.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == SUSPECT_COLUMNS
    info = json.loads((run_dir / "dataset.json").read_text())
    n_train = info["split_sizes"]["train"]
    assert len(rows) == n_train and sorted(int(r["index"]) for r in rows) == list(range(n_train))
    weights = [float(r["final_weight"]) for r in rows]
    assert weights == sorted(weights)  # most suspect (lowest weight) first
    assert all(0.0 <= float(r["probability"]) <= 1.0 for r in rows)
    # no test folder / file given: a held-out split, recorded, and what its labels are said
    assert info["split_sizes"]["test"] == len(info["held_out_test"]["indices"]) > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    key = "dataset.test_dir" if kind == "images" else "dataset.test_path"
    note = info["held_out_test"]["note"]
    assert summary["test_labels"] == note and f"give {key} with labels you trust" in note
    assert "carry whatever noise the training labels have" in note
    assert note in proc.stdout and note in (run_dir / "train.log").read_text()  # logged
    if kind == "images":
        assert all(r["id"].endswith(".png") and r["corrupted"] == "" for r in rows)
        assert "suspect_ranking" not in summary  # the misfiled images are unknown to the run
    else:
        assert all(r["id"].startswith("img") for r in rows)
        corrupted = sum(r["corrupted"] == "1" for r in rows)
        ranking = summary["suspect_ranking"]
        assert ranking["num_corrupted"] == corrupted == info["num_corrupted"] > 0
        for name in ("weight", "small_loss"):
            assert 0.0 <= ranking[name]["precision_at_k"] <= 1.0
            assert "recall_at_100" in ranking[name]

    shown = run([str(run_dir), "--top", "5"], tmp_path, module="reweight.outputs.inspect")
    assert shown.returncode == 0, shown.stderr
    assert rows[0]["id"][-37:] in shown.stdout
    assert (run_dir / "suspects_scatter.png").stat().st_size > 0
    assert (run_dir / "suspects.png").exists() == (kind == "images")


def test_synthetic_noise_never_reaches_the_held_out_test_labels(files):
    """dataset.noise_rate corrupts the training labels after the test split is held out: the
    held-out rows keep the labels the CSV gives them, while training labels change."""
    root = files["root"]
    with (root / "table.csv").open(newline="") as f:
        given = [row["digit"] for row in csv.DictReader(f)]
    bundle = build_dataset(
        "tensors",
        path=str(root / "table.csv"),
        meta_path=str(root / "trusted.csv"),
        label_column="digit",
        id_column="id",
        noise_rate=0.5,
        val_per_class=0,
    )
    held = bundle.info["held_out_test"]["indices"]
    assert len(held) == round(0.2 * N_TRAIN) and bundle.info["num_corrupted"] > 0
    assert [bundle.class_names[int(c)] for c in bundle.test.labels] == [given[i] for i in held]
    assert "dataset.test_path" in bundle.info["held_out_test"]["note"]
    with_test = build_dataset(
        "tensors",
        path=str(root / "table.csv"),
        meta_path=str(root / "trusted.csv"),
        test_path=str(root / "trusted.csv"),
        label_column="digit",
        id_column="id",
        val_per_class=0,
    )
    assert "held_out_test" not in with_test.info  # a test file given: nothing held out, no note


# -- bad files: one error line naming the file, exit 2, nothing written --------------------------


def snapshot(root: Path) -> dict[str, tuple]:
    state = {}
    for path in sorted(root.rglob("*")):
        st = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        state[str(path.relative_to(root))] = (st.st_mtime_ns, digest)
    return state


def assert_refused(tmp_path: Path, args: list[str], names: str) -> None:
    before = snapshot(tmp_path)
    proc = run([*args, *TINY, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(errors) == 1, proc.stderr
    assert names in errors[0], errors[0]
    assert snapshot(tmp_path) == before


def make_images(folder: Path, count: int = 3) -> None:
    for d in ("0", "1"):
        (folder / d).mkdir(parents=True)
        for i in range(count):
            write_png(
                torch.full((1, 8, 8), 40 * i, dtype=torch.uint8), str(folder / d / f"{i}.png")
            )


@pytest.mark.slow  # a CLI subprocess: ~10 s of CPU
def test_empty_class_folder_is_named(tmp_path):
    make_images(tmp_path / "train")
    make_images(tmp_path / "meta")
    (tmp_path / "train" / "2").mkdir()
    args = ["dataset=image_folder", "dataset.train_dir=train", "dataset.meta_dir=meta"]
    assert_refused(tmp_path, args, str(Path("train") / "2"))


@pytest.mark.slow  # a CLI subprocess: ~10 s of CPU
def test_unreadable_image_is_named(tmp_path):
    make_images(tmp_path / "train")
    make_images(tmp_path / "meta")
    (tmp_path / "train" / "1" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    args = ["dataset=image_folder", "dataset.train_dir=train", "dataset.meta_dir=meta"]
    assert_refused(tmp_path, args, str(Path("train") / "1" / "1.png"))


@pytest.mark.slow  # a CLI subprocess: ~10 s of CPU
def test_a_trusted_file_listed_twice_is_named(tmp_path):
    make_images(tmp_path / "train")
    args = [
        "dataset=image_folder",
        "dataset.train_dir=train",
        "dataset.meta_files=[0/0.png,1/1.png,0/0.png]",
    ]
    assert_refused(tmp_path, args, "dataset.meta_files lists '0/0.png' twice")


@pytest.mark.slow  # a CLI subprocess: ~10 s of CPU
def test_missing_trusted_set_says_how_to_give_one(tmp_path):
    make_images(tmp_path / "train")
    assert_refused(
        tmp_path, ["dataset=image_folder", "dataset.train_dir=train"], "dataset.meta_dir"
    )


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


@pytest.mark.slow  # a CLI subprocess: ~10 s of CPU
def test_csv_without_the_label_column_is_named(tmp_path):
    write_csv(tmp_path / "t.csv", ["a", "b", "y"], [[1, 2, 0], [3, 4, 1]] * 5)
    args = ["dataset=tensors", "model=mlp", "dataset.path=t.csv", "dataset.meta_rows=[0,1]"]
    assert_refused(tmp_path, args, "t.csv has no column 'label'")


@pytest.mark.slow  # a CLI subprocess: ~10 s of CPU
def test_label_outside_the_classes_is_named(tmp_path):
    write_csv(tmp_path / "t.csv", ["a", "label"], [[1, "cat"], [3, "dog"]] * 5)
    write_csv(tmp_path / "m.csv", ["a", "label"], [[1, "cat"], [3, "cow"]])
    args = ["dataset=tensors", "model=mlp", "dataset.path=t.csv", "dataset.meta_path=m.csv"]
    assert_refused(tmp_path, args, "m.csv has the label 'cow'")


def _save(path: Path, **arrays) -> None:
    if path.suffix == ".npz":
        np.savez(path, **arrays)
    else:
        torch.save(arrays, path)


_X = np.arange(20, dtype=np.float32).reshape(10, 2)
_Y = np.arange(10) % 2


def _with(row: int, value: float) -> np.ndarray:
    x = _X.copy()
    x[row, 1] = value
    return x


def _plain_pickle(path: Path) -> None:
    """A .pt that torch.save did not write: pickle protocol 4, which torch warns about."""
    import pickle

    path.write_bytes(pickle.dumps({"x": [[1.0, 2.0]], "y": [0]}, protocol=4))


_TABLE = ["dataset=tensors", "model=mlp", "dataset.meta_rows=[0,1]"]


@pytest.mark.slow  # a CLI subprocess each: ~10 s of CPU
@pytest.mark.parametrize(
    ("name", "make", "extra", "names"),
    [
        ("t.npz", lambda p: _save(p, x=_with(3, np.nan), y=_Y), [],
         "t.npz has NaN or infinity in 'x' at row 3"),
        ("t.pt", lambda p: _save(p, x=torch.tensor(_with(7, np.inf)), y=torch.tensor(_Y)), [],
         "t.pt has NaN or infinity in 'x' at row 7"),
        ("t.npz", lambda p: _save(p, x=np.float32(1.0), y=_Y), [], "t.npz: 'x' is a single"),
        ("t.pt", lambda p: _save(p, x=["a", "b"], y=torch.tensor([0, 1])), [],
         "t.pt: 'x' is not an array of numbers"),
        ("t.pt", _plain_pickle, [], "t.pt (it holds Python objects other than arrays"),
        ("t.csv", lambda p: write_csv(p, ["a", "label"], [[1, 0], [2, ""], [3, 1]] * 4), [],
         "t.csv has an empty label in column 'label' on line 3"),
        ("t.csv", lambda p: write_csv(p, ["id", "a", "label"], [["u", 1, 0], ["v", 2, 1],
                                                                  ["u", 3, 1]] * 4),
         ["dataset.id_column=id"], "t.csv has the id 'u' on lines 2 and 4"),
        ("t.csv", lambda p: write_csv(p, ["a", "label"], [[1, 0], [2, 1]] * 5),
         ["dataset.meta_rows=[0,1,0]"], "dataset.meta_rows lists 0 twice"),
    ],
)  # fmt: skip
def test_bad_tensor_and_table_files_are_one_line(tmp_path, name, make, extra, names):
    """Every bad value is refused in every file format with the file and the row, column or
    key: exit 2, exactly one stderr line (no warning before it), nothing written."""
    make(tmp_path / name)
    before = snapshot(tmp_path)
    args = [*_TABLE, f"dataset.path={name}", *extra, *TINY, f"hydra.run.dir={tmp_path / 'run'}"]
    proc = run(args, tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    [line] = proc.stderr.splitlines()
    assert line.startswith("error: ") and names in line, line
    assert snapshot(tmp_path) == before


def test_sixteen_bit_images_are_scaled_by_their_own_range(tmp_path):
    """A 16-bit PNG among 8-bit ones: both in [0, 1], the 16-bit one by 65535."""
    from PIL import Image

    make_images(tmp_path / "train")
    make_images(tmp_path / "meta")
    deep = np.full((8, 8), 65535, dtype=np.uint16)
    deep[0, 0] = 0
    Image.fromarray(deep).save(tmp_path / "train" / "1" / "deep.png")
    bundle = build_dataset(
        "image_folder",
        train_dir=str(tmp_path / "train"),
        meta_dir=str(tmp_path / "meta"),
        test_dir=str(tmp_path / "meta"),
        grayscale=True,
        standardize=False,
    )
    x = bundle.train.inputs
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    deep_x = x[bundle.train_ids.index(str(tmp_path / "train" / "1" / "deep.png"))]
    assert (float(deep_x.min()), float(deep_x.max())) == (0.0, 1.0)
    eight_bit = x[bundle.train_ids.index(str(tmp_path / "train" / "1" / "2.png"))]
    assert float(eight_bit.max()) == pytest.approx(80 / 255)


def test_a_trusted_set_without_a_class_is_one_warning_naming_it(tmp_path, caplog):
    make_images(tmp_path / "train")
    (tmp_path / "train" / "2").mkdir()
    for i in range(3):
        write_png(torch.full((1, 8, 8), 9, dtype=torch.uint8), str(tmp_path / f"train/2/{i}.png"))
    make_images(tmp_path / "meta")  # classes 0 and 1 only
    with caplog.at_level("WARNING", logger="reweight.data.own"):
        build_dataset(
            "image_folder", train_dir=str(tmp_path / "train"), meta_dir=str(tmp_path / "meta")
        )
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    [missing] = [m for m in warned if "trusted" in m or "no example of class" in m]
    assert "no example of class '2'" in missing
    assert all("held out" in m or m == missing for m in warned), warned  # and nothing else


# -- in process ----------------------------------------------------------------------------------


def test_meta_files_leave_training_and_corruption_is_recorded(files):
    train = files["root"] / "images" / "train"
    trusted = sorted(str(p.relative_to(train)) for p in train.rglob("*.png"))[:20]
    kwargs = dict(
        train_dir=str(train),
        meta_files=trusted,
        grayscale=True,
        test_fraction=0.25,
        noise_type="symmetric",
        noise_rate=0.4,
    )
    bundle = build_dataset("image_folder", seed=3, **kwargs)
    # the trusted files: the meta set and, 2 per class present, the validation set
    present = len(set(bundle.meta.labels.tolist()))
    assert len(bundle.meta) == 20 - 2 * present and len(bundle.val) == 2 * present
    assert not set(bundle.train_ids) & {str(train / p) for p in trusted}
    assert len(bundle.train) + len(bundle.test) == N_TRAIN - 20
    assert bundle.info["noise_type"] == "symmetric" and bundle.info["num_corrupted"] > 0
    assert abs(bundle.info["noise_rate_measured"] - 0.4) < 0.15
    x = bundle.train.inputs
    assert x.shape[1:] == (1, 28, 28) and abs(float(x.mean())) < 1e-4  # standardised
    again = build_dataset("image_folder", seed=3, **kwargs)
    assert torch.equal(again.train_labels, bundle.train_labels)
    other = build_dataset("image_folder", seed=4, **kwargs)
    assert not torch.equal(other.corrupted, bundle.corrupted)


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_tensor_files_and_per_class_meta(tmp_path, suffix):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(100, 3, 4, generator=g), torch.arange(100) % 4
    path = tmp_path / f"d{suffix}"
    if suffix == ".pt":
        torch.save({"x": x, "y": y}, path)
    else:
        np.savez(path, x=x.numpy(), y=y.numpy())
    bundle = build_dataset(
        "tensors", path=str(path), meta_path=str(path), meta_per_class=2, test_fraction=0.1
    )
    assert bundle.class_names == ["0", "1", "2", "3"]
    assert bundle.meta.labels.bincount().tolist() == [2, 2, 2, 2]
    assert (len(bundle.train), len(bundle.test)) == (90, 10)
    assert bundle.train.inputs.shape[1:] == (3, 4)


def test_suspect_order_and_precision_at_k():
    weights = torch.tensor([1.0, 0.0, 0.5, 0.0, float("nan")])
    losses = torch.tensor([0.1, 1.0, 9.0, 2.0, 5.0])
    order = suspect_order(weights, losses)
    assert order.tolist() == [3, 1, 2, 4, 0]  # lowest weight, ties by higher loss; NaN = 1
    corrupted = torch.tensor([False, True, False, True, False])
    assert precision_recall_at_k(order, corrupted, 2) == (1.0, 1.0)
    assert precision_recall_at_k(order, corrupted, 4) == (0.5, 1.0)
    metrics = ranking_metrics(weights, losses, corrupted)
    assert metrics["weight"]["precision_at_k"] == 1.0
    assert metrics["small_loss"]["precision_at_k"] == 0.0  # losses 9 and 5 lead: both clean


def test_inspect_without_suspects_is_one_error_line(tmp_path, capsys):
    assert inspect_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "suspects.csv" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_inspect_prints_the_top_rows_and_plots_known_corruption(tmp_path, capsys, caplog):
    rows = [
        {
            "rank": r + 1,
            "index": i,
            "id": f"row {i}",
            "given_label": "a",
            "predicted_label": "b",
            "probability": "0.9",
            "loss": str(3.0 - r),
            "final_weight": str(0.1 * r),
            "mean_weight": "1",
            "corrupted": int(r < 2),
        }
        for r, i in enumerate([4, 0, 3, 1, 2])
    ]
    write_suspects(tmp_path / "suspects.csv", rows)
    with caplog.at_level("INFO", logger="reweight.outputs.inspect"):
        assert inspect_main([str(tmp_path), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "row 4" in out and "row 0" in out and "row 3" not in out
    assert "wrote" not in out  # the report on stdout, what was written in the log
    assert [r.getMessage() for r in caplog.records] == [
        f"wrote {tmp_path / 'suspects_scatter.png'}"
    ]
    assert (tmp_path / "suspects_scatter.png").stat().st_size > 0
    assert not (tmp_path / "suspects.png").exists()  # no config.yaml: no images to show


@pytest.mark.parametrize("final_weights", [0, 1])
def test_suspects_table_ranks_by_final_else_mean_weight(final_weights):
    trainer = tiny_l2rw_trainer(final_weights)
    final = trainer.fit().example_weights
    assert (final is None) == (final_weights == 0)
    rows, ranked_by, losses = suspects_table(trainer, final=final, class_names=["a", "b", "c"])
    assert len(rows) == 50 and {r["given_label"] for r in rows} == {"a", "b", "c"}
    expected = final if final_weights else trainer.mean_example_weights()
    torch.testing.assert_close(ranked_by, expected.float(), rtol=0, atol=0, equal_nan=True)
    assert ranked_by.isnan().any() == (final_weights == 0)  # 4 x 10 draws leave some unseen
    assert [r["index"] for r in rows] == suspect_order(ranked_by, losses).tolist()
    assert (rows[0]["final_weight"] == "") == (final_weights == 0)
