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
  the test set.

Images are files: :class:`ImageFiles` opens one per item (use ``trainer.num_workers``). A missing or
damaged list is one ``FileNotFoundError`` / ``ValueError`` line naming the file, what to download
from where and where to put it.

Example::

    bundle = build_dataset("clothing1m", root="/data", meta_per_class=None, image_size=224)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import transforms

from reweight.data._validate import check_bool, check_int
from reweight.data.cifar import RelabeledSubset
from reweight.data.core import DATA_DIR_ENV, DataBundle

__all__ = [
    "ANIMAL10N_CLASSES",
    "CLOTHING1M_CLASSES",
    "IMAGENET_STATS",
    "ImageFiles",
    "build_animal10n",
    "build_clothing1m",
    "build_food101n",
    "build_mini_webvision",
    "parse_animal10n_name",
    "parse_filelist",
    "parse_key_list",
    "parse_label_kv",
    "parse_lines",
    "parse_verified_tsv",
    "recipe_transform",
]

logger = logging.getLogger(__name__)

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
"""ImageNet per-channel mean and std: what an ImageNet-pretrained backbone expects."""

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

_WHERE = {
    "clothing1m": "https://github.com/Cysu/noisy_label (ask the authors for access)",
    "food101n": "https://kuanghuei.github.io/Food-101N/ (Food-101N_release.zip)",
    "food101": "https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/ (food-101.tar.gz)",
    "animal10n": "https://dm.kaist.ac.kr/datasets/animal-10n/ (raw_image_ver.zip)",
    "webvision": "https://data.vision.ee.ethz.ch/cvl/webvision/download.html (WebVision 1.0, "
    "Google images + info + val_images_256)",
}


def _missing(path: Path, what: str, source: str, folder: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"{what} not found: expected {path.resolve()}. Download it from {_WHERE[source]} and "
        f"extract it into {folder.resolve()}, or set dataset.root / {DATA_DIR_ENV}"
    )


# -- parsers: one line each, the line number in every error --------------------------------------


def parse_lines(path: Path, source: str, folder: Path) -> list[tuple[int, str]]:
    """``(line number, stripped line)`` of each non-blank line of ``path`` (1-based)."""
    if not path.is_file():
        raise _missing(path, path.name, source, folder)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not a text file ({err.reason} at byte {err.start}): download it again "
            f"from {_WHERE[source]}"
        ) from err
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _bad_line(path: Path, n: int, line: str, expected: str, source: str) -> ValueError:
    shown = line if len(line) <= 60 else line[:57] + "..."
    return ValueError(
        f"{path} line {n}: expected {expected}, got {shown!r}: the file is damaged, download it "
        f"again from {_WHERE[source]}"
    )


def parse_label_kv(path: Path, num_classes: int, source: str, folder: Path) -> dict[str, int]:
    """Clothing1M's ``*_label_kv.txt`` (also WebVision's file lists): ``<image path> <label>`` per
    line, label in ``[0, num_classes)``. A path listed twice with two labels is an error."""
    out: dict[str, int] = {}
    expected = f"'<image path> <label 0-{num_classes - 1}>'"
    for n, line in parse_lines(path, source, folder):
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit() or int(parts[1]) >= num_classes:
            raise _bad_line(path, n, line, expected, source)
        key, label = parts[0], int(parts[1])
        if out.setdefault(key, label) != label:
            raise _bad_line(path, n, line, f"one label for {key} (line before: {out[key]})", source)
    return out


def parse_filelist(
    path: Path, keep_below: int, source: str, folder: Path
) -> tuple[list[str], list[int]]:
    """WebVision's ``info/*_filelist*.txt``: ``<path> <label>`` per line (labels 0..999); only the
    lines with ``label < keep_below`` are kept, in file order."""
    paths: list[str] = []
    labels: list[int] = []
    for n, line in parse_lines(path, source, folder):
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise _bad_line(path, n, line, "'<image path> <label>'", source)
        if int(parts[1]) < keep_below:
            paths.append(parts[0])
            labels.append(int(parts[1]))
    return paths, labels


