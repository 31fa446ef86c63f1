"""Clothing1M, Food-101N, ANIMAL-10N and mini-WebVision (reweight/data/realnoise.py): each parser
against its published format line by line (with the formats' quirks), the bundles built from small
replicas of the real layouts (tests/realnoise_replicas.py), bad or missing lists as one error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from reweight.data import build_dataset
from reweight.data.realnoise_images import recipe_transform
from reweight.data.realnoise_lists import (
    parse_animal10n_name,
    parse_filelist,
    parse_key_list,
    parse_label_kv,
    parse_verified_tsv,
)
from tests.realnoise_replicas import (
    FOOD,
    write_animal10n,
    write_clothing1m,
    write_food101n,
    write_mini_webvision,
)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# -- parsers -------------------------------------------------------------------------------------


def test_label_kv_reads_each_line(tmp_path):
    path = write(
        tmp_path / "noisy_label_kv.txt",
        "images/0/00/1.jpg 0\n\nimages/5/42/77.jpg 13\r\nimages/5/42/77.jpg 13\n",
    )
    assert parse_label_kv(path, 14, "clothing1m", tmp_path) == {
        "images/0/00/1.jpg": 0,
        "images/5/42/77.jpg": 13,  # listed twice with one label: kept once
    }


@pytest.mark.parametrize(
    "bad",
    [
        "images/0/00/1.jpg",  # no label
        "images/0/00/1.jpg 3 4",  # three fields
        "images/0/00/1.jpg x",  # not a number
        "images/0/00/1.jpg 14",  # Clothing1M has 14 classes: 0..13
        "images/0/00/1.jpg -1",
        "images/0/00/2.jpg 5",  # the same path again, with another label
    ],
)
def test_label_kv_names_the_bad_line(tmp_path, bad):
    path = write(tmp_path / "clean_label_kv.txt", f"images/0/00/2.jpg 4\n{bad}\n")
    with pytest.raises(ValueError, match=r"clean_label_kv\.txt line 2: expected .*download it"):
        parse_label_kv(path, 14, "clothing1m", tmp_path)


def test_key_list_one_path_per_line(tmp_path):
    path = write(tmp_path / "k.txt", "images/0/00/1.jpg\n\nimages/1/11/2.jpg\n")
    assert parse_key_list(path, "clothing1m", tmp_path) == [
        "images/0/00/1.jpg",
        "images/1/11/2.jpg",
    ]
    write(path, "images/0/00/1.jpg\nimages/1/11/2.jpg 3\n")
    with pytest.raises(ValueError, match=r"k\.txt line 2: expected one image path"):
        parse_key_list(path, "clothing1m", tmp_path)


def test_missing_list_names_what_to_download_and_where(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        parse_key_list(tmp_path / "clothing1m" / "x.txt", "clothing1m", tmp_path / "clothing1m")
    message = str(err.value)
    assert "\n" not in message and "x.txt not found" in message
    assert "github.com/Cysu/noisy_label" in message and str(tmp_path / "clothing1m") in message


def test_verified_tsv_header_flags_and_own_folder_class(tmp_path):
    classes = ["apple_pie", "filet_mignon", "hot_and_sour_soup"]
    path = write(
        tmp_path / "verified_train.tsv",
        "class_name/key\tverification_label\n"
        "apple_pie/0a1b.jpg\t1\n"
        "hot_and_sour_soup/a49e.jpg\t0\n",  # the class is this list's folder, not imagelist's
    )
    assert parse_verified_tsv(path, classes, tmp_path) == [
        ("apple_pie/0a1b.jpg", 0, 1),
        ("hot_and_sour_soup/a49e.jpg", 2, 0),
    ]
    for bad in ("apple_pie/0a1b.jpg 1", "apple_pie/0a1b.jpg\t2", "pizza/1.jpg\t1", "x.jpg\t1"):
        write(path, f"class_name/key\tverification_label\napple_pie/1.jpg\t0\n{bad}\n")
        with pytest.raises(ValueError, match=r"verified_train\.tsv line 3: expected"):
            parse_verified_tsv(path, classes, tmp_path)


def test_animal10n_label_is_the_first_field():
    assert parse_animal10n_name("3_01234.jpg") == 3
    assert parse_animal10n_name("0_7.JPG") == 0
    for bad in ("01234_3.png", "10_1.jpg", "x_1.jpg", "3.jpg", "3_.jpg"):
        with pytest.raises(ValueError, match="not an ANIMAL-10N image name"):
            parse_animal10n_name(bad)


def test_webvision_filelist_keeps_the_first_classes(tmp_path):
    path = write(
        tmp_path / "info" / "train_filelist_google.txt",
        "google/q0001/a.jpg 0\ngoogle/q0050/b.jpg 49\n"
        "google/q0051/c.jpg 50\ngoogle/q0999/d.jpg 998\n",
    )
    assert parse_filelist(path, 50, "webvision", tmp_path) == (
        ["google/q0001/a.jpg", "google/q0050/b.jpg"],
        [0, 49],
    )
    write(path, "google/q0001/a.jpg 0\ngoogle/q0001/b.jpg\n")
    with pytest.raises(ValueError, match=r"train_filelist_google\.txt line 2"):
        parse_filelist(path, 50, "webvision", tmp_path)


def test_recipe_transforms_crop_to_image_size():
    from PIL import Image

    image = Image.new("RGB", (40, 30), (200, 10, 10))
    for crop in ("resize", "pad"):
        for train in (True, False):
            x = recipe_transform(16, train=train, augment=True, crop=crop)(image)
            assert tuple(x.shape) == (3, 16, 16)
    x = recipe_transform(16, train=False, augment=True, crop="resize")(image)
    assert x[0].mean() == pytest.approx((200 / 255 - 0.485) / 0.229, abs=0.05)  # ImageNet stats


# -- bundles from the replicas -------------------------------------------------------------------


def ids(data) -> set[int]:
    return set(data.source_indices.tolist())


def test_clothing1m_bundle(tmp_path):
    counts = write_clothing1m(tmp_path)
    b = build_dataset("clothing1m", root=tmp_path, image_size=8, val_per_class=1)
    assert b.num_classes == 14 and b.class_names[0] == "T-Shirt"
    assert len(b.train) == counts["train"] and b.info["train_keys_without_label"] == 2
    assert len(b.meta) + len(b.val) == counts["val_pool"] and len(b.val) == 14
    assert len(b.test) == counts["test"]
    assert len({*ids(b.train), *ids(b.meta), *ids(b.val), *ids(b.test)}) == 42 + 42 + 14
    # noisy labels on train (from noisy_label_kv.txt), clean ones on meta, val and test
    assert b.train_labels.tolist()[:3] == [0, 1, 2]
    assert b.meta.labels.bincount(minlength=14).tolist() == [2] * 14
    assert b.test.labels.tolist() == list(range(14))
    assert b.train_ids[0].endswith("clothing1m/images/0/00/1000.jpg")
    x, y = b.train[0]
    assert tuple(x.shape) == (3, 8, 8) and y == 0
    drawn = build_dataset("clothing1m", root=tmp_path, val_per_class=1, meta_per_class=1)
    assert drawn.meta.labels.bincount().tolist() == [1] * 14
    with pytest.raises(ValueError, match=r"meta_per_class=3 \+ val_per_class=1"):
        build_dataset("clothing1m", root=tmp_path, val_per_class=1, meta_per_class=3)


def test_food101n_bundle(tmp_path):
    counts = write_food101n(tmp_path)
    b = build_dataset("food101n", root=tmp_path, image_size=8, val_per_class=1, meta_per_class=1)
    assert b.class_names == FOOD and b.info["verified_correct"] == counts["verified_correct"]
    assert len(b.meta) == len(b.val) == len(b.test) == 101
    assert len(b.train) == counts["listed"] - 202  # the trusted images leave training
    train_files = set(b.train_ids)
    trusted = {str(b.train.base.paths[i]) for i in ids(b.meta) | ids(b.val)}
    assert not train_files & trusted
    assert all("abcdef.jpg" in p and p[-11] in "01" for p in trusted)  # verification_label 1 only
    assert all("food-101/images" in str(b.test.base.paths[i]) for i in ids(b.test))


def test_animal10n_bundle(tmp_path):
    write_animal10n(tmp_path)
    b = build_dataset("animal10n", root=tmp_path, image_size=16, val_per_class=1, meta_per_class=2)
    assert (len(b.train), len(b.meta), len(b.val), len(b.test)) == (30, 20, 10, 20)
    assert not ids(b.train) & (ids(b.meta) | ids(b.val))
    names = [Path(p).name for p in b.train_ids]
    assert b.train_labels.tolist() == [int(n.split("_")[0]) for n in names]
    again = build_dataset("animal10n", root=tmp_path, val_per_class=1, meta_per_class=2)
    assert torch.equal(again.meta.source_indices, b.meta.source_indices)  # dataset.seed fixes it
    other = build_dataset("animal10n", root=tmp_path, seed=1, val_per_class=1, meta_per_class=2)
    assert not torch.equal(other.meta.source_indices, b.meta.source_indices)


def test_mini_webvision_bundle(tmp_path):
    write_mini_webvision(tmp_path)
    b = build_dataset(
        "mini_webvision", root=tmp_path, image_size=8, val_per_class=1, meta_per_class=2
    )
    assert b.num_classes == 50 and len(b.train) == 100  # classes 50 and 51 left out
    assert (len(b.meta), len(b.val), len(b.test)) == (100, 50, 50)
    val = {str(b.train.base.paths[i]) for i in ids(b.meta) | ids(b.val) | ids(b.test)}
    assert len(val) == 200 and all("val_images_256" in p for p in val)


@pytest.mark.parametrize(
    ("name", "writer", "remove", "named"),
    [
        ("clothing1m", write_clothing1m, "clothing1m/annotations/noisy_label_kv.txt", "Cysu"),
        ("food101n", write_food101n, "food-101/meta/test.txt", "food-101.tar.gz"),
        ("animal10n", write_animal10n, "animal10n/testing", "raw_image_ver.zip"),
        ("mini_webvision", write_mini_webvision, "webvision/info/val_filelist.txt", "webvision"),
    ],
)
def test_missing_file_is_one_line(tmp_path, name, writer, remove, named):
    writer(tmp_path)
    target = tmp_path / remove
    if target.is_dir():
        for p in target.iterdir():
            p.unlink()
        target.rmdir()
    else:
        target.unlink()
    with pytest.raises(FileNotFoundError) as err:
        build_dataset(name, root=tmp_path, val_per_class=1, meta_per_class=1)
    assert "\n" not in str(err.value) and str(target.resolve()) in str(err.value)
    assert named in str(err.value)


def test_missing_images_are_named(tmp_path):
    write_clothing1m(tmp_path)
    (tmp_path / "clothing1m" / "images" / "0" / "00" / "1000.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"first train image not found.*1000\.jpg"):
        build_dataset("clothing1m", root=tmp_path, val_per_class=1)
