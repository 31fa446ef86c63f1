"""reweight: meta-learned per-example weights for noisy and imbalanced labels.

The public surface: ``Trainer`` (the loop), the methods (``WeightingNetMethod``: a method of your
own), the one meta step every method uses (``MetaStep``), the per-batch helpers
``l2rw_weights`` / ``l2rw_eps_grad`` and the meta layer ``to_meta`` / ``MetaModule``.
"""

from reweight.functional import (
    l2rw_eps_grad,
    l2rw_weights,
    mwnet_meta_grads,
    mwnet_weights,
    normalize_l2rw,
)
from reweight.meta import MetaModule, sgd_step, to_meta
from reweight.metastep import MetaGrad, MetaStep, select_params
from reweight.methods import (
    ERM,
    L2RW,
    METHODS,
    ClassBalanced,
    CMWNet,
    Method,
    MethodOutput,
    MWNet,
    RandomWeights,
    StepInputs,
    WeightingNetMethod,
    WeightNet,
    build_method,
)
from reweight.reweighter import Reweighted, Reweighter
from reweight.train.checkpoint import CheckpointError
from reweight.train.meta_source import SmallLossMetaSource
from reweight.train.signals import TrainingInterrupted
from reweight.train.trainer import FitResult, Trainer, TrainerConfig

__all__ = [
    "ERM",
    "L2RW",
    "METHODS",
    "CMWNet",
    "CheckpointError",
    "ClassBalanced",
    "FitResult",
    "MWNet",
    "MetaGrad",
    "MetaModule",
    "MetaStep",
    "Method",
    "MethodOutput",
    "RandomWeights",
    "Reweighted",
    "Reweighter",
    "SmallLossMetaSource",
    "StepInputs",
    "Trainer",
    "TrainerConfig",
    "TrainingInterrupted",
    "WeightNet",
    "WeightingNetMethod",
    "build_method",
    "l2rw_eps_grad",
    "l2rw_weights",
    "mwnet_meta_grads",
    "mwnet_weights",
    "normalize_l2rw",
    "select_params",
    "sgd_step",
    "to_meta",
]
__version__ = "0.1.0"
