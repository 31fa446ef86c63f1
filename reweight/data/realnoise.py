"""Real-world noisy benchmarks, read from each dataset's own published layout, streamed from disk.

* ``clothing1m`` (Xiao et al., CVPR 2015): ``<root>/clothing1m/`` holds the annotation files
  (``noisy_label_kv.txt``, ``clean_label_kv.txt``, the four ``*_key_list.txt``,
  ``category_names_eng.txt``; directly or under ``annotations/``) and ``images/<a>/<b>/*.jpg``.
  Train: ``noisy_train_key_list.txt`` with the noisy labels (keys without a noisy label are
  skipped and counted, a known quirk); trusted set: ``clean_val_key_list.txt`` with the clean
  labels (MW-Net's meta set); test: ``clean_test_key_list.txt``.
* ``food101n`` (Lee et al., CVPR 2018): ``<root>/Food-101N_release/meta/{classes.txt,
  imagelist.tsv,verified_train.tsv}`` and ``images/<class>/<id>.jpg``; trusted set: the
  ``verified_train.tsv`` rows with ``verification_label`` 1 (taken out of training); test:
  Food-101's test split, ``<root>/food-101/meta/test.txt`` and ``food-101/images/<class>/<id>.jpg``.
* ``animal10n`` (Song et al., ICML 2019): ``<root>/animal10n/{training,testing}/<label>_<id>.jpg``;
  no trusted subset is published: ``meta_per_class`` images per class are drawn out of training.
* ``mini_webvision`` (WebVision 1.0, Google images of the first 50 classes):
  ``<root>/webvision/info/{train_filelist_google.txt,val_filelist.txt}``, training images at the
  listed paths under ``<root>/webvision``, validation images under ``val_images_256/``; the
  trusted set is ``meta_per_class`` images per class of WebVision's validation set, the rest is
  the test set. ILSVRC2012's validation images of the 50 classes are a second test set,
  ``bundle.extra_tests["imagenet"]`` (``imagenet_val_dir``;
  :mod:`reweight.data.realnoise_imagenet`).

One builder, :func:`build_realnoise`, reads each dataset's layout with that dataset's reader
(lists parsed by :mod:`reweight.data.realnoise_lists`); images are files
(:class:`reweight.data.realnoise_images.ImageFiles` opens one per item: use
``trainer.num_workers``). A missing or damaged list is one ``FileNotFoundError`` / ``ValueError``
line naming the file, what to download from where and where to put it.

Example::

    bundle = build_dataset("clothing1m", root="/data", meta_per_class=None, image_size=224)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from reweight.data._validate import check_bool, check_choice, check_int
from reweight.data.core import DataBundle
from reweight.data.realnoise_imagenet import find_imagenet_val
from reweight.data.realnoise_images import FoundFiles, draw_per_class, files_bundle, first_image
from reweight.data.realnoise_lists import (
    DOWNLOADS,
    food_classes,
    food_keys,
    missing_file,
    parse_animal10n_name,
    parse_filelist,
    parse_key_list,
    parse_label_kv,
    parse_lines,
    parse_verified_tsv,
)

__all__ = [
    "ANIMAL10N_CLASSES",
    "CLOTHING1M_CLASSES",
    "REAL_NOISE_DATASETS",
    "WEBVISION_CLASSES",
    "build_realnoise",
]

logger = logging.getLogger(__name__)

CLOTHING1M_CLASSES = 14
ANIMAL10N_CLASSES = (  # ANIMAL-10N's README: label 0..9
    "cat",
    "lynx",
    "wolf",
    "coyote",
    "cheetah",
    "jaguar",
    "chimpanzee",
    "orangutan",
    "hamster",
    "guinea pig",
)
WEBVISION_CLASSES = 50  # mini-WebVision: the first 50 classes

_Reader = Callable[..., FoundFiles]  # (root, meta_per_class, generator, **the dataset's own keys)


def build_realnoise(
    root: Path,
    *,
    dataset: str,
    generator: torch.Generator,
    download: bool,
    meta_per_class: int | None,
    image_size: int,
    augment: bool,
    imagenet_val_dir: str | os.PathLike | None = None,
) -> DataBundle:
    """``dataset`` (one of :data:`REAL_NOISE_DATASETS`) read from ``root`` in its published
    layout: its reader finds the files, the labels and the splits (``meta_per_class`` trusted
    images per class, ``None``: the whole trusted pool where one is published), then one
    ``ImageFiles`` over them, with the recipe's transforms at ``image_size`` (``augment``: random
    crops and flips for training). ``download`` is unused: these datasets are downloaded by hand.
    ``imagenet_val_dir`` (``mini_webvision`` only): ILSVRC2012's validation images, a second
    test set (:func:`reweight.data.realnoise_imagenet.find_imagenet_val`)."""
    reader, crop = REAL_NOISE_DATASETS[check_choice("dataset", dataset, tuple(REAL_NOISE_DATASETS))]
    if meta_per_class is not None:
        check_int("meta_per_class", meta_per_class, minimum=1)
    check_int("image_size", image_size, minimum=8)
    check_bool("augment", augment)
    own = {}
    if dataset == "mini_webvision":
        own["imagenet_val_dir"] = imagenet_val_dir
    elif imagenet_val_dir is not None:
        raise ValueError(f"imagenet_val_dir is mini_webvision's key, not {dataset}'s")
    found = reader(Path(root), meta_per_class, generator, **own)
    return files_bundle(dataset, found, image_size=image_size, augment=augment, crop=crop)


def _annotation(folder: Path, name: str) -> Path:
    """Clothing1M's annotation files sit under ``annotations/`` in the release (a flat copy
    works too)."""
    nested = folder / "annotations" / name
    return nested if nested.is_file() or not (folder / name).is_file() else folder / name


def _read_clothing1m(
    root: Path, meta_per_class: int | None, generator: torch.Generator
) -> FoundFiles:
    """Clothing1M: noisy training keys with noisy labels, the clean validation keys as the trusted
    set (``meta_per_class`` per class of them, ``None``: all), the clean test keys as test."""
    folder = root / "clothing1m"
    k = CLOTHING1M_CLASSES
    noisy = parse_label_kv(_annotation(folder, "noisy_label_kv.txt"), k, "clothing1m", folder)
    clean = parse_label_kv(_annotation(folder, "clean_label_kv.txt"), k, "clothing1m", folder)
    names_file = _annotation(folder, "category_names_eng.txt")
    names = [line for _, line in parse_lines(names_file, "clothing1m", folder)]
    if len(names) != k:
        raise ValueError(
            f"{names_file} lists {len(names)} categories, Clothing1M has {k}: download it again "
            f"from {DOWNLOADS['clothing1m']}"
        )
    found = FoundFiles([], [], {}, names, {"folder": str(folder.resolve())})
    for part, key_file, table in (
        ("train", "noisy_train_key_list.txt", noisy),
        ("meta", "clean_val_key_list.txt", clean),
        ("test", "clean_test_key_list.txt", clean),
    ):
        _add_clothing_keys(found, folder, part, key_file, table)
    meta_labels = torch.tensor(found.labels)[found.parts["meta"]]
    keep = draw_per_class(meta_labels, meta_per_class, k, generator, "clean_val_key_list.txt")
    found.parts["meta"] = found.parts["meta"][keep]
    first_image(found.files, found.parts, folder, "clothing1m")
    return found


def _add_clothing_keys(
    found: FoundFiles, folder: Path, part: str, key_file: str, table: dict[str, int]
) -> None:
    """The keys of ``key_file`` that ``table`` labels, as the split ``part`` of ``found`` (keys
    without a label are skipped and counted: a known quirk of the noisy training list)."""
    keys = parse_key_list(_annotation(folder, key_file), "clothing1m", folder)
    known = [key for key in keys if key in table]
    found.info[f"{part}_keys_without_label"] = len(keys) - len(known)
    if len(known) < len(keys):
        logger.info(
            "clothing1m: %d of %d keys of %s have no label in the kv file: skipped",
            len(keys) - len(known),
            len(keys),
            key_file,
        )
    start = len(found.files)
    found.files += [folder / key for key in known]
    found.labels += [table[key] for key in known]
    found.parts[part] = torch.arange(start, len(found.files))


def _read_food101n(
    root: Path, meta_per_class: int | None, generator: torch.Generator
) -> FoundFiles:
    """Food-101N: every image of ``imagelist.tsv`` but the trusted ones for training, the verified
    (label 1) rows of ``verified_train.tsv`` as the trusted pool, Food-101's test split as test."""
    folder = root / "Food-101N_release"
    food = root / "food-101"
    classes = food_classes(folder / "meta" / "classes.txt", folder, "food101n")
    listed = food_keys(folder / "meta" / "imagelist.tsv", classes, folder, "food101n")
    verified = parse_verified_tsv(folder / "meta" / "verified_train.tsv", classes, folder)
    if food_classes(food / "meta" / "classes.txt", food, "food101") != classes:
        raise ValueError(
            f"{food / 'meta' / 'classes.txt'} and {folder / 'meta' / 'classes.txt'} list other "
            "classes: both must be the 101 Food-101 classes in the same order"
        )
    test = food_keys(food / "meta" / "test.txt", classes, food, "food101")
    pool = [(key, c) for key, c, flag in verified if flag == 1]
    pool_labels = torch.tensor([c for _, c in pool], dtype=torch.int64)
    keep = draw_per_class(pool_labels, meta_per_class, 101, generator, "verified_train.tsv")
    meta = [pool[i] for i in keep.nonzero().flatten().tolist()]
    trusted = {key for key, _ in meta}
    train = [(key, c) for key, c in listed if key not in trusted]
    files = [folder / "images" / key for key, _ in train + meta]
    files += [food / "images" / f"{key}.jpg" for key, _ in test]
    labels = [c for _, c in train + meta + test]
    n_train, n_meta = len(train), len(meta)
    parts = {
        "train": torch.arange(n_train),
        "meta": torch.arange(n_train, n_train + n_meta),
        "test": torch.arange(n_train + n_meta, len(files)),
    }
    first_image(
        files[: n_train + n_meta], {k: parts[k] for k in ("train", "meta")}, folder, "food101n"
    )
    first_image(files, {"test": parts["test"]}, food, "food101")
    info = {
        "folder": str(folder.resolve()),
        "test_folder": str(food.resolve()),
        "verified_rows": len(verified),
        "verified_correct": len(pool),
    }
    return FoundFiles(files, labels, parts, classes, info)


