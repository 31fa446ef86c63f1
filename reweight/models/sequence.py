"""Sequence models over images, for the CPU demos: an LSTM that reads an image row by row
(28 steps of 28 pixels on MNIST) and a small Vision Transformer (torchvision's).

Both are ordinary ``nn.Module``s; the meta step handles their recurrent and attention layers
like any other (``reweight.meta.kernels``).
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["RowLSTM", "image_shape", "vit_tiny"]


class RowLSTM(nn.Module):
    """An image (C, H, W) as a sequence of H rows of C·W features → LSTM → linear head on the
    last step's output (both directions' when bidirectional).

    Example:
        >>> import torch
        >>> RowLSTM(in_features=28, num_classes=10)(torch.randn(4, 1, 28, 28)).shape
        torch.Size([4, 10])
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: int = 128,
        num_layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.lstm = nn.LSTM(
            in_features,
            hidden,
            num_layers=num_layers,
            bidirectional=bidirectional,
            dropout=dropout if num_layers > 1 else 0.0,
            batch_first=True,
        )
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), num_classes)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.permute(0, 2, 1, 3).flatten(2)  # (B, H, C·W)
        return self.head(self.lstm(rows)[0][:, -1])


def vit_tiny(
    num_classes: int,
    in_channels: int = 1,
    input_shape: tuple[int, ...] | None = (1, 28, 28),
    *,
    patch_size: int = 7,
    num_layers: int = 4,
    num_heads: int = 4,
    hidden_dim: int = 64,
    mlp_dim: int = 128,
    dropout: float = 0.0,
) -> nn.Module:
    """torchvision's ``VisionTransformer``, small enough for a CPU: 28×28 images in 7×7
    patches (16 tokens and a class token), 4 layers of width 64 with 4 heads (0.2M weights).
    ``input_shape`` is one image's (C, H, W), square, H a multiple of ``patch_size``; the
    keywords are ``conf/model/vit_tiny.yaml``'s keys (``build_model("vit_tiny", ...)``).

    Example:
        >>> import torch
        >>> vit_tiny(num_classes=10)(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    from torchvision.models import VisionTransformer  # here: its import alone takes seconds

    _, h, w = image_shape("vit_tiny", input_shape)
    if h != w or h % patch_size:
        raise ValueError(
            f"model 'vit_tiny': images must be square and a multiple of patch_size="
            f"{patch_size}, got {h}x{w}; set model.patch_size"
        )
    model = VisionTransformer(
        image_size=h,
        patch_size=patch_size,
        num_layers=num_layers,
        num_heads=num_heads,
        hidden_dim=hidden_dim,
        mlp_dim=mlp_dim,
        dropout=dropout,
        num_classes=num_classes,
    )
    if in_channels != 3:  # the patch embedding is a convolution over the input's channels
        model.conv_proj = nn.Conv2d(in_channels, hidden_dim, patch_size, stride=patch_size)
    return model


def image_shape(name: str, input_shape: tuple[int, ...] | None) -> tuple[int, int, int]:
    """``input_shape`` as one image's (C, H, W); anything else is an error naming model
    ``name``."""
    if input_shape is None or len(input_shape) != 3:
        raise ValueError(
            f"model {name!r} needs one image's shape (C, H, W): model.input_shape=[1,28,28]"
        )
    return input_shape[0], input_shape[1], input_shape[2]
