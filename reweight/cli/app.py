"""The command line: ``python -m reweight [KEY=VALUE ...]``, a Hydra app over ``conf/``.

``train(cfg)`` is a plain function from a composed config to the final objective (default
``val_accuracy``); ``main()`` is the thin ``@hydra.main`` wrapper around it that ``python -m
reweight`` and the ``reweight`` script run. One run, into
``outputs/<dataset>/<method>/<overrides>/seed<seed>``::

    python -m reweight dataset=mnist_imbalanced trainer.max_steps=20

and a sweep, one job per combination, with a table of mean ± std in the sweep directory::

    python -m reweight -m method=erm,l2rw,mwnet seed=0,1,2

From Python (e.g. a notebook), with Hydra's compose API and a directory of your choice::

    from hydra import compose, initialize_config_module
    with initialize_config_module("reweight.conf", version_base="1.3"):
        cfg = compose("config", overrides=["trainer.max_steps=20"])
    val_accuracy = train(cfg, run_dir="runs/smoke")  # cfg.objective

The configs ship inside the package as ``reweight.conf`` (the top-level ``conf/`` folder of the
source tree, mapped by ``pyproject.toml``), so the app works from a checkout and from a wheel.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import json
import logging
import math
import os
import signal
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from reweight.cli.errors import (
    JobErrorFilter,
    RunFailed,
    describe,
    disk_full,
    is_config_error,
    is_multirun,
    one_line,
)
from reweight.cli.run_dir import RunDir, hydra_files
from reweight.cli.schema import validate_config
from reweight.data import build_dataset, resolve_data_root, save_labels
from reweight.distributed import env_rank, env_world_size, init_from_env
from reweight.loggers import build_loggers
from reweight.methods import build_method
from reweight.outputs import (
    CHECKPOINT,
    LOGGER_FILES,
    METRICS,
    RESOLVED_CONFIG,
    SUMMARY,
    MetricsCSV,
    aggregate_sweep,
    record_job,
)
from reweight.run_files import write_run_files
from reweight.signals import TrainingInterrupted
from reweight.trainer import Trainer, TrainerConfig

__all__ = ["CONFIG_PATH", "AggregateSweep", "ValidateConfig", "main", "train", "validate"]

log = logging.getLogger(__name__)


def _config_path() -> str:
    """The package ``reweight.conf`` when installed (wheel or editable); in a checkout that is
    only on ``sys.path`` (``PYTHONPATH=.``, no install), the top-level ``conf/`` folder."""
    if importlib.util.find_spec("reweight.conf") is None:
        source = Path(__file__).resolve().parents[2] / "conf"
        if (source / "config.yaml").is_file():
            return str(source)
    return "pkg://reweight.conf"


CONFIG_PATH = _config_path()
"""Where Hydra finds ``config.yaml``: ``pkg://reweight.conf`` once the package is installed."""


def train(cfg: DictConfig, run_dir: str | os.PathLike | None = None) -> float:
    """Run one experiment described by ``cfg`` (the composed ``conf/config.yaml``).

    Writes into ``run_dir`` (default: Hydra's output directory of this job) the resolved
    ``config.yaml``, ``labels.pt`` / ``dataset.json``, ``checkpoint.pt`` (every
    ``trainer.checkpoint_every`` steps), ``metrics.csv`` (as rows are made), ``summary.json``,
    ``weights.pt`` (the weights and each example's id), ``suspects.csv`` (``reweight.suspects``;
    only where the labels may be noisy), the plots and the trackers' files
    (``cfg.logger``, ``reweight.loggers``), and returns the final value of ``cfg.objective``
    (what a sweeper such as Optuna maximises; default ``val_accuracy``, on the clean validation
    set; a test metric only with ``objective_allow_test=true``). With ``cfg.resume`` it
    continues from ``run_dir/checkpoint.pt``.
    Configuration errors raise ``ValueError`` naming the key and the allowed values.

    Nothing is written before the first training step (``reweight.cli.run_dir``): a run that fails
    earlier leaves ``run_dir`` as it found it. ``summary.json`` is written last, so a run that
    fails while writing its final files is not taken for finished: run again, it writes them.
    A ``run_dir`` holding this run finished (same config up to ``run_dir.NO_EFFECT_KEYS``,
    checkpoint at ``trainer.max_steps``) is left alone and its recorded objective returned; one
    holding it at an earlier step (interrupted, or finished at a smaller ``trainer.max_steps``)
    continues it; one holding a run of another config is refused (``RunDirError``, a
    ``ValueError``) unless ``resume=false``, which keeps a finished run beside until the new one
    has finished. A NaN or inf raises ``RunFailed`` naming the step and the last finite
    checkpoint, kept (recorded in ``diverged.json``): the run continues from it only with
    another ``optimizer.lr`` or ``trainer.grad_clip`` (``run_dir.DIVERGENCE_KEYS``).
    """
    cfg = validate(cfg)
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
            return _train(cfg, run)
        except KeyboardInterrupt as stop:
            if not cfg.resume and run.committed:  # the same command would start over again
                stop.rerun = "resume=true"  # read by _again(): the interrupt line says so
            raise


