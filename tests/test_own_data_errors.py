"""Your own data (reweight.data.own) in-process on real files: each bad file or key is refused
with its one-line message (test_own_data.py checks some of them through the CLI, in a
subprocess a mutation run cannot see), and what a good file becomes: classes, ids, channels,
the trusted rows, the long tail and the noise, each against what was written."""

from __future__ import annotations

import csv
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import write_png as _write_png

from reweight.data import build_dataset


def write_csv(path: Path, header: list[str], rows: list[list]) -> str:
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return str(path)


def tensors(path: str, **params):
    params.setdefault("val_per_class", 0)
    return build_dataset("tensors", path=path, **params)


def write_png(image: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The image decoding and encoding", DeprecationWarning)
        _write_png(image, str(path))


def images(folder: Path, classes=("a", "b"), per_class: int = 3, size=(8, 8), channels=1):
    """per_class PNG images in each class folder, image i of class c filled with 10 * c + i."""
    for c, name in enumerate(classes):
        for i in range(per_class):
            value = 10 * c + i
            write_png(
                torch.full((channels, *size), value, dtype=torch.uint8), folder / name / f"{i}.png"
            )


def image_folder(train: Path, **params):
    params.setdefault("val_per_class", 0)
    return build_dataset("image_folder", train_dir=str(train), **params)


TABLE = [[float(i), i % 2] for i in range(10)]


# -- tables ------------------------------------------------------------------------------------


def test_csv_refusals_name_the_file_line_and_fix(tmp_path: Path):
    p = tmp_path / "t.csv"
    with pytest.raises(FileNotFoundError) as info:
        tensors(str(tmp_path / "none.csv"), meta_rows=[0])
    assert (
        str(info.value)
        == f"dataset.path={str(tmp_path / 'none.csv')!r} is not a file: give a CSV file"
    )
    p.write_text("")
    with pytest.raises(ValueError) as info:
        tensors(str(p), meta_rows=[0])
    assert str(info.value) == f"the CSV file {p} is empty: it needs a header row and data rows"
    write_csv(p, [f"c{i}" for i in range(11)], [list(range(11))])
    with pytest.raises(ValueError) as info:
        tensors(str(p), meta_rows=[0])
    assert str(info.value) == (
        f"the CSV file {p} has no column 'label' (columns: c0, c1, c2, c3, c4, c5, c6, c7, c8, "
        "c9, ...): set dataset.label_column to the column holding the labels"
    )
    write_csv(p, ["a", "y"], [[1, 0]])
    with pytest.raises(ValueError, match=r"\(columns: a, y\): set dataset"):
        tensors(str(p), meta_rows=[0])
    with pytest.raises(ValueError) as info:
        tensors(str(p), meta_rows=[0], label_column="y", id_column="id")
    assert str(info.value) == (
        f"the CSV file {p} has no column 'id' (dataset.id_column): name one of its columns or "
        "set it to null"
    )
    write_csv(p, ["a", "label"], [])
    with pytest.raises(ValueError) as info:
        tensors(str(p), meta_rows=[0])
    assert str(info.value) == f"the CSV file {p} has a header but no data rows"
    write_csv(p, ["a", "label"], [[1, 0], [2, 1, 3]])
    with pytest.raises(ValueError) as info:
        tensors(str(p), meta_rows=[0])
    assert str(info.value) == (
        f"the CSV file {p} has 3 fields on line 3, the header 2: fix that line"
    )
    write_csv(p, ["a", "label"], [[1, 0], ["x1", 1]])
    with pytest.raises(ValueError) as info:
        tensors(str(p), meta_rows=[0])
    assert str(info.value) == (
        f"the CSV file {p} has a non-numeric value 'x1' in column 'a' on line 3: feature "
        "columns must be numbers (name an identifier column with dataset.id_column)"
    )
    write_csv(p, ["a", "label"], [[1, 0], [2, 1], ["inf", 0]])
    with pytest.raises(ValueError) as info:
        tensors(str(p), meta_rows=[0])
    assert str(info.value) == f"the CSV file {p} has NaN or infinity on line 4: fix it"
    write_csv(p, ["a", "label"], [[1, 0], [2, " "], [3, 1]])
    with pytest.raises(ValueError) as info:
        tensors(str(p), meta_rows=[0])
    assert str(info.value) == (
        f"the CSV file {p} has an empty label in column 'label' on line 3: give every row its "
        "label, or remove the row"
    )
    write_csv(p, ["id", "a", "label"], [["u", 1, 0], ["v", 2, 1], ["w", 3, 0], ["v", 4, 1]])
    with pytest.raises(ValueError) as info:
        tensors(str(p), meta_rows=[0], id_column="id")
    assert str(info.value) == (
        f"the CSV file {p} has the id 'v' on lines 3 and 5 (column 'id'): every row needs its "
        "own id"
    )
    p.write_bytes(b"a,label\n\xff\xfe,0\n")
    with pytest.raises(ValueError, match=rf"^cannot read the CSV file {p} \(.*\): fix or replace"):
        tensors(str(p), meta_rows=[0])


def test_a_table_read_with_its_ids_classes_and_trusted_rows(tmp_path: Path):
    rows = [
        [f"id{i}", f"{i}.5", "10" if i % 3 == 0 else "9" if i % 3 == 1 else "-2", 2 * i]
        for i in range(12)
    ]
    rows.insert(3, [])  # a blank line is skipped
    p = write_csv(tmp_path / "t.csv", ["name", "a", "label", "b"], rows)
    bundle = tensors(
        p, id_column="name", meta_rows=[0, 1, 2], test_fraction=0.25, standardize=False
    )
    assert bundle.class_names == ["-2", "9", "10"]  # numerically, not as strings
    kept = bundle.train.source_indices.tolist()
    assert not {0, 1, 2} & set(kept) and len(kept) == 12 - 3 - 2
    assert bundle.train_ids == [f"id{i}" for i in kept]
    label = {0: 2, 1: 1, 2: 0}
    torch.testing.assert_close(bundle.meta.labels, torch.tensor([2, 1, 0]))
    torch.testing.assert_close(bundle.train.labels, torch.tensor([label[i % 3] for i in kept]))
    expected = torch.tensor([[i + 0.5, 2.0 * i] for i in kept])
    torch.testing.assert_close(bundle.train.inputs, expected, rtol=0, atol=0)
    torch.testing.assert_close(bundle.meta.inputs, torch.tensor([[0.5, 0.0], [1.5, 2], [2.5, 4]]))
    assert bundle.in_channels == 1 and bundle.num_classes == 3
    rows = [row[1:] for row in rows if row]
    p = write_csv(tmp_path / "plain.csv", ["a", "label", "b"], rows)
    no_ids = tensors(p, meta_rows=[0, 1, 2], test_fraction=0.25)
    assert no_ids.train_ids == [f"row {i}" for i in no_ids.train.source_indices.tolist()]


def test_string_labels_and_given_classes(tmp_path: Path):
    p = write_csv(
        tmp_path / "t.csv", ["a", "label"], [[i, ["cat", "dog", "ant"][i % 3]] for i in range(9)]
    )
    assert tensors(p, meta_rows=[0, 1, 2]).class_names == ["ant", "cat", "dog"]
    given = tensors(p, meta_rows=[0, 1, 2], classes=["dog", "cat", "ant", "eel"])
    assert given.class_names == ["dog", "cat", "ant", "eel"] and given.num_classes == 4
    torch.testing.assert_close(given.meta.labels, torch.tensor([1, 0, 2]))
    with pytest.raises(ValueError) as info:
        tensors(p, meta_rows=[0], classes=["cat", "dog"])
    assert str(info.value) == (
        f"{p} has the label 'ant' on data row 2, not one of the classes (cat, dog): fix the "
        "label or list every class in dataset.classes"
    )
    many = [f"c{i}" for i in range(11)]
    with pytest.raises(ValueError, match=r"\(c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, \.\.\.\)"):
        tensors(p, meta_rows=[0], classes=many)
    one = write_csv(tmp_path / "one.csv", ["a", "label"], [[1, "x"], [2, "x"]])
    with pytest.raises(ValueError) as info:
        tensors(one, meta_rows=[0])
    assert str(info.value) == f"{one} has 1 class (x): need at least 2"


def test_trusted_rows_and_files_are_checked(tmp_path: Path):
    p = write_csv(tmp_path / "t.csv", ["a", "label"], TABLE)
    with pytest.raises(ValueError) as info:
        tensors(p)
    assert str(info.value) == (
        "no trusted set: give dataset.meta_path (a file like dataset.path) or dataset.meta_rows "
        "(the training rows, 0-based whose labels you trust, e.g. dataset.meta_rows=[0,17,42]); "
        "reweight learns the weights from it"
    )
    with pytest.raises(ValueError) as info:
        tensors(p, meta_rows=[0, 10])
    assert str(info.value) == f"dataset.meta_rows has 10, not a data row of {p} (0 to 9)"
    with pytest.raises(ValueError, match=r"has -1, not a data row"):
        tensors(p, meta_rows=[-1])
    with pytest.raises(ValueError) as info:
        tensors(p, meta_rows=[3, 4, 3])
    assert str(info.value) == "dataset.meta_rows lists 3 twice: list each once"
    assert len(tensors(p, meta_rows=[0, 9], test_fraction=0.2).meta) == 2
    other = write_csv(tmp_path / "m.csv", ["a", "b", "label"], [[1, 2, 0], [3, 4, 1]])
    with pytest.raises(ValueError) as info:
        tensors(p, meta_path=other)
    assert str(info.value) == (
        f"{other} has examples of shape (2,), {p} of shape (1,): both need the same feature columns"
    )
    with pytest.raises(ValueError) as info:
        tensors(p)
    no_features = write_csv(tmp_path / "n.csv", ["label"], [[0], [1]] * 3)
    with pytest.raises(ValueError) as info:
        tensors(no_features, meta_rows=[0, 1])
    assert str(info.value) == f"{no_features} has no feature column besides 'label'"
    with pytest.raises(ValueError) as info:
        build_dataset("tensors", val_per_class=0)
    assert str(info.value) == ("dataset.path is not set: give a .csv, .pt or .npz file of examples")


def test_a_test_file_replaces_the_held_out_split(tmp_path: Path):
    p = write_csv(tmp_path / "t.csv", ["a", "label"], TABLE)
    test = write_csv(tmp_path / "test.csv", ["a", "label"], [[100, 1], [200, 0], [300, 1]])
    bundle = tensors(p, meta_rows=[0, 1], test_path=test, standardize=False)
    assert "held_out_test" not in bundle.info and len(bundle.train) == 8
    torch.testing.assert_close(bundle.test.inputs, torch.tensor([[100.0], [200.0], [300.0]]))
    torch.testing.assert_close(bundle.test.labels, torch.tensor([1, 0, 1]))


# -- tensor files ------------------------------------------------------------------------------


def save(path: Path, **arrays) -> str:
    if path.suffix == ".npz":
        np.savez(path, **arrays)
    else:
        torch.save(arrays, path)
    return str(path)


X = np.arange(20, dtype=np.float32).reshape(10, 2)
Y = np.arange(10) % 2


@pytest.mark.parametrize("suffix", [".npz", ".pt", ".PTH"])
def test_tensor_file_refusals(tmp_path: Path, suffix: str):
    def at(name: str) -> Path:
        return tmp_path / (name + suffix)

    wrap = (lambda a: a) if suffix == ".npz" else torch.as_tensor
    with pytest.raises(FileNotFoundError) as info:
        tensors(str(at("none")), meta_rows=[0])
    assert str(info.value) == f"dataset.path={str(at('none'))!r} is not a file"
    nan = X.copy()
    nan[6, 1] = np.nan
    p = save(at("nan"), x=wrap(nan), y=wrap(Y))
    with pytest.raises(ValueError) as info:
        tensors(p, meta_rows=[0])
    assert str(info.value) == f"{p} has NaN or infinity in 'x' at row 6 (0-based): fix it"
    p = save(at("scalar"), x=wrap(np.float32(1.0)), y=wrap(Y))
    with pytest.raises(ValueError) as info:
        tensors(p, meta_rows=[0])
    assert str(info.value) == (
        f"{p}: 'x' is a single number; it needs one row per example, shape (N, ...)"
    )
    p = save(at("bool"), x=wrap(X > 3), y=wrap(Y))
    with pytest.raises(ValueError) as info:
        tensors(p, meta_rows=[0])
    assert str(info.value) == f"{p}: 'x' must be numbers (float or integer); got dtype torch.bool"
    p = save(at("complex"), x=wrap(X.astype(np.complex64)), y=wrap(Y))
    with pytest.raises(ValueError, match=r"got dtype torch.complex64$"):
        tensors(p, meta_rows=[0])
    for bad_y, shape in ((Y[:9], "(9,)"), (Y.reshape(5, 2), "(5, 2)")):
        p = save(at("y"), x=wrap(X), y=wrap(bad_y))
        with pytest.raises(ValueError) as info:
            tensors(p, meta_rows=[0])
        assert str(info.value) == (
            f"{p}: 'y' must be integer labels of shape (10,); got dtype torch.int64, shape {shape}"
        )
    p = save(at("float_y"), x=wrap(X), y=wrap(Y.astype(np.float32)))
    with pytest.raises(ValueError, match=r"got dtype torch.float32, shape \(10,\)$"):
        tensors(p, meta_rows=[0])
    p = save(at("no_y"), x=wrap(X), z=wrap(Y))
    with pytest.raises(ValueError) as info:
        tensors(p, meta_rows=[0])
    assert str(info.value) == (
        f"{p} must hold a dict of a features tensor 'x' (N, ...) and a labels tensor 'y' (N,): "
        "e.g. torch.save({'x': x, 'y': y}, path) or numpy.savez(path, x=x, y=y)"
    )
    p = save(at("no_x"), y=wrap(Y))
    with pytest.raises(ValueError, match=r"must hold a dict of a features tensor"):
        tensors(p, meta_rows=[0])
    at("garbage").write_bytes(b"")
    with pytest.raises(ValueError, match=rf"^cannot read {at('garbage')} \(\w+"):
        tensors(str(at("garbage")), meta_rows=[0])


def test_a_list_of_numbers_is_read_as_a_tensor(tmp_path: Path):
    p = tmp_path / "t.pt"
    torch.save({"x": [[1.0, 2.0]] * 4, "y": [0, 1, 0, 1]}, p)
    bundle = tensors(str(p), meta_rows=[0, 1], test_fraction=0.5, standardize=False)
    torch.testing.assert_close(bundle.train.inputs, torch.tensor([[1.0, 2.0]]))
    torch.save({"x": ["a", "b"], "y": torch.tensor([0, 1])}, p)
    with pytest.raises(ValueError) as info:
        tensors(str(p), meta_rows=[0])
    assert str(info.value).startswith(f"{p}: 'x' is not an array of numbers (list: ")
    assert str(info.value).endswith("): save a tensor or a numpy array")


def test_a_pickle_is_refused_without_advice_to_run_it(tmp_path: Path):
    p = tmp_path / "t.pt"
    p.write_bytes(pickle.dumps({"x": [[1.0]], "y": [0]}, protocol=4))
    with pytest.raises(ValueError) as info:
        tensors(str(p), meta_rows=[0])
    assert str(info.value) == (
        f"cannot read {p} (it holds Python objects other than arrays and plain containers): "
        "fix or replace it"
    )
    assert "weights_only" not in str(info.value)


def test_integer_and_tensor_features_keep_their_values(tmp_path: Path):
    p = save(tmp_path / "t.npz", x=(np.arange(72).reshape(6, 2, 2, 3)).astype(np.int16), y=Y[:6])
    bundle = tensors(p, meta_rows=[0, 1], test_fraction=0.25, standardize=False)
    assert bundle.train.inputs.dtype == torch.float32 and bundle.in_channels == 2
    i = bundle.train.source_indices[0].item()
    torch.testing.assert_close(
        bundle.train.inputs[0], torch.arange(72).reshape(6, 2, 2, 3)[i].float()
    )


# -- image folders -----------------------------------------------------------------------------


def test_image_folder_refusals(tmp_path: Path):
    train = tmp_path / "train"
    with pytest.raises(ValueError) as info:
        build_dataset("image_folder", val_per_class=0)
    assert str(info.value) == (
        "dataset.train_dir is not set: give the folder of training images, one subfolder per "
        "class (dataset.train_dir=path/to/train)"
    )
    with pytest.raises(ValueError) as info:
        image_folder(train)
    assert str(info.value) == (
        "no trusted set: give dataset.meta_dir (a folder with the same class folders) or "
        "dataset.meta_files (the training images, paths relative to train_dir whose labels you "
        "trust, e.g. dataset.meta_files=[cat/1.png,dog/7.png]); reweight learns the weights "
        "from it"
    )
    with pytest.raises(FileNotFoundError) as info:
        image_folder(train, meta_files=["a/0.png"])
    assert str(info.value) == (
        f"dataset.train_dir={str(train)!r} is not a folder: give a folder holding one subfolder "
        "of images per class"
    )
    train.mkdir()
    (train / ".hidden").mkdir()
    (train / "file.png").write_text("x")
    with pytest.raises(ValueError) as info:
        image_folder(train, meta_files=["a/0.png"])
    assert str(info.value) == (
        f"{train} has no class folders: put the images of each class in a subfolder named "
        "after the class (ImageFolder layout)"
    )
    (train / "a").mkdir()
    (train / "a" / "notes.txt").write_text("not an image")
    (train / "a" / ".0.png").write_text("hidden")
    with pytest.raises(ValueError) as info:
        image_folder(train, meta_files=["a/0.png"])
    assert str(info.value) == (
        f"the class folder {train / 'a'} holds no image (.png, .jpg, .jpeg, .gif, .webp): add "
        "images or remove the folder"
    )
    images(train)
    write_png(torch.zeros(1, 8, 9, dtype=torch.uint8), train / "b" / "9.PNG")
    with pytest.raises(ValueError) as info:
        image_folder(train, meta_files=["a/0.png"])
    assert str(info.value) == (
        f"the image {train / 'b' / '9.PNG'} is 9x8 but {train / 'a' / '0.png'} is 8x8: set "
        "dataset.image_size to resize every image"
    )
    (train / "b" / "9.PNG").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ValueError, match=rf"^cannot read the image {train / 'b' / '9.PNG'} \("):
        image_folder(train, meta_files=["a/0.png"])
    (train / "b" / "9.PNG").unlink()
    with pytest.raises(ValueError) as info:
        image_folder(train, meta_files=["a/0.png", "b/7.png"])
    assert str(info.value) == (
        f"dataset.meta_files names {train / 'b/7.png'}, which is not an image of "
        f"dataset.train_dir={train}: give paths relative to train_dir"
    )
    with pytest.raises(ValueError) as info:
        image_folder(train, meta_files=["a/0.png", "a/0.png"])
    assert str(info.value) == "dataset.meta_files lists 'a/0.png' twice: list each once"


