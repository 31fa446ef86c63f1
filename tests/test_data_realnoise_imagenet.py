"""mini-WebVision's second test set, ILSVRC2012's validation images of its 50 classes
(reweight/data/realnoise_imagenet.py): WebVision's synsets.txt and the devkit's lists parsed line
by line, the three layouts read from small replicas (tests/realnoise_replicas.py) to the same
images and labels, the bundle's ``extra_tests``, the evaluation's ``test_imagenet_*`` keys, and
a missing or damaged folder as one error line; no folder at the default place: WebVision's
validation set only, said once."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from reweight.core.device import Placement
from reweight.data import build_dataset
from reweight.data.core import TensorData
from reweight.data.realnoise_imagenet import find_imagenet_val, read_devkit_meta
from reweight.data.realnoise_lists import parse_ground_truth, parse_synsets
from reweight.train.config import TrainerConfig
from reweight.train.metrics import Evaluation
from tests.realnoise_replicas import (
    IMAGENET_PER_CLASS,
    wnid,
    write_imagenet_val,
    write_meta_mat,
    write_mini_webvision,
)

SYNSETS = "".join(f"{wnid(c)} class {c}, words\n" for c in range(1000))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def one_line(err: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(err.value)
    return str(err.value)


# -- parsers -------------------------------------------------------------------------------------


def test_synsets_line_c_plus_one_is_class_c(tmp_path):
    rest = SYNSETS.split("\n", 1)[1]
    path = write(tmp_path / "synsets.txt", "n01440764 tench, Tinca tinca\n" + rest)
    wnids = parse_synsets(path, tmp_path)
    assert len(wnids) == 1000 and wnids[0] == "n01440764" and wnids[1] == wnid(1)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        (SYNSETS.replace(wnid(3), wnid(2), 1), "line 4"),  # a synset listed twice
        (SYNSETS.replace(wnid(5), "tench", 1), "line 6"),  # no wnid first
        (SYNSETS.replace(wnid(7), "n0144076", 1), "line 8"),  # seven digits
        ("\n".join(SYNSETS.splitlines()[:999]), "lists 999 synsets"),
    ],
)
def test_bad_synsets_is_one_line(tmp_path, text, named):
    path = write(tmp_path / "synsets.txt", text)
    with pytest.raises(ValueError) as err:
        parse_synsets(path, tmp_path)
    assert named in one_line(err) and str(path) in str(err.value) and "webvision" in str(err.value)


def test_ground_truth_line_n_is_image_n(tmp_path):
    path = write(tmp_path / "gt.txt", "490\n361\n171\n1000\n1\n")
    assert parse_ground_truth(path, tmp_path) == [490, 361, 171, 1000, 1]


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("490\n\n171\n", "line 2"),  # a blank line would shift every later image's label
        ("490\n0\n", "line 2"),
        ("490\n1001\n", "line 2"),
        ("n01440764\n", "line 1"),
        ("490 361\n", "line 1"),
    ],
)
def test_bad_ground_truth_is_one_line(tmp_path, text, named):
    path = write(tmp_path / "gt.txt", text)
    with pytest.raises(ValueError) as err:
        parse_ground_truth(path, tmp_path)
    assert named in one_line(err) and "image-net.org" in str(err.value)


def test_missing_ground_truth_names_the_devkit(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        parse_ground_truth(tmp_path / "gt.txt", tmp_path)
    line = one_line(err)
    assert "ILSVRC2012_devkit_t12.tar.gz" in line and "dataset.imagenet_val_dir" in line


def test_devkit_meta_maps_ids_to_leaf_synsets(tmp_path):
    synsets = {i: wnid((7 * i) % 1000) for i in range(1, 1001)}
    write_meta_mat(tmp_path / "meta.mat", synsets)
    assert read_devkit_meta(tmp_path / "meta.mat") == synsets  # the three ancestors left out


def test_devkit_meta_damaged_is_one_line(tmp_path):
    (tmp_path / "meta.mat").write_bytes(b"not a MATLAB file at all" * 10)
    with pytest.raises(ValueError, match=r"is not the devkit's meta\.mat") as err:
        read_devkit_meta(tmp_path / "meta.mat")
    one_line(err)
    write_meta_mat(tmp_path / "short.mat", {i: wnid(i) for i in range(1, 11)})
    with pytest.raises(ValueError, match="lists 10 classes, not ILSVRC2012_IDs 1-1000"):
        read_devkit_meta(tmp_path / "short.mat")


# -- the layouts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["synset", "index", "flat"])
def test_every_layout_gives_the_same_images_and_labels(tmp_path, layout):
    write_mini_webvision(tmp_path)
    write_imagenet_val(tmp_path, layout)
    files, labels, info = find_imagenet_val(None, tmp_path, tmp_path / "webvision", 50)
    assert info["used"] and info["images"] == 50 * IMAGENET_PER_CLASS
    truth = {f.name: (int(f.stem[-8:]) - 1) % 52 for f in files}  # the replica's classes
    assert sorted(zip((f.name for f in files), labels, strict=True)) == sorted(truth.items())
    assert set(labels) == set(range(50))  # classes 50 and 51 left out
    assert all(f.is_file() for f in files)


def test_a_folder_per_synset_of_all_1000_reads_the_first_50(tmp_path):
    write_mini_webvision(tmp_path)
    val = write_imagenet_val(tmp_path, "synset")
    (val / wnid(999)).mkdir()  # ImageNet's other classes may be there
    _, labels, _ = find_imagenet_val(val, tmp_path, tmp_path / "webvision", 50)
    assert torch.tensor(labels).bincount().tolist() == [IMAGENET_PER_CLASS] * 50


def test_no_folder_at_the_default_place_is_said_once(tmp_path, caplog):
    write_mini_webvision(tmp_path)
    with caplog.at_level(logging.INFO, logger="reweight"):
        bundle = build_dataset("mini_webvision", root=tmp_path, val_per_class=1, meta_per_class=2)
    said = [r.getMessage() for r in caplog.records if "ImageNet" in r.getMessage()]
    assert len(said) == 1 and "WebVision's validation images only" in said[0]
    assert str(tmp_path / "imagenet" / "val") in said[0]
    assert bundle.extra_tests == {} and bundle.info["imagenet_val"]["used"] is False


def test_set_but_missing_folder_is_one_line(tmp_path):
    write_mini_webvision(tmp_path)
    missing = tmp_path / "nowhere" / "val"
    with pytest.raises(FileNotFoundError) as err:
        build_dataset(
            "mini_webvision",
            root=tmp_path,
            imagenet_val_dir=str(missing),
            val_per_class=1,
            meta_per_class=2,
        )
    line = one_line(err)
    assert f"dataset.imagenet_val_dir={missing}" in line and "ILSVRC2012_img_val.tar" in line
    assert "image-net.org" in line and "(null: WebVision's validation images only)" in line


def _drop_class_7(val: Path) -> Path:
    shutil.rmtree(val / wnid(7))
    return val / wnid(7)


def _bad_first_image(val: Path) -> Path:
    first = sorted((val / wnid(0)).iterdir())[0]
    first.write_bytes(b"not a JPEG")
    return first


def _no_devkit(val: Path) -> Path:
    shutil.rmtree(val.parent / "ILSVRC2012_devkit_t12")
    return val / "ILSVRC2012_devkit_t12"


def _missing_image(val: Path) -> Path:
    (val / "ILSVRC2012_val_00000003.JPEG").unlink()
    return val / "ILSVRC2012_val_00000003.JPEG"


def _nothing_there(val: Path) -> Path:
    shutil.rmtree(val)
    val.mkdir()
    (val / "readme.txt").write_text("empty")
    return val


@pytest.mark.parametrize(
    ("layout", "damage", "said"),
    [
        ("synset", _drop_class_7, "is missing (class 7"),
        ("synset", _bad_first_image, "cannot read the ImageNet validation image"),
        ("flat", _no_devkit, "ILSVRC2012_devkit_t12/"),
        ("flat", _missing_image, "1 of the validation images"),
        ("synset", _nothing_there, "holds none of ILSVRC2012's validation layouts"),
    ],
)
def test_damaged_folder_is_one_line_naming_the_path(tmp_path, layout, damage, said):
    write_mini_webvision(tmp_path)
    val = write_imagenet_val(tmp_path, layout)
    named = damage(val)
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        build_dataset("mini_webvision", root=tmp_path, val_per_class=1, meta_per_class=2)
    line = one_line(err)
    assert said in line and str(named.resolve()) in line and "image-net.org" in line


def test_only_mini_webvision_takes_the_key(tmp_path):
    with pytest.raises(ValueError, match="unknown parameter 'imagenet_val_dir'"):
        build_dataset("animal10n", root=tmp_path, imagenet_val_dir=str(tmp_path))


# -- the bundle and the evaluation ---------------------------------------------------------------


def test_bundle_holds_imagenet_as_a_second_test_set(tmp_path):
    write_mini_webvision(tmp_path)
    write_imagenet_val(tmp_path, "synset")
    b = build_dataset(
        "mini_webvision", root=tmp_path, image_size=8, val_per_class=1, meta_per_class=2
    )
    [(name, imagenet)] = list(b.extra_tests.items())
    assert name == "imagenet" and len(imagenet) == 50 * IMAGENET_PER_CLASS
    assert (len(b.train), len(b.meta), len(b.val), len(b.test)) == (100, 100, 50, 50)  # as before
    paths = [b.train.base.paths[i] for i in imagenet.source_indices.tolist()]
    assert all(p.parent.name == wnid(int(y)) for p, y in zip(paths, imagenet.labels, strict=True))
    assert imagenet.transform is b.test.transform  # evaluated as the test set is, no augmentation
    x, y = imagenet[0]
    assert tuple(x.shape) == (3, 8, 8) and y == 0
    info = b.info["imagenet_val"]
    assert info["used"] and info["layout"] == "synset folders" and info["images"] == 100


def test_evaluation_reports_each_test_set_in_rows_and_summary():
    torch.manual_seed(0)
    x = torch.randn(12, 3)
    test, other = TensorData(x, torch.arange(12) % 2), TensorData(x, torch.ones(12, dtype=int))
    model = nn.Linear(3, 2)
    placement, model = Placement.of(model, "cpu", False, False)
    ev = Evaluation(
        model,
        nn.functional.cross_entropy,
        placement,
        2,
        TrainerConfig(eval_batch_size=5),
        test_data=test,
        extra_tests={"imagenet": other},
    )
    summary, row = ev.summary(3), ev.row(3)
    pred = model(x).argmax(1)
    assert summary["test_accuracy"] == pytest.approx(float((pred == test.labels).double().mean()))
    assert summary["test_imagenet_accuracy"] == pytest.approx(float((pred == 1).double().mean()))
    assert summary["test_imagenet_error"] == pytest.approx(1 - summary["test_imagenet_accuracy"])
    assert len(summary["test_imagenet_per_class_accuracy"]) == 2
    assert "best_test_imagenet_accuracy" not in summary  # the main test set's alone
    assert row["test_imagenet_accuracy"] == summary["test_imagenet_accuracy"]
    assert ev.sets() == "test and test_imagenet"
