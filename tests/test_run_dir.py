"""A run directory never lies: the real CLI in a subprocess, on the real MNIST, against run
directories that are missing, finished, unfinished, of another config, read-only or a file.

Every refusal is checked three ways: exit status 2, exactly one stderr line ``error: ...`` that
names the key or the path, and the temporary tree unchanged (paths, modes, sizes, mtimes and
content hashes before and after).
"""

from __future__ import annotations

import csv
import ctypes
import dataclasses
import doctest
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import reweight.cli.run_dir
from reweight.cli.run_dir import NO_EFFECT_KEYS, RunDir, RunDirError, config_differences
from reweight.trainer_config import NO_EFFECT_FIELDS, TrainerConfig
from tests.test_cli import cli_env

ARGS = [
    "dataset=mnist_imbalanced",
    "trainer.max_steps=4",
    "trainer.batch_size=20",
    "trainer.eval_every=0",
    "trainer.final_weights=0",
    "threads=1",
]
FINISHED = "finished at step 4"

# prctl(PR_CAPBSET_DROP) and the capabilities that let root ignore permission bits
_PR_CAPBSET_DROP = 24
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH, _CAP_FOWNER = 1, 2, 3


def _as_a_user() -> None:
    """``preexec_fn`` for root: drop from the bounding set the capabilities that bypass
    permission bits, so the CLI it executes meets ``chmod`` as any user would. (Switching to
    ``nobody`` instead would lock it out of an interpreter installed under ``/root``.)"""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH, _CAP_FOWNER):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), f"prctl(PR_CAPBSET_DROP, {cap}) failed")


def cli(args: list[str], cwd: Path, as_user: bool = False) -> subprocess.CompletedProcess:
    """``python -m reweight ARGS`` in ``cwd``; ``as_user``: permission bits apply even to root."""
    return subprocess.run(
        [sys.executable, "-m", "reweight", *args],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=_as_a_user if as_user and os.geteuid() == 0 else None,
    )


def snapshot(root: Path) -> dict[str, tuple]:
    """Everything under ``root`` (not ``root`` itself): kind, mode, mtime, and for files size
    and content hash; a folder's size is left out (some file systems never shrink it)."""
    tree = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        is_file = stat.S_ISREG(st.st_mode)
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if is_file else None
        tree[str(path.relative_to(root))] = (
            stat.S_IFMT(st.st_mode),
            stat.S_IMODE(st.st_mode),
            st.st_mtime_ns,
            st.st_size if is_file else None,
            digest,
        )
    return tree


def assert_refused(proc: subprocess.CompletedProcess, *names: str) -> str:
    """Exit status 2 and one stderr line ``error: ...`` holding each of ``names``."""
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def chmod_tree(root: Path, writable: bool) -> None:
    """Folders 0755 / 0555 and files 0644 / 0444, ``root`` included."""
    for path in [root, *root.rglob("*")]:
        if path.is_dir():
            path.chmod(0o755 if writable else 0o555)
        else:
            path.chmod(0o644 if writable else 0o444)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_root) -> Path:
    """One finished 4-step run, made once for this module; tests work on copies."""
    base = tmp_path_factory.mktemp("finished")
    proc = cli([*ARGS, f"hydra.run.dir={base / 'run'}"], cwd=base)
    assert proc.returncode == 0, proc.stderr
    return base / "run"


@pytest.fixture
def copy_of(tmp_path):
    """``copy_of(run)``: ``tmp_path/run``, a copy with the same mtimes; writable again at the
    end so that pytest can remove it when the tests run without root."""
    copies = []

    def copy(run: Path) -> Path:
        dst = tmp_path / "run"
        shutil.copytree(run, dst, copy_function=shutil.copy2)
        copies.append(dst)
        return dst

    yield copy
    for dst in copies:
        chmod_tree(dst, writable=True)


# -- the lists and the messages, in-process ------------------------------------------------------


