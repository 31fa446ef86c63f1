"""Differentiable weights: buffer-backed meta modules, the twin cache and the virtual step
(plain SGD, or the real optimizer replayed).

``to_meta`` converts any module (one generic mechanism for every layer); the per-layer classes
it builds on (``MetaLinear``, ``MetaConv2d``, ``MetaBatchNorm2d``, ...) are in
:mod:`reweight.meta.modules`.
"""

from reweight.meta.modules import MetaModule, bufferize_, to_meta
from reweight.meta.optim import OptimizerReplay, check_replayable
from reweight.meta.sgd import keep_layout, sgd_direction, sgd_step, sgd_values
from reweight.meta.twins import LossFn, TwinCache, meta_gradient, trainable

__all__ = [
    "LossFn",
    "MetaModule",
    "OptimizerReplay",
    "TwinCache",
    "bufferize_",
    "check_replayable",
    "keep_layout",
    "meta_gradient",
    "sgd_direction",
    "sgd_step",
    "sgd_values",
    "to_meta",
    "trainable",
]