def parse_key_list(path: Path, source: str, folder: Path) -> list[str]:
    """Clothing1M's ``*_key_list.txt``: one image path per line, no spaces."""
    keys = []
    for n, line in parse_lines(path, source, folder):
        if len(line.split()) != 1:
            raise _bad_line(path, n, line, "one image path", source)
        keys.append(line)
    return keys


def parse_verified_tsv(path: Path, classes: list[str], folder: Path) -> list[tuple[str, int, int]]:
    """Food-101N's ``meta/verified_*.tsv`` (header ``class_name/key<TAB>verification_label``):
    ``(key, class index, verification label)`` per row. The class is the key's folder: the lists
    disagree on a few images' classes (a known quirk), so each list's own folder counts."""
    index = {c: i for i, c in enumerate(classes)}
    rows = []
    for n, line in parse_lines(path, "food101n", folder):
        if n == 1 and line.startswith("class_name"):
            continue  # the header
        parts = line.split("\t")
        ok = len(parts) == 2 and parts[1].strip() in ("0", "1") and "/" in parts[0]
        if not ok or parts[0].split("/")[0] not in index:
            raise _bad_line(
                path, n, line, "'<class_name>/<id>.jpg<TAB><0 or 1>' of a class", "food101n"
            )
        rows.append((parts[0], index[parts[0].split("/")[0]], int(parts[1])))
    return rows


def _food_keys(path: Path, classes: list[str], folder: Path, source: str) -> list[tuple[str, int]]:
    """``imagelist.tsv`` (header ``class_name/key``) or Food-101's ``meta/test.txt`` (no header,
    no ``.jpg``): ``(key, class index)`` per line."""
    index = {c: i for i, c in enumerate(classes)}
    rows = []
    for n, line in parse_lines(path, source, folder):
        if n == 1 and line.startswith("class_name"):
            continue
        cls = line.split("/")[0]
        if "/" not in line or len(line.split()) != 1 or cls not in index:
            raise _bad_line(path, n, line, "'<class_name>/<id>' of a class", source)
        rows.append((line, index[cls]))
    return rows


def _food_classes(path: Path, folder: Path, source: str) -> list[str]:
    """``classes.txt``: one class name per line; Food-101N's starts with the header
    ``class_name``, Food-101's has none."""
    lines = parse_lines(path, source, folder)
    names = [line for n, line in lines if not (n == 1 and line == "class_name")]
    if len(names) != 101 or len(set(names)) != 101:
        raise ValueError(
            f"{path} lists {len(set(names))} distinct classes, Food-101 has 101: the file is "
            f"damaged, download it again from {_WHERE[source]}"
        )
    return names


def parse_animal10n_name(name: str) -> int:
    """ANIMAL-10N's file name ``<label>_<id>.jpg`` (label first, 0..9) -> the label."""
    stem, _, ext = name.rpartition(".")
    label, sep, ident = stem.partition("_")
    if ext.lower() != "jpg" or not sep or not label.isdigit() or int(label) > 9 or not ident:
        raise ValueError(
            f"{name!r} is not an ANIMAL-10N image name '<label 0-9>_<id>.jpg': remove it or "
            f"extract ANIMAL-10N again from {_WHERE['animal10n']}"
        )
    return int(label)


# -- datasets ------------------------------------------------------------------------------------


