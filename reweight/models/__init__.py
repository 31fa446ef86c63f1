"""Classifiers: plain ``nn.Module``s (never meta-aware; ``reweight.meta.to_meta`` makes twins).

A leaf package: it imports torch and torchvision only.

- ``LeNet``: the L2RW MNIST 4-vs-9 network (official L2RW code).
- ``MLP``: flatten + fully connected layers.
- ``CifarResNet`` / ``resnet32``: He et al. 2016 CIFAR ResNets (option-A shortcuts), 0.46M params.
- ``WideResNet`` / ``wrn28_10``: Zagoruyko & Komodakis 2016, pre-activation, 36.5M params.
- ``torchvision_model``: any torchvision classification model by name.
- ``build_model``: the name → model registry behind ``conf/model/*.yaml``.
"""

from reweight.models.factory import MODEL_NAMES, build_model
from reweight.models.lenet import LeNet
from reweight.models.mlp import MLP
from reweight.models.resnet import CifarResNet, resnet32
from reweight.models.torchvision_models import (
    adapt_input_channels,
    replace_head,
    torchvision_model,
    torchvision_model_names,
)
from reweight.models.wide_resnet import WideResNet, wrn28_10

__all__ = [
    "MLP",
    "MODEL_NAMES",
    "CifarResNet",
    "LeNet",
    "WideResNet",
    "adapt_input_channels",
    "build_model",
    "replace_head",
    "resnet32",
    "torchvision_model",
    "torchvision_model_names",
    "wrn28_10",
]
