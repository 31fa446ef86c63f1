"""A plain multi-layer perceptron that flattens its input."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["MLP"]


class MLP(nn.Module):
    """Flatten → (Linear → ReLU → Dropout) per hidden layer → Linear.

    ``hidden=()`` gives a linear (multinomial logistic regression) model. Layers keep PyTorch's
    default initialisation (Kaiming-uniform with ``a=√5`` weights, uniform biases), the usual
    choice for small MLP baselines.

    Args:
        in_features: number of input features after flattening, e.g. ``1 * 28 * 28``;
            ``build_model("mlp", ..., input_shape=(1, 28, 28))`` computes it for you.
        num_classes: number of output logits.
        hidden: widths of the hidden layers.
        dropout: dropout probability after each hidden activation (0 disables it).

    Example:
        >>> import torch
        >>> MLP(in_features=784, num_classes=10)(torch.randn(4, 1, 28, 28)).shape
        torch.Size([4, 10])
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: Sequence[int] = (100, 100),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        hidden = tuple(int(h) for h in hidden)
        if in_features < 1:
            raise ValueError(f"MLP: in_features must be >= 1, got {in_features}")
        if num_classes < 1:
            raise ValueError(f"MLP: num_classes must be >= 1, got {num_classes}")
        if any(h < 1 for h in hidden):
            raise ValueError(f"MLP: every hidden width must be >= 1, got {list(hidden)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MLP: dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=False)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)
        self.in_features = in_features

    def forward(self, x: Tensor) -> Tensor:
        """``(B, *)`` inputs with ``in_features`` elements each → ``(B, num_classes)`` logits."""
        return self.net(x)