class ImageFiles(Dataset):
    """Items ``(PIL RGB image, 0)`` read from ``paths`` when asked for (nothing is held in memory);
    the base of :class:`reweight.data.cifar.RelabeledSubset`, which adds labels and transforms."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                return image.convert("RGB"), 0
        except (OSError, UnidentifiedImageError) as err:
            raise ValueError(f"cannot read the image {path}: {err}") from err


def recipe_transform(image_size: int, *, train: bool, augment: bool, crop: str) -> Callable:
    """The recipes' augmentations. ``crop="resize"`` (Clothing1M, Food-101N, WebVision; ImageNet
    style): resize the short side to ``image_size * 256 / 224``, then a random (train) or centre
    crop of ``image_size`` and a random horizontal flip. ``crop="pad"`` (ANIMAL-10N's 64x64 images):
    resize to ``image_size``, then pad-4 random crop and flip. ImageNet normalisation."""
    steps: list[Callable] = []
    if crop == "resize":
        steps.append(transforms.Resize(round(image_size * 256 / 224)))
        steps.append(
            transforms.RandomCrop(image_size)
            if train and augment
            else transforms.CenterCrop(image_size)
        )
    else:
        steps.append(transforms.Resize((image_size, image_size)))
        if train and augment:
            steps.append(transforms.RandomCrop(image_size, padding=4))
    if train and augment:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(*IMAGENET_STATS)]
    return transforms.Compose(steps)


def _draw_per_class(
    labels: Tensor, n: int | None, num_classes: int, generator: torch.Generator, what: str
) -> Tensor:
    """A boolean mask: ``n`` random members of each class (``None``: all), in source order."""
    if n is None:
        return torch.ones_like(labels, dtype=torch.bool)
    mask = torch.zeros_like(labels, dtype=torch.bool)
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        if members.numel() < n:
            raise ValueError(
                f"{what} has {members.numel()} image(s) of class {c}, fewer than "
                f"meta_per_class={n}: lower dataset.meta_per_class"
            )
        mask[members[torch.randperm(members.numel(), generator=generator)[:n]]] = True
    return mask


def _bundle(
    name: str,
    files: list[Path],
    labels: list[int],
    parts: dict[str, Tensor],
    class_names: list[str],
    *,
    image_size: int,
    augment: bool,
    crop: str,
    info: dict[str, Any],
) -> DataBundle:
    """One ``ImageFiles`` over every file; ``parts`` maps train / meta / test to index tensors."""
    base = ImageFiles(files)
    y = torch.tensor(labels, dtype=torch.int64)
    train_tf = recipe_transform(image_size, train=True, augment=augment, crop=crop)
    test_tf = recipe_transform(image_size, train=False, augment=augment, crop=crop)

    def subset(key: str, tf: Callable) -> RelabeledSubset:
        return RelabeledSubset(base, parts[key], y[parts[key]], tf)

    train = subset("train", train_tf)
    for key in ("train", "meta", "test"):
        if parts[key].numel() == 0:
            raise ValueError(f"{name}: the {key} set is empty: check the list files")
    return DataBundle(
        name=name,
        train=train,
        meta=subset("meta", train_tf),
        test=subset("test", test_tf),
        num_classes=len(class_names),
        train_labels=train.labels,
        true_labels=train.labels.clone(),  # real noise: the true labels are unknown
        corrupted=torch.zeros_like(train.labels, dtype=torch.bool),
        class_names=class_names,
        in_channels=3,
        info={
            "source": name,
            "true_labels": "unknown (real noise): num_corrupted is 0 by convention",
            "image_size": image_size,
            "augment": augment,
            **info,
        },
        train_ids=[str(files[i]) for i in parts["train"].tolist()],
    )


def _check_common(meta_per_class: int | None, image_size: int, augment: bool) -> None:
    if meta_per_class is not None:
        check_int("meta_per_class", meta_per_class, minimum=1)
    check_int("image_size", image_size, minimum=8)
    check_bool("augment", augment)


def _annotation(folder: Path, name: str) -> Path:
    """Clothing1M's annotation files sit under ``annotations/`` in the release (a flat copy
    works too)."""
    nested = folder / "annotations" / name
    return nested if nested.is_file() or not (folder / name).is_file() else folder / name


def build_clothing1m(
    root: Path,
    *,
    generator: torch.Generator,
    download: bool,
    meta_per_class: int | None,
    image_size: int,
    augment: bool,
) -> DataBundle:
    """Clothing1M: noisy training keys with noisy labels, the clean validation keys as the trusted
    set (``meta_per_class`` per class of them, ``None``: all), the clean test keys as test."""
    _check_common(meta_per_class, image_size, augment)
    folder = Path(root) / "clothing1m"
    k = CLOTHING1M_CLASSES
    noisy = parse_label_kv(_annotation(folder, "noisy_label_kv.txt"), k, "clothing1m", folder)
    clean = parse_label_kv(_annotation(folder, "clean_label_kv.txt"), k, "clothing1m", folder)
    names_file = _annotation(folder, "category_names_eng.txt")
    names = [line for _, line in parse_lines(names_file, "clothing1m", folder)]
    if len(names) != k:
        raise ValueError(
            f"{names_file} lists {len(names)} categories, Clothing1M has {k}: download it again "
            f"from {_WHERE['clothing1m']}"
        )
    files: list[Path] = []
    labels: list[int] = []
    parts: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    for part, key_file, table in (
        ("train", "noisy_train_key_list.txt", noisy),
        ("meta", "clean_val_key_list.txt", clean),
        ("test", "clean_test_key_list.txt", clean),
    ):
        keys = parse_key_list(_annotation(folder, key_file), "clothing1m", folder)
        known = [key for key in keys if key in table]
        counts[f"{part}_keys_without_label"] = len(keys) - len(known)
        if len(known) < len(keys):
            logger.info(
                "clothing1m: %d of %d keys of %s have no label in the kv file: skipped",
                len(keys) - len(known),
                len(keys),
                key_file,
            )
        start = len(files)
        files += [folder / key for key in known]
        labels += [table[key] for key in known]
        parts[part] = torch.arange(start, len(files))
    meta_labels = torch.tensor(labels)[parts["meta"]]
    keep = _draw_per_class(meta_labels, meta_per_class, k, generator, "clean_val_key_list.txt")
    parts["meta"] = parts["meta"][keep]
    _first_image(files, parts, folder, "clothing1m")
    return _bundle(
        "clothing1m",
        files,
        labels,
        parts,
        names,
        image_size=image_size,
        augment=augment,
        crop="resize",
        info={"folder": str(folder.resolve()), **counts},
    )


def _first_image(files: list[Path], parts: dict[str, Tensor], folder: Path, source: str) -> None:
    """The first image of each split must exist (a cheap check that the images were extracted)."""
    for part, idx in parts.items():
        if idx.numel() and not files[int(idx[0])].is_file():
            raise _missing(files[int(idx[0])], f"the first {part} image", source, folder)


def build_food101n(
    root: Path,
    *,
    generator: torch.Generator,
    download: bool,
    meta_per_class: int | None,
    image_size: int,
    augment: bool,
) -> DataBundle:
    """Food-101N: every image of ``imagelist.tsv`` but the trusted ones for training, the verified
    (label 1) rows of ``verified_train.tsv`` as the trusted pool, Food-101's test split as test."""
    _check_common(meta_per_class, image_size, augment)
    folder = Path(root) / "Food-101N_release"
    food = Path(root) / "food-101"
    classes = _food_classes(folder / "meta" / "classes.txt", folder, "food101n")
    listed = _food_keys(folder / "meta" / "imagelist.tsv", classes, folder, "food101n")
    verified = parse_verified_tsv(folder / "meta" / "verified_train.tsv", classes, folder)
    food_classes = _food_classes(food / "meta" / "classes.txt", food, "food101")
    if food_classes != classes:
        raise ValueError(
            f"{food / 'meta' / 'classes.txt'} and {folder / 'meta' / 'classes.txt'} list other "
            "classes: both must be the 101 Food-101 classes in the same order"
        )
    test = _food_keys(food / "meta" / "test.txt", classes, food, "food101")
    pool = [(key, c) for key, c, flag in verified if flag == 1]
    pool_labels = torch.tensor([c for _, c in pool], dtype=torch.int64)
    keep = _draw_per_class(pool_labels, meta_per_class, 101, generator, "verified_train.tsv")
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
    _first_image(
        files[: n_train + n_meta], {k: parts[k] for k in ("train", "meta")}, folder, "food101n"
    )
    _first_image(files, {"test": parts["test"]}, food, "food101")
    info = {
        "folder": str(folder.resolve()),
        "test_folder": str(food.resolve()),
        "verified_rows": len(verified),
        "verified_correct": len(pool),
    }
    return _bundle(
        "food101n",
        files,
        labels,
        parts,
        classes,
        image_size=image_size,
        augment=augment,
        crop="resize",
        info=info,
    )


