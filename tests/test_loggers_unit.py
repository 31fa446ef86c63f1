"""The trackers' plumbing (reweight.train.loggers, reweight.train.trackers) in-process: which
rows and values reach a tracker, the checks before the first step and their messages, the
loggers a config builds, closing them all, and what a resumed run hands them. The real packages
write to a temporary folder and are read back with their own readers (test_tracker_records.py
checks the records themselves)."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from reweight.core.files import LOGGER_FILES
from reweight.train.loggers import LOGGERS, LoggerGroup, build_loggers, close_all
from reweight.train.trackers import (
    MLflowLogger,
    TensorBoardLogger,
    WandbLogger,
    check_writable,
    flatten_config,
    scalars,
)
from tests.helpers import next_second

# -- rows and configs --------------------------------------------------------------------------


def test_flatten_config_joins_nested_keys_with_dots():
    config = {"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None, "f": {}}
    assert flatten_config(config) == {"a.b": 1, "a.c.d": [1, 2], "e": None}
    assert flatten_config({"x": 1}, prefix="p.") == {"p.x": 1}


def test_scalars_are_the_finite_numbers_but_step():
    row = {"step": 3, "lr": 0.5, "n": 2, "flag": True, "name": "x", "nan": math.nan,
           "inf": math.inf, "neg": -1.5}  # fmt: skip
    out = scalars(row)
    assert out == {"lr": 0.5, "n": 2.0, "neg": -1.5}
    assert all(type(v) is float for v in out.values())


# -- the checks before the first step ----------------------------------------------------------


def test_check_writable_names_what_is_in_the_way(tmp_path: Path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    with pytest.raises(ValueError) as info:
        check_writable(tmp_path / "file", "logger.wandb.dir")
    assert str(info.value) == (
        f"logger.wandb.dir: {tmp_path / 'file'} is in the way, it should be a folder: move it, "
        "or choose another logger.wandb.dir"
    )
    with pytest.raises(ValueError) as info:
        check_writable(tmp_path / "dir", "logger=mlflow", folder=False)
    assert str(info.value) == (
        f"logger=mlflow: {tmp_path / 'dir'} is in the way, it should be a file: move it"
    )
    with pytest.raises(ValueError) as info:
        check_writable(tmp_path / "file" / "a" / "b", "logger=tensorboard")
    assert str(info.value) == (
        f"logger=tensorboard: {tmp_path / 'file'} is a file, not a folder: move it"
    )
    check_writable(tmp_path / "dir", "logger=tensorboard")
    check_writable(tmp_path / "file", "logger=mlflow", folder=False)
    check_writable(tmp_path / "new" / "deeper", "logger=tensorboard")


def test_check_writable_asks_for_the_right_permissions(tmp_path: Path, denied):
    refused, asked = denied
    (tmp_path / "dir").mkdir()
    (tmp_path / "db").write_text("")
    check_writable(tmp_path / "dir", "k")
    check_writable(tmp_path / "db", "k", folder=False)  # SQLite's journal goes beside it
    check_writable(tmp_path / "new" / "x", "k")
    wx = os.W_OK | os.X_OK
    assert asked == [
        (tmp_path / "dir", wx),
        (tmp_path / "db", os.W_OK),
        (tmp_path, wx),
        (tmp_path, wx),
    ]
    refused.add(tmp_path)
    with pytest.raises(ValueError) as info:
        check_writable(tmp_path / "db", "logger.mlflow.tracking_uri", folder=False)
    assert str(info.value) == (
        f"logger.mlflow.tracking_uri: cannot write to {tmp_path} (permission denied): fix the "
        "permissions, or choose another logger.mlflow.tracking_uri"
    )
    with pytest.raises(ValueError) as info:
        check_writable(tmp_path / "new", "logger=tensorboard")
    assert str(info.value) == (
        f"logger=tensorboard: cannot write to {tmp_path} (permission denied): fix the permissions"
    )


def test_each_tracker_checks_its_own_places(tmp_path: Path, denied, monkeypatch):
    _refused, asked = denied
    TensorBoardLogger(tmp_path / "tb").check()
    assert asked == [(tmp_path, os.W_OK | os.X_OK)]
    asked.clear()
    monkeypatch.setitem(sys.modules, "wandb", sys.modules.get("wandb") or _import("wandb"))
    WandbLogger(tmp_path / "w", tmp_path / "id").check()
    assert asked == [(tmp_path, os.W_OK | os.X_OK)] * 2
    (tmp_path / "w").write_text("a file")
    with pytest.raises(ValueError, match=r"^logger\.wandb\.dir: \S+ is in the way"):
        WandbLogger(tmp_path / "w", tmp_path / "id").check()
    (tmp_path / "w").unlink()
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "wandb").write_text("a file")
    with pytest.raises(ValueError, match=r"^logger\.wandb\.dir: \S+/w/wandb is in the way"):
        WandbLogger(tmp_path / "w", tmp_path / "id").check()


def _import(name: str):
    import importlib

    return importlib.import_module(name)


@pytest.mark.parametrize(
    ("uri", "artifacts", "checked", "key"),
    [
        ("sqlite:///{t}/m.db", None, "{t}/m.db", "logger.mlflow.tracking_uri"),
        ("file://{t}/store", None, "{t}/store", "logger.mlflow.tracking_uri"),
        ("file:{t}/store", None, "{t}/store", "logger.mlflow.tracking_uri"),
        ("{t}/store", None, "{t}/store", "logger.mlflow.tracking_uri"),
        ("http://localhost:1", "file://{t}/art", "{t}/art", "logger=mlflow"),
    ],
)
def test_mlflow_checks_a_local_store_and_its_artifacts(tmp_path, uri, artifacts, checked, key):
    t = str(tmp_path)
    in_the_way = Path(checked.format(t=t))
    folder = not uri.startswith("sqlite")
    if folder:
        in_the_way.write_text("a file")
    else:
        in_the_way.mkdir()
    logger = MLflowLogger(uri.format(t=t), tmp_path / "id", artifact_location=(
        artifacts.format(t=t) if artifacts else None))  # fmt: skip
    with pytest.raises(ValueError) as info:
        logger.check()
    assert str(info.value).startswith(f"{key}: {in_the_way} is in the way, it should be a ")
    in_the_way.unlink() if folder else in_the_way.rmdir()
    logger.check()


def test_mlflow_refuses_a_scheme_it_has_no_store_for(tmp_path: Path):
    logger = MLflowLogger("htp://localhost:5000", tmp_path / "id")
    with pytest.raises(ValueError) as info:
        logger.check()
    assert str(info.value).startswith(
        "logger.mlflow.tracking_uri='htp://localhost:5000': MLflow has no tracking store for "
    )
    assert "http, https" in str(info.value) and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing written, no store built


def test_a_server_is_not_checked(tmp_path: Path, denied):
    _refused, asked = denied
    MLflowLogger("http://localhost:1", tmp_path / "id", artifact_location="s3://b/x").check()
    assert asked == []


def test_a_missing_package_is_one_line_with_the_install(monkeypatch, tmp_path: Path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ValueError) as info:
        WandbLogger(tmp_path, tmp_path / "id")
    assert str(info.value).startswith("logger=wandb needs the wandb package (")
    assert str(info.value).endswith('): pip install "reweight[wandb]"')
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ValueError, match=r"^logger=mlflow needs the mlflow package \(.*mlflow"):
        MLflowLogger("sqlite:///x.db", tmp_path / "id")


def test_wandb_mode_is_checked_first(tmp_path: Path):
    with pytest.raises(ValueError) as info:
        WandbLogger(tmp_path, tmp_path / "id", mode="cloud")
    assert str(info.value) == "logger.wandb.mode must be offline, online or disabled, got 'cloud'"
    for mode in ("offline", "online", "disabled"):
        assert WandbLogger(tmp_path, tmp_path / "id", mode=mode).mode == mode


# -- the loggers a config builds ---------------------------------------------------------------


def test_build_loggers_puts_each_tracker_in_the_run_dir(tmp_path: Path):
    run = tmp_path / "run"
    options = {"csv": None, "tensorboard": {"flush_secs": 3}, "mlflow": None, "wandb": None}
    tb, ml, wb = build_loggers(options, run, files=LOGGER_FILES, run_name="r1")
    assert isinstance(tb, TensorBoardLogger)
    assert (tb.log_dir, tb.flush_secs) == (run / "tensorboard", 3)
    assert isinstance(ml, MLflowLogger)
    assert ml.tracking_uri == f"sqlite:///{(run / 'mlflow.db').resolve()}"
    assert ml.artifact_location == (run / "mlruns").resolve().as_uri()
    assert (ml.id_file, ml.run_name, ml.experiment) == (run / "mlflow_run_id.txt", "r1", "reweight")
    assert isinstance(wb, WandbLogger)
    assert (wb.directory, wb.id_file, wb.run_name) == (run, run / "wandb_run_id.txt", "r1")
    assert (wb.mode, wb.project) == ("offline", "reweight")
    [ml] = build_loggers(
        {"mlflow": {"tracking_uri": "http://h:1", "experiment": "e"}}, run, files=LOGGER_FILES
    )
    assert (ml.tracking_uri, ml.artifact_location, ml.experiment) == ("http://h:1", None, "e")
    assert ml.run_name is None
    [wb] = build_loggers(
        {"wandb": {"dir": str(tmp_path / "w"), "mode": "disabled"}}, run, files=LOGGER_FILES
    )
    assert (wb.directory, wb.mode, wb.id_file) == (
        tmp_path / "w",
        "disabled",
        run / "wandb_run_id.txt",
    )
    assert build_loggers({"csv": {}}, run, files=LOGGER_FILES) == []
    with pytest.raises(ValueError) as info:
        build_loggers({"neptune": None}, run, files=LOGGER_FILES)
    assert str(info.value) == (f"logger=neptune is not a logger; choose from {', '.join(LOGGERS)}")
    assert not run.exists()  # nothing written


# -- closing and the group ---------------------------------------------------------------------


class Recorder:
    def __init__(self, steps=None, fail=None, status=False):
        self.calls: list[tuple] = []
        self.steps, self.fail = steps, fail
        if status:
            self.close = self._close_with_status  # type: ignore[method-assign]

    def log_config(self, config):
        self.calls.append(("config", dict(config)))

    def log_row(self, step, row):
        self.calls.append(("row", step, dict(row)))

    def log_histogram(self, name, values, step):
        self.calls.append(("hist", name, step, values.tolist()))

    def close(self):
        self.calls.append(("close",))
        if self.fail:
            raise self.fail

    def _close_with_status(self, status="FINISHED"):
        self.calls.append(("close", status))
        if self.fail:
            raise self.fail


class Knows(Recorder):
    def has_step(self, step):
        self.calls.append(("has", step))
        return step in self.steps


def test_close_all_closes_every_logger_then_raises_the_first_error():
    first, second = RuntimeError("first"), OSError("second")
    loggers = [Recorder(fail=first), Recorder(status=True), Recorder(fail=second, status=True)]
    with pytest.raises(RuntimeError) as info:
        close_all(loggers, status="KILLED")
    assert info.value is first
    assert [r.calls for r in loggers] == [
        [("close",)],
        [("close", "KILLED")],
        [("close", "KILLED")],
    ]
    close_all([Recorder(status=True)])
    ok = Recorder(status=True)
    close_all([ok])
    assert ok.calls == [("close", "FINISHED")]


def test_the_group_logs_the_config_once_the_backlog_where_missing_and_histograms():
    plain, knows = Recorder(), Knows(steps={1})
    group = LoggerGroup([plain, knows], {"method": "l2rw"})
    group.backlog = [{"step": 1, "lr": 0.1}, {"step": 2, "lr": 0.2}]
    w = torch.tensor([0.5, 1.5])
    group.log(3, {"step": 3, "lr": 0.3}, w)
    group.log(4, {"step": 4, "lr": 0.4})
    assert plain.calls == [
        ("config", {"method": "l2rw"}),
        ("row", 3, {"step": 3, "lr": 0.3}),
        ("hist", "weights", 3, [0.5, 1.5]),
        ("row", 4, {"step": 4, "lr": 0.4}),
    ]
    assert knows.calls == [
        ("config", {"method": "l2rw"}),
        ("has", 1),
        ("has", 2),
        ("row", 2, {"step": 2, "lr": 0.2}),
        ("row", 3, {"step": 3, "lr": 0.3}),
        ("hist", "weights", 3, [0.5, 1.5]),
        ("row", 4, {"step": 4, "lr": 0.4}),
    ]
    assert group.backlog == []
    group.close("FAILED")
    assert plain.calls[-1] == ("close",)
    empty = LoggerGroup([], {})
    empty.log(1, {"step": 1})
    late = Recorder()
    empty.loggers.append(late)  # no logger had the config yet: it gets it
    empty.log(2, {"step": 2})
    assert late.calls[0] == ("config", {})


def test_the_group_hands_its_status_to_close_finished_by_default():
    told, plain = Recorder(status=True), Recorder()
    LoggerGroup([told, plain], {}).close()
    assert (told.calls, plain.calls) == ([("close", "FINISHED")], [("close",)])
    killed = Recorder(status=True)
    LoggerGroup([killed], {}).close("KILLED")
    assert killed.calls == [("close", "KILLED")]


# -- TensorBoard -------------------------------------------------------------------------------


def tb_events(log_dir: Path):
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(
        str(log_dir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0}
    )
    acc.Reload()
    return acc


def test_tensorboard_writes_the_config_with_the_first_row_and_knows_its_steps(tmp_path: Path):
    log_dir = tmp_path / "tb"
    logger = TensorBoardLogger(log_dir, flush_secs=3600)
    assert not logger.has_step(0) and logger.has_step(-1)  # nothing on disk: step -1
    logger.log_config({"b": 2, "a": {"c": "x"}})
    logger.log_row(2, {"step": 2, "lr": 0.5, "flag": True})
    logger.log_histogram("weights", torch.tensor([0.0, 1.0, 1.0, 3.0], dtype=torch.float64), 2)
    logger.log_row(3, {"step": 3, "lr": 0.25})
    logger.close()
    logger.close()  # closed twice: nothing more
    acc = tb_events(log_dir)
    assert [(e.step, e.value) for e in acc.Scalars("lr")] == [(2, 0.5), (3, 0.25)]
    assert acc.Tags()["scalars"] == ["lr"]
    [hist] = acc.Histograms("weights")
    assert (hist.step, hist.histogram_value.num, hist.histogram_value.sum) == (2, 4, 5.0)
    [text] = acc.Tensors("config/text_summary")
    assert text.step == 2
    shown = text.tensor_proto.string_val[0].decode()
    assert shown == '```\n{\n  "a": {\n    "c": "x"\n  },\n  "b": 2\n}\n```'
    next_second()  # the second session's file sorts after the first one's
    again = TensorBoardLogger(log_dir)
    assert again.has_step(3) and again.has_step(2) and not again.has_step(4)
    again.log_row(4, {"lr": 1.0})
    assert not again.has_step(1)  # writing: whatever it is given is new
    again.close()
    assert [e.step for e in tb_events(log_dir).Scalars("lr")] == [2, 3, 4]


def test_a_torn_event_file_counts_what_was_read(tmp_path: Path):
    log_dir = tmp_path / "tb"
    logger = TensorBoardLogger(log_dir)
    for step in (1, 2):
        logger.log_row(step, {"lr": 0.1})
    logger.close()
    (log_dir / "events.out.tfevents.0.torn").write_bytes(b"\x00" * 5)
    assert TensorBoardLogger(log_dir).has_step(2)
    assert not TensorBoardLogger(log_dir).has_step(3)


# -- MLflow ------------------------------------------------------------------------------------


def mlflow_client(uri: str):
    import mlflow

    return mlflow.tracking.MlflowClient(uri)


def test_mlflow_run_params_quantiles_and_status(tmp_path: Path, mlflow_quiet):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    id_file = tmp_path / "sub" / "id.txt"
    logger = MLflowLogger(uri, id_file, experiment="exp", run_name="r",
                          artifact_location=(tmp_path / "art").as_uri())  # fmt: skip
    config = {"a": {"b": 1}, "long": "x" * 7000, **{f"k{i}": i for i in range(120)}}
    logger.log_config(config)
    assert not logger.has_step(0)
    values = torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0])
    logger.log_histogram("weights", values, 1)
    logger.log_histogram("weights", torch.empty(0), 2)  # empty: nothing
    logger.log_row(1, {"step": 1, "lr": 0.1, "nan": math.nan})
    assert logger.has_step(1) and not logger.has_step(2)
    logger.log_row(1, {"step": 1, "lr": 99.0})  # logged already: skipped
    logger.close(status="KILLED")
    client = mlflow_client(uri)
    run_id = id_file.read_text().strip()
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.info.run_name == "r"
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "exp" and exp.artifact_location == (tmp_path / "art").as_uri()
    params = run.data.params
    assert len(params) == 2 + 120 and params["a.b"] == "1" and params["long"] == "x" * 6000
    for p, q in zip((10, 50, 90), np.quantile(values.numpy(), [0.1, 0.5, 0.9]), strict=True):
        [m] = client.get_metric_history(run_id, f"weights/p{p}")
        assert (m.step, m.value) == (1, pytest.approx(float(q)))
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "lr")] == [(1, 0.1)]
    assert "nan" not in run.data.metrics
    # a second session: the same run, RUNNING again, no params re-logged, the same experiment
    again = MLflowLogger(uri, id_file, experiment="exp")
    again.log_config(config)
    assert again.has_step(1) and not again.has_step(2)
    assert client.get_run(run_id).info.status == "RUNNING"
    again.log_histogram("weights", values, 1)  # before the resume: not again
    again.log_row(2, {"lr": 0.2})
    again.close()
    assert client.get_run(run_id).info.status == "FINISHED"
    assert len(client.get_metric_history(run_id, "weights/p50")) == 1
    assert [m.step for m in client.get_metric_history(run_id, "lr")] == [1, 2]
    third = MLflowLogger(uri, tmp_path / "other.txt", experiment="exp")
    third.log_row(1, {"lr": 1.0})
    third.close()
    other = client.get_run(third_id := (tmp_path / "other.txt").read_text().strip())
    assert other.info.experiment_id == run.info.experiment_id and third_id != run_id
    third.close()  # closed: nothing


def test_mlflow_run_finished_by_a_session_that_logged_nothing(tmp_path: Path, mlflow_quiet):
    """A session stopped while writing the run's files ends the run KILLED; the next session,
    with no step left, writes them and ends it FINISHED without logging (reopened). A session
    that logged nothing and ends otherwise, or a logger closed twice, changes nothing."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    id_file = tmp_path / "id.txt"
    first = MLflowLogger(uri, id_file)
    first.log_row(1, {"lr": 0.1})
    first.close(status="KILLED")
    first.close()  # this logger opened and closed the run: nothing
    client, run_id = mlflow_client(uri), id_file.read_text().strip()
    assert client.get_run(run_id).info.status == "KILLED"
    MLflowLogger(uri, id_file).close(status="FAILED")  # logged nothing, not finished: nothing
    assert client.get_run(run_id).info.status == "KILLED"
    MLflowLogger(uri, id_file).close()
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "lr")] == [1]
    MLflowLogger(uri, tmp_path / "none.txt").close()  # no run yet: none made
    assert not (tmp_path / "none.txt").exists()


