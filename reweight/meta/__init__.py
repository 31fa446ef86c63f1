"""Differentiable weights: buffer-backed meta modules and the virtual SGD step."""

from reweight.meta.functional import sgd_step
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

__all__ = [
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
    "bufferize_",
    "sgd_step",
    "to_meta",
]
