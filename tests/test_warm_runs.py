"""The tests' warm runs (``tests/helpers/warm.py``) against fresh interpreters: the same exit
status, output and results, a signalled run answering as a Popen does, and each path really
taken."""

from __future__ import annotations

import csv
import json
import re
import signal
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REWEIGHT, cli_env, run_command, signal_at, start_command
from tests.helpers.warm import WarmProcess, can_run_warm, run_warm

TINY = [
    "dataset=mnist_imbalanced",
    "dataset.n_train=200",
    "dataset.proportion=0.9",
    "trainer.max_steps=3",
    "trainer.batch_size=20",
    "trainer.final_weights=0",
    "threads=1",
]


def fresh(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*REWEIGHT, *args], cwd=cwd, env=cli_env(**env), capture_output=True, text=True
    )


def warm(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return run_warm([*REWEIGHT, *args], cwd, cli_env(**env), 300, server_env=cli_env())


def messages(text: str) -> list[str]:
    """Log lines less their time stamps, and less those that give a phase's duration."""
    lines = [line.split(" - ", 1)[-1] for line in text.splitlines()]
    return [m for m in lines if "time_s" not in m and not re.search(r": [0-9.]+ s$", m)]


@pytest.mark.slow
def test_a_refusal_is_the_same_warm_or_fresh(tmp_path: Path):
    args = ["trainer.batch_size=0", f"hydra.run.dir={tmp_path / 'run'}"]
    a, b = warm(args, tmp_path), fresh(args, tmp_path)
    assert (a.returncode, a.stdout, a.stderr) == (b.returncode, b.stdout, b.stderr)
    assert a.returncode == 2 and a.stderr.startswith("error: trainer.batch_size")


@pytest.mark.slow
def test_a_run_is_the_same_warm_or_fresh(tmp_path: Path):
    """The same metrics bit for bit and the same log, in the caller's working directory."""
    runs = {}
    for name, start in (("warm", warm), ("fresh", fresh)):
        (tmp_path / name).mkdir()
        proc = start([*TINY, "hydra.run.dir=run"], tmp_path / name)
        assert proc.returncode == 0, proc.stderr
        run = tmp_path / name / "run"  # relative to the caller's cwd
        summary = json.loads((run / "summary.json").read_text())
        for timed in ("wall_time_s", "run_dir"):
            summary.pop(timed)
        with (run / "metrics.csv").open(newline="") as f:
            rows = [{k: v for k, v in row.items() if k != "time_s"} for row in csv.DictReader(f)]
        runs[name] = (summary, rows, messages(proc.stdout.replace(str(tmp_path / name), "~")))
    assert runs["warm"][1] and runs["warm"][0]["steps"] == 3
    assert runs["warm"] == runs["fresh"]


def test_only_runs_that_start_alike_are_warm(monkeypatch):
    base = cli_env()
    assert can_run_warm(cli_env(RANK="1", REWEIGHT_DATA_DIR="/x"), base)
    assert not can_run_warm(cli_env(PYTHONPATH="/shadow"), base)
    assert not can_run_warm(cli_env(MALLOC_MMAP_THRESHOLD_="1"), base)
    assert not can_run_warm({k: v for k, v in base.items() if k != "OMP_NUM_THREADS"}, base)
    monkeypatch.setenv("REWEIGHT_TESTS_FRESH", "1")
    assert not can_run_warm(base, base)


@pytest.mark.slow
def test_run_command_forks_the_cli_from_the_warm_server(tmp_path: Path, monkeypatch):
    taken = []
    monkeypatch.setattr(
        "tests.helpers.run_warm", lambda *a, **k: taken.append(a[0]) or run_warm(*a, **k)
    )
    args = ["trainer.batch_size=0", f"hydra.run.dir={tmp_path / 'run'}"]
    assert run_command([*REWEIGHT, *args], tmp_path).returncode == 2
    assert run_command([*REWEIGHT, *args], tmp_path, env=cli_env(PYTHONPATH="/x")).returncode == 2
    assert taken == [[*REWEIGHT, *args]]  # the second: a fresh interpreter


LONG = [*TINY, "trainer.max_steps=5000", "trainer.log_every=1", "trainer.eval_every=0"]


def _signalled(proc: subprocess.Popen | WarmProcess) -> list:
    """Popen's protocol on a long run: still running, SIGINT at step 5's line, its end."""
    with proc:
        seen = [proc.poll()]
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=0.01)
        signal_at(proc, "step 5:", signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        seen += [proc.returncode, proc.poll(), proc.wait(), re.sub(r"[0-9]+", "N", err)]
        proc.send_signal(signal.SIGTERM)  # after its end: nothing to signal, no error
    return seen


@pytest.mark.slow
def test_a_signalled_run_is_the_same_warm_or_fresh(tmp_path: Path):
    command = [*REWEIGHT, *LONG, "hydra.run.dir=run"]
    for name in ("warm", "fresh"):
        (tmp_path / name).mkdir()
    fresh = subprocess.Popen(
        command,
        cwd=tmp_path / "fresh",
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    warm = WarmProcess(command, tmp_path / "warm", cli_env(), cli_env())
    expected = [None, 130, 130, 130, "interrupted at step N; run the same command to continue\n"]
    assert _signalled(warm) == _signalled(fresh) == expected
    for name in ("warm", "fresh"):
        assert (tmp_path / name / "run" / "checkpoint.pt").exists()


@pytest.mark.slow
def test_a_warm_run_is_killed_timed_out_and_redirected_as_popen_does(tmp_path: Path):
    err = (tmp_path / "err.txt").open("w")
    command = [*REWEIGHT, *LONG, f"hydra.run.dir={tmp_path / 'run'}"]
    with err, WarmProcess(command, tmp_path, cli_env(), cli_env(), stderr=err) as proc:
        assert proc.stderr is None and proc.poll() is None
        so_far = ""
        while "run directory" not in so_far:  # each time out gives the output so far
            with pytest.raises(subprocess.TimeoutExpired) as expired:
                proc.communicate(timeout=0.1)
            assert expired.value.stderr is None
            so_far = expired.value.output
        signal_at(proc, "step 20:", signal.SIGKILL)
        out, none = proc.communicate(timeout=120)  # goes on where it stopped
    assert (proc.returncode, none) == (-signal.SIGKILL, None)
    assert out.startswith(so_far) and "step 19:" not in so_far
    assert "step 20:" not in out  # read by signal_at, through the stream, as with Popen
    assert (tmp_path / "err.txt").read_text() == ""  # the run's stderr went to the file
    refused = run_warm([*REWEIGHT, "trainer.batch_size=0"], tmp_path, cli_env(), 60, cli_env())
    assert refused.returncode == 2 and refused.stderr.startswith("error: trainer.batch_size")


@pytest.mark.slow
def test_start_command_forks_the_cli_from_the_warm_server(tmp_path: Path):
    args = [*REWEIGHT, "trainer.batch_size=0", f"hydra.run.dir={tmp_path / 'run'}"]
    warm = start_command(args, tmp_path)
    fresh = start_command(args, tmp_path, env=cli_env(PYTHONPATH="/x"))
    assert isinstance(warm, WarmProcess) and isinstance(fresh, subprocess.Popen)
    assert [proc.communicate(timeout=120)[1][:30] for proc in (warm, fresh)] == [
        "error: trainer.batch_size must"
    ] * 2
