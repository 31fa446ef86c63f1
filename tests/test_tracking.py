"""Experiment trackers (reweight.train.loggers), the clean validation split and the sweep objective:
the real TensorBoard, MLflow, W&B (offline) and Optuna packages, no network."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from torch import nn
from torch.utils.data import TensorDataset

from reweight import Trainer
from reweight.cli import validate
from reweight.data import build_dataset
from reweight.train.loggers import Logger
from reweight.train.signals import TrainingInterrupted
from reweight.train.trackers import TensorBoardLogger
from tests.helpers import (
    REWEIGHT,
    cli_env,
    next_second,
    quiet,
    run_command,
    signal_at,
    start_command,
)
from tests.test_tracker_records import wandb_history, wandb_records

TINY = [
    "dataset=mnist_imbalanced",
    "dataset.n_train=500",
    "dataset.proportion=0.9",
    "model=mlp",
    "trainer.max_steps=4",
    "trainer.eval_every=2",
    "trainer.log_every=1",
    "trainer.batch_size=20",
    "trainer.final_weights=0",
    "threads=1",
]


@pytest.fixture(autouse=True)
def _fresh_hydra():
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


def _env(tmp: Path) -> dict[str, str]:
    return cli_env(
        WANDB_MODE="offline",
        WANDB_DIR=str(tmp),
        WANDB_SILENT="true",
        WANDB_CACHE_DIR=str(tmp / "wandb-cache"),
        WANDB_CONFIG_DIR=str(tmp / "wandb-config"),
        MLFLOW_TRACKING_URI="",  # nothing from the user's environment
    )


def _cli(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = run_command([*REWEIGHT, *args], cwd, timeout=900, env=_env(cwd))
    if check and proc.returncode != 0:
        pytest.fail(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def _csv_scalars(path: Path) -> dict[str, dict[int, float]]:
    """metrics.csv as {key: {step: value}}, empty and NaN cells left out."""
    out: dict[str, dict[int, float]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            step = int(row.pop("step"))
            for key, cell in row.items():
                if cell != "" and math.isfinite(float(cell)):
                    out.setdefault(key, {})[step] = float(cell)
    return out


def _tb_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# -- one CLI run with every tracker ----------------------------------------------------------


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, data_root) -> Path:
    tmp = tmp_path_factory.mktemp("tracked")
    _cli([*TINY, "logger=[tensorboard,mlflow,wandb]", f"hydra.run.dir={tmp / 'run'}"], tmp)
    return tmp / "run"


@pytest.mark.slow
def test_tensorboard_scalars_equal_metrics_csv(tracked_run: Path) -> None:
    expected = _csv_scalars(tracked_run / "metrics.csv")
    got = _tb_scalars(tracked_run / "tensorboard")
    assert set(got) == set(expected)  # every numeric column, lr and val/test accuracy among them
    assert {"lr", "val_accuracy", "test_accuracy", "weight_mean"} <= set(got)
    for key, values in expected.items():
        steps = [s for s, _ in got[key]]
        assert steps == sorted(values), key  # each step once
        for step, value in got[key]:
            assert value == pytest.approx(values[step], rel=1e-6, abs=1e-7), (key, step)
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(
        str(tracked_run / "tensorboard"), size_guidance={"histograms": 0}
    )
    acc.Reload()
    assert "weights" in acc.Tags()["histograms"]
    assert [e.step for e in acc.Histograms("weights")] == [1, 2, 3, 4]


@pytest.mark.slow
def test_mlflow_local_store_has_the_same_metrics(tracked_run: Path) -> None:
    import mlflow

    run_id = (tracked_run / "mlflow_run_id.txt").read_text().strip()
    with warnings.catch_warnings():  # MLflow's SQL store uses APIs SQLAlchemy 2.1 deprecates
        warnings.simplefilter("ignore", DeprecationWarning)
        client = mlflow.tracking.MlflowClient(f"sqlite:///{tracked_run / 'mlflow.db'}")
        run = client.get_run(run_id)
        histories = {
            key: {m.step: m.value for m in client.get_metric_history(run_id, key)}
            for key in [*run.data.metrics, "weights/p50"]
        }
    assert run.info.status == "FINISHED"
    assert run.data.params["method.name"] == "l2rw"
    assert run.data.params["objective"] == "val_accuracy"
    expected = _csv_scalars(tracked_run / "metrics.csv")
    assert set(expected) <= set(histories)
    for key, values in expected.items():
        assert histories[key] == pytest.approx(values, rel=1e-6), key
    assert sorted(histories["weights/p50"]) == [1, 2, 3, 4]  # the histogram's quantiles


@pytest.mark.slow
def test_wandb_offline_run_folder(tracked_run: Path) -> None:
    run_id = (tracked_run / "wandb_run_id.txt").read_text().strip()
    folders = list((tracked_run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(folders) == 1
    path = folders[0] / f"run-{run_id}.wandb"  # what `wandb sync` uploads, parsed
    config = {
        item.key
        for r in wandb_records(path)
        if r.WhichOneof("record_type") == "run"
        for item in r.run.config.update
    }
    assert {"objective", "trainer", "method"} <= config
    history, expected = wandb_history(path), _csv_scalars(tracked_run / "metrics.csv")
    assert sorted(history) == [1, 2, 3, 4]
    for step, row in history.items():  # the rows, and a histogram of the batch's 20 weights
        assert row["lr"] == pytest.approx(expected["lr"][step]), step
        assert row["train_loss"] == pytest.approx(expected["train_loss"][step], rel=1e-6), step
        assert row["weights._type"] == "histogram" and sum(row["weights.values"]) == 20, step
    assert [s for s, row in history.items() if "val_accuracy" in row] == [2, 4]


@pytest.mark.slow
def test_summary_and_dataset_record_the_validation_split(tracked_run: Path) -> None:
    summary = json.loads((tracked_run / "summary.json").read_text())
    assert summary["objective"] == "val_accuracy" and summary["objective_is_test"] is False
    assert summary["objective_value"] == summary["val_accuracy"]
    info = json.loads((tracked_run / "dataset.json").read_text())
    assert info["split_sizes"]["val"] == 10 and info["val_class_counts"] == [5, 5]
    with (tracked_run / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["val_accuracy"] != "" for r in rows] == [False, True, False, True]


# -- the Python API ----------------------------------------------------------------------------


class Recorder:
    """A Logger of our own: what the Trainer calls, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def log_config(self, config):
        self.calls.append(("config", dict(config)))

    def log_row(self, step, row):
        self.calls.append(("row", step, dict(row)))

    def log_histogram(self, name, values, step):
        self.calls.append(("hist", name, step, values.numel()))

    def close(self):
        self.calls.append(("close",))