def test_trusted_and_test_folders_are_checked_against_training(tmp_path: Path):
    images(tmp_path / "train")
    images(tmp_path / "meta", classes=("a", "c"))
    with pytest.raises(ValueError) as info:
        image_folder(tmp_path / "train", meta_dir=str(tmp_path / "meta"))
    assert str(info.value) == (
        f"{tmp_path / 'meta' / 'c'} is a class the training folder does not have (classes: a, "
        "b): rename or remove it"
    )
    images(tmp_path / "big", size=(6, 6))
    with pytest.raises(ValueError) as info:
        image_folder(tmp_path / "train", meta_dir=str(tmp_path / "big"))
    assert str(info.value) == (
        f"the image {tmp_path / 'big' / 'a' / '0.png'} is 6x6 but the training images are 8x8: "
        "set dataset.image_size to resize every image"
    )
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ValueError) as info:
        image_folder(tmp_path / "train", meta_dir=str(tmp_path / "empty"))
    assert (
        str(info.value)
        == f"{tmp_path / 'empty'} holds no image: put the images in its class folders"
    )
    with pytest.raises(FileNotFoundError, match=r"^dataset\.test_dir='"):
        image_folder(
            tmp_path / "train", meta_dir=str(tmp_path / "train"), test_dir=str(tmp_path / "none")
        )