def _animal_split(folder: Path, split: str) -> tuple[list[Path], list[int]]:
    path = folder / split
    if not path.is_dir():
        raise missing_file(path, f"ANIMAL-10N's {split}/ folder", "animal10n", folder)
    files = sorted(p for p in path.iterdir() if p.is_file())
    return files, [parse_animal10n_name(p.name) for p in files]


def _read_animal10n(
    root: Path, meta_per_class: int | None, generator: torch.Generator
) -> FoundFiles:
    """ANIMAL-10N: ``training/`` less ``meta_per_class`` images per class drawn as the trusted set
    (the dataset publishes none), ``testing/`` as the test set; labels from the file names."""
    if meta_per_class is None:
        raise ValueError(
            "ANIMAL-10N has no trusted subset: set dataset.meta_per_class (images per class "
            "drawn out of training/ as the meta set)"
        )
    folder = root / "animal10n"
    train_files, train_labels = _animal_split(folder, "training")
    test_files, test_labels = _animal_split(folder, "testing")
    y = torch.tensor(train_labels, dtype=torch.int64)
    meta = draw_per_class(y, meta_per_class, 10, generator, f"{folder / 'training'}")
    n = len(train_files)
    parts = {
        "train": (~meta).nonzero().flatten(),
        "meta": meta.nonzero().flatten(),
        "test": torch.arange(n, n + len(test_files)),
    }
    files, labels = train_files + test_files, train_labels + test_labels
    return FoundFiles(
        files, labels, parts, list(ANIMAL10N_CLASSES), {"folder": str(folder.resolve())}
    )


