"""Your own images (``image_folder``): class folders read into memory, then split by
:func:`reweight.data.own.make_bundle`.

Example::

    bundle = build_dataset("image_folder", train_dir="pets/train", meta_dir="pets/trusted")
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from reweight.data._validate import check_bool, check_int
from reweight.data.core import DataBundle
from reweight.data.own import SplitProtocol, check_unique, make_bundle, no_trusted_set

__all__ = ["IMAGE_EXTENSIONS", "build_image_folder"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".webp")
"""Files read as images (by ``torchvision.io.decode_image``); other files are ignored."""

_DECODER_DEPRECATED = "The image decoding and encoding capabilities of TorchVision are deprecated"


def build_image_folder(
    root: Path,
    *,
    generator: torch.Generator,
    download: bool,
    train_dir: str | None,
    meta_dir: str | None,
    meta_files: list[str] | None,
    meta_per_class: int | None,
    test_dir: str | None,
    test_fraction: float,
    image_size: int | None,
    grayscale: bool,
    standardize: bool,
    noise_type: str,
    noise_rate: float,
    imbalance_factor: float,
) -> DataBundle:
    """Images in class folders (``train_dir/<class>/<image>``): labels from the folder names.

    The trusted set is ``meta_dir`` (the same class folders) or ``meta_files`` (paths, relative
    to ``train_dir``, of training images whose labels you trust: they leave the training set).
    ``test_dir`` is the test set; without it ``test_fraction`` of the training images are held
    out. Images are read with ``torchvision.io`` (PNG, JPEG, GIF, WebP) as grayscale (1 channel)
    or RGB (3), resized to ``image_size`` squares if given (else they must share one size).
    ``root`` and ``download`` are unused (paths are as given, relative to the working folder).
    """
    protocol = SplitProtocol(
        meta_per_class, test_fraction, standardize, noise_type, noise_rate, imbalance_factor
    )
    protocol.check()
    check_bool("grayscale", grayscale)
    if image_size is not None:
        check_int("image_size", image_size, minimum=1)
    train_dir = _require_train_dir(train_dir)
    train = Path(train_dir)
    if meta_dir is None and not meta_files:
        raise no_trusted_set("image_folder")
    x, y, ids, names = _load_folder(train, "train_dir", None, grayscale, image_size)

    def load(folder: str, key: str) -> tuple[Tensor, Tensor]:
        return _load_like(x, Path(folder), key, names, grayscale, image_size)

    meta: tuple[Tensor, Tensor] | list[int]
    if meta_dir is not None:
        meta = load(meta_dir, "meta_dir")
    else:
        meta = _trusted_positions(train_dir, ids, list(meta_files or []))
    test = load(test_dir, "test_dir") if test_dir is not None else None
    info: dict[str, Any] = {
        "source": "image_folder",
        "train_dir": str(train.resolve()),
        "image_shape": list(x.shape[1:]),
    }
    return make_bundle(
        "image_folder", (x, y, ids), meta, test, names, protocol, generator=generator, info=info
    )


def _require_train_dir(train_dir: str | None) -> str:
    if train_dir is None:
        raise ValueError(
            "dataset.train_dir is not set: give the folder of training images, one subfolder "
            "per class (dataset.train_dir=path/to/train)"
        )
    return train_dir


def _trusted_positions(train_dir: str, ids: list[str], meta_files: list[str]) -> list[int]:
    """The positions in ``ids`` (the training images' paths) of ``meta_files`` (paths relative
    to ``train_dir``)."""
    train = Path(train_dir)
    position = {Path(p).resolve(): i for i, p in enumerate(ids)}
    check_unique("dataset.meta_files", meta_files)
    meta = []
    for name in meta_files:
        found = position.get((train / name).resolve())
        if found is None:
            raise ValueError(
                f"dataset.meta_files names {train / name}, which is not an image of "
                f"dataset.train_dir={train_dir}: give paths relative to train_dir"
            )
        meta.append(found)
    return meta


def _load_like(
    x: Tensor,
    folder: Path,
    key: str,
    names: list[str],
    grayscale: bool,
    size: int | None,
) -> tuple[Tensor, Tensor]:
    """The images and labels of ``folder`` (the training folder's classes ``names``), which
    must have the training images' size (those are ``x``)."""
    fx, fy, fids, _ = _load_folder(folder, key, names, grayscale, size)
    if tuple(fx.shape[-2:]) != tuple(x.shape[-2:]):
        raise ValueError(
            f"the image {fids[0]} is {fx.shape[-1]}x{fx.shape[-2]} but the training images "
            f"are {x.shape[-1]}x{x.shape[-2]}: set dataset.image_size to resize every image"
        )
    return fx, fy


def _class_folders(folder: Path, key: str) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(
            f"dataset.{key}={str(folder)!r} is not a folder: give a folder holding one "
            "subfolder of images per class"
        )
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(
            f"{folder} has no class folders: put the images of each class in a subfolder named "
            "after the class (ImageFolder layout)"
        )
    return classes


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _read_image(path: Path, grayscale: bool, size: int | None) -> Tensor:
    """(C, H, W) float32 in [0, 1] (an 8-bit or a 16-bit image alike); resized (bilinear,
    antialiased) to size x size if given."""
    from torchvision.io import ImageReadMode, decode_image

    try:
        data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
        mode = ImageReadMode.GRAY if grayscale else ImageReadMode.RGB
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its decoders in favour of torchcodec, which is not a
            # dependency; they still work, and warnings are errors under pytest
            warnings.filterwarnings("ignore", _DECODER_DEPRECATED, DeprecationWarning)
            image = decode_image(data, mode=mode)
    except (RuntimeError, ValueError, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(
            f"cannot read the image {path} ({reason}): replace or delete the file"
        ) from err
    # by the range of its own type: 8-bit / 255, 16-bit (PNG) / 65535
    x = image.to(torch.float32) / float(torch.iinfo(image.dtype).max)
    if size is not None and tuple(x.shape[1:]) != (size, size):
        x = F.interpolate(
            x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )[0]
    return x


def _load_folder(
    folder: Path,
    key: str,
    class_names: list[str] | None,
    grayscale: bool,
    size: int | None,
) -> tuple[Tensor, Tensor, list[str], list[str]]:
    """Images and labels of an ImageFolder tree; ``class_names`` (of the training folder) fixes
    the label of each class folder, and a class folder it does not know is an error."""
    folders = _class_folders(folder, key)
    names = class_names or [p.name for p in folders]
    images: list[Tensor] = []
    labels: list[int] = []
    ids: list[str] = []
    for sub in folders:
        if sub.name not in names:
            raise ValueError(
                f"{sub} is a class the training folder does not have (classes: "
                f"{', '.join(names)}): rename or remove it"
            )
        files = _image_files(sub)
        if not files and class_names is None:
            raise ValueError(
                f"the class folder {sub} holds no image ({', '.join(IMAGE_EXTENSIONS)}): add "
                "images or remove the folder"
            )
        for path in files:
            x = _read_image(path, grayscale, size)
            if images and x.shape != images[0].shape:
                raise ValueError(
                    f"the image {path} is {x.shape[2]}x{x.shape[1]} but {ids[0]} is "
                    f"{images[0].shape[2]}x{images[0].shape[1]}: set dataset.image_size to "
                    "resize every image"
                )
            images.append(x)
            labels.append(names.index(sub.name))
            ids.append(str(path))
    if not images:
        raise ValueError(f"{folder} holds no image: put the images in its class folders")
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64), ids, names
