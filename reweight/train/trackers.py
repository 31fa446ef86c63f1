"""The experiment trackers' writers: TensorBoard, W&B and MLflow (``reweight.train.loggers``
builds them from the ``logger`` config block and defines the ``Logger`` protocol).

Why lazy: a run writes nothing before its first training step (``reweight.cli.run_dir``), so
the writers below open their files on the first call, which the Trainer makes after that step.
``close`` may be followed by more calls (the writer reopens), which is how ``Trainer.fit``
closes them on success, interrupt and error alike and a later ``fit(resume=True)`` goes on.
``close("FINISHED")`` comes only once the run's files are written; a session that finishes a
run without logging a row (its steps were done, its files were not) reopens MLflow's and W&B's
run to end it FINISHED.

Resuming: a run killed between its last checkpoint and the kill had logged rows that are made
again, and a tracker may have lost rows from before its checkpoint (W&B's service writes its
file behind the run: a SIGKILL loses its last rows). So a resumed run hands the trackers its
history from the checkpoint first, then its new rows, and each keeps every step once.
TensorBoard reopens with ``purge_step`` = the first step it is given (the events from that
step on are dropped, the standard TensorBoard remedy); MLflow skips steps at or below the last
step stored for the run; W&B (offline: one folder per session, one run id) skips steps at or
below the last one its earlier sessions wrote to disk, or this process logged.

The tracking packages are optional extras (``pip install "reweight[tensorboard]"``, ``[wandb]``,
``[mlflow]``); each is imported when its logger is built, with the install line if missing.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "EXTRA_PACKAGES",
    "MLflowLogger",
    "TensorBoardLogger",
    "WandbLogger",
    "check_writable",
    "flatten_config",
    "scalars",
]

log = logging.getLogger(__name__)


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: the key paths a tracker's parameter table shows."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_config(value, prefix=f"{name}."))
        else:
            out[name] = value
    return out


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The row's finite numeric values less ``step`` (NaN marks "not measured" in a row)."""
    out = {}
    for key, value in row.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


def check_writable(path: Path, key: str, folder: bool = True) -> None:
    """``ValueError`` naming ``path`` and ``key`` (the setting that chose it) when a tracker
    could not write there: a file where a folder goes (or the reverse), no permission. Checked
    before the first training step, so that a run that cannot track writes nothing."""
    fix = f"move it, or choose another {key}" if key.startswith("logger.") else "move it"
    if path.exists():
        if path.is_dir() != folder:
            kind = "a folder" if folder else "a file"
            raise ValueError(f"{key}: {path} is in the way, it should be {kind}: {fix}")
        targets = [path] if folder else [path, path.parent]  # SQLite writes a journal beside
    else:
        existing = next(p for p in path.absolute().parents if p.exists())
        if not existing.is_dir():
            raise ValueError(f"{key}: {existing} is a file, not a folder: {fix}")
        targets = [existing]
    for target in targets:
        if not os.access(target, os.W_OK | (os.X_OK if target.is_dir() else 0)):
            raise ValueError(
                f"{key}: cannot write to {target} (permission denied): fix the permissions"
                + (f", or choose another {key}" if key.startswith("logger.") else "")
            )


EXTRA_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
"""The package each tracker's extra installs (``pyproject.toml``), named when it is missing."""


