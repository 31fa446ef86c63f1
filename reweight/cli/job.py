"""One job of the command line: ``train(cfg)``, from a composed config to the final objective.

``validate(cfg)`` checks a config before any work (the app's ``ValidateConfig`` callback runs it
before Hydra makes a run directory, ``train`` again before it reads data). ``train`` then reads
top to bottom: the settings (built once: ``Settings``), the run directory's verdict (finished,
continued or new), the data, the model and the method, the Trainer (loggers and ``metrics.csv``
given at construction), ``fit``, and the run's files.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from reweight.cli.errors import RunFailed
from reweight.cli.run_dir import RunDir, hydra_files
from reweight.cli.schema import validate_config
from reweight.core.device import resolve_device
from reweight.core.distributed import DistContext, env_rank, env_world_size, init_from_env
from reweight.core.malloc import tune_malloc
from reweight.data import DataBundle, build_dataset, resolve_data_root, save_labels
from reweight.methods import build_method
from reweight.outputs import CHECKPOINT, LOGGER_FILES, METRICS, RESOLVED_CONFIG, SUMMARY, MetricsCSV
from reweight.train.loggers import Logger, build_loggers
from reweight.train.run_files import write_run_files
from reweight.train.trainer import FitResult, Trainer, TrainerConfig

__all__ = ["Settings", "check_objective", "train", "validate"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    """What a validated config builds before any data is read, once per job."""

    cfg: DictConfig  # typed and resolved
    trainer: TrainerConfig
    optimizer: functools.partial
    scheduler: functools.partial | None


def settings(cfg: DictConfig) -> Settings:
    """``cfg`` checked before any work, or ``ValueError`` naming the first bad key.

    First its schema (``reweight.cli.schema.validate_config``: every key's type, finite numbers,
    ``trainer.device``, milestones, betas, and ``trainer.batch_size`` against the ``WORLD_SIZE``
    processes torchrun starts, checked before any process group is joined), then the range
    checks of what a run builds before reading data: ``TrainerConfig``, the optimizer and
    scheduler factories (on a stand-in parameter), and the method. Nothing is read or written.
    """
    cfg = validate_config(cfg, world_size=env_world_size())
    check_objective(cfg)
    trainer = _trainer_config(cfg.trainer, cfg.seed)
    # The method is built here to check its keys; the run builds its own after the model, as
    # MW-Net's weighting net draws its initial weights from the global RNG after the model's.
    build_method(**_container(cfg.method))
    optimizer = _partial(cfg.optimizer, "optimizer")
    schedule = cfg.get("scheduler")  # {} for scheduler=none
    scheduler = _partial(schedule, "scheduler") if schedule and "_target_" in schedule else None
    return Settings(cfg, trainer, optimizer, scheduler)


def validate(cfg: DictConfig) -> DictConfig:
    """The typed, resolved ``cfg`` that ``train`` runs, checked as ``settings`` says."""
    return settings(cfg).cfg


def check_objective(cfg: DictConfig) -> None:
    """``objective`` is never silently a test-set metric, and a ``val_*`` one has a
    validation set to measure it on; ``ValueError`` naming the key and the fix otherwise."""
    objective = cfg.objective
    if objective.startswith("test_") and not cfg.objective_allow_test:
        raise ValueError(
            f"objective={objective} is a test-set metric: a sweep tuned on it reports optimistic "
            "numbers; use objective=val_accuracy (the clean validation set), or add "
            "objective_allow_test=true to choose the test set knowingly"
        )
    val = cfg.dataset.get("val_per_class")
    if objective.startswith("val_") and val is not None and val == 0:
        raise ValueError(
            f"objective={objective} needs a validation set but dataset.val_per_class=0: set "
            "dataset.val_per_class to 1 or more"
        )


def train(cfg: DictConfig, run_dir: str | os.PathLike | None = None) -> float:
    """Run one experiment described by ``cfg`` (the composed ``conf/config.yaml``).

    Writes into ``run_dir`` (default: Hydra's output directory of this job) the resolved
    ``config.yaml``, ``labels.pt`` / ``dataset.json``, ``checkpoint.pt`` (every
    ``trainer.checkpoint_every`` steps), ``metrics.csv`` (as rows are made), ``summary.json``,
    ``weights.pt`` (the weights and each example's id), ``suspects.csv``
    (``reweight.outputs.suspects``; only where the labels may be noisy), the plots and the
    trackers' files (``cfg.logger``, ``reweight.train.loggers``), and returns the final value of
    ``cfg.objective`` (what a sweeper such as Optuna maximises; default ``val_accuracy``, on the
    clean validation set; a test metric only with ``objective_allow_test=true``). With
    ``cfg.resume`` it continues from ``run_dir/checkpoint.pt``.
    Configuration errors raise ``ValueError`` naming the key and the allowed values.

    Nothing is written before the first training step (``reweight.cli.run_dir``): a run that fails
    earlier leaves ``run_dir`` as it found it. ``summary.json`` is written last, so a run that
    fails while writing its final files is not taken for finished: run again, it writes them.
    A ``run_dir`` holding this run finished (same config up to ``run_config.NO_EFFECT_KEYS``,
    checkpoint at ``trainer.max_steps``) is left alone and its recorded objective returned; one
    holding it at an earlier step (interrupted, or finished at a smaller ``trainer.max_steps``)
    continues it; one holding a run of another config is refused (``RunDirError``, a
    ``ValueError``) unless ``resume=false``, which keeps a finished run beside until the new one
    has finished. A NaN or inf raises ``RunFailed`` naming the step and the last finite
    checkpoint, kept (recorded in ``diverged.json``): the run continues from it only with
    another ``optimizer.lr`` or ``trainer.grad_clip`` (``run_dir.DIVERGENCE_KEYS``).
    """
    built = settings(cfg)
    dir_key = "run_dir"
    if run_dir is None:
        if not HydraConfig.initialized():
            raise TypeError("train(cfg) outside a Hydra app needs run_dir=<folder>")
        hydra_cfg = HydraConfig.get()
        run_dir = hydra_cfg.runtime.output_dir
        dir_key = "hydra.sweep.dir" if hydra_cfg.mode == RunMode.MULTIRUN else "hydra.run.dir"
    # holds train.log back until the first step; one run per folder (rank 0 locks it)
    with RunDir(run_dir, dir_key, lock=env_rank() == 0) as run:
        try:
            return _train(built, run)
        except KeyboardInterrupt as stop:
            if not built.cfg.resume and run.committed:  # the same command would start over
                stop.rerun = "resume=true"  # type: ignore[attr-defined]  # read by app._again
            raise


def _train(built: Settings, run: RunDir) -> float:
    cfg, run_dir = built.cfg, run.path
    threads = cfg.get("threads")
    if threads is not None:
        torch.set_num_threads(threads)
    log.info("malloc: %s", tune_malloc(cfg.malloc, resolve_device(built.trainer.device)))
    # torchrun: join the process group; rank 0 alone writes the run's files (see distributed.py)
    ctx = init_from_env()
    main_rank = ctx is None or ctx.is_main
    # the data folder as dataset.json records it (absolute), so config.yaml names the same one
    cfg.dataset.root = str(resolve_data_root(cfg.dataset.get("root")).resolve())
    resolved = OmegaConf.to_yaml(cfg, resolve=True)
    finished = run.check(resolved, resume=cfg.resume, max_steps=built.trainer.max_steps)
    if finished is not None:
        run.finish()  # a finished run stopped after summary.json: the run it replaced goes now
        log.info(
            "%s holds this run, finished at step %d: results in %s (test accuracy %.4f); "
            "nothing to do (resume=false starts over)",
            run_dir,
            finished.step,
            finished.summary,
            finished.test_accuracy,
        )
        recorded = json.loads(finished.summary.read_text()).get(cfg.objective)
        return _objective(cfg, recorded if isinstance(recorded, int | float) else math.nan)

    bundle = _dataset(cfg, ctx)
    trainer = _trainer(built, bundle, run_dir, main_rank)
    log.info("run directory: %s", run_dir.resolve())
    # the run's records, once it has made its first step (a resumed run may have none left)
    commit = None
    if main_rank:
        records = {RESOLVED_CONFIG: resolved.encode(), **hydra_files(cfg)}
        commit = functools.partial(run.commit, records, functools.partial(save_labels, bundle))
    resume = cfg.resume and not _continue_diverged(trainer, run)

    def report(result: FitResult) -> None:
        """The run's files, summary.json last; ``fit`` closes the trackers after them, so
        that none says FINISHED for a run stopped while writing them."""
        if commit is not None:  # a resumed run with no step left commits here
            commit()
        objective = float(result.metrics.get(cfg.objective, math.nan))
        _write_outputs(cfg, run, trainer, bundle, result, objective)

    try:
        result = trainer.fit(resume=resume, on_start=commit, on_end=report if main_rank else None)
    except FloatingPointError as err:  # NaN/inf: one line naming the step and what is kept
        reason = str(err).split(";")[0]  # the Trainer's own advice follows the ";"
        raise RunFailed(run.diverged(reason) if main_rank else reason) from None
    objective = float(result.metrics.get(cfg.objective, math.nan))
    if main_rank:
        run.finish()  # finished: the run it replaced (kept beside until now) goes
        _log_done(trainer, result, run_dir)
    return _objective(cfg, objective)


def _log_done(trainer: Trainer, result: FitResult, run_dir: Path) -> None:
    """The run's last line: its step, test accuracies and where its summary is."""
    others = "".join(  # the further test sets (mini_webvision: ImageNet's validation images)
        f", {name} test accuracy {result.metrics.get(f'test_{name}_accuracy', math.nan):.4f}"
        for name in trainer.evaluation.extra_tests
    )
    log.info(
        "done: step %d, test accuracy %.4f, balanced %.4f%s -> %s",
        trainer.step,
        result.metrics.get("test_accuracy", math.nan),
        result.metrics.get("test_balanced_accuracy", math.nan),
        others,
        run_dir / SUMMARY,
    )


def _dataset(cfg: DictConfig, ctx: DistContext | None) -> DataBundle:
    """The (possibly corrupted) training set, the clean meta set, the validation and test sets.
    Under torchrun rank 0 builds first, so that a download happens once; the others learn
    whether it could."""
    if ctx is not None and not ctx.is_main and ctx.max_int(0, _collective_device()):
        raise _DataFailedOnRankZero("rank 0 could not build the dataset (its error says why)")
    try:
        bundle = build_dataset(**_container(cfg.dataset))
    except BaseException:
        if ctx is not None and ctx.is_main:
            ctx.max_int(1, _collective_device())  # the others stop without a word
        raise
    if ctx is not None and ctx.is_main:
        ctx.max_int(0, _collective_device())
    return bundle


def _trainer(built: Settings, bundle: DataBundle, run_dir: Path, main_rank: bool) -> Trainer:
    """The model, then the method (MW-Net's weighting net draws from the global RNG after the
    model, so every method starts from the same model for one seed), then the Trainer with the
    run's trackers and ``metrics.csv`` (rows from before a resume too)."""
    cfg = built.cfg
    torch.manual_seed(cfg.seed)
    model = hydra.utils.instantiate(
        cfg.model,
        num_classes=bundle.num_classes,
        in_channels=bundle.in_channels,
        input_shape=list(bundle.test[0][0].shape),  # (C, H, W); test items are not augmented
        _convert_="all",
    )
    method = build_method(**_container(cfg.method))
    loggers: list[Logger] = []
    if main_rank and cfg.get("logger"):
        loggers = build_loggers(
            _container(cfg.logger), run_dir, files=LOGGER_FILES, run_name=_run_name(cfg)
        )
        for tracker in loggers:  # a place a tracker cannot write: refused now
            check = getattr(tracker, "check", None)
            if check is not None:
                check()
    metrics_csv = MetricsCSV(run_dir / METRICS, history=lambda: trainer.history)
    trainer = Trainer.from_bundle(
        model,
        bundle,
        method=method,
        optimizer=built.optimizer,
        scheduler=built.scheduler,
        config=built.trainer,
        checkpoint_path=run_dir / CHECKPOINT,
        callbacks=[metrics_csv],
        loggers=loggers,
        run_config=_container(cfg) if loggers else None,
    )
    return trainer


def _continue_diverged(trainer: Trainer, run: RunDir) -> bool:
    """A run that diverged, continued with another ``optimizer.lr``: load its checkpoint now,
    with the schedule scaled by new / old, so that ``fit`` does not load it again. True when
    it did (only asked when ``resume=true``)."""
    checkpoint = run.path / CHECKPOINT
    if run.lr_change is None or not checkpoint.is_file():
        return False
    trainer.load_checkpoint(checkpoint)
    old_lr, new_lr = run.lr_change
    _scale_lr(trainer, new_lr / old_lr)
    log.info("resumed from %s at step %d with optimizer.lr=%s", CHECKPOINT, trainer.step, new_lr)
    return True


def _write_outputs(
    cfg: DictConfig,
    run: RunDir,
    trainer: Trainer,
    bundle: DataBundle,
    result: FitResult,
    objective: float,
) -> None:
    """The same files as ``Trainer(..., run_dir=...)`` writes (``reweight.train.run_files``),
    with the CLI's keys in the summary (written last: the run is finished once it is)."""
    info, name, run_dir = bundle.info, bundle.info.get("name", cfg.dataset.name), run.path
    write_run_files(
        run_dir,
        trainer,
        result,
        dataset=name,
        class_names=bundle.class_names,
        ids=bundle.train_ids,
        labels_known=info.get("true_labels_known", True),
        title=f"{result.metrics['method']} on {name} (seed {cfg.seed})",
        extra={
            "seed": cfg.seed,
            "dataset_seed": info.get("seed"),
            "model": cfg.model.get("name"),
            "run_dir": str(run_dir.resolve()),
            "dataset_info": info,
            "objective": cfg.objective,
            "objective_value": objective,
            "objective_is_test": cfg.objective.startswith("test_"),
            # own data without a test set: what its test accuracy is measured against
            **({"test_labels": info["held_out_test"]["note"]} if "held_out_test" in info else {}),
        },
    )


class _DataFailedOnRankZero(ValueError):
    """Under torchrun: rank 0 could not build the dataset and reports why; the other ranks
    stop with this (exit status 2, no line: only rank 0 prints)."""


def _collective_device() -> torch.device:
    """Where a small all-reduce of the process group runs: this rank's GPU for NCCL."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _scale_lr(trainer: Trainer, factor: float) -> None:
    """Every learning rate of the trainer's optimizer and schedule times ``factor``."""
    for group in trainer.optimizer.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor
    base = getattr(trainer.scheduler, "base_lrs", None)
    if base is not None:
        trainer.scheduler.base_lrs = [lr * factor for lr in base]


def _objective(cfg: DictConfig, value: float) -> float:
    """The value ``train`` returns to a sweeper, logged with its name; a test-set objective
    (only with ``objective_allow_test=true``, see ``validate``) is logged as a warning."""
    if cfg.objective.startswith("test_"):
        log.warning(
            "objective %s = %.4f is a TEST-SET metric (objective_allow_test=true): numbers tuned "
            "on it are optimistic",
            cfg.objective,
            value,
        )
    else:
        log.info("objective %s = %.4f", cfg.objective, value)
    return float(value)


def _run_name(cfg: DictConfig) -> str:
    return f"{cfg.dataset.name}/{cfg.method.name}/seed{cfg.seed}"


# -- helpers ------------------------------------------------------------------------------------


def _container(node: Any) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]


def _partial(node: Any, key: str) -> functools.partial:
    """The ``_partial_`` factory of an optimizer or scheduler config, checked now rather than
    deep in the Trainer: keywords that are not arguments of the target (for a ``_target_`` the
    schema does not know), and whatever the target itself refuses when built on a stand-in
    parameter (e.g. a negative learning rate). The values' types are the schema's job."""
    factory = hydra.utils.instantiate(node, _convert_="all")
    if not isinstance(factory, functools.partial):
        raise ValueError(
            f"{key} must be a _partial_: true config (the Trainer binds its first argument)"
        )
    name = getattr(factory.func, "__name__", str(factory.func))
    try:
        params = inspect.signature(factory.func).parameters
    except (TypeError, ValueError):  # no signature to check against
        params = {}
    if params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(factory.keywords) - set(params))
        if unknown:
            allowed = [p for p in params if p not in ("self", "params", "optimizer")]
            raise ValueError(
                f"{key}.{unknown[0]} is not an argument of {name}; allowed: {', '.join(allowed)}"
            )
    stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    try:  # an optimizer takes parameters, a scheduler an optimizer
        factory(stand_in if key == "scheduler" else stand_in.param_groups[0]["params"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{key} ({name}): {err}") from err
    return factory


def _trainer_config(node: Any, seed: int) -> TrainerConfig:
    """``TrainerConfig`` from the ``trainer`` block of a validated config (the schema typed
    every value; TrainerConfig checks the ranges)."""
    return TrainerConfig(**_container(node), seed=seed)
