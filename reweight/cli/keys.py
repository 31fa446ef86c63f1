"""The hand-written part of the config schema (``reweight.cli.schema`` derives the rest from
the signatures that consume the keys): the root keys (``RunConfig``), the loggers
(``LoggerConfig``), the optimizers and schedulers the configs use (one dataclass per torch
target: torch's own annotations are not config types, ``float | Tensor``, and none at all in
older releases), and the rules of single keys (``Rule``: milestones increase, betas lie in
[0, 1), ``trainer.device`` exists here...)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from reweight.core.device import resolve_device
from reweight.core.malloc import MALLOC_CHOICES
from reweight.data._validate import check_choice
from reweight.data.build import META_SOURCES
from reweight.functional import check_meta_grad

__all__ = [
    "OBJECTIVES",
    "OPTIMIZER_SCHEMAS",
    "SCHEDULER_SCHEMAS",
    "AdamConfig",
    "AdamWConfig",
    "CosineAnnealingLRConfig",
    "LoggerConfig",
    "MultiStepLRConfig",
    "NoSchedulerConfig",
    "Rule",
    "RunConfig",
    "SGDConfig",
    "TargetConfig",
    "at_least",
    "device_rule",
    "key",
    "meta_source_rule",
]

OBJECTIVES = (
    "val_accuracy",
    "val_balanced_accuracy",
    "test_accuracy",
    "test_balanced_accuracy",
)
"""What ``train(cfg)`` may return to a sweeper (``objective``): a final summary metric, all to
be maximised. The ``test_*`` ones need ``objective_allow_test=true`` (reweight.cli.job)."""

Rule = Callable[[str, Any], None]
"""A check of one key's (already typed) value: ``rule(full_key, value)`` raises ValueError."""


def key(rule: Rule | None = None) -> Any:
    """A schema field: no default (the YAML owns the defaults; a key the config does not set
    stays ``???`` in the merge and is left out again), optionally with a rule."""
    return field(default=MISSING, metadata={"rule": rule} if rule else {})


# -- rules of single keys ----------------------------------------------------------------------


def at_least(minimum: int) -> Rule:
    def rule(key: str, value: Any) -> None:
        if value is not None and value < minimum:
            raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")

    return rule


def _meta_grad(key: str, value: Any) -> None:
    check_meta_grad(value)  # "meta_grad must be one of [...]": names the root key itself


def device_rule(key: str, value: Any) -> None:
    resolve_device(value)  # names trainer.device and the allowed values


def _milestones(key: str, value: Any) -> None:
    """MultiStepLR counts milestones in a multiset: unordered or repeated steps are legal
    there but almost always a typo, and an empty list is scheduler=none in disguise."""
    steps = list(value)
    if not steps:
        raise ValueError(
            f"{key} must list at least one optimizer step, got []; for a constant learning "
            "rate use scheduler=none"
        )
    if steps[0] < 1 or any(b <= a for a, b in itertools.pairwise(steps)):
        raise ValueError(
            f"{key} must be increasing positive optimizer steps (e.g. [4000,6000]), got {steps}"
        )


def _malloc(key: str, value: Any) -> None:
    check_choice(key, value, MALLOC_CHOICES)


def _objective(key: str, value: Any) -> None:
    check_choice(key, value, OBJECTIVES)


def meta_source_rule(key: str, value: Any) -> None:
    check_choice(key, value, META_SOURCES)


def _betas(key: str, value: Any) -> None:
    betas = list(value)
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(
            f"{key} must be a pair of numbers in [0, 1), e.g. [0.9,0.999], got {betas}"
        )


# -- hand-written schemas ------------------------------------------------------------------------


@dataclass
class RunConfig:
    """The root keys of ``conf/config.yaml`` (the groups are added per option by
    :func:`schema_classes`)."""

    seed: int = field(default=MISSING, metadata={"rule": at_least(0)})
    resume: bool = MISSING
    meta_grad: str = field(default=MISSING, metadata={"rule": _meta_grad})
    threads: int | None = field(default=MISSING, metadata={"rule": at_least(1)})
    malloc: str = field(default=MISSING, metadata={"rule": _malloc})
    objective: str = field(default=MISSING, metadata={"rule": _objective})
    objective_allow_test: bool = MISSING


def _wandb_mode(key: str, value: Any) -> None:
    check_choice(key, value, ("offline", "online", "disabled"))


