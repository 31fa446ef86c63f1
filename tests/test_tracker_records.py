"""What the trackers (reweight.train.loggers) actually store, read back from their own files: the
real W&B (offline: its ``.wandb`` record log, parsed with W&B's own protobuf), MLflow (a local
SQLite store) and TensorBoard (event files) packages, no network.

- W&B: every row's scalars and the weight histogram, at their steps;
- MLflow: a resumed run logs the rows a killed session had already logged once, not twice;
- TensorBoard: ``close()`` leaves every row on disk (no timed flush needed).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from reweight.train.trackers import MLflowLogger, TensorBoardLogger, WandbLogger
from tests.helpers import next_second

_BLOCK, _FULL, _FIRST, _MIDDLE, _LAST = 32768, 1, 2, 3, 4


def wandb_records(path: Path) -> list[Any]:
    """The records of a ``run-<id>.wandb`` file (a LevelDB-style log of 32 KiB blocks after a
    7-byte header; each chunk: CRC32, length, type), as ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, parts, out = 7, [], []
    while pos + 7 <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < 7:  # a block's tail too short for a chunk header is padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        body, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (_FULL, _FIRST):
            parts = [body]
        elif kind in (_MIDDLE, _LAST):
            parts.append(body)
        else:
            raise AssertionError(f"chunk type {kind} at byte {pos} of {path}")
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            out.append(record)
    return out


def wandb_history(path: Path) -> dict[int, dict[str, Any]]:
    """{step: {key: value}} of the history records (nested keys joined by dots)."""
    history: dict[int, dict[str, Any]] = {}
    for record in wandb_records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row = history.setdefault(record.history.step.num, {})
        for item in record.history.item:
            key = ".".join(item.nested_key) if item.nested_key else item.key
            row[key] = json.loads(item.value_json)
    return history