def test_images_labels_channels_and_sizes(tmp_path: Path):
    images(tmp_path / "train", per_class=4, channels=3)
    images(tmp_path / "meta", classes=("b",), per_class=2, channels=3)  # a class short
    images(tmp_path / "test", per_class=1, channels=3)
    bundle = image_folder(
        tmp_path / "train",
        meta_dir=str(tmp_path / "meta"),
        test_dir=str(tmp_path / "test"),
        standardize=False,
    )
    assert bundle.class_names == ["a", "b"] and bundle.in_channels == 3
    assert bundle.train.inputs.shape == (8, 3, 8, 8)
    expected = torch.tensor([10 * c + i for c in range(2) for i in range(4)]) / 255
    torch.testing.assert_close(bundle.train.inputs[:, 1, 3, 3], expected)
    torch.testing.assert_close(bundle.meta.labels, torch.tensor([1, 1]))
    assert bundle.info["meta_classes_missing"] == ["a"]
    assert bundle.info["image_shape"] == [3, 8, 8]
    assert bundle.info["train_dir"] == str((tmp_path / "train").resolve())
    gray = image_folder(
        tmp_path / "train",
        meta_files=["a/1.png", "b/2.png"],
        grayscale=True,
        image_size=4,
        test_fraction=0.2,
        standardize=False,
    )
    assert gray.in_channels == 1 and gray.train.inputs.shape[1:] == (1, 4, 4)
    assert len(gray.train) == 5 and len(gray.test) == 1
    torch.testing.assert_close(gray.meta.inputs[:, 0, 0, 0], torch.tensor([1.0, 12.0]) / 255)
    torch.testing.assert_close(gray.meta.labels, torch.tensor([0, 1]))
    kept = {Path(p).relative_to(tmp_path / "train").as_posix() for p in gray.train_ids}
    assert not {"a/1.png", "b/2.png"} & kept


