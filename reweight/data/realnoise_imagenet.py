"""ILSVRC2012's validation images of mini-WebVision's 50 classes: the papers' second test set
(e.g. CMW-Net-SL 78.08 % on WebVision's validation images, 75.72 % on these; Shu et al., TPAMI
2023), read from ``dataset.imagenet_val_dir`` (default ``<root>/imagenet/val``) in any of the
layouts it is kept in:

* synset folders, ``<dir>/<wnid>/*.JPEG``: the validation images sorted into one folder per
  synset, as PyTorch's ImageNet example and torchvision's ``ImageFolder`` read them (and most
  mini-WebVision loaders); WebVision's ``info/synsets.txt`` names class ``c``'s synset on line
  ``c + 1`` (WebVision 1.0 has ILSVRC2012's 1000 synsets), so the other 950 folders may be there
  or not;
* class-index folders, ``<dir>/<c>/*`` for ``c`` in 0..49 (DivideMix's ``imagenet/val/<c>/``);
* as it ships: ``ILSVRC2012_img_val.tar`` extracted flat (``ILSVRC2012_val_00000001.JPEG`` ..
  ``ILSVRC2012_val_00050000.JPEG``) with the devkit ``ILSVRC2012_devkit_t12/`` inside ``<dir>``
  or beside it: ``data/ILSVRC2012_validation_ground_truth.txt`` (line ``n``: the ILSVRC2012_ID of
  image ``n``) and ``data/meta.mat`` (ILSVRC2012_ID -> synset; read with scipy, as torchvision's
  ``ImageNet`` reads it).

:func:`find_imagenet_val` returns the images and labels; an unset key with no folder at the
default place is logged once and the run tests on WebVision's validation images only.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from reweight.data.realnoise_lists import (
    DOWNLOADS,
    missing_file,
    parse_ground_truth,
    parse_synsets,
)

__all__ = ["DEVKIT", "find_imagenet_val", "read_devkit_meta"]

logger = logging.getLogger(__name__)

DEVKIT = "ILSVRC2012_devkit_t12"
_VAL_IMAGE = re.compile(r"ILSVRC2012_val_\d{8}\.JPEG")
_WNID = re.compile(r"n\d{8}")
_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
_KEY = "dataset.imagenet_val_dir"


def find_imagenet_val(
    val_dir: str | os.PathLike | None, root: Path, webvision: Path, num_classes: int
) -> tuple[list[Path], list[int], dict[str, Any]]:
    """The ILSVRC2012 validation images of classes ``0 .. num_classes - 1`` and their labels,
    and what ``dataset.json`` records of them. ``val_dir`` None: ``<root>/imagenet/val`` if it
    exists, else no images (said once in the log); a ``val_dir`` that is not a folder, or holds
    none of the layouts, is an error naming it and where to get the images."""
    unset = val_dir is None or val_dir == ""  # an empty string as from an unset variable
    folder = root / "imagenet" / "val" if unset else Path(val_dir).expanduser()
    if unset and not folder.exists():
        logger.info(
            "mini_webvision: no ImageNet validation images at %s: tested on WebVision's "
            "validation images only (dataset.imagenet_val_dir names another folder; %s)",
            folder.resolve(),
            DOWNLOADS["imagenet"],
        )
        return [], [], {"used": False, "folder": str(folder.resolve())}
    if not folder.is_dir():
        raise FileNotFoundError(
            f"dataset.imagenet_val_dir={'null' if unset else val_dir}: no folder at "
            f"{folder.resolve()}. Download {DOWNLOADS['imagenet']} and extract it there "
            f"({_LAYOUTS}), or set dataset.imagenet_val_dir to the folder that holds it"
            + ("" if unset else " (null: WebVision's validation images only)")
        )
    files, labels, layout = _read_layout(folder, webvision, num_classes)
    _check_image(files[0])
    logger.info(
        "mini_webvision: %d ImageNet validation images of classes 0-%d from %s (%s)",
        len(files),
        num_classes - 1,
        folder.resolve(),
        layout,
    )
    info = {"used": True, "folder": str(folder.resolve()), "layout": layout, "images": len(files)}
    return files, labels, info


_LAYOUTS = (
    "<wnid>/ folders, <class 0-49>/ folders, or the flat ILSVRC2012_val_<8 digits>.JPEG "
    f"files with the devkit {DEVKIT}/ inside or beside the folder"
)


def _read_layout(
    folder: Path, webvision: Path, num_classes: int
) -> tuple[list[Path], list[int], str]:
    """Which layout ``folder`` holds, and its images and labels."""
    with os.scandir(folder) as entries:  # d_type: no stat per image of a flat folder
        listed = [(e.name, e.is_dir()) for e in entries]
    dirs = {name for name, is_dir in listed if is_dir}
    if any(_WNID.fullmatch(name) for name in dirs):
        synsets = parse_synsets(webvision / "info" / "synsets.txt", webvision)[:num_classes]
        files, labels = _from_folders(folder, synsets, "<wnid>/ folders")
        return files, labels, "synset folders"
    if "0" in dirs:
        names = [str(c) for c in range(num_classes)]
        files, labels = _from_folders(folder, names, "<class>/ folders")
        return files, labels, "class-index folders"
    if any(_VAL_IMAGE.fullmatch(name) for name, is_dir in listed if not is_dir):
        files, labels = _from_devkit(folder, webvision, num_classes)
        return files, labels, f"flat, labels from {DEVKIT}"
    raise ValueError(
        f"{folder.resolve()} holds none of ILSVRC2012's validation layouts ({_LAYOUTS}): "
        f"extract {DOWNLOADS['imagenet']} there, or set dataset.imagenet_val_dir"
    )


def _from_folders(folder: Path, names: list[str], layout: str) -> tuple[list[Path], list[int]]:
    """Class ``c``'s images: the image files of ``folder / names[c]``, sorted by name."""
    files: list[Path] = []
    labels: list[int] = []
    for c, name in enumerate(names):
        sub = folder / name
        found = sorted(
            p for p in sub.glob("*") if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file()
        )
        if not found:
            what = "is missing" if not sub.is_dir() else "holds no image"
            raise ValueError(
                f"{sub.resolve()} {what} (class {c}; {layout}): ILSVRC2012 has 50 validation "
                f"images per class; extract them again from {DOWNLOADS['imagenet']}"
            )
        files += found
        labels += [c] * len(found)
    return files, labels


