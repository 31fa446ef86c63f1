"""Differentiable weights: buffer-backed meta modules, the twin cache and the virtual SGD step."""

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
    "TwinCache",
    "bufferize_",
    "keep_layout",
    "meta_gradient",
    "sgd_direction",
    "sgd_step",
    "sgd_values",
    "to_meta",
    "trainable",
]