def _tiny_trainer(tmp: Path, max_steps: int, loggers, **kwargs) -> Trainer:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(120, 3, generator=g), torch.randint(0, 2, (120,), generator=g)
    train, meta = TensorDataset(x[:80], y[:80]), TensorDataset(x[80:100], y[80:100])
    val, test = TensorDataset(x[100:110], y[100:110]), TensorDataset(x[110:], y[110:])
    torch.manual_seed(0)
    return Trainer(
        nn.Linear(3, 2),
        train,
        meta,
        test,
        val_data=val,
        method="l2rw",
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        config=quiet(
            max_steps=max_steps, batch_size=10, meta_batch_size=10, eval_every=2, log_every=1
        ),
        checkpoint_path=tmp / "ckpt.pt",
        loggers=loggers,
        **kwargs,
    )


def test_trainer_calls_loggers_after_the_first_step_and_closes_them(tmp_path: Path) -> None:
    rec = Recorder()
    assert isinstance(rec, Logger)
    trainer = _tiny_trainer(tmp_path, 3, [rec], run_config={"lr": 0.1})
    result = trainer.fit()
    kinds = [c[0] for c in rec.calls]
    assert kinds == ["config", "row", "hist", "row", "hist", "row", "hist", "close"]
    assert rec.calls[0][1] == {"method": "l2rw", "lr": 0.1}
    assert [c[1] for c in rec.calls if c[0] == "row"] == [1, 2, 3]
    assert rec.calls[3][2]["val_accuracy"] == result.history[1]["val_accuracy"]
    assert result.metrics["val_accuracy"] == result.history[-1]["val_accuracy"]
    assert rec.calls[2][3] == 10  # one weight per example of the batch