def _from_devkit(folder: Path, webvision: Path, num_classes: int) -> tuple[list[Path], list[int]]:
    """The flat layout: each image's ILSVRC2012_ID from the devkit's ground truth, its synset
    from ``meta.mat``, its class from WebVision's ``synsets.txt``."""
    candidates = [folder / DEVKIT, folder.parent / DEVKIT]
    devkit = next((d for d in candidates if d.is_dir()), None)
    if devkit is None:
        what = f"the devkit {DEVKIT}/ (the flat layout's labels; or {candidates[1].resolve()})"
        raise missing_file(candidates[0], what, "imagenet", folder, _KEY)
    truth = parse_ground_truth(devkit / "data" / "ILSVRC2012_validation_ground_truth.txt", devkit)
    synset_of = read_devkit_meta(devkit / "data" / "meta.mat")
    synsets = parse_synsets(webvision / "info" / "synsets.txt", webvision)
    class_of = {wnid: c for c, wnid in enumerate(synsets[:num_classes])}
    files: list[Path] = []
    labels: list[int] = []
    for n, ident in enumerate(truth, 1):
        c = class_of.get(synset_of[ident])
        if c is not None:
            files.append(folder / f"ILSVRC2012_val_{n:08d}.JPEG")
            labels.append(c)
    missing = [p for p in files if not p.is_file()]
    if missing or not files:
        raise FileNotFoundError(
            f"{missing[0].resolve() if missing else folder.resolve()} not found: "
            f"{len(missing) if files else 'all'} of the validation images the devkit's ground "
            f"truth gives classes 0-{num_classes - 1} are missing; extract "
            f"{DOWNLOADS['imagenet']} into {folder.resolve()}"
        )
    return files, labels


def read_devkit_meta(path: Path) -> dict[int, str]:
    """The devkit's ``data/meta.mat``: ILSVRC2012_ID -> synset (WNID) of the 1000 classes (the
    leaf synsets, ``num_children`` 0; the other 860 are their ancestors)."""
    if not path.is_file():
        raise missing_file(path, "the devkit's meta.mat", "imagenet", path.parent, _KEY)
    try:
        from scipy.io import loadmat
        from scipy.io.matlab import MatReadError
    except ImportError as err:
        raise ValueError(
            f"reading {path} needs scipy (pip install scipy), or sort the validation images "
            "into <wnid>/ folders"
        ) from err
    try:
        synsets = loadmat(path, squeeze_me=True)["synsets"]
        out = {
            int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0
        }
    except (MatReadError, OSError, ValueError, KeyError, TypeError, IndexError) as err:
        raise ValueError(
            f"{path} is not the devkit's meta.mat ({type(err).__name__}: {err}): download "
            f"{DOWNLOADS['imagenet']} again"
        ) from err
    if sorted(out) != list(range(1, 1001)):
        raise ValueError(
            f"{path} lists {len(out)} classes, not ILSVRC2012_IDs 1-1000: download "
            f"{DOWNLOADS['imagenet']} again"
        )
    return out


def _check_image(path: Path) -> None:
    """The first image must decode (a cheap check that the folder holds images)."""
    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, UnidentifiedImageError) as err:
        raise ValueError(
            f"cannot read the ImageNet validation image {path.resolve()} ({err}): extract "
            f"{DOWNLOADS['imagenet']} again"
        ) from err
