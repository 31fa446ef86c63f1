"""``find_imagenet_val`` (reweight/data/realnoise_imagenet.py) called directly on the small
replicas of tests/realnoise_replicas.py: what it returns and records per layout, which files
of a class folder count as images and in what order, where the devkit may be, and every
refusal word for word (test_data_realnoise_imagenet.py checks them through build_dataset by
fragments)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from reweight.data.realnoise_imagenet import find_imagenet_val, read_devkit_meta
from reweight.data.realnoise_lists import DOWNLOADS
from tests.realnoise_replicas import (
    IMAGENET_PER_CLASS,
    jpg,
    wnid,
    write_imagenet_val,
    write_meta_mat,
    write_mini_webvision,
)

TAR = DOWNLOADS["imagenet"]
LAYOUTS = (
    "<wnid>/ folders, <class 0-49>/ folders, or the flat ILSVRC2012_val_<8 digits>.JPEG files "
    "with the devkit ILSVRC2012_devkit_t12/ inside or beside the folder"
)


def find(root: Path, val_dir=None, num_classes: int = 50):
    return find_imagenet_val(val_dir, root, root / "webvision", num_classes)


@pytest.mark.parametrize(
    ("layout", "said"),
    [
        ("synset", "synset folders"),
        ("index", "class-index folders"),
        ("flat", "flat, labels from ILSVRC2012_devkit_t12"),
    ],
)
def test_what_each_layout_returns_and_records(tmp_path, layout, said):
    write_mini_webvision(tmp_path)
    val = write_imagenet_val(tmp_path, layout)
    files, labels, info = find(tmp_path)
    assert info == {
        "used": True,
        "folder": str(val.resolve()),
        "layout": said,
        "images": 50 * IMAGENET_PER_CLASS,
    }
    # folders: class by class, each class's images by name; flat: in the ground truth's order
    # (image n is class (n - 1) % 52 in the replica)
    names = [f.name for f in files]
    assert (labels if layout != "flat" else names) == sorted(labels if layout != "flat" else names)
    for c in range(50):
        names = [f.name for f, y in zip(files, labels, strict=True) if y == c]
        want = [f"ILSVRC2012_val_{n:08d}.JPEG" for n in range(1, 105) if (n - 1) % 52 == c]
        assert names == want
    first = [0, 0, 1, 1, 2, 2] if layout != "flat" else [0, 1, 2, 0, 1, 2]
    assert find(tmp_path, val, num_classes=3)[1] == first  # the first classes only


def test_an_unset_key_is_the_default_place_and_an_empty_string_is_unset(tmp_path):
    write_mini_webvision(tmp_path)
    default = tmp_path / "imagenet" / "val"
    for unset in (None, ""):
        assert find(tmp_path, unset) == ([], [], {"used": False, "folder": str(default.resolve())})
    write_imagenet_val(tmp_path, "index")
    assert find(tmp_path, "")[2]["used"] is True


def test_a_folder_that_is_not_one_is_one_line(tmp_path, monkeypatch):
    write_mini_webvision(tmp_path)
    (tmp_path / "imagenet").mkdir()
    default = tmp_path / "imagenet" / "val"
    default.write_text("a file where the folder should be")
    with pytest.raises(FileNotFoundError) as err:
        find(tmp_path)
    assert str(err.value) == (
        f"dataset.imagenet_val_dir=null: no folder at {default.resolve()}. Download {TAR} and "
        f"extract it there ({LAYOUTS}), or set dataset.imagenet_val_dir to the folder that "
        "holds it"
    )
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        find(tmp_path, "~/elsewhere")
    assert str(err.value) == (
        f"dataset.imagenet_val_dir=~/elsewhere: no folder at {(tmp_path / 'elsewhere').resolve()}. "
        f"Download {TAR} and extract it there ({LAYOUTS}), or set dataset.imagenet_val_dir to "
        "the folder that holds it (null: WebVision's validation images only)"
    )
    val = write_imagenet_val(tmp_path / "home", "index")
    assert find(tmp_path, "~/home/imagenet/val")[2]["folder"] == str(val.resolve())


def test_only_image_files_of_a_class_folder_count(tmp_path):
    write_mini_webvision(tmp_path)
    val = write_imagenet_val(tmp_path, "index")
    jpg(val / "0" / "extra.PNG", 1)
    jpg(val / "0" / "another.jpg", 2)
    (val / "0" / "notes.txt").write_text("not an image")
    (val / "0" / "folder.jpg").mkdir()  # a folder named like an image
    files, labels, _ = find(tmp_path, val, num_classes=1)
    assert [f.name for f in files] == [
        "ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000053.JPEG", "another.jpg",
        "extra.PNG",
    ]  # fmt: skip
    assert labels == [0] * 4


@pytest.mark.parametrize("what", ["is missing", "holds no image"])
def test_a_class_folder_missing_or_empty_is_one_line(tmp_path, what):
    write_mini_webvision(tmp_path)
    val = write_imagenet_val(tmp_path, "synset")
    sub = val / wnid(7)
    shutil.rmtree(sub)
    if what == "holds no image":
        sub.mkdir()
        (sub / "readme.txt").write_text("no images")
    with pytest.raises(ValueError) as err:
        find(tmp_path)
    assert str(err.value) == (
        f"{sub.resolve()} {what} (class 7; <wnid>/ folders): ILSVRC2012 has 50 validation "
        f"images per class; extract them again from {TAR}"
    )
    index = write_imagenet_val(tmp_path / "i", "index")
    shutil.rmtree(index / "3")
    with pytest.raises(ValueError, match=r"3 is missing \(class 3; <class>/ folders\)"):
        find(tmp_path / "i", index)


def test_none_of_the_layouts_is_one_line(tmp_path):
    write_mini_webvision(tmp_path)
    val = tmp_path / "imagenet" / "val"
    (val / "1").mkdir(parents=True)  # a class folder, but not class 0's
    (val / "ILSVRC2012_val_1.JPEG").write_text("not 8 digits")
    (val / "nothing").mkdir()
    with pytest.raises(ValueError) as err:
        find(tmp_path)
    assert str(err.value) == (
        f"{val.resolve()} holds none of ILSVRC2012's validation layouts ({LAYOUTS}): extract "
        f"{TAR} there, or set dataset.imagenet_val_dir"
    )


def test_the_devkit_inside_the_folder_and_its_refusals(tmp_path):
    write_mini_webvision(tmp_path)
    val = write_imagenet_val(tmp_path, "flat")
    shutil.move(tmp_path / "imagenet" / "ILSVRC2012_devkit_t12", val / "ILSVRC2012_devkit_t12")
    _, labels, info = find(tmp_path)
    assert info["images"] == 100 and sorted(set(labels)) == list(range(50))
    shutil.rmtree(val / "ILSVRC2012_devkit_t12")
    with pytest.raises(FileNotFoundError) as err:
        find(tmp_path)
    inside, beside = val / "ILSVRC2012_devkit_t12", tmp_path / "imagenet" / "ILSVRC2012_devkit_t12"
    assert str(err.value) == (
        f"the devkit ILSVRC2012_devkit_t12/ (the flat layout's labels; or {beside.resolve()}) "
        f"not found: expected {inside.resolve()}. Download it from {TAR} and extract it into "
        f"{val.resolve()}, or set dataset.imagenet_val_dir"
    )


def test_missing_flat_images_are_counted(tmp_path):
    write_mini_webvision(tmp_path)
    val = write_imagenet_val(tmp_path, "flat")
    for n in (3, 9):
        (val / f"ILSVRC2012_val_{n:08d}.JPEG").unlink()
    with pytest.raises(FileNotFoundError) as err:
        find(tmp_path)
    first = val / "ILSVRC2012_val_00000003.JPEG"
    assert str(err.value) == (
        f"{first.resolve()} not found: 2 of the validation images the devkit's ground truth "
        f"gives classes 0-49 are missing; extract {TAR} into {val.resolve()}"
    )
    (val / "ILSVRC2012_val_00000001.JPEG").unlink()  # keeps the flat layout recognised
    with pytest.raises(FileNotFoundError) as err:
        find(tmp_path, num_classes=0)  # no class: no image
    assert str(err.value) == (
        f"{val.resolve()} not found: all of the validation images the devkit's ground truth "
        f"gives classes 0--1 are missing; extract {TAR} into {val.resolve()}"
    )


def test_the_devkits_meta_refusals_word_for_word(tmp_path):
    missing = tmp_path / "data" / "meta.mat"
    with pytest.raises(FileNotFoundError) as err:
        read_devkit_meta(missing)
    assert str(err.value) == (
        f"the devkit's meta.mat not found: expected {missing.resolve()}. Download it from {TAR} "
        f"and extract it into {missing.parent.resolve()}, or set dataset.imagenet_val_dir"
    )
    short = tmp_path / "short.mat"
    write_meta_mat(short, {i: wnid(i) for i in range(2, 1001)})  # ID 1 missing
    with pytest.raises(ValueError) as err:
        read_devkit_meta(short)
    assert str(err.value) == (
        f"{short} lists 999 classes, not ILSVRC2012_IDs 1-1000: download {TAR} again"
    )
    bad = tmp_path / "bad.mat"
    bad.write_bytes(b"not a MATLAB file at all" * 10)
    from scipy.io import loadmat

    with pytest.raises(Exception) as scipy_says:  # what scipy says of it, named in the line
        loadmat(bad, squeeze_me=True)
    why = f"{type(scipy_says.value).__name__}: {scipy_says.value}"
    with pytest.raises(ValueError) as err:
        read_devkit_meta(bad)
    assert str(err.value) == f"{bad} is not the devkit's meta.mat ({why}): download {TAR} again"


def test_an_unreadable_first_image_is_one_line(tmp_path):
    write_mini_webvision(tmp_path)
    val = write_imagenet_val(tmp_path, "index")
    first = val / "0" / "ILSVRC2012_val_00000001.JPEG"
    first.write_bytes(b"not a JPEG")
    with pytest.raises(ValueError) as err:
        find(tmp_path)
    text = str(err.value)
    assert text.startswith(f"cannot read the ImageNet validation image {first.resolve()} (")
    assert text.endswith(f"): extract {TAR} again") and "cannot identify image file" in text


@pytest.mark.parametrize("layout", ["synset", "flat"])
def test_the_lists_a_layout_reads_are_named_where_missing(tmp_path, layout):
    write_mini_webvision(tmp_path)
    val = write_imagenet_val(tmp_path, layout)
    webvision = tmp_path / "webvision"
    synsets = webvision / "info" / "synsets.txt"
    assert_missing_named(
        tmp_path,
        synsets,
        f"synsets.txt not found: expected {synsets.resolve()}. Download it from "
        f"{DOWNLOADS['webvision']} and extract it into {webvision.resolve()}, or set "
        "dataset.root / REWEIGHT_DATA_DIR",
    )
    if layout == "flat":
        devkit = val.parent / "ILSVRC2012_devkit_t12"
        truth = devkit / "data" / "ILSVRC2012_validation_ground_truth.txt"
        assert_missing_named(
            tmp_path,
            truth,
            f"ILSVRC2012's validation ground truth not found: expected {truth.resolve()}. "
            f"Download it from {TAR} and extract it into {devkit.resolve()}, or set "
            "dataset.imagenet_val_dir",
        )


def assert_missing_named(root, path, message: str) -> None:
    """With ``path`` removed, finding the data under ``root`` fails with ``message``."""
    path.unlink()
    with pytest.raises(FileNotFoundError) as err:
        find(root)
    assert str(err.value) == message


def test_the_devkits_meta_without_scipy_is_one_line(tmp_path, monkeypatch):
    import sys

    path = tmp_path / "meta.mat"
    write_meta_mat(path, {i: wnid(i) for i in range(1, 1001)})
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # import scipy.io fails
    with pytest.raises(ValueError) as err:
        read_devkit_meta(path)
    assert str(err.value) == (
        f"reading {path} needs scipy (pip install scipy), or sort the validation images into "
        "<wnid>/ folders"
    )
