"""Wide Residual Networks (Zagoruyko & Komodakis 2016, "Wide Residual Networks").

WRN-d-k: a 3×3 conv with 16 filters, three groups of n = (d − 4) / 6 pre-activation basic
blocks with 16k, 32k and 64k filters (the second and third groups start with stride 2), then
BN-ReLU, global average pooling and a linear classifier. WRN-28-10 has 36.5M parameters
(Zagoruyko & Komodakis 2016, Table 1 / Sec. 3) and is the network L2RW (Ren et al. 2018) uses
for its noisy-label CIFAR experiments.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from reweight.models.resnet import three_stages

__all__ = ["WideResNet", "wrn28_10"]


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3×3-BN-ReLU-(dropout)-conv3×3, plus the shortcut.

    When the shape changes the shortcut is a 1×1 conv applied to the *pre-activated* input
    (``relu(bn1(x))``), as in the authors' implementation; otherwise it is the identity on ``x``.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-depth-widen_factor for CIFAR-sized images (pooling is adaptive, so other sizes work).

    Initialisation as in the authors' code (``MSRinit``): convs Kaiming-normal with fan-out,
    std = √(2 / (k·k·out_channels)); BatchNorm γ = 1, β = 0; linear bias 0 and linear weight
    PyTorch's default.

    Args:
        depth: total depth, 6n + 4 (10, 16, 22, 28, 40, ...).
        widen_factor: width multiplier k.
        num_classes: number of output logits.
        dropout: dropout probability between the two convs of each block (the paper uses 0.3
            on CIFAR for some runs; 0 disables it).
        in_channels: channels of the input image.

    Example:
        >>> import torch
        >>> WideResNet(depth=10, widen_factor=1, num_classes=10)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 10,
        dropout: float = 0.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(
                f"WideResNet: depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40), got {depth}"
            )
        if widen_factor < 1:
            raise ValueError(f"WideResNet: widen_factor must be >= 1, got {widen_factor}")
        if num_classes < 1:
            raise ValueError(f"WideResNet: num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"WideResNet: dropout must be in [0, 1), got {dropout}")
        blocks_per_group = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.block1, self.block2, self.block3 = three_stages(
            lambda cin, cout, stride: WideBasicBlock(cin, cout, stride, dropout),
            widths,
            blocks_per_group,
        )
        self.bn = nn.BatchNorm2d(widths[-1])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MSR init (fan-out) for convs, BatchNorm (1, 0), zero linear bias."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` images → ``(B, num_classes)`` logits."""
        out = self.conv1(x)  # (B, 16, 32, 32)
        out = self.block3(self.block2(self.block1(out)))  # (B, 64k, 8, 8)
        out = F.relu(self.bn(out))
        return self.fc(self.pool(out).flatten(1))  # (B, num_classes)


def wrn28_10(num_classes: int = 10, dropout: float = 0.0, in_channels: int = 3) -> WideResNet:
    """WRN-28-10 (36.5M parameters for 10 classes), the L2RW noisy-CIFAR network.

    Example:
        >>> sum(p.numel() for p in wrn28_10(num_classes=10).parameters())
        36479194
    """
    return WideResNet(
        depth=28, widen_factor=10, num_classes=num_classes, dropout=dropout, in_channels=in_channels
    )
