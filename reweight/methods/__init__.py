"""Methods: each turns a training batch into per-example weights for the real update."""

from __future__ import annotations

import inspect
from typing import Any

from reweight.methods.base import Method, MethodOutput, StepInputs
from reweight.methods.baselines import ERM, ClassBalanced, RandomWeights
from reweight.methods.cmwnet import ClassAwareWeightNet, CMWNet
from reweight.methods.l2rw import L2RW
from reweight.methods.mwnet import MWNet, WeightNet
from reweight.methods.weighting import WeightingNetMethod

__all__ = [
    "ERM",
    "L2RW",
    "METHODS",
    "CMWNet",
    "ClassAwareWeightNet",
    "ClassBalanced",
    "MWNet",
    "Method",
    "MethodOutput",
    "RandomWeights",
    "StepInputs",
    "WeightNet",
    "WeightingNetMethod",
    "build_method",
    "method_class",
]

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (ERM, RandomWeights, ClassBalanced, L2RW, MWNet, CMWNet)
}


def method_class(name: str) -> type[Method]:
    """The class of method ``name``; its constructor's arguments are the method's config keys."""
    if not isinstance(name, str) or name not in METHODS:  # a list from the command line too
        raise ValueError(f"method.name must be one of {sorted(METHODS)}, got {name!r}")
    return METHODS[name]


def build_method(name: str, **kwargs: Any) -> Method:
    """A method by name (``erm``, ``random``, ``class_balanced``, ``l2rw``, ``mwnet``,
    ``cmwnet``)."""
    cls = method_class(name)
    params = inspect.signature(cls).parameters.values()
    allowed = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(
            f"method {name!r} has no option {', '.join(unknown)}; allowed: {allowed or 'none'}"
        )
    return cls(**kwargs)