def _animal_split(folder: Path, split: str) -> tuple[list[Path], list[int]]:
    path = folder / split
    if not path.is_dir():
        raise _missing(path, f"ANIMAL-10N's {split}/ folder", "animal10n", folder)
    files = sorted(p for p in path.iterdir() if p.is_file())
    return files, [parse_animal10n_name(p.name) for p in files]


def build_animal10n(
    root: Path,
    *,
    generator: torch.Generator,
    download: bool,
    meta_per_class: int | None,
    image_size: int,
    augment: bool,
) -> DataBundle:
    """ANIMAL-10N: ``training/`` less ``meta_per_class`` images per class drawn as the trusted set
    (the dataset publishes none), ``testing/`` as the test set; labels from the file names."""
    _check_common(meta_per_class, image_size, augment)
    if meta_per_class is None:
        raise ValueError(
            "ANIMAL-10N has no trusted subset: set dataset.meta_per_class (images per class "
            "drawn out of training/ as the meta set)"
        )
    folder = Path(root) / "animal10n"
    train_files, train_labels = _animal_split(folder, "training")
    test_files, test_labels = _animal_split(folder, "testing")
    y = torch.tensor(train_labels, dtype=torch.int64)
    meta = _draw_per_class(y, meta_per_class, 10, generator, f"{folder / 'training'}")
    n = len(train_files)
    parts = {
        "train": (~meta).nonzero().flatten(),
        "meta": meta.nonzero().flatten(),
        "test": torch.arange(n, n + len(test_files)),
    }
    return _bundle(
        "animal10n",
        train_files + test_files,
        train_labels + test_labels,
        parts,
        list(ANIMAL10N_CLASSES),
        image_size=image_size,
        augment=augment,
        crop="pad",
        info={"folder": str(folder.resolve())},
    )