def wandb_run_file(run_dir: Path, id_file: Path) -> Path:
    run_id = id_file.read_text().strip()
    [path] = (run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    return path


WEIGHTS = {1: torch.linspace(0.0, 2.0, 10), 2: torch.tensor([0.5, 1.5, 1.0, 1.0]), 3: torch.ones(6)}


def test_wandb_records_every_row_and_histogram(tmp_path: Path, wandb_env) -> None:
    run_dir, id_file = tmp_path / "run", tmp_path / "run" / "wandb_run_id.txt"
    logger = WandbLogger(run_dir, id_file)
    logger.log_config({"trainer": {"final_weights": 1}})  # a config key that holds "weights"
    for step, w in WEIGHTS.items():
        logger.log_row(step, {"step": step, "lr": 0.1 * step, "nan": float("nan")})
        logger.log_histogram("weights", w, step)
    logger.close()
    import wandb

    wandb.teardown()  # W&B's service writes the log out as it stops (as at the CLI's exit)
    history = wandb_history(wandb_run_file(run_dir, id_file))
    assert sorted(history) == [1, 2, 3]
    for step, w in WEIGHTS.items():
        row = history[step]
        assert row["lr"] == pytest.approx(0.1 * step) and "nan" not in row
        assert row["weights._type"] == "histogram", row
        assert sum(row["weights.values"]) == w.numel()  # every weight counted once
        bins = row["weights.bins"]
        assert bins[0] <= float(w.min()) and bins[-1] >= float(w.max())  # every weight in


# -- MLflow -------------------------------------------------------------------------------------


def mlflow_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    import mlflow

    with warnings.catch_warnings():  # MLflow's SQL store uses APIs SQLAlchemy 2.1 deprecates
        warnings.simplefilter("ignore", DeprecationWarning)
        client = mlflow.tracking.MlflowClient(uri)
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def mlflow_session(uri: str, id_file: Path, rows: dict[int, float]) -> None:
    logger = MLflowLogger(uri, id_file)
    logger.log_config({"method": "l2rw", "trainer": {"max_steps": 4}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for step, lr in rows.items():
            logger.log_row(step, {"step": step, "lr": lr, "train_loss": 1.0 / step})
            logger.log_histogram("weights", torch.full((4,), lr), step)
        logger.close()


def test_mlflow_resume_logs_each_step_once(tmp_path: Path) -> None:
    """A session logs steps 1-3 and is killed after its checkpoint at step 2; the resumed
    session makes step 3 again (another value: 99) and goes on to 4. MLflow keeps step 3 as
    first logged, once, for the rows and for the histogram's quantiles alike."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    id_file = tmp_path / "mlflow_run_id.txt"
    mlflow_session(uri, id_file, {1: 0.1, 2: 0.1, 3: 0.1})
    run_id = id_file.read_text().strip()
    mlflow_session(uri, id_file, {3: 99.0, 4: 0.1})
    assert id_file.read_text().strip() == run_id  # the same MLflow run goes on
    assert mlflow_history(uri, run_id, "lr") == [(1, 0.1), (2, 0.1), (3, 0.1), (4, 0.1)]
    loss = mlflow_history(uri, run_id, "train_loss")
    assert [s for s, _ in loss] == [1, 2, 3, 4]
    assert mlflow_history(uri, run_id, "weights/p50") == [
        (s, pytest.approx(0.1)) for s in range(1, 5)
    ]


# -- TensorBoard --------------------------------------------------------------------------------


def tb_events(log_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[int]]]:
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(
        str(log_dir), size_guidance={"scalars": 0, "histograms": 0}
    )
    acc.Reload()
    scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    hists = {t: [e.step for e in acc.Histograms(t)] for t in acc.Tags()["histograms"]}
    return scalars, hists


# A process that ends right after fit() returns: close() must have written every row, since
# TensorBoard's writer thread (a daemon) dies with the process and what it still queues is lost.
# The switch interval keeps that thread from running while the rows are logged (it runs when
# the main thread blocks, as in close()), so without a working close() no row reaches the file.
_ENDS_AFTER_CLOSE = """
import os, sys
from reweight.train.trackers import TensorBoardLogger

logger = TensorBoardLogger(sys.argv[1], flush_secs=3600)
sys.setswitchinterval(1e4)
for step in (1, 2, 3):
    logger.log_row(step, {"step": step, "lr": 0.5 * step})
logger.close()
os._exit(0)
"""


def test_tensorboard_close_writes_the_last_rows_before_the_process_ends(tmp_path: Path) -> None:
    script = tmp_path / "ends_after_close.py"
    script.write_text(_ENDS_AFTER_CLOSE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "tb")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    scalars, _ = tb_events(tmp_path / "tb")
    assert scalars.get("lr") == [(1, 0.5), (2, 1.0), (3, 1.5)]


def test_tensorboard_close_writes_every_row(tmp_path: Path) -> None:
    """In-process: rows and histograms on disk after ``close``; closed, the logger reopens on
    the next row (a later fit(resume=True)) and its close writes that row too."""
    log_dir = tmp_path / "tb"
    logger = TensorBoardLogger(log_dir, flush_secs=3600)
    logger.log_config({"method": "mwnet"})
    for step in (1, 2, 3):
        logger.log_row(step, {"step": step, "lr": 0.5 * step})
        logger.log_histogram("weights", torch.linspace(0, 2, 8), step)
    logger.close()
    scalars, hists = tb_events(log_dir)
    assert scalars["lr"] == [(1, 0.5), (2, 1.0), (3, 1.5)]
    assert hists["weights"] == [1, 2, 3]
    next_second()  # the reopened writer's file sorts after the first one's
    logger.log_row(4, {"step": 4, "lr": 2.0})
    logger.close()
    scalars, _ = tb_events(log_dir)
    assert scalars["lr"] == [(1, 0.5), (2, 1.0), (3, 1.5), (4, 2.0)]
