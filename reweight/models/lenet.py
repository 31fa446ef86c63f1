"""The LeNet of L2RW's MNIST 4-vs-9 class-imbalance experiment (Ren et al. 2018, Sec. 5.1)."""

from __future__ import annotations

import itertools

from torch import Tensor, nn

__all__ = ["LeNet"]


def _pooled(size: int) -> int:
    """Side length after one ``MaxPool2d(3, stride=2, padding=1)``: ⌈size / 2⌉."""
    return (size - 1) // 2 + 1


class LeNet(nn.Module):
    """LeNet-style CNN as in the official L2RW code (uber-research/learning-to-reweight-examples).

    The architecture follows ``get_model`` in that repository's ``mnist/reweight.py``, which
    builds the network used for the MNIST 4-vs-9 imbalance experiment on 28×28 inputs::

        conv 5×5, 16, 'same' → max-pool 3×3 stride 2 → ReLU    # (B, 16, 14, 14)
        conv 5×5, 32, 'same' → max-pool 3×3 stride 2 → ReLU    # (B, 32, 7, 7)
        conv 5×5, 64, 'same' → max-pool 3×3 stride 2 → ReLU    # (B, 64, 4, 4)
        flatten → linear 1024 → 100 → ReLU → linear 100 → num_classes

    Differences from that code, all deliberate: the official network ends in a *single* logit
    trained with a sigmoid loss; here ``num_classes`` logits are returned (``num_classes=2`` with
    cross-entropy is the same model family; pass ``num_classes=1`` for the original head). The
    TensorFlow 'SAME' max-pool pads only on the bottom/right where PyTorch pads symmetrically;
    both give the 28 → 14 → 7 → 4 sizes above and, since padding is −∞, the same kind of
    features. ReLU after max-pooling equals max-pooling after ReLU (both are monotone).
    Some PyTorch re-implementations (e.g. danieltan07/learning-to-reweight-examples) instead use
    the classic 6/16/120-channel LeNet-5 on inputs resized to 32×32; this class keeps the
    architecture of the authors' code.

    Initialisation follows the official code too: weights from a normal distribution with
    standard deviation 0.1 truncated at two standard deviations, biases zero.

    Args:
        num_classes: number of output logits.
        in_channels: channels of the input image (1 for MNIST).
        input_size: spatial size ``H`` (square) or ``(H, W)`` of the input; fixes the width of
            the first fully connected layer (28 → 64·4·4 = 1024 as published; 32 gives the same).

    Example:
        >>> import torch
        >>> LeNet(num_classes=2)(torch.randn(4, 1, 28, 28)).shape
        torch.Size([4, 2])
    """

    def __init__(
        self,
        num_classes: int = 2,
        in_channels: int = 1,
        input_size: int | tuple[int, int] = 28,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"LeNet: num_classes must be >= 1, got {num_classes}")
        if in_channels < 1:
            raise ValueError(f"LeNet: in_channels must be >= 1, got {in_channels}")
        height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
        if height < 1 or width < 1:
            raise ValueError(f"LeNet: input_size must be positive, got {input_size}")
        channels = (in_channels, 16, 32, 64)
        layers: list[nn.Module] = []
        for c_in, c_out in itertools.pairwise(channels):
            layers += [
                nn.Conv2d(c_in, c_out, kernel_size=5, padding=2),
                nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
                nn.ReLU(inplace=False),
            ]
            height, width = _pooled(height), _pooled(width)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels[-1] * height * width, 100),
            nn.ReLU(inplace=False),
            nn.Linear(100, num_classes),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Truncated normal(0, 0.1) weights cut at ±0.2 and zero biases, as in the L2RW code."""
        std = 0.1
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` images → ``(B, num_classes)`` logits."""
        return self.classifier(self.features(x))