# -- the split protocol ------------------------------------------------------------------------


def test_meta_per_class_draws_that_many_of_each_class_or_says_which_is_short(tmp_path: Path):
    p = write_csv(tmp_path / "t.csv", ["a", "label"], [[i, i % 2] for i in range(20)])
    m = write_csv(tmp_path / "m.csv", ["a", "label"], [[100 + i, int(i < 3)] for i in range(8)])
    bundle = tensors(p, meta_path=m, meta_per_class=2, standardize=False)
    torch.testing.assert_close(bundle.meta.labels.sort().values, torch.tensor([0, 0, 1, 1]))
    for x, y in zip(bundle.meta.inputs[:, 0].tolist(), bundle.meta.labels.tolist(), strict=True):
        assert int(x >= 103) == 1 - y  # each drawn example kept its own label
    assert len(tensors(p, meta_path=m, meta_per_class=3).meta) == 6
    with pytest.raises(ValueError) as info:
        tensors(p, meta_path=m, meta_per_class=4)
    assert str(info.value) == (
        "meta_per_class=4 but the trusted set has 3 examples of class '1'; lower "
        "dataset.meta_per_class or set it to null to use the whole trusted set"
    )


def test_the_long_tail_and_the_noise_are_recorded(tmp_path: Path):
    p = write_csv(tmp_path / "t.csv", ["a", "label"], [[i, i % 3] for i in range(300)])
    test = write_csv(tmp_path / "test.csv", ["a", "label"], [[0, 0], [1, 1], [2, 2]])
    bundle = tensors(p, meta_rows=[0, 1, 2], imbalance_factor=4.0, test_path=test)
    counts = bundle.info["long_tail_counts"]
    assert bundle.info["imbalance_factor"] == 4.0
    assert counts == [99, 49, 24]  # int(99 * 4 ** (-i / 2)), 99 per class left for training
    assert torch.bincount(bundle.true_labels, minlength=3).tolist() == counts
    noisy = tensors(p, meta_rows=[0, 1, 2], noise_rate=0.4, noise_type="uniform")
    assert noisy.info["noise_type"] == "uniform" and noisy.info["noise_rate"] == 0.4
    changed = (noisy.train_labels != noisy.true_labels).float().mean().item()
    assert noisy.corrupted.float().mean().item() == pytest.approx(changed)
    assert 0.2 < changed < 0.45  # uniform noise at 0.4 over 3 classes changes ~ 0.4 * 2 / 3
    torch.testing.assert_close(noisy.train.labels, noisy.train_labels)
    assert "long_tail_counts" not in noisy.info
    clean = tensors(p, meta_rows=[0, 1, 2])
    assert "noise_rate" not in clean.info and not clean.corrupted.any()


