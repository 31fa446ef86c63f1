"""Differentiable weights: buffer-backed meta modules, the twin cache and the virtual step
(plain SGD, or the real optimizer replayed)."""

from reweight.meta.modules import (
    MetaBatchNorm1d,
    MetaBatchNorm2d,
    MetaBatchNorm3d,
    MetaConv1d,
    MetaConv2d,
    MetaLinear,
    MetaModule,
    MetaModuleDict,
    MetaModuleList,
    MetaSequential,
    MetaSyncBatchNorm,
    bufferize_,
    to_meta,
)
from reweight.meta.optim import OptimizerReplay, check_replayable
from reweight.meta.sgd import keep_layout, sgd_direction, sgd_step, sgd_values
from reweight.meta.twins import LossFn, TwinCache, meta_gradient, trainable

__all__ = [
    "LossFn",
    "MetaBatchNorm1d",
    "MetaBatchNorm2d",
    "MetaBatchNorm3d",
    "MetaConv1d",
    "MetaConv2d",
    "MetaLinear",
    "MetaModule",
    "MetaModuleDict",
    "MetaModuleList",
    "MetaSequential",
    "MetaSyncBatchNorm",
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