def _require(module: str, extra: str) -> Any:
    """``import module``, or one line naming the missing package and the extra that installs it
    (``torch.utils.tensorboard`` is part of torch but needs the ``tensorboard`` package)."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ValueError(
            f"logger={extra} needs the {EXTRA_PACKAGES[extra]} package ({err}): "
            f'pip install "reweight[{extra}]"'
        ) from err


def _tensorboard_last_step(log_dir: Path) -> int:
    """The last step of a scalar in the event files under ``log_dir``, or -1."""
    if not log_dir.is_dir():
        return -1
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    last = -1
    for path in log_dir.glob("events.out.tfevents.*"):
        try:
            for event in EventFileLoader(str(path)).Load():
                if event.HasField("summary"):
                    last = max(last, int(event.step))
        except Exception:  # a torn file: what was read before counts
            continue
    return last


class TensorBoardLogger:
    """Event files in ``log_dir`` (``tensorboard --logdir <run dir>/tensorboard``): one scalar
    per row key, the weight histogram, the config as text."""

    def __init__(self, log_dir: str | os.PathLike, flush_secs: int = 10) -> None:
        self._module = _require("torch.utils.tensorboard", "tensorboard")
        self.log_dir = Path(log_dir)
        self.flush_secs = flush_secs
        self._writer: Any = None
        self._config: Mapping[str, Any] | None = None
        self._on_disk: int | None = None  # the last step in the event files before this process

    def has_step(self, step: int) -> bool:
        """Whether the event files already hold ``step`` (a resumed run's earlier rows)."""
        if self._on_disk is None:
            self._on_disk = _tensorboard_last_step(self.log_dir)
        return self._writer is None and step <= self._on_disk

    def _open(self, step: int) -> Any:
        if self._writer is None:
            # purge_step: events at or after `step` left by a killed session are dropped
            self._writer = self._module.SummaryWriter(
                str(self.log_dir), purge_step=step, flush_secs=self.flush_secs
            )
            if self._config is not None:
                text = json.dumps(self._config, indent=2, sort_keys=True, default=str)
                self._writer.add_text("config", f"```\n{text}\n```", global_step=step)
        return self._writer

    def check(self) -> None:
        """Before the first step: ``ValueError`` if ``log_dir`` cannot be written."""
        check_writable(self.log_dir, "logger=tensorboard")

    def log_config(self, config: Mapping[str, Any]) -> None:
        self._config = dict(config)  # written with the first row (the step it needs is there)

    def log_row(self, step: int, row: Mapping[str, float]) -> None:
        writer = self._open(step)
        for key, value in scalars(row).items():
            writer.add_scalar(key, value, global_step=step)

    def log_histogram(self, name: str, values: Tensor, step: int) -> None:
        self._open(step).add_histogram(name, values.detach().float().cpu(), global_step=step)

    def close(self, status: str = "FINISHED") -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class _EachStepOnce:
    """A tracker whose store knows the last step it holds (``_last_step``, which ``_open``
    reads from the store: W&B's earlier sessions on disk, MLflow's run): the rows of a resumed
    run at or below it are skipped, so that every step is logged once."""

    _last_step: int
    _config: Mapping[str, Any] | None

    def _open(self) -> Any:
        raise NotImplementedError

    def _write_row(self, opened: Any, step: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def log_config(self, config: Mapping[str, Any]) -> None:
        self._config = dict(config)

    def has_step(self, step: int) -> bool:
        """Whether the store already has ``step`` (a resumed run's earlier rows), or this
        process logged it."""
        self._open()
        return step <= self._last_step

    def log_row(self, step: int, row: Mapping[str, float]) -> None:
        opened = self._open()
        if step <= self._last_step:
            return  # logged before a resume
        self._write_row(opened, step, scalars(row))
        self._last_step = step


class MLflowLogger(_EachStepOnce):
    """A run in an MLflow tracking store; by default a local SQLite store in the run
    directory, ``<run dir>/mlflow.db`` with artifacts in ``<run dir>/mlruns`` (``mlflow ui
    --backend-store-uri sqlite:///<run dir>/mlflow.db``; MLflow 3 refuses its old ``./mlruns``
    file store unless ``MLFLOW_ALLOW_FILE_STORE=true``). Metrics per row with the step, the
    flattened config as parameters; MLflow has no histograms, so the weight histogram is
    logged as its quantiles (``weights/p10`` ...). The run id is kept in ``id_file`` so that a
    resumed run continues the same MLflow run."""

    def __init__(
        self,
        tracking_uri: str,
        id_file: str | os.PathLike,
        experiment: str = "reweight",
        run_name: str | None = None,
        artifact_location: str | None = None,
    ) -> None:
        self._mlflow = _require("mlflow", "mlflow")
        self.tracking_uri = tracking_uri
        self.id_file = Path(id_file)
        self.experiment = experiment
        self.run_name = run_name
        self.artifact_location = artifact_location
        self._client: Any = None
        self._run_id: str | None = None
        self._last_step = -1
        self._stored_step = -1  # the last step of the run already in the store when opened
        self._config: Mapping[str, Any] | None = None
        self._opened = False  # by this logger: then close() never reopens

    def _open(self) -> tuple[Any, str]:
        if self._client is None or self._run_id is None:
            # MLflow announces the making of its SQLite tables on stderr, where a run keeps
            # its one line for an error or an interrupt
            for name in ("mlflow.store.db.utils", "alembic"):
                logging.getLogger(name).setLevel(logging.WARNING)
            client = self._mlflow.tracking.MlflowClient(tracking_uri=self.tracking_uri)
            run_id = self.id_file.read_text().strip() if self.id_file.is_file() else ""
            if run_id:
                history = client.get_metric_history(run_id, "lr")
                self._last_step = max((m.step for m in history), default=-1)
                self._stored_step = self._last_step
                client.update_run(run_id, status="RUNNING")
            else:
                exp = client.get_experiment_by_name(self.experiment)
                exp_id = (
                    exp.experiment_id
                    if exp
                    else client.create_experiment(
                        self.experiment, artifact_location=self.artifact_location
                    )
                )
                run_id = client.create_run(exp_id, run_name=self.run_name).info.run_id
                self.id_file.parent.mkdir(parents=True, exist_ok=True)
                self.id_file.write_text(run_id + "\n")
            self._client, self._run_id, self._opened = client, run_id, True
            if self._config is not None:
                params = [
                    self._mlflow.entities.Param(k, str(v)[:6000])
                    for k, v in flatten_config(self._config).items()
                ]
                if run_id and self._last_step >= 0:
                    params = []  # logged by the first session (MLflow refuses a re-log)
                for i in range(0, len(params), 100):
                    client.log_batch(run_id, params=params[i : i + 100])
        return self._client, self._run_id

    def check(self) -> None:
        """Before the first step: ``ValueError`` if a local store (``sqlite:///`` or
        ``file:``) or its artifact folder cannot be written; a server is not contacted."""
        uri = self.tracking_uri
        _check_mlflow_scheme(uri)
        if uri.startswith("sqlite:///"):
            check_writable(Path(uri[len("sqlite:///") :]), "logger.mlflow.tracking_uri", False)
        elif uri.startswith("file:") or "://" not in uri:
            check_writable(
                Path(uri.removeprefix("file://").removeprefix("file:")),
                "logger.mlflow.tracking_uri",
            )
        if self.artifact_location and self.artifact_location.startswith("file:"):
            check_writable(Path(self.artifact_location.removeprefix("file://")), "logger=mlflow")

    def _write_row(self, opened: Any, step: int, values: dict[str, float]) -> None:
        client, run_id = opened
        now = _millis()
        metrics = [self._mlflow.entities.Metric(k, v, now, step) for k, v in values.items()]
        client.log_batch(run_id, metrics=metrics)

    def log_histogram(self, name: str, values: Tensor, step: int) -> None:
        client, run_id = self._open()
        v = values.detach().float().cpu().flatten()
        if v.numel() == 0 or step <= self._stored_step:
            return  # empty, or logged before a resume (as the row was)
        qs = torch.quantile(v, torch.tensor([0.1, 0.5, 0.9])).tolist()
        now = _millis()
        metrics = [
            self._mlflow.entities.Metric(f"{name}/p{p}", q, now, step)
            for p, q in zip((10, 50, 90), qs, strict=True)
        ]
        client.log_batch(run_id, metrics=metrics)

    def close(self, status: str = "FINISHED") -> None:
        """End the MLflow run with ``status``: FINISHED, KILLED (interrupted) or FAILED. A run
        finished by a session that logged nothing (an earlier one stopped while writing the
        run's files; this one wrote them) is reopened to be marked FINISHED; a run this logger
        opened and closed stays as it was closed."""
        if not self._opened and status == "FINISHED" and self.id_file.is_file():
            self._open()
        if self._client is not None and self._run_id is not None:
            self._client.set_terminated(self._run_id, status=status)
        self._client = self._run_id = None


def _check_mlflow_scheme(uri: str) -> None:
    """``ValueError`` naming ``logger.mlflow.tracking_uri`` when MLflow has no tracking store for
    its scheme (a typo such as ``htp://``): found only when the first step opens the run, after
    the run's files are written, as an MLflow traceback. The store is not built here."""
    try:  # MLflow's own table of schemes (private: skipped if it moves)
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry

        schemes = sorted(s for s in _tracking_store_registry._registry if s)
        _tracking_store_registry.get_store_builder(uri)
    except (ImportError, AttributeError):
        return
    except Exception as err:  # MLflow's UnsupportedModelRegistryStoreURIException
        raise ValueError(
            f"logger.mlflow.tracking_uri={uri!r}: MLflow has no tracking store for this URI "
            f"({type(err).__name__}); use one of the schemes {', '.join(schemes)}, a folder, or "
            "null (a SQLite store in the run directory)"
        ) from err


def _read_wandb_records(path: Path) -> Iterator[Any]:
    """The protobuf ``Record``s of one offline W&B log (``run-<id>.wandb``), in order: a 7-byte
    header, then 32 KiB blocks of chunks, each with a 7-byte header (CRC, length, type
    FULL/FIRST/MIDDLE/LAST). A torn file raises after the records before the tear."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, chunk = path.read_bytes(), 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # the rest of a block is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST: a whole record
            record = pb.Record()
            record.ParseFromString(chunk)
            yield record
        if kind in (0, 1, 4):
            chunk = b""


def _wandb_last_step(directory: Path, run_id: str) -> int:
    """The last step that the offline sessions of W&B run ``run_id`` under ``directory`` wrote
    to disk (a session killed with SIGKILL loses what its service had not yet written), or -1.
    Anything it cannot read counts as nothing written."""
    last = -1
    for path in (directory / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"):
        try:
            for record in _read_wandb_records(path):
                if record.WhichOneof("record_type") == "history":
                    last = max(last, int(record.history.step.num))
        except Exception:  # a torn file, or no wandb: what was read before counts
            continue
    return last


class WandbLogger(_EachStepOnce):
    """A Weights & Biases run, offline by default (``mode="offline"``: a folder
    ``<dir>/wandb/offline-run-*`` that ``wandb sync`` uploads later; no login, no network).
    Rows with ``step`` as W&B's step, the weight histogram as ``wandb.Histogram``, the config
    as the run config. The run id is kept in ``id_file`` so a resumed run keeps its id."""

    def __init__(
        self,
        directory: str | os.PathLike,
        id_file: str | os.PathLike,
        project: str = "reweight",
        mode: str = "offline",
        entity: str | None = None,
        run_name: str | None = None,
    ) -> None:
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger.wandb.mode must be offline, online or disabled, got {mode!r}")
        self._wandb = _require("wandb", "wandb")
        self.directory = Path(directory)
        self.id_file = Path(id_file)
        self.project, self.mode, self.entity, self.run_name = project, mode, entity, run_name
        self._run: Any = None
        self._last_step = -1
        self._config: Mapping[str, Any] | None = None
        self._opened = False  # by this logger: then close() never reopens

    def _open(self) -> Any:
        if self._run is None:
            self._opened = True
            if self.id_file.is_file():
                run_id = self.id_file.read_text().strip()
                if self.mode == "offline":  # what earlier sessions wrote down is not logged again
                    self._last_step = max(self._last_step, _wandb_last_step(self.directory, run_id))
            else:
                run_id = uuid.uuid4().hex[:12]
                self.id_file.parent.mkdir(parents=True, exist_ok=True)
                self.id_file.write_text(run_id + "\n")
            self.directory.mkdir(parents=True, exist_ok=True)
            self._run = self._wandb.init(
                project=self.project,
                entity=self.entity,
                name=self.run_name,
                id=run_id,
                resume="allow",
                dir=str(self.directory),
                mode=self.mode,
                config=dict(self._config or {}),
                settings=self._wandb.Settings(silent=True, console="off"),
                reinit="create_new",
            )
        return self._run

    def check(self) -> None:
        """Before the first step: ``ValueError`` if ``directory`` cannot be written."""
        check_writable(self.directory, "logger.wandb.dir")
        check_writable(self.directory / "wandb", "logger.wandb.dir")

    def _write_row(self, opened: Any, step: int, values: dict[str, float]) -> None:
        opened.log(values, step=step)

    def log_histogram(self, name: str, values: Tensor, step: int) -> None:
        run = self._open()
        if step < self._last_step:
            return
        v = values.detach().float().cpu().numpy()
        run.log({name: self._wandb.Histogram(v)}, step=step)
        self._last_step = step

    def close(self, status: str = "FINISHED") -> None:
        """Finish the W&B run with the exit code of ``status``: 0 for FINISHED, else 1. A run
        finished by a session that logged nothing (an earlier one stopped while writing the
        run's files; this one wrote them) is reopened to end with 0; a run this logger opened
        and closed stays as it was closed."""
        if not self._opened and status == "FINISHED" and self.id_file.is_file():
            self._open()
        if self._run is not None:
            self._run.finish(exit_code=0 if status == "FINISHED" else 1)
            self._run = None


def _millis() -> int:
    import time

    return int(time.time() * 1000)
