"""Any torchvision classification model by name, with its head and stem adapted to the data.

torchvision is imported by the functions that use it: its import alone takes seconds, which a
run of the package's own models does without (``tests/test_imports.py`` holds that)."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

__all__ = ["adapt_input_channels", "replace_head", "torchvision_model", "torchvision_model_names"]


# Builders that emit a FutureWarning when ``init_weights`` is left unset.
_INIT_WEIGHTS_WARN = frozenset({"googlenet", "inception_v3"})


def torchvision_model_names() -> list[str]:
    """Names of torchvision's classification models (``resnet18``, ``vgg11``, ...), sorted."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _check_name(name: str) -> None:
    names = torchvision_model_names()
    if name in names:
        return
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f"close matches: {close}" if close else f"for example {names[:5]}"
    raise ValueError(
        f"model.arch={name!r} is not a torchvision classification model; {hint}. "
        f'List them all with: python -c "import torchvision; '
        f'print(torchvision.models.list_models(module=torchvision.models))"'
    )


def _first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    raise ValueError(f"{type(model).__name__} has no nn.Conv2d to adapt to the input channels")


def adapt_input_channels(model: nn.Module, in_channels: int) -> nn.Module:
    """Replace ``model``'s first ``nn.Conv2d`` (the stem) by one taking ``in_channels``, in place.

    The new conv keeps every other hyper-parameter. Its weights are the old filters averaged over
    their input channels, repeated and scaled by ``old_in / in_channels``, so an image whose
    channels are all equal gives the same response as before (for ``in_channels=1`` this is the
    sum over RGB, the usual way to reuse pretrained RGB filters on grey images). Raises
    ``ValueError`` where the first conv is not a plain stem (grouped) or where the model
    preprocesses three input channels itself (``transform_input`` in GoogLeNet / Inception-v3).
    Returns ``model``.
    """
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    name, conv = _first_conv(model)
    if conv.in_channels == in_channels:
        return model
    if conv.groups != 1:
        raise ValueError(
            f"cannot adapt {type(model).__name__} to in_channels={in_channels}: its first conv "
            f"{name!r} is grouped (groups={conv.groups}); use in_channels={conv.in_channels} "
            f"(e.g. repeat grey images to {conv.in_channels} channels in the dataset transform)"
        )
    if getattr(model, "transform_input", False):
        raise ValueError(
            f"cannot adapt {type(model).__name__} to in_channels={in_channels}: it is built with "
            f"transform_input=True, which rescales three RGB channels; pass transform_input=False"
        )
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        groups=1,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        mean = conv.weight.mean(dim=1, keepdim=True)  # (out, 1, kh, kw)
        new.weight.copy_(mean.expand_as(new.weight) * (conv.in_channels / in_channels))
        if conv.bias is not None and new.bias is not None:
            new.bias.copy_(conv.bias)
    model.set_submodule(name, new)
    return model


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Swap ``model``'s last ``nn.Linear`` for a fresh one with ``num_classes`` outputs, in place.

    For fine-tuning pretrained weights on a dataset with a different number of classes. The last
    ``nn.Linear`` in registration order is the classifier for torchvision's ResNets, VGGs,
    MobileNets, EfficientNets, DenseNets, RegNets, ConvNeXts, Swin and ViT models; models whose
    classifier is a conv (SqueezeNet) raise ``ValueError``. Returns ``model``.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    last: tuple[str, nn.Linear] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = (name, module)
    if last is None:
        raise ValueError(
            f"cannot replace the head of {type(model).__name__}: it has no nn.Linear classifier; "
            f"build it without weights or pick another arch"
        )
    name, head = last
    if head.out_features != num_classes:
        new = nn.Linear(
            head.in_features,
            num_classes,
            bias=head.bias is not None,
            device=head.weight.device,
            dtype=head.weight.dtype,
        )
        model.set_submodule(name, new)
    return model


def torchvision_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    weights: str | None = None,
    pretrained: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build torchvision classification model ``name`` for ``num_classes`` and ``in_channels``.

    Without ``weights`` (the default) the model is built with ``num_classes`` outputs and
    torchvision's own initialisation. With ``weights`` (e.g. ``"DEFAULT"`` or
    ``"IMAGENET1K_V1"``; torchvision downloads them on first use) the pretrained model is built
    and its last linear layer replaced when ``num_classes`` differs (see ``replace_head``). For
    ``in_channels != 3`` the stem conv is replaced (see ``adapt_input_channels``).
    ``pretrained=True`` means ``weights="DEFAULT"``. Offline, the weights file must already be in
    torch's cache (``$TORCH_HOME/hub/checkpoints``): if it is not and the download fails, a
    one-line ``FileNotFoundError`` names the file, its URL and the folder to put it in. Extra
    ``kwargs`` go to the torchvision builder (``dropout=``, ``width_per_group=``, ...).

    Note that ImageNet stems down-sample by 4–32×: on 32×32 CIFAR images most of these models
    work but are not the CIFAR architectures of the papers (use ``resnet32`` / ``WideResNet``).

    Example:
        >>> import torch
        >>> model = torchvision_model("resnet18", num_classes=10, in_channels=1)
        >>> model(torch.randn(2, 1, 32, 32)).shape
        torch.Size([2, 10])
    """
    import torchvision

    _check_name(name)
    if name in _INIT_WEIGHTS_WARN:
        # Their builders warn (an error under ``-W error``) unless init_weights is explicit;
        # True keeps their published truncated-normal init, which pretrained weights overwrite.
        kwargs.setdefault("init_weights", True)
    if pretrained and weights is None:
        weights = "DEFAULT"
    if weights is None:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    else:
        model = _pretrained(name, weights, **kwargs)
        replace_head(model, num_classes)
    if in_channels != 3:
        adapt_input_channels(model, in_channels)
    return model


def _pretrained(name: str, weights: str, **kwargs: Any) -> nn.Module:
    """torchvision's ``name`` with ``weights``; a failed download of a file not in torch's cache
    is one line naming the file, where torch looks for it and where to get it."""
    import torchvision

    table = torchvision.models.get_model_weights(name)
    if weights != "DEFAULT" and weights not in table.__members__:
        allowed = ", ".join(["DEFAULT", *table.__members__])
        raise ValueError(f"model.weights={weights!r} is not a weight set of {name}: {allowed}")
    entry = table.DEFAULT if weights == "DEFAULT" else table[weights]
    file = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(entry.url).path).name
    try:
        return torchvision.models.get_model(name, weights=entry, **kwargs)
    except (OSError, RuntimeError) as err:
        if file.is_file():  # in the cache, yet unreadable: not a download problem
            raise
        reason = str(getattr(err, "reason", err)).splitlines()[0][:100]
        raise FileNotFoundError(
            f"the {weights} weights of {name} are not in torch's cache and the download failed "
            f"({reason}): download {entry.url} and put it at {file} (torch looks there; set "
            "TORCH_HOME to move it), or use model.weights=null"
        ) from err