def test_a_constant_feature_is_left_unscaled(tmp_path: Path):
    p = write_csv(tmp_path / "t.csv", ["a", "b", "label"], [[i, 7, i % 2] for i in range(10)])
    bundle = tensors(p, meta_rows=[0, 1], test_fraction=0.2)
    assert bundle.info["standardized"]["std"][1] == 1.0
    torch.testing.assert_close(bundle.train.inputs[:, 1], torch.zeros(len(bundle.train)))
    one = write_csv(tmp_path / "one.csv", ["a", "label"], [[3, 0], [5, 1], [4, 0]])
    with warnings.catch_warnings():  # one training row: std is NaN (torch warns of it)
        warnings.filterwarnings("ignore", "std\\(\\): degrees of freedom", UserWarning)
        single = tensors(one, meta_rows=[0], test_fraction=0.5)
    assert single.info["standardized"]["std"] == [1.0]
    torch.testing.assert_close(single.train.inputs, torch.zeros(1, 1))


def test_an_unreadable_tensor_file_says_why_in_a_few_words(tmp_path: Path):
    """The error's type and its first line (the type alone when it says nothing more)."""
    cases = {
        "a.npz": (b"", "EOFError: No data left in file"),
        "a.pt": (b"", "EOFError"),
        "c.npz": (b"not a zip", "ValueError: This file contains pickled (object) data. If you "
                  "trust the file you can load it unsafely using the `allow_pickle=` keyword "
                  "argument or `pickle.load()`."),
    }  # fmt: skip
    for name, (data, why) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError) as info:
            tensors(str(tmp_path / name), meta_rows=[0])
        assert str(info.value) == f"cannot read {tmp_path / name} ({why}): fix or replace it"
    p = tmp_path / "y.pt"
    torch.save({"x": torch.ones(4, 2), "y": ["a", "b", "c", "d"]}, p)
    with pytest.raises(ValueError) as info:
        tensors(str(p), meta_rows=[0])
    assert str(info.value) == (
        f"{p}: 'y' is not an array of numbers (list: too many dimensions 'str'): save a tensor "
        "or a numpy array"
    )