def test_no_effect_keys_are_left_out_of_the_run_dir_name():
    """One list: the keys that cannot change a result are those the directory name omits
    (besides dataset, method and seed, which are in the path)."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("reweight.conf", version_base="1.3"):
            cfg = compose("config", return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    excluded = list(cfg.hydra.job.config.override_dirname.exclude_keys)
    assert excluded == ["dataset", "method", "seed", *NO_EFFECT_KEYS]
    # and every one is a key the code reads: of the composed config, the trainer's the fields
    # TrainerConfig declares without effect (a renamed or dropped key fails here)
    for key in NO_EFFECT_KEYS:
        assert OmegaConf.select(cfg, key, default="absent") != "absent", key
    trainer_keys = [k.removeprefix("trainer.") for k in NO_EFFECT_KEYS if k.startswith("trainer.")]
    assert trainer_keys == list(NO_EFFECT_FIELDS)
    assert set(NO_EFFECT_FIELDS) <= {f.name for f in dataclasses.fields(TrainerConfig)}


def test_channels_last_is_not_a_differing_key():
    old = {"trainer": {"channels_last": False, "max_steps": 4}, "seed": 0}
    assert (
        config_differences(old, {**old, "trainer": {"channels_last": True, "max_steps": 4}}) == []
    )


def test_another_config_is_refused_with_each_key_and_both_values(tmp_path):
    long_root = "/data/" + "x" * 80
    old = {"trainer": {"batch_size": 4, "progress": None}, "note": long_root, "gone": 1}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    new = {"trainer": {"batch_size": 8, "progress": True}, "note": long_root + "y"}
    before = snapshot(tmp_path)
    with RunDir(tmp_path, dir_key="hydra.run.dir") as run, pytest.raises(RunDirError) as info:
        run.check(yaml.safe_dump(new), resume=True, max_steps=8)
    message = str(info.value)
    assert "trainer.batch_size: 4 there, 8 here" in message
    assert 'note: "/data/' + "x" * 30 + "... there" in message  # shortened to 40 characters
    assert "gone: 1 there, <absent> here" in message
    assert "progress" not in message  # trainer.progress cannot change the result
    assert "resume=false" in message and "hydra.run.dir" in message
    assert snapshot(tmp_path) == before
    with RunDir(tmp_path) as run:  # resume=false: starts over, nothing refused
        assert run.check(yaml.safe_dump(new), resume=False, max_steps=8) is None
    assert config_differences({"a": 1}, {"a": True}) == [("a", 1, True)]  # 1 is not true


def test_docstring_example():
    result = doctest.testmod(reweight.cli.run_dir, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# -- runs that fail before their first step --------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["dataset.root={tmp}/nowhere", "dataset.download=false", "hydra.run.dir={tmp}/run"],
         "dataset.root"),
        (["trainer.max_steps=0"], "trainer.max_steps"),  # into outputs/... under the cwd
    ],
)  # fmt: skip
def test_failed_first_run_leaves_no_run_folder(tmp_path, args, key):
    args = [a.format(tmp=tmp_path) for a in args]
    before = snapshot(tmp_path)
    assert_refused(cli([*ARGS, *args], cwd=tmp_path), key)
    assert snapshot(tmp_path) == before == {}  # neither run/ nor outputs/ with its parents


@pytest.mark.slow
@pytest.mark.parametrize("resume", ["true", "false"])
def test_failed_run_leaves_an_unfinished_run_unchanged(finished_run, copy_of, tmp_path, resume):
    """An unfinished run (killed before its summary) and a command that fails on its data:
    with resume=true (it would continue) or resume=false (it would start over), nothing of the
    run there changes, train.log included."""
    run = copy_of(finished_run)
    (run / "summary.json").unlink()
    before = snapshot(tmp_path)
    proc = cli(
        [*ARGS, f"hydra.run.dir={run}", f"resume={resume}", f"dataset.root={tmp_path}/nowhere",
         "dataset.download=false"],
        cwd=tmp_path,
    )  # fmt: skip
    assert_refused(proc, "dataset.root")
    assert snapshot(tmp_path) == before


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "shown"),
    [
        (["trainer.max_steps=2"], "at step 4, past trainer.max_steps=2|trainer.max_steps=4"),
        (["scheduler=cosine"], "scheduler: "),
        (
            ["optimizer.lr=0.5", "seed=1"],
            "optimizer.lr: 0.001 there, 0.5 here|seed: 0 there, 1 here",
        ),
    ],
)
def test_another_config_in_the_run_dir_is_refused(finished_run, copy_of, tmp_path, change, shown):
    """Every differing key is named, in whatever order the config holds them."""
    run = copy_of(finished_run)
    before = snapshot(tmp_path)
    proc = cli([*ARGS, *change, f"hydra.run.dir={run}"], cwd=tmp_path)
    assert_refused(proc, str(run), *shown.split("|"), "resume=false", "hydra.run.dir")
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_finished_run_run_again_is_a_noop(finished_run, copy_of, tmp_path):
    """Keys that cannot change the result may differ (a data root that does not even exist):
    the run is found finished, nothing is read or written, its accuracy is reported."""
    run = copy_of(finished_run)
    before = snapshot(tmp_path)
    proc = cli(
        [*ARGS, f"hydra.run.dir={run}", "threads=2", f"dataset.root={tmp_path}/nowhere",
         "trainer.eval_batch_size=500"],
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    [line] = [line for line in proc.stdout.splitlines() if FINISHED in line]
    accuracy = json.loads((run / "summary.json").read_text())["test_accuracy"]
    assert str(run / "summary.json") in line and f"test accuracy {accuracy:.4f}" in line
    assert "reading MNIST" not in proc.stdout  # skipped before the data
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_a_larger_max_steps_continues_a_finished_run_as_one_uninterrupted_run(tmp_path, data_root):
    """4 steps, then trainer.max_steps=8 in the same folder = 8 steps at once, bit for bit
    (CPU): the same parameters, optimizer and schedule state, step. (channels_last is not a
    differing key either, but changes the rounding: not part of a bitwise comparison.)"""
    schedule = ["scheduler=multistep", "scheduler.milestones=[3,6]", "scheduler.gamma=0.5"]
    short, whole = tmp_path / "short", tmp_path / "whole"
    for args in (
        [*ARGS, *schedule, f"hydra.run.dir={short}"],
        [*ARGS, *schedule, "trainer.max_steps=8", f"hydra.run.dir={short}"],
        [*ARGS, *schedule, "trainer.max_steps=8", f"hydra.run.dir={whole}"],
    ):  # fmt: skip
        proc = cli(args, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    assert f"resumed from {short / 'checkpoint.pt'} at step 4" in (short / "train.log").read_text()
    a = torch.load(short / "checkpoint.pt", weights_only=True)
    b = torch.load(whole / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 8
    for key, value in b["model"].items():
        assert torch.equal(a["model"][key], value), key
    assert a["scheduler"] == b["scheduler"] and a["scheduler"]["last_epoch"] == 8
    for i, state in b["optimizer"]["state"].items():
        assert torch.equal(a["optimizer"]["state"][i]["momentum_buffer"], state["momentum_buffer"])
    assert yaml.safe_load((short / "config.yaml").read_text())["trainer"]["max_steps"] == 8
    assert json.loads((short / "summary.json").read_text())["steps"] == 8
    again = cli([*ARGS, *schedule, "trainer.max_steps=8", f"hydra.run.dir={short}"], tmp_path)
    assert "finished at step 8" in again.stdout  # and now it is finished at 8


@pytest.mark.slow
def test_a_schedule_that_follows_max_steps_is_refused_with_the_way_on(tmp_path, data_root):
    """A cosine schedule's T_max is trainer.max_steps: 4 -> 8 would change the schedule of the
    steps already made, so it is refused in one line naming why and the override that goes
    on with the old schedule, which then continues the run."""
    run = tmp_path / "run"
    assert cli([*ARGS, "scheduler=cosine", f"hydra.run.dir={run}"], tmp_path).returncode == 0
    before = snapshot(tmp_path)
    proc = cli([*ARGS, "scheduler=cosine", "trainer.max_steps=8", f"hydra.run.dir={run}"], tmp_path)
    assert_refused(
        proc, "scheduler.T_max follows trainer.max_steps (4 there, 8 here)",
        "add scheduler.T_max=4", "resume=false",
    )  # fmt: skip
    assert snapshot(tmp_path) == before
    proc = cli(
        [*ARGS, "scheduler=cosine", "trainer.max_steps=8", "scheduler.T_max=4",
         f"hydra.run.dir={run}"], tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 8


@pytest.mark.slow
def test_resume_false_starts_over_once_the_first_step_is_done(finished_run, copy_of, tmp_path):
    run = copy_of(finished_run)
    (run / "notes.txt").write_text("mine")  # not a run file: stays
    proc = cli([*ARGS, "trainer.max_steps=6", "resume=false", f"hydra.run.dir={run}"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["max_steps"] == 6
    assert json.loads((run / "summary.json").read_text())["steps"] == 6
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 6
    log = (run / "train.log").read_text()
    assert "done: step 6" in log and "done: step 4" not in log  # the old run's log is gone
    assert log.count("reading MNIST") == 1  # lines from before the first step, once
    assert "trainer.max_steps=6" in (run / ".hydra" / "overrides.yaml").read_text()
    assert (run / "notes.txt").read_text() == "mine"


# -- folders that cannot be written --------------------------------------------------------------


def _file_in_the_way(tmp: Path) -> tuple[list[str], str]:
    (tmp / "run").write_text("not a folder")
    return [f"hydra.run.dir={tmp / 'run'}"], str(tmp / "run")


def _read_only_parent(tmp: Path) -> tuple[list[str], str]:
    (tmp / "ro").mkdir(mode=0o555)
    return [f"hydra.run.dir={tmp / 'ro' / 'run'}"], str(tmp / "ro" / "run")


def _read_only_run_folder(tmp: Path) -> tuple[list[str], str]:
    (tmp / "run").mkdir(mode=0o555)
    return [f"hydra.run.dir={tmp / 'run'}"], str(tmp / "run")


def _read_only_sweep_parent(tmp: Path) -> tuple[list[str], str]:
    (tmp / "ro").mkdir(mode=0o555)
    sweep = tmp / "ro" / "sweep"
    return ["method=erm,random", f"hydra.sweep.dir={sweep}"], str(sweep)


@pytest.mark.parametrize(
    "setup", [_file_in_the_way, _read_only_parent, _read_only_run_folder, _read_only_sweep_parent]
)
def test_unwritable_run_dir_is_one_line_naming_the_path(tmp_path, setup):
    args, path = setup(tmp_path)
    sweep = setup is _read_only_sweep_parent
    before = snapshot(tmp_path)
    try:
        proc = cli([*(["-m"] if sweep else []), *ARGS, *args], cwd=tmp_path, as_user=True)
        after = snapshot(tmp_path)
    finally:
        chmod_tree(tmp_path, writable=True)  # so that pytest can remove it
    assert_refused(proc, path, "hydra.sweep.dir" if sweep else "hydra.run.dir")
    assert after == before


@pytest.mark.slow
def test_finished_run_made_read_only_is_one_line(finished_run, copy_of, tmp_path):
    run = copy_of(finished_run)
    chmod_tree(run, writable=False)
    before = snapshot(tmp_path)
    proc = cli([*ARGS, f"hydra.run.dir={run}"], cwd=tmp_path, as_user=True)
    assert_refused(proc, str(run), "fix the permissions")
    assert snapshot(tmp_path) == before


# -- sweeps ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_finished_sweep_jobs_are_skipped(tmp_path, data_root):
    sweep = tmp_path / "sweep"
    args = ["-m", "method=erm,random", *ARGS, f"hydra.sweep.dir={sweep}"]
    first = cli(args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    jobs = {job: snapshot(sweep / job) for job in ("0", "1")}
    assert all(".hydra/overrides.yaml" in tree for tree in jobs.values())
    again = cli(args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count(FINISHED) == 2 and "reading MNIST" not in again.stdout
    assert {job: snapshot(sweep / job) for job in jobs} == jobs
    with (sweep / "results.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["n"]) for r in rows] == [("erm", "1"), ("random", "1")]
