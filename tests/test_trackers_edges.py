"""The trackers' edges that test_loggers_unit.py and test_tracker_records.py leave open (found by
mutation testing, docs/mutation.md): W&B's resume from its own offline log (read with the
real package, across 32 KiB blocks, and torn), the folders each tracker makes, TensorBoard's
flush interval, config text and missing package, MLflow's empty history, its parameters in
batches and its timestamps."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import pytest
import torch

from reweight.train import trackers
from reweight.train.trackers import MLflowLogger, TensorBoardLogger, WandbLogger
from tests.helpers import next_second
from tests.test_loggers_unit import FakeWandb, tb_events
from tests.test_tracker_records import wandb_history, wandb_records

# -- W&B ---------------------------------------------------------------------------------------


def _wandb_session(run_dir: Path, id_file: Path, steps, keys: int = 60) -> WandbLogger:
    logger = WandbLogger(run_dir, id_file)
    for step in steps:  # wide rows: the log spans several 32 KiB blocks
        logger.log_row(step, {"step": step, **{f"metric_{k:03d}": step + k for k in range(keys)}})
    logger.close()
    import wandb

    wandb.teardown()  # W&B's service writes the log out as it stops
    return logger


def test_wandb_resume_reads_its_offline_log_and_logs_each_step_once(tmp_path: Path, wandb_env):
    run_dir, id_file = tmp_path / "run", tmp_path / "run" / "wandb_run_id.txt"
    _wandb_session(run_dir, id_file, range(1, 41))
    run_id = id_file.read_text().strip()
    [first] = (run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    # W&B names a session's folder by the second it started: a second session within the same
    # second would share it, so the first one's gets a name of its own (the pattern read keeps)
    folder = first.parent.rename(first.parent.with_name(f"offline-run-first-{run_id}"))
    first = folder / first.name
    assert first.stat().st_size > 2 * 32768  # records cross block boundaries
    assert sorted(wandb_history(first)) == list(range(1, 41))
    assert trackers._wandb_last_step(run_dir, run_id) == 40
    assert trackers._wandb_last_step(run_dir, "another") == -1
    ours = [r.SerializeToString() for r in trackers._read_wandb_records(first)]
    assert ours == [r.SerializeToString() for r in wandb_records(first)]

    # a resumed session: what the first wrote to disk is not logged again
    again = WandbLogger(run_dir, id_file)
    assert again.has_step(40) and not again.has_step(41)
    again.log_row(39, {"lr": 99.0})
    again.log_row(41, {"lr": 0.5})
    again.close()
    import wandb

    wandb.teardown()
    [second] = [
        p for p in (run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
        if p != first
    ]  # fmt: skip
    assert sorted(wandb_history(second)) == [41]


def test_wandb_last_step_counts_the_records_before_a_tear(tmp_path: Path, wandb_env, monkeypatch):
    run_dir, id_file = tmp_path / "run", tmp_path / "run" / "wandb_run_id.txt"
    _wandb_session(run_dir, id_file, range(1, 31))
    run_id = id_file.read_text().strip()
    [path] = (run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    data = path.read_bytes()
    # a tear 3 bytes into the chunk header after the history record of step 20
    offsets = _record_ends(data)
    steps = [r.history.step.num if r.WhichOneof("record_type") == "history" else None
             for r in wandb_records(path)]  # fmt: skip
    end = offsets[steps.index(20)]
    path.write_bytes(data[: end + 3])
    assert trackers._wandb_last_step(run_dir, run_id) == 20
    # a log whose first record is not a protobuf, read first: it counts as nothing, the rest
    # still counts
    junk = run_dir / "wandb" / f"offline-run-0-{run_id}" / f"run-{run_id}.wandb"
    junk.parent.mkdir()
    junk.write_bytes(b":W&B\x00\x00\x00" + bytes([0, 0, 0, 0, 3, 0, 1]) + b"\xff\xff\xff")
    from google.protobuf.message import DecodeError

    with pytest.raises(DecodeError):
        list(trackers._read_wandb_records(junk))
    real_glob = Path.glob
    monkeypatch.setattr(  # the junk first, whatever order the folder lists them in
        Path, "glob", lambda self, pattern: iter([junk, path]) if self == run_dir / "wandb"
        else real_glob(self, pattern),
    )  # fmt: skip
    assert trackers._wandb_last_step(run_dir, run_id) == 20


def _record_ends(data: bytes) -> list[int]:
    """The byte offset after each whole record of a W&B log (as wandb_records walks it)."""
    pos, ends = 7, []
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:
            pos += room
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pos += 7 + length
        if kind in (1, 4):
            ends.append(pos)
    return ends


def _write_log(path: Path, records, kinds=None) -> list[int]:
    """A W&B log of ``records`` as LevelDB's log writer lays it out: a 7-byte file header, then
    32 KiB blocks; a record goes in as one chunk (FULL) or, across blocks, FIRST, MIDDLE..., LAST;
    a block's tail too short for a chunk header (< 7 bytes) is zero padding. Returns the kind of
    every chunk written."""
    out, written = bytearray(b":W&B\x00\x00\x00"), []
    for record in records:
        body, first = record.SerializeToString(), True
        while True:
            room = 32768 - len(out) % 32768
            if room < 7:
                out += b"\x00" * room
                continue
            take = min(len(body), room - 7)
            part, body = body[:take], body[take:]
            kind = (1 if first else 4) if not body else (2 if first else 3)
            out += (0).to_bytes(4, "little") + len(part).to_bytes(2, "little") + bytes([kind])
            out += part
            written.append(kind)
            first = False
            if not body:
                break
    path.write_bytes(bytes(out))
    return written


def _history(step: int, length: int):
    """A history record of ``step`` whose serialized size is ``length`` bytes."""
    from wandb.proto import wandb_internal_pb2 as pb

    size = length
    while True:
        record = pb.Record()
        record.history.step.num = step
        item = record.history.item.add()
        item.key, item.value_json = "note", '"' + "x" * size + '"'
        got = record.ByteSize()
        assert size >= 0, f"a history record is at least {got} bytes"
        if got == length:
            return record
        size += length - got


def test_wandb_log_reader_joins_chunks_and_skips_block_padding(tmp_path: Path):
    """A log with block tails of padding (3 and 6 bytes, under a chunk header's 7), records
    split FIRST/LAST and FIRST/MIDDLE/LAST, and FULL records right after a split one."""
    # block 0: header 7 + chunk 7 + 32751 = 32765: a 3-byte tail
    # block 1: a FULL, then a record of 70000 over blocks 1-3 (FIRST, MIDDLE, LAST)
    # then a FULL that ends 6 bytes before its block's end, and two FULL after
    lengths = [32751, 40, 70000]
    at = 7 + 7 + 32751 + 3 + 7 + 40 + (70000 + 3 * 7)  # where the next chunk starts
    lengths += [32768 - at % 32768 - 7 - 6, 100, 60]
    records = [_history(step, n) for step, n in enumerate(lengths, start=1)]
    path = tmp_path / "run.wandb"
    assert _write_log(path, records) == [1, 1, 2, 3, 4, 1, 1, 1]
    data = path.read_bytes()
    assert data[32765:32768] == b"\x00" * 3 and data[:4] == b":W&B"
    want = [r.SerializeToString() for r in records]
    assert [r.SerializeToString() for r in wandb_records(path)] == want  # the tests' reader
    assert [r.SerializeToString() for r in trackers._read_wandb_records(path)] == want
    boundary = len(data) - (7 + 100) - (7 + 60)  # the block the last two records start
    assert boundary % 32768 == 0 and data[boundary - 6 : boundary] == b"\x00" * 6


def test_wandb_makes_the_folders_it_needs(tmp_path: Path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    directory, id_file = tmp_path / "a" / "b", tmp_path / "c" / "d" / "id.txt"
    WandbLogger(directory, id_file).log_row(1, {"lr": 0.1})
    assert directory.is_dir() and id_file.is_file()
    other = WandbLogger(directory, id_file.with_name("id2.txt"))  # the folders exist already
    other.log_row(1, {"lr": 0.1})
    assert id_file.with_name("id2.txt").is_file()


def test_wandb_online_does_not_read_the_offline_log(tmp_path: Path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    id_file = tmp_path / "id.txt"
    id_file.write_text("abc\n")
    monkeypatch.setattr(trackers, "_wandb_last_step", lambda d, r: pytest.fail("read"))
    logger = WandbLogger(tmp_path, id_file, mode="online")
    logger.log_row(1, {"lr": 0.1})
    assert fake.calls[0][1]["id"] == "abc" and fake.calls[1:] == [("log", ["lr"], 1)]


def test_wandb_offline_resume_asks_for_its_run_folder(tmp_path: Path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    id_file = tmp_path / "id.txt"
    id_file.write_text("abc\n")
    asked = []
    monkeypatch.setattr(trackers, "_wandb_last_step", lambda d, r: asked.append((d, r)) or 5)
    logger = WandbLogger(tmp_path / "dir", id_file)
    assert logger.has_step(5) and not logger.has_step(6)
    assert asked == [(tmp_path / "dir", "abc")]


# -- TensorBoard -------------------------------------------------------------------------------


def test_tensorboard_flush_interval_config_text_and_missing_package(tmp_path, monkeypatch):
    logger = TensorBoardLogger(tmp_path / "default")
    assert logger.flush_secs == 10
    assert logger._open(1).flush_secs == 10
    logger.close()
    three = TensorBoardLogger(tmp_path / "three", flush_secs=3)
    assert three._open(1).flush_secs == 3
    three.close()
    # no config logged: no config text; a config with a value JSON lacks: its str()
    bare = TensorBoardLogger(tmp_path / "bare")
    bare.log_row(1, {"lr": 0.1})
    bare.close()
    assert tb_events(tmp_path / "bare").Tags()["tensors"] == []
    paths = TensorBoardLogger(tmp_path / "paths")
    paths.log_config({"data": tmp_path})
    paths.log_row(1, {"lr": 0.1})
    paths.close()
    [text] = tb_events(tmp_path / "paths").Tensors("config/text_summary")
    assert text.tensor_proto.string_val[0].decode() == f'```\n{{\n  "data": "{tmp_path}"\n}}\n```'
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ValueError) as info:
        TensorBoardLogger(tmp_path / "x")
    assert str(info.value).startswith("logger=tensorboard needs the tensorboard package (")
    assert str(info.value).endswith('): pip install "reweight[tensorboard]"')


def test_tensorboard_a_histogram_first_purges_like_a_row(tmp_path: Path):
    """A resumed session whose first call is a histogram at step 2 drops the events a killed
    session left from step 2 on, as a first row would."""
    log_dir = tmp_path / "tb"
    first = TensorBoardLogger(log_dir)
    for step in (1, 2, 3):
        first.log_row(step, {"lr": 0.1 * step})
    first.close()
    next_second()
    again = TensorBoardLogger(log_dir)
    again.log_histogram("weights", torch.ones(4), 2)
    again.log_row(2, {"lr": 9.0})
    again.close()
    assert [(e.step, e.value) for e in tb_events(log_dir).Scalars("lr")] == [
        (1, pytest.approx(0.1)), (2, 9.0)
    ]  # fmt: skip


def test_tensorboard_check_names_its_setting(tmp_path: Path):
    (tmp_path / "tb").write_text("a file")
    with pytest.raises(ValueError) as info:
        TensorBoardLogger(tmp_path / "tb").check()
    assert str(info.value) == (
        f"logger=tensorboard: {tmp_path / 'tb'} is in the way, it should be a folder: move it"
    )


def test_tensorboard_has_no_step_in_a_folder_without_scalars(tmp_path: Path):
    (tmp_path / "tb").mkdir()
    logger = TensorBoardLogger(tmp_path / "tb")
    assert not logger.has_step(0) and not logger.has_step(1)


def test_a_torn_event_file_does_not_hide_the_next_one(tmp_path: Path, monkeypatch):
    log_dir = tmp_path / "tb"
    logger = TensorBoardLogger(log_dir)
    logger.log_row(7, {"lr": 0.1})
    logger.close()
    [good] = log_dir.glob("events.out.tfevents.*")
    # tensorboard's loader stops quietly at a torn record; what raises is a file it cannot
    # read at all (here a folder by that name)
    torn = log_dir / "events.out.tfevents.0.unreadable"
    torn.mkdir()
    real_glob = Path.glob
    monkeypatch.setattr(  # the torn file first, whatever order the folder lists them in
        Path, "glob", lambda self, pattern: iter([torn, good]) if self == log_dir
        else real_glob(self, pattern),
    )  # fmt: skip
    assert trackers._tensorboard_last_step(log_dir) == 7


# -- MLflow ------------------------------------------------------------------------------------


def test_mlflow_quiets_its_table_makers_and_makes_its_id_folder(tmp_path: Path, mlflow_quiet):
    names = ("mlflow.store.db.utils", "alembic")
    before = {n: logging.getLogger(n).level for n in (*names, None)}
    try:
        for name in names:
            logging.getLogger(name).setLevel(logging.NOTSET)
        root = logging.getLogger().level
        uri = f"sqlite:///{tmp_path / 'm.db'}"
        id_file = tmp_path / "a" / "b" / "id.txt"
        logger = MLflowLogger(uri, id_file)
        logger.log_row(1, {"lr": 0.1})
        logger.close()
        assert id_file.is_file()
        assert [logging.getLogger(n).level for n in names] == [logging.WARNING] * 2
        assert logging.getLogger().level == root
    finally:
        for name, level in before.items():
            logging.getLogger(name).setLevel(level)


def test_mlflow_resume_of_a_run_without_rows(tmp_path: Path, mlflow_quiet):
    """A session that logged no ``lr`` (its history is empty): the next logs from step 0 on,
    with its parameters."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    id_file = tmp_path / "id.txt"
    first = MLflowLogger(uri, id_file)
    first.log_row(0, {"loss": 1.0})
    first.close()
    again = MLflowLogger(uri, id_file)
    again.log_config({"a": 1})
    assert not again.has_step(0)
    again.log_row(0, {"lr": 0.5})
    again.log_row(1, {"lr": 0.25})
    again.close()
    import mlflow

    client = mlflow.tracking.MlflowClient(uri)
    run_id = id_file.read_text().strip()
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "lr")] == [
        (0, 0.5), (1, 0.25)
    ]  # fmt: skip
    assert client.get_run(run_id).data.params == {"a": "1"}


