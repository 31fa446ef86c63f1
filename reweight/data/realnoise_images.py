"""Images of the real-world noisy benchmarks as files: read when asked for (nothing is held in
memory), with the recipes' transforms; :func:`files_bundle` makes the :class:`DataBundle` of what
a reader of :mod:`reweight.data.realnoise` found."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from reweight.data.cifar import RelabeledSubset
from reweight.data.core import DataBundle
from reweight.data.realnoise_lists import missing_file

__all__ = [
    "IMAGENET_STATS",
    "FoundFiles",
    "ImageFiles",
    "draw_per_class",
    "files_bundle",
    "first_image",
    "recipe_transform",
]

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
"""ImageNet per-channel mean and std: what an ImageNet-pretrained backbone expects."""


@dataclass
class FoundFiles:
    """What a reader found: every image file with its label, the positions in ``files`` of each
    split (``parts``: train, meta, test), the class names and what ``dataset.json`` records."""

    files: list[Path]
    labels: list[int]
    parts: dict[str, Tensor]
    class_names: list[str]
    info: dict[str, Any] = field(default_factory=dict)


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
    from torchvision import transforms  # here, not at the top: its import alone takes seconds

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


def draw_per_class(
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


def files_bundle(
    name: str, found: FoundFiles, *, image_size: int, augment: bool, crop: str
) -> DataBundle:
    """One ``ImageFiles`` over every file found, a ``RelabeledSubset`` of it per split; a part
    besides train, meta and test is a further test set (``bundle.extra_tests``, by its name)."""
    files, parts, class_names = found.files, found.parts, found.class_names
    base = ImageFiles(files)
    y = torch.tensor(found.labels, dtype=torch.int64)
    train_tf = recipe_transform(image_size, train=True, augment=augment, crop=crop)
    test_tf = recipe_transform(image_size, train=False, augment=augment, crop=crop)

    def subset(key: str, tf: Callable) -> RelabeledSubset:
        return RelabeledSubset(base, parts[key], y[parts[key]], tf)

    train = subset("train", train_tf)
    for key in ("train", "meta", "test"):
        if parts[key].numel() == 0:
            raise ValueError(f"{name}: the {key} set is empty: check the list files")
    extra = [key for key in parts if key not in ("train", "meta", "test")]
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
            **found.info,
        },
        train_ids=[str(files[i]) for i in parts["train"].tolist()],
        extra_tests={key: subset(key, test_tf) for key in extra},
    )


def first_image(files: list[Path], parts: dict[str, Tensor], folder: Path, source: str) -> None:
    """The first image of each split must exist (a cheap check that the images were extracted)."""
    for part, idx in parts.items():
        if idx.numel() and not files[int(idx[0])].is_file():
            raise missing_file(files[int(idx[0])], f"the first {part} image", source, folder)
