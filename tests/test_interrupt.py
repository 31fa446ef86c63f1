"""Interrupt = checkpoint: SIGINT / SIGTERM stop ``Trainer.fit`` at a step boundary with the
checkpoint written, the command line says so in one line (exit 130 / 143) and the same command
continues bit for bit; a damaged checkpoint is one ``error:`` line and stays as it was."""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import TensorDataset

import reweight
from reweight import CheckpointError, Trainer, TrainingInterrupted
from reweight.train.checkpoint import read_checkpoint
from tests.helpers import (
    REWEIGHT,
    free_port,
    gloo_group,
    quiet,
    run_command,
    start_command,
    torchrun,
)
from tests.test_cli import read_csv

SGD = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)
LINE = "interrupted at step {}; run the same command to continue"


# -- the Trainer, in this process ----------------------------------------------------------------


def small_trainer(
    checkpoint: Path | None,
    callbacks: tuple[Callable[[dict[str, float]], None], ...] = (),
    final_weights: int = 0,
) -> Trainer:
    """L2RW on a linear model, 8 steps, a log row (and its callbacks) every step."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(160, 4, generator=g)
    y = (x[:, 0] + 0.5 * torch.randn(160, generator=g) > 0).long()
    torch.manual_seed(0)
    return Trainer(
        nn.Linear(4, 2),
        TensorDataset(x, y),
        TensorDataset(x[:20], y[:20]),
        TensorDataset(x, y),
        method="l2rw",
        optimizer=SGD,
        checkpoint_path=checkpoint,
        callbacks=callbacks,
        config=quiet(
            max_steps=8,
            batch_size=20,
            meta_batch_size=10,
            log_every=1,
            eval_every=0,
            final_weights=final_weights,
        ),
    )


def signals_at(step: int, *signums: int) -> Callable[[dict[str, float]], None]:
    """A callback that sends this process ``signums``, one after the other, from the log row
    of ``step`` (i.e. in the middle of that step's bookkeeping)."""

    def callback(row: dict[str, float]) -> None:
        if row["step"] == step:
            for signum in signums:
                signal.raise_signal(signum)  # its Python handler runs before this returns

    return callback


@pytest.fixture
def python_sigint():
    """SIGINT handled by Python's default handler (KeyboardInterrupt), restored afterwards."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def handlers() -> tuple[object, object]:
    return signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_first_signal_finishes_the_step_checkpoints_and_raises(tmp_path, python_sigint, signum):
    path = tmp_path / "checkpoint.pt"
    before = handlers()
    trainer = small_trainer(path, callbacks=(signals_at(3, signum),))
    with pytest.raises(TrainingInterrupted) as info:
        trainer.fit()
    stop = info.value
    assert (stop.step, stop.signum, stop.checkpoint) == (3, signum, path)
    assert stop.exit_status == {signal.SIGINT: 130, signal.SIGTERM: 143}[signum]
    assert isinstance(stop, KeyboardInterrupt)  # `except Exception` does not swallow it
    assert str(stop) == f"{signal.Signals(signum).name} at step 3; checkpoint {path}"
    assert handlers() == before  # restored
    state = torch.load(path, weights_only=True)
    assert state["step"] == 3 and [row["step"] for row in state["history"]] == [1.0, 2.0, 3.0]

    resumed = small_trainer(path)
    resumed_result = resumed.fit(resume=True)
    reference = small_trainer(None)
    reference_result = reference.fit()
    for name, tensor in reference.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    rows = [{**r, "time_s": 0.0} for r in resumed_result.history]
    assert rows == [{**r, "time_s": 0.0} for r in reference_result.history]


def test_second_sigint_aborts_at_once(tmp_path, python_sigint):
    path = tmp_path / "checkpoint.pt"
    before = handlers()
    trainer = small_trainer(path, callbacks=(signals_at(3, signal.SIGINT, signal.SIGINT),))
    with pytest.raises(KeyboardInterrupt) as info:
        trainer.fit()
    assert type(info.value) is KeyboardInterrupt  # not the graceful stop
    assert trainer.step == 3 and not path.exists()  # raised inside step 3, nothing written
    assert handlers() == before


def test_second_signal_gets_the_handler_from_before_fit(tmp_path):
    """The second signal goes to whatever handled it before ``fit`` (here a recorder that
    returns), so the first one still stops the loop at the step boundary."""
    seen: list[int] = []

    def recorder(signum: int, frame: object) -> None:
        seen.append(signum)

    before = signal.signal(signal.SIGINT, recorder)
    try:
        trainer = small_trainer(None, callbacks=(signals_at(2, signal.SIGINT, signal.SIGINT),))
        with pytest.raises(TrainingInterrupted) as info:
            trainer.fit()
        assert signal.getsignal(signal.SIGINT) is recorder  # restored
        signal.raise_signal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, before)
    assert (info.value.step, info.value.checkpoint) == (2, None)
    assert seen == [signal.SIGINT, signal.SIGINT]  # the second signal in fit, then ours


def test_ignored_signal_stays_ignored(tmp_path):
    """SIGINT ignored before fit (``nohup``, a background job of a script): fit leaves it so."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        result = small_trainer(None, callbacks=(signals_at(2, signal.SIGINT),)).fit()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
    assert result.metrics["steps"] == 8


def test_no_handlers_outside_the_main_thread(tmp_path):
    before = handlers()
    during: list[tuple[object, object]] = []
    results = []

    def run() -> None:
        trainer = small_trainer(None, callbacks=(lambda row: during.append(handlers()),))
        results.append(trainer.fit())

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert results[0].metrics["steps"] == 8
    assert during and all(h == before for h in during)


def test_signal_during_the_final_metrics_stops_at_once(tmp_path, python_sigint):
    """After the last step (its checkpoint written) nothing is left to save: the scoring pass
    of ``final_weights`` is cut short at once."""
    path = tmp_path / "checkpoint.pt"
    trainer = small_trainer(path, final_weights=1)
    scored: list[int] = []

    def example_weights(passes: int = 1) -> torch.Tensor:
        signal.raise_signal(signal.SIGINT)
        scored.append(passes)  # not reached
        return torch.ones(160)

    trainer.example_weights = example_weights  # type: ignore[method-assign]
    before = handlers()
    with pytest.raises(TrainingInterrupted) as info:
        trainer.fit()
    assert (info.value.step, info.value.signum, scored) == (8, signal.SIGINT, [])
    assert torch.load(path, weights_only=True)["step"] == 8
    assert handlers() == before


def test_training_interrupted_is_exported():
    assert reweight.TrainingInterrupted is TrainingInterrupted
    assert reweight.CheckpointError is CheckpointError
    assert issubclass(CheckpointError, ValueError)  # the CLI's one-line `error:` class


# -- two processes (gloo): a signal to one rank stops both after the same step ------------------


def _rank(rank: int, world: int, port: int, out: str) -> None:
    # a rank that stops alone leaves the other waiting in a collective: fail, do not hang
    with gloo_group(rank, world, port, timeout=timedelta(seconds=60)):
        trainer = small_trainer(Path(out) / "checkpoint.pt")

        def hook(optimizer, args, kwargs) -> None:
            if rank == 1 and trainer.step == 2:  # inside step 3, on rank 1 only
                signal.raise_signal(signal.SIGTERM)

        trainer.optimizer.register_step_post_hook(hook)
        try:
            trainer.fit()
            got = (-1, -1)
        except TrainingInterrupted as stop:
            got = (stop.step, stop.signum)
        torch.save(torch.tensor(got), Path(out) / f"rank{rank}.pt")


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    mp.spawn(_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True).tolist()
        assert got == [3, signal.SIGTERM], f"rank {rank}"
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 3  # rank 0's


# -- unreadable checkpoints ----------------------------------------------------------------------


class _NotATensor:  # a pickled class: what a weights-only load refuses
    pass


def _damage(kind: str, good: bytes, path: Path) -> None:
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":  # a full disk, a copy cut short
        path.write_bytes(good[: len(good) // 2])
    elif kind == "random":
        path.write_bytes(random.Random(0).randbytes(4096))
    elif kind == "list":
        torch.save([1, 2], path)
    elif kind == "missing_keys":
        torch.save({"step": 3, "model": {}}, path)
    elif kind == "object":
        torch.save({"step": _NotATensor()}, path)
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("empty", "(the file is empty)"),
        ("truncated", "bytes that are not a complete PyTorch zip archive: truncated or"),
        ("random", "(4096 bytes that are not a complete PyTorch zip archive"),
        ("list", "(not a Trainer checkpoint: it holds a list)"),
        ("missing_keys", "(not a Trainer checkpoint: no 'optimizer', 'method', 'rng',"),
        ("object", "(it holds Python objects other than tensors and plain containers)"),
    ],
)
def test_unreadable_checkpoint_names_the_file_and_the_fix(tmp_path, kind, reason):
    path = tmp_path / "checkpoint.pt"
    small_trainer(path).fit()
    _damage(kind, path.read_bytes(), path)
    damaged = path.read_bytes()
    trainer = small_trainer(path)
    with pytest.raises(CheckpointError) as info:
        trainer.fit(resume=True)
    message = str(info.value)
    assert message.startswith(f"checkpoint {path} cannot be read (")
    assert reason in message
    assert message.endswith("): delete it, or run with resume=false to start over")
    assert "weights_only" not in message and "\n" not in message
    error = info.value  # no chained torch message (one of them recommends weights_only=False)
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    assert path.read_bytes() == damaged and trainer.step == 0


def test_missing_checkpoint_file_is_the_os_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint\.pt"):
        read_checkpoint(tmp_path / "checkpoint.pt")


# -- the command line, in subprocesses, on the real MNIST ------------------------------------------

ARGS = [
    "dataset=mnist_imbalanced",
    "method=l2rw",
    "trainer.max_steps=40",
    "trainer.log_every=5",
    "trainer.eval_every=0",
    "trainer.final_weights=0",
    "trainer.checkpoint_every=0",  # only the interrupt writes a checkpoint before the end
    "threads=1",
]
STOP_AFTER = 10  # signal once metrics.csv shows this step


def cli(args: list[str], run_dir: Path, **popen) -> subprocess.Popen:
    return start_command([*REWEIGHT, *args, f"hydra.run.dir={run_dir}"], run_dir.parent, **popen)


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def last_step(metrics: Path) -> int:
    try:  # written atomically: absent or complete
        rows = read_csv(metrics)
    except FileNotFoundError:
        return -1
    return int(rows[-1]["step"]) if rows else -1


def wait_for_step(proc: subprocess.Popen, metrics: Path, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while last_step(metrics) < step:
        if proc.poll() is not None:
            pytest.fail(
                f"the run ended (exit {proc.returncode}) before step {step}: {finish(proc)}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no step {step} in {metrics} within {timeout} s")
        time.sleep(0.05)


def model_state(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert state["step"] == 40
    return state["model"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_root) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    code, _, err = finish(cli(ARGS, run_dir))
    assert code == 0, err
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"]
)
def test_interrupted_run_continues_bit_for_bit(tmp_path, uninterrupted, signum, status):
    """Signal a run after step 10 of 40: one line on stderr, exit 128 + signal, a checkpoint
    of that step and nothing of a finished run; the same command again ends with the model
    and metrics of an uninterrupted run, bit for bit."""
    run_dir = tmp_path / "run"
    proc = cli(ARGS, run_dir)
    try:
        wait_for_step(proc, run_dir / "metrics.csv", STOP_AFTER)
        proc.send_signal(signum)
        code, _, err = finish(proc, timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == status, err
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    step = state["step"]
    assert STOP_AFTER <= step < 40, f"stopped at step {step}: the run was too fast to interrupt"
    assert err.splitlines() == [LINE.format(step)]
    for unfinished in ("summary.json", "learning_curves.png", "weights.pt"):
        assert not (run_dir / unfinished).exists(), unfinished
    assert last_step(run_dir / "metrics.csv") == step - step % 5  # the rows up to the stop

    code, out, err = finish(cli(ARGS, run_dir))  # the same command, the same directory
    assert code == 0, err
    assert f"resumed from {run_dir / 'checkpoint.pt'} at step {step}" in out
    reference, resumed = model_state(uninterrupted), model_state(run_dir)
    assert reference.keys() == resumed.keys()
    for name, tensor in reference.items():
        assert torch.equal(tensor, resumed[name]), name
    rows_a, rows_b = read_csv(uninterrupted / "metrics.csv"), read_csv(run_dir / "metrics.csv")
    assert len(rows_a) == 8
    for row_a, row_b in zip(rows_a, rows_b, strict=True):
        assert {**row_a, "time_s": ""} == {**row_b, "time_s": ""}
    summary_a = json.loads((uninterrupted / "summary.json").read_text())
    summary_b = json.loads((run_dir / "summary.json").read_text())
    for key in ("steps", "test_accuracy", "test_loss", "per_class_accuracy"):
        assert summary_a[key] == summary_b[key], key


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_root) -> Path:
    """A short finished run, whose checkpoint the tests below damage (in copies)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    code, _, err = finish(cli([*ARGS, "trainer.max_steps=5"], run_dir))
    assert code == 0, err
    return run_dir


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["empty", "truncated", "random"])
def test_damaged_checkpoint_is_one_error_line_and_stays(tmp_path, finished_run, kind):
    """The same command in the run directory of a finished run whose checkpoint.pt is damaged:
    exit 2, one `error:` line naming the file, and every file of the run as it was (nothing is
    written before the first training step: reweight.cli.run_dir), train.log and .hydra/
    included."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    checkpoint = run_dir / "checkpoint.pt"
    _damage(kind, checkpoint.read_bytes(), checkpoint)
    before = snapshot(run_dir)
    mtimes = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    code, _, err = finish(cli([*ARGS, "trainer.max_steps=5"], run_dir))
    assert code == 2, err
    [line] = err.splitlines()
    assert line.startswith(f"error: checkpoint {checkpoint} cannot be read ("), line
    assert line.endswith("delete it, or run with resume=false to start over")
    assert "weights_only" not in line
    assert snapshot(run_dir) == before  # no file added, removed or changed
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == mtimes


@pytest.mark.slow
def test_interrupted_sweep_stops_and_the_same_command_continues(tmp_path, data_root):
    """A sweep (basic launcher) interrupted in its second job: one line, exit 130, the table of
    the first job only (updated as each job ends); the
    same command with the same hydra.sweep.dir finishes the first job's outputs again from its
    final checkpoint, resumes the second from its interrupt and writes the table."""
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "seed=0,1",
        *[a for a in ARGS if not a.startswith("trainer.max_steps")],
        "trainer.max_steps=20",
        f"hydra.sweep.dir={sweep}",
    ]
    command = [*REWEIGHT, *args]
    proc = start_command(command, tmp_path)
    try:
        wait_for_step(proc, sweep / "1" / "metrics.csv", 5)
        proc.send_signal(signal.SIGINT)
        code, _, err = finish(proc, timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    step = torch.load(sweep / "1" / "checkpoint.pt", weights_only=True)["step"]
    assert 5 <= step < 20
    assert (code, err.splitlines()) == (130, [LINE.format(step)])
    assert (sweep / "0" / "summary.json").exists() and not (sweep / "1" / "summary.json").exists()
    assert [r["n"] for r in read_csv(sweep / "results.csv")] == ["1"]  # as job 0 ended

    again = run_command(command, tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"resumed from {sweep / '1' / 'checkpoint.pt'} at step {step}" in again.stdout
    assert [r["n"] for r in read_csv(sweep / "results.csv")] == ["2"]
    for job in ("0", "1"):
        assert json.loads((sweep / job / "summary.json").read_text())["steps"] == 20


def _children(pid: int) -> dict[int, dict[str, str]]:
    """The child processes of ``pid`` and their environments (Linux /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                raw = (entry / "environ").read_bytes().split(b"\0")
                found[int(entry.name)] = dict(
                    item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item
                )
        except (OSError, ValueError):
            continue  # gone meanwhile
    return found


@pytest.mark.slow
@pytest.mark.parametrize("target", ["torchrun", "rank1"])
def test_torchrun_interrupt_stops_every_rank_at_one_step(tmp_path, data_root, target):
    """`torchrun --nproc_per_node=2` on CPU. Ctrl-C reaches torchrun only (each worker has a
    session of its own), which forwards it to every rank; SIGTERM to rank 1 alone reaches the
    other rank through the per-step all-reduce. Either way: every rank stops after the same
    step, rank 0 writes its checkpoint, the line is printed once, the exit status is not 0."""
    run_dir = tmp_path / "run"
    command = [*torchrun(), *ARGS, f"hydra.run.dir={run_dir}"]
    proc = start_command(command, tmp_path)
    try:
        wait_for_step(proc, run_dir / "metrics.csv", STOP_AFTER)
        if target == "torchrun":
            proc.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal does
        else:
            [rank1] = [pid for pid, env in _children(proc.pid).items() if env.get("RANK") == "1"]
            os.kill(rank1, signal.SIGTERM)
        code, out, err = finish(proc, timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    step = torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"]
    assert STOP_AFTER <= step < 40
    assert code != 0
    assert err.count("interrupted at step") == 1, err
    assert LINE.format(step) in err.splitlines()
    assert not (run_dir / "summary.json").exists()
    stopped = [line for line in out.splitlines() if "stopped after step" in line]
    assert len(stopped) == 1 and f"stopped after step {step};" in stopped[0]  # rank 0's log