@dataclass
class CSVLoggerConfig:
    """``logger=csv``: metrics.csv, which every run writes; no settings."""


@dataclass
class TensorBoardLoggerConfig:
    """``conf/logger/tensorboard.yaml`` (``reweight.train.trackers.TensorBoardLogger``)."""

    flush_secs: int = field(default=MISSING, metadata={"rule": at_least(1)})


@dataclass
class MLflowLoggerConfig:
    """``conf/logger/mlflow.yaml`` (``reweight.train.trackers.MLflowLogger``)."""

    tracking_uri: str | None = MISSING
    experiment: str = MISSING


@dataclass
class WandbLoggerConfig:
    """``conf/logger/wandb.yaml`` (``reweight.train.trackers.WandbLogger``)."""

    mode: str = field(default=MISSING, metadata={"rule": _wandb_mode})
    project: str = MISSING
    entity: str | None = MISSING
    dir: str | None = MISSING


@dataclass
class LoggerConfig:
    """The ``logger`` group: one block per selected option (``logger=[tensorboard,mlflow]``)."""

    csv: CSVLoggerConfig = MISSING
    tensorboard: TensorBoardLoggerConfig = MISSING
    mlflow: MLflowLoggerConfig = MISSING
    wandb: WandbLoggerConfig = MISSING


@dataclass
class TargetConfig:
    """Any ``_target_`` this module has no schema for: the rest of its keys pass untyped (the
    CLI checks them against the target's signature when it builds the factory)."""

    _target_: str = MISSING
    _partial_: bool = MISSING


@dataclass
class SGDConfig(TargetConfig):
    """``torch.optim.SGD`` (``conf/optimizer/sgd.yaml``)."""

    lr: float = MISSING
    momentum: float = MISSING
    dampening: float = MISSING
    weight_decay: float = MISSING
    nesterov: bool = MISSING
    maximize: bool = MISSING
    foreach: bool | None = MISSING
    differentiable: bool = MISSING
    fused: bool | None = MISSING


@dataclass
class _AdamKeys(TargetConfig):
    """The keys ``torch.optim.Adam`` and ``AdamW`` share."""

    lr: float = MISSING
    betas: tuple[float, float] = field(default=MISSING, metadata={"rule": _betas})
    eps: float = MISSING
    weight_decay: float = MISSING
    amsgrad: bool = MISSING
    foreach: bool | None = MISSING
    maximize: bool = MISSING
    capturable: bool = MISSING
    differentiable: bool = MISSING
    fused: bool | None = MISSING


@dataclass
class AdamConfig(_AdamKeys):
    """``torch.optim.Adam`` (``conf/optimizer/adam.yaml``)."""

    decoupled_weight_decay: bool = MISSING


@dataclass
class AdamWConfig(_AdamKeys):
    """``torch.optim.AdamW`` (``conf/optimizer/adamw.yaml``; its weight decay is always
    decoupled)."""


@dataclass
class MultiStepLRConfig(TargetConfig):
    """``torch.optim.lr_scheduler.MultiStepLR`` (``conf/scheduler/multistep.yaml``)."""

    milestones: list[int] = field(default=MISSING, metadata={"rule": _milestones})
    gamma: float = MISSING
    last_epoch: int = MISSING


@dataclass
class CosineAnnealingLRConfig(TargetConfig):
    """``torch.optim.lr_scheduler.CosineAnnealingLR`` (``conf/scheduler/cosine.yaml``)."""

    T_max: int = field(default=MISSING, metadata={"rule": at_least(1)})
    eta_min: float = MISSING
    last_epoch: int = MISSING


@dataclass
class NoSchedulerConfig:
    """``scheduler=none``: an empty group, a constant learning rate."""


OPTIMIZER_SCHEMAS: dict[str, type] = {
    "torch.optim.SGD": SGDConfig,
    "torch.optim.Adam": AdamConfig,
    "torch.optim.AdamW": AdamWConfig,
}
"""The schema of each optimizer ``_target_`` the configs use."""

SCHEDULER_SCHEMAS: dict[str, type] = {
    "torch.optim.lr_scheduler.MultiStepLR": MultiStepLRConfig,
    "torch.optim.lr_scheduler.CosineAnnealingLR": CosineAnnealingLRConfig,
}
"""The schema of each scheduler ``_target_`` the configs use."""