# -- W&B ---------------------------------------------------------------------------------------


class FakeRun:
    def __init__(self, calls):
        self.calls = calls

    def log(self, data, step):
        self.calls.append(("log", sorted(data), step))

    def finish(self, exit_code):
        self.calls.append(("finish", exit_code))


class FakeWandb:
    """wandb's init/Histogram/Settings, recording what the logger asks of them."""

    def __init__(self):
        self.calls: list[tuple] = []

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        return FakeRun(self.calls)

    def Histogram(self, values):
        return ("histogram", values.tolist())

    def Settings(self, **kwargs):
        return kwargs


def test_wandb_init_steps_and_exit_codes(tmp_path: Path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    id_file = tmp_path / "ids" / "wandb_run_id.txt"
    logger = WandbLogger(tmp_path / "dir", id_file, project="p", entity="e", run_name="n")
    logger.log_config({"a": 1})
    logger.log_row(2, {"step": 2, "lr": 0.1})
    logger.log_histogram("weights", torch.tensor([1.0, 2.0]), 2)
    logger.log_row(2, {"lr": 0.2})  # logged: skipped
    logger.log_histogram("weights", torch.tensor([1.0]), 1)  # behind: skipped
    assert logger.has_step(2) and not logger.has_step(3)
    logger.close(status="FAILED")
    logger.close()  # closed: nothing
    run_id = id_file.read_text().strip()
    assert len(run_id) == 12 and id_file.read_text() == run_id + "\n"
    assert (tmp_path / "dir").is_dir()
    [(_, init)] = [c for c in fake.calls if c[0] == "init"]
    assert init == {
        "project": "p", "entity": "e", "name": "n", "id": run_id, "resume": "allow",
        "dir": str(tmp_path / "dir"), "mode": "offline", "config": {"a": 1},
        "settings": {"silent": True, "console": "off"}, "reinit": "create_new",
    }  # fmt: skip
    assert fake.calls[1:] == [
        ("log", ["lr"], 2),
        ("log", ["weights"], 2),
        ("finish", 1),
    ]
    fake.calls.clear()
    again = WandbLogger(tmp_path / "dir", id_file, mode="disabled")
    again.log_row(1, {"lr": 0.1})
    again.close()
    assert fake.calls[0][1]["id"] == run_id and fake.calls[0][1]["config"] == {}
    assert fake.calls[1:] == [("log", ["lr"], 1), ("finish", 0)]


def test_wandb_run_finished_by_a_session_that_logged_nothing(tmp_path: Path, monkeypatch):
    """With the run's id on disk, a logger that logged nothing reopens the run only to finish
    it with 0 (the run's files were written by its session); it never reopens to fail it, and
    without an id there is no run to finish."""
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    id_file = tmp_path / "wandb_run_id.txt"
    WandbLogger(tmp_path, id_file).close()
    WandbLogger(tmp_path, id_file).close(status="KILLED")
    assert fake.calls == [] and not id_file.exists()
    id_file.write_text("abc123\n")
    WandbLogger(tmp_path, id_file).close(status="KILLED")
    assert fake.calls == []
    WandbLogger(tmp_path, id_file).close()
    assert [c[0] for c in fake.calls] == ["init", "finish"]
    assert fake.calls[0][1]["id"] == "abc123" and fake.calls[1] == ("finish", 0)