def test_an_npz_of_python_objects_is_not_unpickled(tmp_path: Path):
    x = np.empty((4, 2), dtype=object)
    x[:] = 1.0
    np.savez(tmp_path / "o.npz", x=x, y=np.arange(4) % 2)
    with pytest.raises(ValueError) as info:
        tensors(str(tmp_path / "o.npz"), meta_rows=[0])
    assert str(info.value) == (
        f"cannot read {tmp_path / 'o.npz'} (ValueError: Object arrays cannot be loaded when "
        "allow_pickle=False): fix or replace it"
    )


def test_ten_columns_are_listed_whole_and_a_quoted_label_keeps_its_line_break(tmp_path: Path):
    p = write_csv(tmp_path / "t.csv", [f"c{i}" for i in range(10)], [list(range(10))])
    with pytest.raises(ValueError) as info:
        tensors(p, meta_rows=[0])
    assert "(columns: c0, c1, c2, c3, c4, c5, c6, c7, c8, c9): set" in str(info.value)
    rows = [[i, "a\r\nb" if i % 2 else "c"] for i in range(6)]  # csv quotes the first label
    p = write_csv(tmp_path / "q.csv", ["v", "label"], rows)
    assert tensors(p, meta_rows=[0, 1]).class_names == ["a\r\nb", "c"]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"standardize": "yes"}, "standardize must be true or false; got 'yes'"),
        ({"meta_per_class": 0}, "meta_per_class must be an integer >= 1; got 0"),
        ({"test_fraction": 1.0}, "test_fraction must be a number in [0, 1); got 1.0"),
        ({"noise_rate": -0.1}, "noise_rate must be a number in [0, 1); got -0.1"),
        ({"imbalance_factor": 0.5}, "imbalance_factor must be a number >= 1; got 0.5"),
        ({"noise_type": "gauss"},
         "noise_type must be one of uniform, symmetric, flip, flip2, pair; got 'gauss'"),
    ],
)  # fmt: skip
def test_each_key_of_a_table_is_checked_by_name(tmp_path: Path, params, message):
    p = write_csv(tmp_path / "t.csv", ["a", "label"], TABLE)
    with pytest.raises(ValueError) as info:
        tensors(p, meta_rows=[0, 1], **params)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"grayscale": 1}, "grayscale must be true or false; got 1"),
        ({"standardize": "no"}, "standardize must be true or false; got 'no'"),
        ({"image_size": 0}, "image_size must be an integer >= 1; got 0"),
        ({"meta_per_class": 0}, "meta_per_class must be an integer >= 1; got 0"),
    ],
)
def test_each_key_of_an_image_folder_is_checked_by_name(tmp_path: Path, params, message):
    with pytest.raises(ValueError) as info:
        image_folder(tmp_path, meta_files=["a/0.png"], **params)
    assert str(info.value) == message