def _read_mini_webvision(
    root: Path,
    meta_per_class: int | None,
    generator: torch.Generator,
    imagenet_val_dir: str | os.PathLike | None = None,
) -> FoundFiles:
    """mini-WebVision: the Google training images of classes 0..49, ``meta_per_class`` images per
    class of WebVision's validation set as the trusted set and the rest of it as the test set;
    ILSVRC2012's validation images of the 50 classes as the test set ``imagenet`` when found."""
    if meta_per_class is None:
        raise ValueError(
            "mini_webvision takes its trusted set out of WebVision's validation set: set "
            "dataset.meta_per_class (the rest is the test set)"
        )
    folder = root / "webvision"
    train_paths, train_labels = parse_filelist(
        folder / "info" / "train_filelist_google.txt", WEBVISION_CLASSES, "webvision", folder
    )
    val_paths, val_labels = parse_filelist(
        folder / "info" / "val_filelist.txt", WEBVISION_CLASSES, "webvision", folder
    )
    files = [folder / p for p in train_paths] + [folder / "val_images_256" / p for p in val_paths]
    vy = torch.tensor(val_labels, dtype=torch.int64)
    meta = draw_per_class(vy, meta_per_class, WEBVISION_CLASSES, generator, "val_filelist.txt")
    n = len(train_paths)
    parts = {
        "train": torch.arange(n),
        "meta": n + meta.nonzero().flatten(),
        "test": n + (~meta).nonzero().flatten(),
    }
    first_image(files, parts, folder, "webvision")
    labels = train_labels + val_labels
    imagenet, imagenet_labels, imagenet_info = find_imagenet_val(
        imagenet_val_dir, root, folder, WEBVISION_CLASSES
    )
    if imagenet:  # the second test set: ILSVRC2012's validation images of the 50 classes
        parts["imagenet"] = torch.arange(len(files), len(files) + len(imagenet))
        files, labels = files + imagenet, labels + imagenet_labels
    names = [f"webvision class {c}" for c in range(WEBVISION_CLASSES)]
    info = {"folder": str(folder.resolve()), "imagenet_val": imagenet_info}
    return FoundFiles(files, labels, parts, names, info)


REAL_NOISE_DATASETS: dict[str, tuple[_Reader, str]] = {
    "clothing1m": (_read_clothing1m, "resize"),
    "food101n": (_read_food101n, "resize"),
    "animal10n": (_read_animal10n, "pad"),  # ANIMAL-10N's 64x64 images: pad-4 crops
    "mini_webvision": (_read_mini_webvision, "resize"),
}
"""Each dataset's reader (what ``build_realnoise(dataset=...)`` reads) and its crop
(:func:`reweight.data.realnoise_images.recipe_transform`)."""