def test_loggers_are_closed_on_errors_and_interrupts(tmp_path: Path) -> None:
    rec = Recorder()
    trainer = _tiny_trainer(tmp_path, 3, [rec])

    def fail(row):
        raise RuntimeError("boom")

    trainer.callbacks.append(fail)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit()
    assert rec.calls[-1] == ("close",)

    rec2 = Recorder()
    trainer = _tiny_trainer(tmp_path, 3, [rec2])

    def interrupt(row):
        raise TrainingInterrupted(int(row["step"]), 2, None)

    trainer.callbacks.append(interrupt)
    with pytest.raises(TrainingInterrupted):
        trainer.fit()
    assert rec2.calls[-1] == ("close",)


class StatusRecorder(Recorder):
    """A Recorder that notes the status it is closed with and whether the run's files were
    all written then (``summary.json``, written last, is there)."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__()
        self.run_dir = run_dir

    def close(self, status="FINISHED"):
        self.calls.append(("close", status, (self.run_dir / "summary.json").is_file()))


@pytest.mark.parametrize(
    ("stop", "status"),
    [
        (None, "FINISHED"),
        (OSError(28, "No space left on device"), "FAILED"),
        (KeyboardInterrupt(), "KILLED"),
    ],
)
def test_trackers_are_finished_only_once_the_run_files_are_written(
    tmp_path: Path, monkeypatch, stop, status
) -> None:
    """Trainer(run_dir=...): the trackers are closed after the run's files, FINISHED only when
    every one is written; an error while writing them (a full disk) is FAILED, a signal
    (KeyboardInterrupt) KILLED; ``on_end`` runs before the trackers close too."""
    import reweight.train.trainer as trainer_module

    write = trainer_module.write_trainer_files

    def writer(trainer, result):
        if stop is not None:
            raise stop
        return write(trainer, result)

    monkeypatch.setattr(trainer_module, "write_trainer_files", writer)
    rec = StatusRecorder(tmp_path / "run")
    trainer = _tiny_trainer(tmp_path, 2, [rec], run_dir=tmp_path / "run")
    ended = []
    if stop is None:
        trainer.fit(on_end=lambda result: ended.append(rec.calls[-1][0]))
        assert ended == ["hist"]  # on_end came after the last row, before close
    else:
        with pytest.raises(type(stop)):
            trainer.fit()
    assert rec.calls[-1] == ("close", status, stop is None)


def test_an_error_in_on_end_is_failed_in_the_trackers(tmp_path: Path) -> None:
    rec = StatusRecorder(tmp_path)
    trainer = _tiny_trainer(tmp_path, 2, [rec])

    def fail(result):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        trainer.fit(on_end=fail)
    assert rec.calls[-1] == ("close", "FAILED", False)


def test_tensorboard_resume_appends_without_duplicates(tmp_path: Path) -> None:
    log_dir = tmp_path / "tb"
    first = _tiny_trainer(tmp_path, 4, [TensorBoardLogger(log_dir)])
    first.fit()
    # a killed session: steps 5 and 6 logged after the checkpoint at step 4, never saved
    next_second()
    stray = TensorBoardLogger(log_dir)
    stray.log_row(5, {"lr": 99.0})
    stray.log_row(6, {"lr": 99.0})
    stray.close()
    next_second()
    second = _tiny_trainer(tmp_path, 6, [TensorBoardLogger(log_dir)])
    result = second.fit(resume=True)
    lr = _tb_scalars(log_dir)["lr"]
    assert [s for s, _ in lr] == [1, 2, 3, 4, 5, 6]
    assert all(v == pytest.approx(0.1) for _, v in lr)  # the stray 99s were purged
    loss = dict(_tb_scalars(log_dir)["train_loss"])
    assert loss == pytest.approx({int(r["step"]): r["train_loss"] for r in result.history})


def test_no_logger_file_before_the_first_step(tmp_path: Path) -> None:
    log_dir = tmp_path / "tb"
    trainer = _tiny_trainer(tmp_path, 2, [TensorBoardLogger(log_dir)])
    seen = []
    trainer.fit(on_start=lambda: seen.append(log_dir.exists()))
    assert seen == [False] and log_dir.is_dir()  # opened only after the first step


# -- the validation split -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "params"), [("mnist_imbalanced", {}), ("mnist_noisy", {"meta_per_class": 5})]
)
def test_validation_meta_test_train_are_disjoint(data_root, name, params) -> None:
    bundle = build_dataset(name, **params)
    assert bundle.val is not None and len(bundle.val) > 0
    train = set(bundle.train.source_indices.tolist())
    meta = set(bundle.meta.source_indices.tolist())
    val = set(bundle.val.source_indices.tolist())
    assert not (train & meta or train & val or meta & val)
    # test items come from MNIST's test split: no validation image equals a test image
    test_x = bundle.test.inputs.flatten(1)
    val_x = bundle.val.inputs.flatten(1)
    assert not (torch.cdist(val_x, test_x) == 0).any()
    assert bundle.info["split_sizes"]["val"] == len(bundle.val)
    k = bundle.num_classes
    assert bundle.val.labels.bincount(minlength=k).tolist() == [bundle.info["val_per_class"]] * k


def test_mnist_imbalanced_validation_leaves_train_and_meta_alone(data_root) -> None:
    """The paper's 20 training fours stay 20: its validation set comes from undrawn images."""
    with_val = build_dataset("mnist_imbalanced")
    without = build_dataset("mnist_imbalanced", val_per_class=0)
    assert without.val is None and len(with_val.val) == 10
    assert with_val.train_labels.bincount().tolist() == [20, 4970]
    for split in ("train", "meta", "test"):
        a, b = getattr(with_val, split), getattr(without, split)
        assert torch.equal(a.source_indices, b.source_indices), split