def test_the_smallest_meta_per_class_and_image_size_are_one(tmp_path: Path):
    p = write_csv(tmp_path / "t.csv", ["a", "label"], TABLE)
    bundle = tensors(p, meta_path=p, meta_per_class=1, test_fraction=0.2)
    assert sorted(bundle.meta.labels.tolist()) == [0, 1]
    assert bundle.info["source"] == "tensors" and bundle.info["path"] == str(Path(p).resolve())
    images(tmp_path / "train")
    one = image_folder(tmp_path / "train", meta_dir=str(tmp_path / "train"), image_size=1,
                       meta_per_class=1)  # fmt: skip
    assert one.train.inputs.shape[1:] == (3, 1, 1) and len(one.meta) == 2
    assert one.info["source"] == "image_folder"


def test_trusted_and_test_files_are_named_in_their_messages(tmp_path: Path):
    p = write_csv(tmp_path / "t.csv", ["a", "label"], TABLE)
    for key in ("meta_path", "test_path"):
        missing = str(tmp_path / f"{key}.csv")
        params = {"meta_rows": [0]} if key == "test_path" else {}
        with pytest.raises(FileNotFoundError) as info:
            tensors(p, **{key: missing}, **params)
        assert str(info.value) == f"dataset.{key}={missing!r} is not a file: give a CSV file"
    bad = write_csv(tmp_path / "bad.csv", ["a", "label"], [[1, 0], [2, 7]])
    with pytest.raises(ValueError) as info:
        tensors(p, meta_path=bad)
    assert str(info.value) == (
        f"{bad} has the label '7' on data row 1, not one of the classes (0, 1): fix the label or "
        "list every class in dataset.classes"
    )


def test_labels_are_numbers_only_when_every_one_is_an_integer(tmp_path: Path):
    p = write_csv(tmp_path / "t.csv", ["a", "label"],
                  [[i, ["X10", "X9", "-X"][i % 3]] for i in range(9)])  # fmt: skip
    assert tensors(p, meta_rows=[0, 1, 2]).class_names == ["-X", "X10", "X9"]  # as strings
    ten = [str(i) for i in range(10)]
    q = write_csv(tmp_path / "q.csv", ["a", "label"], [[i, i % 10] for i in range(20)] + [[0, 10]])
    with pytest.raises(ValueError, match=r"classes \(0, 1, 2, 3, 4, 5, 6, 7, 8, 9\): fix"):
        tensors(q, meta_rows=[0], classes=ten)


