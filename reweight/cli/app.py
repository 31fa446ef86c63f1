"""The command line: ``python -m reweight [KEY=VALUE ...]``, a Hydra app over ``conf/``.

``train(cfg)`` (``reweight.cli.job``) is a plain function from a composed config to the final
objective (default ``val_accuracy``); ``main()`` is the thin ``@hydra.main`` wrapper around it
that ``python -m reweight`` and the ``reweight`` script run, with the callbacks that check a
config before Hydra makes a directory and write a sweep's table at its end. One run, into
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

import atexit
import functools
import gc
import importlib.util
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
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
from reweight.cli.job import train, validate
from reweight.core.configs import config_dir
from reweight.core.distributed import env_rank
from reweight.outputs import (
    aggregate_sweep,
    record_job,
)
from reweight.train.signals import TrainingInterrupted

__all__ = ["CONFIG_PATH", "AggregateSweep", "ValidateConfig", "main", "train", "validate"]

log = logging.getLogger(__name__)


def _config_path() -> str:
    """The package ``reweight.conf`` when installed (wheel or editable); in a checkout that is
    only on ``sys.path`` (``PYTHONPATH=.``, no install), the top-level ``conf/`` folder."""
    if importlib.util.find_spec("reweight.conf") is None:
        return str(config_dir())
    return "pkg://reweight.conf"


CONFIG_PATH = _config_path()
"""Where Hydra finds ``config.yaml``: ``pkg://reweight.conf`` once the package is installed."""


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
    _exit_without_the_last_collection()
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
        else:
            _after_rank_zero()
        sys.exit(2)
    finally:
        sys.stderr = stderr
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


def _after_rank_zero() -> None:
    """Under torchrun, a rank other than 0 that refuses a config (every rank refuses alike)
    waits for torchrun's agent to stop it, up to 10 s: the agent stops every worker once one
    has exited, so a rank that left first could cut rank 0 off before its ``error:`` line (seen
    once exits took 0.5 s instead of 2 s). Without torchrun (``TORCHELASTIC_RUN_ID`` unset)
    nothing waits."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        time.sleep(10)


@functools.cache  # once per process: main() also runs in-process, in tests
def _exit_without_the_last_collection() -> None:
    """At the process's exit, after the exit handlers registered later (trackers' among them),
    freeze the heap: the interpreter's last garbage collection then skips the objects of torch,
    Hydra and matplotlib, which took 1.9-2.4 s of every run's exit, a refused key's included
    (0.5 s frozen; 2-core EPYC, torch 2.14). Nothing a run writes is lost: its files, logs and
    trackers are closed before (by the run, and by the handlers that run before this one)."""
    atexit.register(gc.freeze)


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