def test_mlflow_resume_after_step_0_keeps_the_first_parameters(tmp_path: Path, mlflow_quiet):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    id_file = tmp_path / "id.txt"
    first = MLflowLogger(uri, id_file)
    first.log_config({"a": 1})
    first.log_row(0, {"lr": 0.5})
    first.close()
    again = MLflowLogger(uri, id_file)
    again.log_config({"a": 2})  # MLflow refuses to change a logged parameter: not re-logged
    again.log_row(1, {"lr": 0.25})
    again.close()
    import mlflow

    run = mlflow.tracking.MlflowClient(uri).get_run(id_file.read_text().strip())
    assert run.data.params == {"a": "1"}


def test_mlflow_logs_every_parameter_of_a_large_config(tmp_path: Path, mlflow_quiet):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    id_file = tmp_path / "id.txt"
    logger = MLflowLogger(uri, id_file)
    logger.log_config({f"k{i:03d}": i for i in range(250)})
    logger.log_row(1, {"lr": 0.1})
    logger.close()
    import mlflow

    params = mlflow.tracking.MlflowClient(uri).get_run(id_file.read_text().strip()).data.params
    assert params == {f"k{i:03d}": str(i) for i in range(250)}


def test_mlflow_checks_an_existing_store_file(tmp_path: Path):
    (tmp_path / "m.db").write_bytes(b"")
    MLflowLogger(f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "id").check()  # no error


def test_mlflow_timestamps_are_wall_clock_milliseconds(tmp_path: Path, mlflow_quiet):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    id_file = tmp_path / "id.txt"
    logger = MLflowLogger(uri, id_file)
    before = int(time.time() * 1000)
    logger.log_row(1, {"lr": 0.1})
    logger.log_histogram("weights", torch.ones(4), 1)
    after = int(time.time() * 1000)
    logger.close()
    import mlflow

    client = mlflow.tracking.MlflowClient(uri)
    run_id = id_file.read_text().strip()
    for key in ("lr", "weights/p50"):
        [m] = client.get_metric_history(run_id, key)
        assert before <= m.timestamp <= after