def _train(cfg: DictConfig, run: RunDir) -> float:
    run_dir = run.path
    # 0. the settings (every one checked by validate() above, before any data is read)
    seed, resume = cfg.seed, cfg.resume
    threads = cfg.get("threads")
    if threads is not None:
        torch.set_num_threads(threads)
    trainer_config = _trainer_config(cfg.trainer, seed)
    # torchrun: join the process group; rank 0 alone writes the run's files (see distributed.py)
    ctx = init_from_env()
    main_rank = ctx is None or ctx.is_main
    optimizer = _partial(cfg.optimizer, "optimizer")
    schedule = cfg.get("scheduler")  # {} for scheduler=none
    scheduler = _partial(schedule, "scheduler") if schedule and "_target_" in schedule else None
    # the data folder as dataset.json records it (absolute), so config.yaml names the same one
    cfg.dataset.root = str(resolve_data_root(cfg.dataset.get("root")).resolve())
    resolved = OmegaConf.to_yaml(cfg, resolve=True)
    finished = run.check(resolved, resume=resume, max_steps=trainer_config.max_steps)
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

    # 1. data: the (possibly corrupted) training set, the clean meta set, the test set
    #    (rank 0 first, so that a download happens once; the others learn whether it could)
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
    input_shape = list(bundle.test[0][0].shape)  # (C, H, W); test items are not augmented

    # 2. the model, then the method (MW-Net's weighting net draws from the global RNG after
    #    the model, so every method starts from the same model for one seed)
    torch.manual_seed(seed)
    model = hydra.utils.instantiate(
        cfg.model,
        num_classes=bundle.num_classes,
        in_channels=bundle.in_channels,
        input_shape=input_shape,
        _convert_="all",
    )
    method = build_method(**_container(cfg.method))

    # 3. the loop; metrics.csv follows the Trainer's history (rows from before a resume too)
    trainer = Trainer.from_bundle(
        model,
        bundle,
        method=method,
        optimizer=optimizer,
        scheduler=scheduler,
        config=trainer_config,
        checkpoint_path=run_dir / CHECKPOINT,
    )
    if main_rank and cfg.get("logger"):
        trainer.loggers = build_loggers(
            _container(cfg.logger), run_dir, files=LOGGER_FILES, run_name=_run_name(cfg)
        )
        for tracker in trainer.loggers:  # a place a tracker cannot write: refused now
            check = getattr(tracker, "check", None)
            if check is not None:
                check()
        trainer.run_config = _container(cfg)
    metrics_csv = MetricsCSV(run_dir / METRICS, history=lambda: trainer.history)
    trainer.callbacks.append(metrics_csv)
    log.info("run directory: %s", run_dir.resolve())
    # the run's records, once it has made its first step (a resumed run may have none left)
    commit = None
    if main_rank:
        records = {RESOLVED_CONFIG: resolved.encode(), **hydra_files(cfg)}
        commit = functools.partial(run.commit, records, functools.partial(save_labels, bundle))
    if run.lr_change is not None and resume and (run_dir / CHECKPOINT).is_file():
        # a run that diverged, continued with another optimizer.lr: its checkpoint's schedule,
        # scaled by new / old (loaded here, so fit() does not load it again)
        trainer.load_checkpoint(run_dir / CHECKPOINT)
        resume = False
        old_lr, new_lr = run.lr_change
        _scale_lr(trainer, new_lr / old_lr)
        log.info(
            "resumed from %s at step %d with optimizer.lr=%s", CHECKPOINT, trainer.step, new_lr
        )
    try:
        result = trainer.fit(resume=resume, on_start=commit)
    except FloatingPointError as err:  # NaN/inf: one line naming the step and what is kept
        reason = str(err).split(";")[0]  # the Trainer's own advice follows the ";"
        raise RunFailed(run.diverged(reason) if main_rank else reason) from None
    if commit is not None:
        commit()
    accuracy = float(result.metrics.get("test_accuracy", math.nan))
    objective = float(result.metrics.get(cfg.objective, math.nan))
    if not main_rank:
        return _objective(cfg, objective)

    # 4. outputs: the same files as Trainer(..., run_dir=...) writes (reweight.run_files)
    info = bundle.info
    write_run_files(
        run_dir,
        trainer,
        result.metrics,
        dataset=info.get("name", cfg.dataset.name),
        class_names=bundle.class_names,
        ids=bundle.train_ids,
        labels_known=info.get("true_labels_known", True),
        title=f"{result.metrics['method']} on {info.get('name', cfg.dataset.name)} (seed {seed})",
        extra={
            "seed": seed,
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
    run.finish()
    log.info(
        "done: step %d, test accuracy %.4f, balanced %.4f -> %s",
        trainer.step,
        accuracy,
        result.metrics.get("test_balanced_accuracy", math.nan),
        run_dir / SUMMARY,
    )
    return _objective(cfg, objective)


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


class AggregateSweep(Callback):
    """At the end of a multirun, write ``results.csv`` and ``results.md`` into the sweep dir.

    Configured in ``conf/config.yaml`` under ``hydra.callbacks``; by hand:
    ``python -m reweight.outputs <sweep_dir>``.

    Each job, as it ends, updates the table too (and records its error in ``failed/<num>.json``
    if it failed), so that a sweep that stops at a failed job still leaves its table, with the
    failure in ``results.md``.
    """

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        failed = job_return.status == JobStatus.FAILED
        error = describe(job_return._return_value, task=train) if failed else None
        overrides = list(config.hydra.overrides.task)
        record_job(
            sweep_dir, config.hydra.job.num, overrides, config.hydra.runtime.output_dir, error
        )
        aggregate_sweep(sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if sweep_dir.is_dir():
            aggregate_sweep(sweep_dir)


def validate(cfg: DictConfig) -> DictConfig:
    """``cfg`` checked before any work, or ``ValueError`` naming the first bad key.

    First its schema (``reweight.cli.schema.validate_config``: every key's type, finite numbers,
    ``trainer.device``, milestones, betas, and ``trainer.batch_size`` against the ``WORLD_SIZE``
    processes torchrun starts, checked before any process group is joined), then the range
    checks of what a run builds before reading data: ``TrainerConfig``, the method, the
    optimizer and scheduler factories (on a stand-in parameter). Returns the typed, resolved
    config, which is what ``train`` runs. Nothing is read or written.
    """
    cfg = validate_config(cfg, world_size=env_world_size())
    check_objective(cfg)
    _trainer_config(cfg.trainer, cfg.seed)
    build_method(**_container(cfg.method))
    _partial(cfg.optimizer, "optimizer")
    schedule = cfg.get("scheduler")
    if schedule and "_target_" in schedule:
        _partial(schedule, "scheduler")
    return cfg


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


class _ConfigRefused(BaseException):
    """A config that ``ValidateConfig`` refused, on its way to ``main``. A BaseException (as
    SystemExit is) because Hydra turns an Exception raised in a callback into a warning and
    then runs the job anyway."""

    def __init__(self, error: Exception, job: list[str] | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.job = job  # the overrides of the job of a multirun that has this config


class ValidateConfig(Callback):
    """Run :func:`validate` before Hydra creates the run directory.

    Configured in ``conf/config.yaml`` under ``hydra.callbacks``. Hydra calls ``on_run_start``
    after composing the config and before it makes the run directory, writes ``.hydra/`` and
    opens ``train.log``; the same check at the start of ``train`` comes after all of that.
    A multirun is checked whole, every job's config, before its first job runs (or Hydra makes
    the sweep directory), where the sweep is a list of values (Hydra's basic sweeper, whatever
    the launcher); a sweeper that draws values as it goes (Optuna) has each job checked in
    ``train``.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        job = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
        try:
            validate(job)
        except Exception as err:
            raise _ConfigRefused(err) from err

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        loader = GlobalHydra.instance().config_loader()
        for overrides in _sweep_jobs(config):
            try:
                job = loader.load_sweep_config(config, overrides)
                validate(OmegaConf.masked_copy(job, [k for k in job if k != "hydra"]))
            except Exception as err:
                raise _ConfigRefused(err, job=overrides) from err


def _sweep_jobs(config: DictConfig) -> list[list[str]]:
    """Every job's overrides of a multirun under Hydra's basic sweeper (the command line's
    sweeps and ``hydra.sweeper.params``), in its order; none for another sweeper."""
    if config.hydra.sweeper.get("_target_") != f"{BasicSweeper.__module__}.BasicSweeper":
        return []
    params = config.hydra.sweeper.get("params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()]
    arguments += list(config.hydra.overrides.task)
    parsed = OverridesParser.create().parse_overrides(arguments)
    return [list(job) for job in BasicSweeper.split_arguments(parsed, None)[0]]


@hydra.main(config_path=CONFIG_PATH, config_name="config", version_base="1.3")
def _app(cfg: DictConfig) -> float:
    return train(cfg)


def main() -> None:
    """``python -m reweight``: run the Hydra app; a configuration error is one line on stderr.

    Under ``torchrun`` every rank runs this; ranks other than 0 write no Hydra files (no
    ``.hydra/``, no log file) into the run directory they share with rank 0, and log only
    warnings and errors (each line would otherwise be printed once per rank).

    Hydra prints its own errors over several lines (and ours with a traceback), so this runs
    the app with ``HYDRA_FULL_ERROR=1`` (errors propagate here) and reports a configuration
    error as ``error: <message>`` with exit status 2. Anything else keeps its traceback. Set
    ``HYDRA_FULL_ERROR=1`` yourself to see the traceback of configuration errors too. Under
    torchrun every rank refuses a bad config alike; rank 0 alone prints the line.

    Ctrl-C or SIGTERM during training stops after the current step with the checkpoint written
    and one line, ``interrupted at step N; run the same command to continue``, exit status 130
    or 143 (see ``Trainer.fit``); a second Ctrl-C aborts at once. A ``resume=false`` run says
    ``run it again with resume=true to continue`` instead once it has written its files.
    """
    if env_rank() > 0:  # rank 0 alone logs what every rank does alike; the others warn
        sys.argv += [
            "hydra.output_subdir=null",
            "hydra/job_logging=stdout",
            "hydra.job_logging.root.level=WARNING",
        ]
    previous = os.environ.get("HYDRA_FULL_ERROR")
    if previous == "1":
        _run_app()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"
    stderr = sys.stderr
    sys.stderr = JobErrorFilter(stderr)  # type: ignore[assignment]
    try:
        _run_app()
    except (Exception, _ConfigRefused) as caught:
        err = caught.error if isinstance(caught, _ConfigRefused) else caught
        after_start = str(err) if isinstance(err, RunFailed) else disk_full(err)
        failed = sys.stderr.failed_job if isinstance(sys.stderr, JobErrorFilter) else None
        if isinstance(caught, _ConfigRefused) and caught.job is not None:
            failed = str(caught.job)
        where = f" (job with overrides {failed})" if failed and is_multirun() else ""
        if after_start is not None:  # the run started: exit status 1, as for any failed run
            if env_rank() == 0:
                print(f"error: {after_start}{where}", file=stderr)
            sys.exit(1)
        if not is_config_error(err, task=train):
            raise  # a bug, not a bad override: keep the traceback
        if env_rank() == 0:
            print(f"error: {one_line(err, task=train)}{where}", file=stderr)
        sys.exit(2)
    finally:
        sys.stderr = stderr
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


def _run_app() -> None:
    """``_app()``; a run stopped by SIGINT or SIGTERM (``TrainingInterrupted``, raised after its
    checkpoint is written) ends with one line on stderr, from rank 0 only, and the exit status
    of death by that signal (130, 143). A sweep stops at the interrupted job: the exception is
    a KeyboardInterrupt, which Hydra's job runner does not catch. Outside training (reading the
    data, writing the final files) SIGINT and SIGTERM alike end with one line too, ``interrupted;
    run the same command to continue``: nothing was written yet, or the run is not finished
    (its ``summary.json`` is written last) and the same command completes it."""
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_DFL:  # SIGTERM outside training: as Ctrl-C, one line
        signal.signal(signal.SIGTERM, _terminated)
    try:
        _app()
    except TrainingInterrupted as stop:
        if env_rank() == 0:
            print(f"interrupted at step {stop.step}; {_again(stop)}", file=sys.stderr)
        sys.exit(stop.exit_status)
    except KeyboardInterrupt as stop:  # before the first step, or after the last
        if env_rank() == 0:
            print(f"interrupted; {_again(stop)}", file=sys.stderr)
        sys.exit(128 + (signal.SIGTERM if isinstance(stop, _Terminated) else signal.SIGINT))
    finally:
        if previous is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, previous)


def _again(stop: KeyboardInterrupt) -> str:
    """What the interrupt line says to do: run the same command, or, for a ``resume=false``
    run that had written its files (``stop.rerun``, set by ``train``), run it with
    ``resume=true``, since the same command would start over once more."""
    change = getattr(stop, "rerun", None)
    if change is None:
        return "run the same command to continue"
    return f"run it again with {change} to continue (resume=false starts over)"


class _Terminated(KeyboardInterrupt):
    """SIGTERM outside ``Trainer.fit`` (which handles it itself): stops the app as Ctrl-C does."""


def _terminated(signum: int, frame: Any) -> None:
    raise _Terminated()


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
