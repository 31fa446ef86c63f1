"""reweight: meta-learned per-example weights for noisy and imbalanced labels.

The public surface: ``Trainer`` (the loop), the methods, the per-batch helpers
``l2rw_weights`` / ``l2rw_eps_grad`` and the meta layer ``to_meta`` / ``MetaModule``.
"""

from reweight.checkpoint import CheckpointError
from reweight.functional import (
    l2rw_eps_grad,
    l2rw_weights,
    mwnet_meta_grads,
    mwnet_weights,
    normalize_l2rw,
)
from reweight.meta import MetaModule, sgd_step, to_meta
from reweight.methods import (
    ERM,
    L2RW,
    METHODS,
    ClassBalanced,
    Method,
    MethodOutput,
    MWNet,
    RandomWeights,
    StepInputs,
    WeightNet,
    build_method,
)
from reweight.signals import TrainingInterrupted
from reweight.trainer import FitResult, Trainer, TrainerConfig

__all__ = [
    "ERM",
    "L2RW",
    "METHODS",
    "CheckpointError",
    "ClassBalanced",
    "FitResult",
    "MWNet",
    "MetaModule",
    "Method",
    "MethodOutput",
    "RandomWeights",
    "StepInputs",
    "Trainer",
    "TrainerConfig",
    "TrainingInterrupted",
    "WeightNet",
    "build_method",
    "l2rw_eps_grad",
    "l2rw_weights",
    "mwnet_meta_grads",
    "mwnet_weights",
    "normalize_l2rw",
    "sgd_step",
    "to_meta",
]
__version__ = "0.1.0"