def test_images_are_resized_with_antialiasing_as_pil_does(tmp_path: Path):
    """A 12x12 noise image read at image_size=4: PIL's bilinear resize (which filters over the
    whole footprint when it shrinks) within a grey level; without antialiasing it is 0.44 off."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    noise = (torch.rand(12, 12, generator=g) * 255).to(torch.uint8)
    for name in ("a", "b"):
        write_png(noise[None], tmp_path / "train" / name / "0.png")
        write_png(noise[None], tmp_path / "train" / name / "1.png")
    bundle = image_folder(tmp_path / "train", meta_files=["a/0.png", "b/0.png"], image_size=4,
                          grayscale=True, standardize=False, test_fraction=0.5)  # fmt: skip
    small = Image.fromarray(noise.numpy()).resize((4, 4), Image.BILINEAR)
    want = torch.tensor(np.array(small), dtype=torch.float32) / 255
    torch.testing.assert_close(bundle.meta.inputs[0, 0], want, rtol=0, atol=3 / 255)


def test_the_second_image_of_another_size_is_named_with_both_sizes(tmp_path: Path):
    write_png(torch.zeros(1, 8, 10, dtype=torch.uint8), tmp_path / "train" / "a" / "0.png")
    write_png(torch.zeros(1, 7, 6, dtype=torch.uint8), tmp_path / "train" / "a" / "1.png")
    with pytest.raises(ValueError) as info:
        image_folder(tmp_path / "train", meta_files=["a/0.png"])
    first, second = tmp_path / "train" / "a" / "0.png", tmp_path / "train" / "a" / "1.png"
    assert str(info.value) == (
        f"the image {second} is 6x7 but {first} is 10x8: set dataset.image_size to resize "
        "every image"
    )


def test_an_unreadable_image_gives_the_decoders_reason(tmp_path: Path):
    path = tmp_path / "train" / "a" / "0.png"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ValueError) as info:
        image_folder(tmp_path / "train", meta_files=["a/0.png"])
    message = str(info.value)
    assert message.startswith(f"cannot read the image {path} (")
    assert message.endswith("): replace or delete the file") and "(None)" not in message
    assert "decode" in message.lower()  # torchvision's own words, first line only


def test_a_trusted_folder_is_read_like_the_training_folder(tmp_path: Path):
    """Grayscale and image_size apply to it too; non-square sizes are compared as (H, W)."""
    images(tmp_path / "train", size=(8, 6), channels=3)
    images(tmp_path / "same", size=(8, 6), channels=3)
    images(tmp_path / "other", size=(5, 4), channels=3)
    bundle = image_folder(tmp_path / "train", meta_dir=str(tmp_path / "same"), grayscale=True)
    assert bundle.train.inputs.shape[1:] == bundle.meta.inputs.shape[1:] == (1, 8, 6)
    with pytest.raises(ValueError) as info:
        image_folder(tmp_path / "train", meta_dir=str(tmp_path / "other"))
    assert str(info.value) == (
        f"the image {tmp_path / 'other' / 'a' / '0.png'} is 4x5 but the training images are "
        "6x8: set dataset.image_size to resize every image"
    )
    resized = image_folder(tmp_path / "train", meta_dir=str(tmp_path / "other"), image_size=3)
    assert resized.meta.inputs.shape[1:] == (3, 3, 3)
    with pytest.raises(FileNotFoundError) as info:
        image_folder(tmp_path / "train", meta_dir=str(tmp_path / "none"))
    assert str(info.value) == (
        f"dataset.meta_dir={str(tmp_path / 'none')!r} is not a folder: give a folder holding one "
        "subfolder of images per class"
    )


@pytest.mark.parametrize(("name", "key"), [("tensors", "test_path"), ("image_folder", "test_dir")])
def test_a_held_out_test_set_is_recorded_with_its_note(tmp_path: Path, name, key):
    if name == "tensors":
        bundle = tensors(write_csv(tmp_path / "t.csv", ["a", "label"], TABLE), meta_rows=[0, 1])
    else:
        images(tmp_path / "train", per_class=5)
        bundle = image_folder(tmp_path / "train", meta_files=["a/0.png", "b/0.png"])
    held = bundle.info["held_out_test"]
    assert held["fraction"] == 0.2 and len(held["indices"]) == 2
    assert held["note"] == (
        f"the test set is held out of the training data (no dataset.{key} given): its labels "
        "are as given there and carry whatever noise the training labels have (never the "
        f"synthetic dataset.noise_rate), so test accuracy is measured against them; give "
        f"dataset.{key} with labels you trust for a clean test accuracy"
    )


def test_no_test_set_and_a_zero_fraction_is_refused(tmp_path: Path):
    p = write_csv(tmp_path / "t.csv", ["a", "label"], TABLE)
    with pytest.raises(ValueError) as info:
        tensors(p, meta_rows=[0, 1], test_fraction=0.0)
    assert str(info.value) == (
        "no test set and test_fraction=0.0 holds out 0 of 8 training examples; give "
        "dataset.test_* or a test_fraction in (0, 1) that leaves examples on both sides"
    )


def test_the_dataset_seed_alone_fixes_every_draw(tmp_path: Path):
    """meta_per_class, the held-out split, the long tail and the noise: the same for one
    dataset seed whatever the global RNG holds, and the global RNG is left as it was."""
    p = write_csv(tmp_path / "t.csv", ["a", "label"], [[i, i % 3] for i in range(300)])
    m = write_csv(tmp_path / "m.csv", ["a", "label"], [[i, i % 3] for i in range(30)])
    params = dict(meta_path=m, meta_per_class=4, imbalance_factor=1.5, noise_rate=0.4)
    bundles = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        state = torch.random.get_rng_state()
        bundles.append(tensors(p, **params))
        assert torch.equal(torch.random.get_rng_state(), state)
    a, b = bundles
    assert torch.equal(a.meta.inputs, b.meta.inputs)
    assert a.info["held_out_test"]["indices"] == b.info["held_out_test"]["indices"]
    assert torch.equal(a.train.source_indices, b.train.source_indices)
    assert torch.equal(a.train_labels, b.train_labels) and a.corrupted.any()
    assert a.info["noise_matrix"] == b.info["noise_matrix"]
    # a factor below 2 still makes a tail: int(n * 1.5 ** (-i / 2)) per class
    counts = a.info["long_tail_counts"]
    assert counts == [counts[0], int(counts[0] * 1.5**-0.5), int(counts[0] / 1.5)]
    assert counts[0] > counts[1] > counts[2]


def test_features_of_small_spread_are_scaled_up_and_the_bundle_is_named(tmp_path: Path):
    """A std below 1 divides too (only a zero std is left at 1)."""
    rows = [[0.01 * i, i % 2] for i in range(10)]
    bundle = tensors(write_csv(tmp_path / "t.csv", ["a", "label"], rows), meta_rows=[0, 1])
    assert bundle.name == "tensors"
    assert 0 < bundle.info["standardized"]["std"][0] < 0.1
    assert float(bundle.train.inputs.std()) == pytest.approx(1.0, rel=1e-5)
