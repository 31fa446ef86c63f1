"""``build_model``: one entry point from a name (and a Hydra config) to an ``nn.Module``."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from reweight.models.lenet import LeNet
from reweight.models.mlp import MLP
from reweight.models.resnet import CifarResNet, resnet32
from reweight.models.sequence import RowLSTM, image_shape, vit_tiny
from reweight.models.torchvision_models import torchvision_model
from reweight.models.wide_resnet import WideResNet, wrn28_10

__all__ = ["MODEL_NAMES", "build_model", "model_builder"]


def _lenet(
    num_classes: int,
    in_channels: int,
    input_shape: tuple[int, ...] | None,
    *,
    input_size: int | Sequence[int] | None = None,
) -> nn.Module:
    size: int | tuple[int, int] = 28
    if input_size is not None:
        size = input_size if isinstance(input_size, int) else _pair(input_size, "model.input_size")
    if input_shape is not None:
        if len(input_shape) != 3:
            raise ValueError(
                f"model 'lenet': input_shape must be (C, H, W), got {list(input_shape)}"
            )
        from_shape = (input_shape[1], input_shape[2])
        given = (size, size) if isinstance(size, int) else size
        if input_size is not None and given != from_shape:
            raise ValueError(
                f"model 'lenet': input_size={input_size} disagrees with the data's "
                f"input_shape={input_shape}; drop model.input_size or make them match"
            )
        size = from_shape
    return LeNet(num_classes=num_classes, in_channels=in_channels, input_size=size)


def _mlp(
    num_classes: int,
    in_channels: int,
    input_shape: tuple[int, ...] | None,
    *,
    in_features: int | None = None,
    hidden: Sequence[int] = (100, 100),
    dropout: float = 0.0,
) -> nn.Module:
    if input_shape is not None:
        from_shape = math.prod(input_shape)
        if in_features is not None and in_features != from_shape:
            raise ValueError(
                f"model 'mlp': in_features={in_features} disagrees with "
                f"input_shape={input_shape} (= {from_shape} features); give only one of them"
            )
        in_features = from_shape
    if in_features is None:
        raise ValueError(
            "model 'mlp' needs the input size: pass input_shape=(C, H, W) (e.g. "
            "model.input_shape=[1,28,28]) or in_features=<int>"
        )
    return MLP(in_features, num_classes, hidden=tuple(hidden), dropout=dropout)


def _lstm(
    num_classes: int,
    in_channels: int,
    input_shape: tuple[int, ...] | None,
    *,
    hidden: int = 128,
    num_layers: int = 1,
    bidirectional: bool = False,
    dropout: float = 0.0,
) -> nn.Module:
    c, _, w = image_shape("lstm", input_shape)
    return RowLSTM(c * w, num_classes, hidden, num_layers, bidirectional, dropout)


def _resnet32(
    num_classes: int, in_channels: int, input_shape: tuple[int, ...] | None, *, shortcut: str = "A"
) -> nn.Module:
    return resnet32(num_classes=num_classes, in_channels=in_channels, shortcut=shortcut)


def _cifar_resnet(
    num_classes: int,
    in_channels: int,
    input_shape: tuple[int, ...] | None,
    *,
    depth: int = 32,
    shortcut: str = "A",
) -> nn.Module:
    return CifarResNet(depth, num_classes=num_classes, in_channels=in_channels, shortcut=shortcut)


def _wrn28_10(
    num_classes: int, in_channels: int, input_shape: tuple[int, ...] | None, *, dropout: float = 0.0
) -> nn.Module:
    return wrn28_10(num_classes=num_classes, dropout=dropout, in_channels=in_channels)


def _wrn(
    num_classes: int,
    in_channels: int,
    input_shape: tuple[int, ...] | None,
    *,
    depth: int = 28,
    widen_factor: int = 10,
    dropout: float = 0.0,
) -> nn.Module:
    return WideResNet(depth, widen_factor, num_classes, dropout=dropout, in_channels=in_channels)


def _torchvision(
    num_classes: int,
    in_channels: int,
    input_shape: tuple[int, ...] | None,
    *,
    arch: str | None = None,
    weights: str | None = None,
    pretrained: bool = False,
    **kwargs: Any,
) -> nn.Module:
    if arch is None:
        raise ValueError(
            "model 'torchvision' needs arch=<torchvision model name>, e.g. "
            "python -m reweight model=torchvision model.arch=resnet18"
        )
    return torchvision_model(
        arch, num_classes, in_channels=in_channels, weights=weights, pretrained=pretrained, **kwargs
    )


_Builder = Callable[..., nn.Module]
_REGISTRY: dict[str, _Builder] = {
    "lenet": _lenet,
    "mlp": _mlp,
    "resnet32": _resnet32,
    "cifar_resnet": _cifar_resnet,
    "wrn28_10": _wrn28_10,
    "wrn": _wrn,
    "torchvision": _torchvision,
    "lstm": _lstm,
    "vit_tiny": vit_tiny,
}

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def model_builder(name: str) -> _Builder:
    """The function behind model ``name``: its keyword-only arguments are the keys that
    ``conf/model/<name>.yaml`` may set besides ``name`` and ``input_shape``, typed by their
    annotations (``reweight.cli.schema`` reads them there)."""
    builder = _REGISTRY.get(name) if isinstance(name, str) else None  # a list: unhashable
    if builder is None:
        raise ValueError(f"model name {name!r} is unknown; allowed: {list(MODEL_NAMES)}")
    return builder


def _pair(value: Sequence[int], key: str) -> tuple[int, int]:
    """``value`` as ``(H, W)``; ``ValueError`` naming ``key`` for anything but two integers
    (a string or a list holding a mapping, from the command line, included)."""
    items = tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else ()
    if len(items) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise ValueError(f"{key} must be an integer or a pair [H,W] of integers, got {value!r}")
    return items[0], items[1]


def _check_kwargs(name: str, builder: _Builder, kwargs: dict[str, Any]) -> None:
    params = inspect.signature(builder).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return  # passes the rest on (torchvision builders check their own keywords)
    allowed = sorted(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"model {name!r} got unknown key(s) {unknown}; allowed: {allowed}")


def build_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    input_shape: Sequence[int] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build model ``name`` for ``num_classes`` outputs and ``in_channels``-channel inputs.

    Names (``MODEL_NAMES``) and the keywords each accepts beyond the common arguments:

    - ``lenet``: ``input_size`` (default 28, or ``input_shape[-2:]``) — ``LeNet``.
    - ``mlp``: ``in_features`` or ``input_shape``, ``hidden``, ``dropout`` — ``MLP``.
    - ``resnet32``: ``shortcut`` ("A" published, "B") — ``resnet32``.
    - ``cifar_resnet``: ``depth`` (6n + 2), ``shortcut`` — ``CifarResNet``.
    - ``wrn28_10``: ``dropout`` — ``wrn28_10``.
    - ``wrn``: ``depth`` (6n + 4), ``widen_factor``, ``dropout`` — ``WideResNet``.
    - ``torchvision``: ``arch`` (required), ``weights``, any builder keyword —
      ``torchvision_model``.
    - ``lstm``: ``input_shape`` (C, H, W; H steps of C·W features), ``hidden``,
      ``num_layers``, ``bidirectional``, ``dropout`` — ``RowLSTM``.
    - ``vit_tiny``: ``input_shape``, ``patch_size``, ``num_layers``, ``num_heads``,
      ``hidden_dim``, ``mlp_dim``, ``dropout`` — ``vit_tiny``.

    ``input_shape`` is one example's shape, ``(C, H, W)`` for images; when it has three
    entries its first must equal ``in_channels``. Lists (as Hydra passes them) are accepted
    wherever a tuple is. This is the ``_target_`` of ``conf/model/*.yaml``; the CLI adds
    ``num_classes`` and ``in_channels`` from the dataset.

    Example:
        >>> import torch
        >>> model = build_model("mlp", num_classes=3, in_channels=1, input_shape=(1, 28, 28))
        >>> model(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 3])
    """
    builder = model_builder(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"model {name!r}: num_classes must be an int >= 1, got {num_classes!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"model {name!r}: in_channels must be an int >= 1, got {in_channels!r}")
    shape: tuple[int, ...] | None = None
    if input_shape is not None:
        shape = tuple(int(s) for s in input_shape)
        if not shape or any(s < 1 for s in shape):
            raise ValueError(
                f"model {name!r}: input_shape must be positive sizes like (C, H, W), "
                f"got {list(input_shape)}"
            )
        if len(shape) == 3 and shape[0] != in_channels:
            raise ValueError(
                f"model {name!r}: input_shape={shape} has {shape[0]} channels but "
                f"in_channels={in_channels}; make model.input_shape match the dataset"
            )
    _check_kwargs(name, builder, kwargs)
    return builder(num_classes, in_channels, shape, **kwargs)