def build_mini_webvision(
    root: Path,
    *,
    generator: torch.Generator,
    download: bool,
    meta_per_class: int | None,
    image_size: int,
    augment: bool,
) -> DataBundle:
    """mini-WebVision: the Google training images of classes 0..49, ``meta_per_class`` images per
    class of WebVision's validation set as the trusted set and the rest of it as the test set."""
    _check_common(meta_per_class, image_size, augment)
    if meta_per_class is None:
        raise ValueError(
            "mini_webvision takes its trusted set out of WebVision's validation set: set "
            "dataset.meta_per_class (the rest is the test set)"
        )
    folder = Path(root) / "webvision"
    train_paths, train_labels = parse_filelist(
        folder / "info" / "train_filelist_google.txt", WEBVISION_CLASSES, "webvision", folder
    )
    val_paths, val_labels = parse_filelist(
        folder / "info" / "val_filelist.txt", WEBVISION_CLASSES, "webvision", folder
    )
    files = [folder / p for p in train_paths] + [folder / "val_images_256" / p for p in val_paths]
    vy = torch.tensor(val_labels, dtype=torch.int64)
    meta = _draw_per_class(vy, meta_per_class, WEBVISION_CLASSES, generator, "val_filelist.txt")
    n = len(train_paths)
    parts = {
        "train": torch.arange(n),
        "meta": n + meta.nonzero().flatten(),
        "test": n + (~meta).nonzero().flatten(),
    }
    _first_image(files, parts, folder, "webvision")
    return _bundle(
        "mini_webvision",
        files,
        train_labels + val_labels,
        parts,
        [f"webvision class {c}" for c in range(WEBVISION_CLASSES)],
        image_size=image_size,
        augment=augment,
        crop="resize",
        info={"folder": str(folder.resolve())},
    )