# -- the objective ------------------------------------------------------------------------------


def _cfg(*overrides: str):
    with initialize_config_module("reweight.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_objective_is_never_silently_a_test_metric() -> None:
    assert validate(_cfg()).objective == "val_accuracy"
    with pytest.raises(ValueError, match=r"objective=test_accuracy is a test-set metric.*"):
        validate(_cfg("objective=test_accuracy"))
    allowed = validate(_cfg("objective=test_accuracy", "objective_allow_test=true"))
    assert allowed.objective == "test_accuracy"
    with pytest.raises(ValueError, match=r"needs a validation set but dataset.val_per_class=0"):
        validate(_cfg("dataset.val_per_class=0"))
    with pytest.raises(ValueError, match=r"objective must be one of"):
        validate(_cfg("objective=train_loss"))


def test_cli_refuses_a_test_objective_in_one_line(tmp_path: Path) -> None:
    proc = _cli(
        [*TINY, "objective=test_accuracy", f"hydra.run.dir={tmp_path / 'run'}"],
        tmp_path,
        check=False,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1
    assert lines[0].startswith("error: objective=test_accuracy is a test-set metric")
    assert "objective_allow_test=true" in lines[0]
    assert not (tmp_path / "run").exists()


# -- an Optuna sweep ----------------------------------------------------------------------------


def _optuna_sweep(tmp: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return _cli(
        [
            "-m",
            *TINY,
            "method=mwnet",
            "hydra/sweeper=optuna",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.n_jobs=1",
            "hydra.sweeper.direction=maximize",
            "hydra.sweeper.sampler.seed=0",
            "method.lr=tag(log,interval(1e-4,1e-2))",
            "method.hidden=choice(10,20)",
            f"hydra.sweep.dir={tmp / 'sweep'}",
            *extra,
        ],
        tmp,
        check=check,
    )


@pytest.mark.slow
def test_optuna_sweep_optimises_val_accuracy(tmp_path: Path, data_root) -> None:
    _optuna_sweep(tmp_path)
    sweep = tmp_path / "sweep"
    summaries = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/summary.json"))]
    assert len(summaries) == 2
    assert all(s["objective"] == "val_accuracy" for s in summaries)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(s["val_accuracy"] for s in summaries)
    # the results table names a job with the best val_accuracy (by its overrides) and gives
    # that job's test accuracy, apart (every job's test accuracy is somewhere in the table)
    table = (sweep / "results.md").read_text()
    assert "val accuracy (%)" in table
    [line] = [r for r in table.splitlines() if r.startswith("Configuration chosen by val_accuracy")]
    top = max(s["val_accuracy"] for s in summaries)
    named = [
        json.loads((job / "summary.json").read_text())
        for job in sorted(p.parent for p in sweep.glob("*/summary.json"))
        if all(
            f"`{o}`" in line for o in yaml.safe_load((job / ".hydra/overrides.yaml").read_text())
        )
    ]
    assert len(named) == 1, line  # the two trials differ in method.lr at least
    assert named[0]["val_accuracy"] == top, line
    assert f"val_accuracy {100 * top:.2f}." in line
    assert line.endswith(f"not used in the choice: {100 * named[0]['test_accuracy']:.2f} %.")


@pytest.mark.slow
def test_optuna_sweep_refuses_a_test_objective(tmp_path: Path, data_root) -> None:
    proc = _optuna_sweep(tmp_path, "objective=test_accuracy", check=False)
    assert proc.returncode == 2
    assert "error: objective=test_accuracy is a test-set metric" in proc.stderr
    assert not list((tmp_path / "sweep").glob("*/summary.json"))


def test_every_train_return_is_the_objective() -> None:
    """The three places train() returns all go through _objective (a review guard: a new return
    of a raw test accuracy fails here)."""
    import inspect

    from reweight.cli import job

    source = inspect.getsource(job._train)
    returns = [line.strip() for line in source.splitlines() if line.strip().startswith("return")]
    assert returns and all(r.startswith("return _objective(cfg,") for r in returns), returns


# -- the logger config group --------------------------------------------------------------------


@pytest.mark.parametrize("option", ["csv", "tensorboard", "mlflow", "wandb"])
def test_every_logger_key_is_typed(option) -> None:
    import dataclasses
    import typing

    from reweight.cli.keys import LoggerConfig

    node = yaml.safe_load(
        (Path(__file__).parents[1] / "conf" / "logger" / f"{option}.yaml").read_text()
    )
    assert list(node) == [option]
    schema = typing.get_type_hints(LoggerConfig)[option]
    assert set(node[option] or {}) == {f.name for f in dataclasses.fields(schema)}


def test_several_loggers_compose_and_bad_values_are_refused() -> None:
    cfg = validate(_cfg("logger=[tensorboard,mlflow,wandb]"))
    assert set(cfg.logger) == {"tensorboard", "mlflow", "wandb"}
    assert cfg.logger.wandb.mode == "offline" and cfg.logger.mlflow.tracking_uri is None
    with pytest.raises(ValueError, match=r"logger\.wandb\.mode must be one of"):
        validate(_cfg("logger=wandb", "logger.wandb.mode=cloud"))
    with pytest.raises(ValueError, match=r"logger\.tensorboard\.flush_secs must be an integer"):
        validate(_cfg("logger=tensorboard", "logger.tensorboard.flush_secs=0"))


def test_starting_over_removes_the_old_runs_tracker_files(tmp_path: Path) -> None:
    """resume=false in a run directory: the replaced run's events, store and ids go with its
    other files (at the new run's first step), so no tracker mixes two runs."""
    from reweight.cli.run_dir import RunDir
    from reweight.core.files import TRACKER_DIRS, TRACKER_FILES

    run = tmp_path / "run"
    for name in TRACKER_DIRS:
        (run / name / "sub").mkdir(parents=True)
        (run / name / "sub" / "old").write_text("old")
    for name in TRACKER_FILES:
        (run / name).write_text("old")
    (run / "config.yaml").write_text("seed: 0\n")
    (run / "mine.txt").write_text("not a run file")
    with RunDir(run) as rd:
        assert rd.check("seed: 1\n", resume=False, max_steps=1) is None
        assert (run / "tensorboard" / "sub" / "old").exists()  # nothing before the commit
        rd.commit({"config.yaml": b"seed: 1\n"})
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "mine.txt"]


# -- how a run ended, as each tracker records it ------------------------------------------------


def _wandb_records(run_dir: Path) -> list:
    """Every record of the run's offline W&B files (what ``wandb sync`` uploads), session by
    session."""
    return [
        record
        for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
        for record in wandb_records(path)
    ]


def _mlflow_status(run_dir: Path) -> str:
    import mlflow

    run_id = (run_dir / "mlflow_run_id.txt").read_text().strip()
    with warnings.catch_warnings():  # MLflow's SQL store uses APIs SQLAlchemy 2.1 deprecates
        warnings.simplefilter("ignore", DeprecationWarning)
        client = mlflow.tracking.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
        return client.get_run(run_id).info.status


def _exit_codes(run_dir: Path) -> list[int]:
    return [
        r.exit.exit_code for r in _wandb_records(run_dir) if r.WhichOneof("record_type") == "exit"
    ]


@pytest.mark.slow
def test_an_interrupted_or_failed_run_is_not_finished_in_any_tracker(tmp_path, data_root):
    """SIGINT mid-run: MLflow's run KILLED, W&B's exit code non-zero; a run that diverges:
    FAILED and non-zero; the finished run (the fixture's, the same code path): FINISHED, 0."""
    import signal as signals

    run = tmp_path / "killed"
    args = [*TINY, "trainer.max_steps=400", "logger=[mlflow,wandb]", f"hydra.run.dir={run}"]
    proc = start_command([*REWEIGHT, *args], tmp_path, env=_env(tmp_path))
    signal_at(proc, "step 3:", signals.SIGINT)  # the trackers have opened
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err
    [line] = err.splitlines()
    assert line.startswith("interrupted at step ")
    assert _mlflow_status(run) == "KILLED"
    assert _exit_codes(run) and all(code != 0 for code in _exit_codes(run))

    run = tmp_path / "diverged"
    diverges = ["optimizer.lr=1e4", "trainer.max_steps=10", "trainer.checkpoint_every=2"]
    failed = _cli(
        [*TINY, *diverges, "logger=[mlflow,wandb]", f"hydra.run.dir={run}"], tmp_path, False
    )
    assert failed.returncode == 1, failed.stderr
    [line] = failed.stderr.splitlines()
    assert line.startswith("error: training loss is nan at step ")
    assert _mlflow_status(run) == "FAILED"
    assert _exit_codes(run) and all(code != 0 for code in _exit_codes(run))


# `python -m reweight` stopped while it draws the learning curves, after training and before
# summary.json: the drawing raises ENOSPC (a full disk), or the process sends itself SIGINT.
_STOPPED_IN_PLOTS = """
import errno, os, runpy, signal, sys
how = sys.argv.pop(1)
import reweight.train.run_files as files
draw = files.plot_learning_curves
def plot(*args, **kwargs):
    if how == "SIGINT":
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs before the next line
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[1]))  # args[1]: the file
files.plot_learning_curves = plot
runpy.run_module("reweight", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("how", "exit_status", "status"), [("disk_full", 1, "FAILED"), ("SIGINT", 130, "KILLED")]
)
def test_a_run_stopped_while_writing_its_files_is_not_finished_in_any_tracker(
    tmp_path, data_root, how, exit_status, status
):
    """Trained, then stopped before summary.json (a full disk, or Ctrl-C, while the plots are
    drawn): MLflow's run is FAILED / KILLED and W&B's exit code non-zero, not FINISHED and 0.
    The same command then writes the files and each tracker ends FINISHED, exit code 0."""
    run = tmp_path / "run"
    args = [*TINY, "logger=[mlflow,wandb]", f"hydra.run.dir={run}"]
    proc = run_command(
        [sys.executable, "-c", _STOPPED_IN_PLOTS, how, *args], tmp_path, env=_env(tmp_path)
    )
    assert proc.returncode == exit_status, proc.stderr
    [line] = proc.stderr.splitlines()
    if how == "SIGINT":
        assert line == "interrupted; run the same command to continue", line
    else:
        assert line.startswith("error: no space left on device writing "), line
        assert "learning_curves.png: free some space" in line, line
    assert not (run / "summary.json").exists()
    assert _mlflow_status(run) == status
    assert _exit_codes(run) and all(code != 0 for code in _exit_codes(run))
    _cli(args, tmp_path)  # the files are written now
    assert (run / "summary.json").is_file()
    assert _mlflow_status(run) == "FINISHED"
    assert _exit_codes(run)[-1] == 0


@pytest.mark.slow
def test_a_finished_run_is_finished_in_every_tracker(tracked_run: Path) -> None:
    assert _mlflow_status(tracked_run) == "FINISHED"
    assert _exit_codes(tracked_run) == [0]


@pytest.mark.slow
def test_after_sigkill_and_resume_every_tracker_has_each_step_once(tmp_path, data_root):
    """Killed (SIGKILL: nothing flushed, W&B's service loses its last rows) at step 15 with a
    checkpoint at step 10, then the same command: TensorBoard, MLflow and W&B each hold every
    step of 1..40 exactly once."""
    import signal as signals

    run = tmp_path / "run"
    args = [
        *[a for a in TINY if not a.startswith("trainer.max_steps")],
        "trainer.max_steps=40",
        "trainer.checkpoint_every=10",
        "logger=[tensorboard,mlflow,wandb]",
        f"hydra.run.dir={run}",
    ]
    proc = start_command(
        [*REWEIGHT, *args], tmp_path, env=_env(tmp_path), stderr=subprocess.DEVNULL
    )
    signal_at(proc, "step 15:", signals.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 10
    _cli(args, tmp_path)
    steps = list(range(1, 41))
    assert [s for s, _ in _tb_scalars(run / "tensorboard")["lr"]] == steps
    import mlflow

    run_id = (run / "mlflow_run_id.txt").read_text().strip()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        client = mlflow.tracking.MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
        assert sorted(m.step for m in client.get_metric_history(run_id, "lr")) == steps
    history = [r for r in _wandb_records(run) if r.WhichOneof("record_type") == "history"]
    assert sorted(r.history.step.num for r in history) == steps


# -- a missing extra ----------------------------------------------------------------------------


def test_every_extra_package_is_what_its_extra_installs() -> None:
    """The package a missing-extra message names is one that the extra in pyproject installs."""
    import tomllib

    from reweight.train.loggers import LOGGERS
    from reweight.train.trackers import EXTRA_PACKAGES

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert set(EXTRA_PACKAGES) == set(LOGGERS) - {"csv"}
    for extra, package in EXTRA_PACKAGES.items():
        assert any(req.startswith(package) for req in extras[extra]), (extra, extras[extra])


@pytest.mark.parametrize("extra", ["tensorboard", "mlflow", "wandb"])
def test_a_missing_extra_names_its_package_in_one_line(tmp_path: Path, data_root, extra) -> None:
    """The real CLI with the tracker's package shadowed by one that cannot be imported (as when
    the extra is not installed): one line naming that package (not torch), exit 2."""
    shadow = tmp_path / "shadow" / extra
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(
        f"raise ModuleNotFoundError(\"No module named '{extra}'\", name={extra!r})\n"
    )
    env = {**_env(tmp_path), "PYTHONPATH": str(tmp_path / "shadow")}
    proc = run_command(
        [*REWEIGHT, *TINY, f"logger={extra}", f"hydra.run.dir={tmp_path / 'run'}"],
        tmp_path,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: logger={extra} needs the {extra} package (No module named '{extra}'): "
        f'pip install "reweight[{extra}]"'
    ], proc.stderr
