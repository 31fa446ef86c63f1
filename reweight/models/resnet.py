"""CIFAR ResNets of He et al. 2016 ("Deep Residual Learning for Image Recognition", Sec. 4.2).

The 6n+2-layer family for 32×32 inputs: a 3×3 conv with 16 filters, then three stages of n
basic blocks (two 3×3 convs each) on 32×32, 16×16 and 8×8 maps with 16, 32 and 64 filters,
down-sampling by stride-2 convs, then global average pooling and a linear classifier.
ResNet-32 (n = 5) has 0.46M parameters (He et al. 2016, Table 6) and is the classifier
Meta-Weight-Net (Shu et al. 2019) uses for its long-tailed CIFAR experiments.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SHORTCUTS", "CifarResNet", "resnet32"]

SHORTCUTS = ("A", "B")


class _PadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and zero-pad the new channels (no weights)."""

    def __init__(self, stride: int, extra_channels: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra_channels = extra_channels

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        before = self.extra_channels // 2
        return F.pad(x, (0, 0, 0, 0, before, self.extra_channels - before))


class BasicBlock(nn.Module):
    """Post-activation basic block: conv-BN-ReLU-conv-BN, add the shortcut, ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.shortcut = _PadShortcut(stride, planes - in_planes)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes),
                )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def three_stages(
    block: Callable[[int, int, int], nn.Module], widths: tuple[int, int, int], blocks: int
) -> list[nn.Sequential]:
    """The three stages of a CIFAR ResNet after its 16-channel stem: ``blocks`` blocks each,
    ``block(in_planes, planes, stride)``, of ``widths`` channels; each stage's first block
    has stride 1, 2, 2 (32x32 -> 16x16 -> 8x8)."""
    stages = []
    in_planes = 16
    for planes, stride in zip(widths, (1, 2, 2), strict=True):
        layers = []
        for i in range(blocks):
            layers.append(block(in_planes, planes, stride if i == 0 else 1))
            in_planes = planes
        stages.append(nn.Sequential(*layers))
    return stages


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for CIFAR-sized images, with option-A shortcuts by default.

    He et al. 2016 use "identity shortcuts in all cases (i.e., option A)" on CIFAR: where a
    stage changes shape the shortcut subsamples by 2 and zero-pads the extra channels, so it
    has no parameters. ``shortcut="B"`` uses a 1×1 conv + BatchNorm projection there instead
    (more parameters; not the published CIFAR model). Pooling is adaptive, so inputs other than
    32×32 also work.

    Initialisation as in He et al. 2015 ("Delving Deep into Rectifiers"), which He et al. 2016
    cite, in the form Meta-Weight-Net's ``resnet.py`` uses: Kaiming-normal (fan-in, ReLU gain)
    for every conv and for the linear weight; BatchNorm γ = 1, β = 0; the linear bias keeps
    PyTorch's default.

    Args:
        depth: total number of weighted layers, 6n + 2 (20, 32, 44, 56, 110, ...).
        num_classes: number of output logits.
        in_channels: channels of the input image.
        shortcut: ``"A"`` (zero-padding identity, published) or ``"B"`` (projection).

    Example:
        >>> import torch
        >>> CifarResNet(depth=20, num_classes=10)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        depth: int = 32,
        num_classes: int = 10,
        in_channels: int = 3,
        shortcut: str = "A",
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(
                f"CifarResNet: depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110), got {depth}"
            )
        if shortcut not in SHORTCUTS:
            raise ValueError(f"CifarResNet: shortcut must be one of {SHORTCUTS}, got {shortcut!r}")
        if num_classes < 1:
            raise ValueError(f"CifarResNet: num_classes must be >= 1, got {num_classes}")
        blocks_per_stage = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1, self.layer2, self.layer3 = three_stages(
            lambda cin, cout, stride: BasicBlock(cin, cout, stride, shortcut),
            (16, 32, 64),
            blocks_per_stage,
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal convs and linear weight, BatchNorm (1, 0); see the class docstring."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` images → ``(B, num_classes)`` logits."""
        out = F.relu(self.bn1(self.conv1(x)))  # (B, 16, 32, 32)
        out = self.layer3(self.layer2(self.layer1(out)))  # (B, 64, 8, 8)
        return self.fc(self.pool(out).flatten(1))  # (B, num_classes)


def resnet32(num_classes: int = 10, in_channels: int = 3, shortcut: str = "A") -> CifarResNet:
    """ResNet-32 of He et al. 2016 (n = 5, option A): 0.46M parameters for 10 classes.

    Example:
        >>> sum(p.numel() for p in resnet32(num_classes=10).parameters())
        464154
    """
    return CifarResNet(
        depth=32, num_classes=num_classes, in_channels=in_channels, shortcut=shortcut
    )
