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
import hashlib
import json
import os
import shutil
import signal
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
from reweight.cli.run_config import NO_EFFECT_KEYS, config_differences
from reweight.cli.run_dir import RunDir, RunDirError
from reweight.train.config import NO_EFFECT_FIELDS, TrainerConfig
from tests.helpers import REWEIGHT, run_command, signal_at, start_command, torchrun

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


# `python -m reweight` on a disk that is full for one file: every write of a run's file ends with
# the fsync of atomic_write's temporary file ".<name>.*.tmp"; that one fails with ENOSPC, as a
# write to a full disk does (the file system itself is left as it is).
_ENOSPC = """
import errno, os, runpy, sys
name = sys.argv.pop(1)
sync = os.fsync
def fsync(fd):
    if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{name}."):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return sync(fd)
os.fsync = fsync
runpy.run_module("reweight", run_name="__main__", alter_sys=True)
"""


def cli(
    args: list[str], cwd: Path, as_user: bool = False, disk_full_at: str | None = None
) -> subprocess.CompletedProcess:
    """``python -m reweight ARGS`` in ``cwd``; ``as_user``: permission bits apply even to root;
    ``disk_full_at``: writing the run file of that name fails with ENOSPC (``_ENOSPC``)."""
    command = REWEIGHT if disk_full_at is None else [sys.executable, "-c", _ENOSPC, disk_full_at]
    return run_command(
        [*command, *args], cwd, preexec_fn=_as_a_user if as_user and os.geteuid() == 0 else None
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


@pytest.mark.parametrize(
    ("args", "method"),
    [
        (["method=mwnet"], "mwnet"),
        (["method=mwnet_sum"], "mwnet_sum"),  # its method.name is mwnet
        (["experiment=mwnet_mnist_noisy"], "mwnet_sum"),  # chosen by the preset
    ],
)
def test_the_run_folder_is_named_by_the_method_config_chosen(tmp_path, args, method):
    """Two method configs with one method.name (and the same overrides) never share a folder."""
    proc = run_command(
        [*REWEIGHT, *args, "--cfg", "all", "--resolve", "-p", "hydra.run.dir"],
        tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).parts[2] == method, proc.stdout  # outputs/<dataset>/


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


def files_of(tree: dict[str, tuple]) -> dict[str, tuple]:
    """A ``snapshot`` without folders' mtimes (a folder moved elsewhere may get a new one)."""
    return {k: v if v[4] is not None else v[:2] for k, v in tree.items()}


@pytest.mark.slow
def test_disk_full_in_the_final_files_keeps_the_finished_run(finished_run, copy_of, tmp_path):
    """A finished run, then resume=false with another config on a disk that fills up at the
    last plot: one line naming the file, exit 1; the finished run is kept whole beside, the new
    run is not taken for finished (no summary.json), and once there is space again the same
    command finishes it (the plots made) and the finished run it replaced goes."""
    run = copy_of(finished_run)
    old = files_of(snapshot(run))
    curves = run / "learning_curves.png"
    args = [*ARGS, "trainer.max_steps=6", f"hydra.run.dir={run}"]
    proc = cli([*args, "resume=false"], tmp_path, disk_full_at=curves.name)
    assert proc.returncode == 1, proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith("error: no space left on device writing ") and str(curves) in line
    assert "resume=true" in line
    kept = tmp_path / "run.replaced"
    assert files_of(snapshot(kept)) == old  # whole, every file as it was
    assert f"finished run in {run} moved to {kept}" in proc.stdout
    left = {p.name for p in run.iterdir()}
    assert "summary.json" not in left and curves.name not in left
    assert not [name for name in left if name.endswith(".tmp")]
    assert "metrics.csv" in left  # the new run's, written as it trained
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 6

    again = cli(args, tmp_path)  # space again; resume=true (the default) continues
    assert again.returncode == 0, again.stderr
    assert "finished at step" not in again.stdout  # not taken for finished
    assert json.loads((run / "summary.json").read_text())["steps"] == 6
    assert curves.read_bytes().startswith(b"\x89PNG")
    assert not kept.exists()


DIVERGES = [
    "optimizer.lr=1e4",
    "trainer.max_steps=10",
    "trainer.checkpoint_every=2",
    "trainer.log_every=1",
]
"""With ARGS: a NaN loss at step 8 (a checkpoint at step 6 before it)."""


@pytest.mark.slow
def test_a_diverging_restart_keeps_the_finished_run(finished_run, copy_of, tmp_path):
    """A finished run, then resume=false with a learning rate that diverges at step 8: one line
    naming the step, the checkpoint kept and the folder the finished run is kept in, exit 1;
    the finished run whole there; nothing of it (suspects.csv...) left in the run folder."""
    run = copy_of(finished_run)
    old = files_of(snapshot(run))
    proc = cli([*ARGS, *DIVERGES, "resume=false", f"hydra.run.dir={run}"], tmp_path)
    assert proc.returncode == 1, proc.stderr
    [line] = proc.stderr.splitlines()
    kept = tmp_path / "run.replaced"
    assert line.startswith("error: training loss is nan at step 8 ")
    assert f"{run / 'checkpoint.pt'} (step 6), the last finite checkpoint, is kept" in line
    assert "lower optimizer.lr" in line and f"kept in {kept}" in line
    assert files_of(snapshot(kept)) == old
    left = {p.name for p in run.iterdir()}
    assert not left & {"summary.json", "suspects.csv", "learning_curves.png", "weights.pt"}
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 6


@pytest.mark.slow
def test_a_diverged_run_continues_only_with_a_lower_learning_rate(tmp_path, data_root):
    """Diverged at step 8: the same command again is refused with one line (it would diverge
    again) and changes nothing; with a lower optimizer.lr it continues from the step-6
    checkpoint at that rate and finishes."""
    run = tmp_path / "run"
    args = [*ARGS, *DIVERGES, f"hydra.run.dir={run}"]
    assert cli(args, tmp_path).returncode == 1
    before = snapshot(tmp_path)
    assert_refused(cli(args, tmp_path), str(run), "diverged", "step 6", "optimizer.lr")
    assert snapshot(tmp_path) == before
    lower = cli([*args, "optimizer.lr=0.01"], tmp_path)
    assert lower.returncode == 0, lower.stderr
    assert "resumed from checkpoint.pt at step 6 with optimizer.lr=0.01" in lower.stdout
    assert json.loads((run / "summary.json").read_text())["steps"] == 10
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.01)
    assert [int(row["step"]) for row in state["history"]] == list(range(1, 11))
    assert not (run / "diverged.json").exists()


@pytest.mark.slow
def test_one_run_per_folder_and_a_stale_lock_is_taken_over(tmp_path, data_root):
    """Two identical commands into one folder: while the first holds it (here frozen by SIGSTOP
    once it has logged its run directory), the second exits 2 with one line naming the first's
    process and changes nothing; once the first is killed (SIGKILL: no clean-up of any kind)
    the lock it left is taken over and the run completes, with one log."""
    run = tmp_path / "run"
    args = [*ARGS, f"hydra.run.dir={run}"]
    first = start_command([*REWEIGHT, *args], tmp_path, stderr=subprocess.DEVNULL)
    try:
        for line in first.stdout:  # the lock is taken before this line
            if "run directory:" in line:
                break
        first.send_signal(signal.SIGSTOP)
        before = snapshot(tmp_path)
        second = cli(args, tmp_path)
        assert_refused(second, str(run), f"in use by process {first.pid}", "hydra.run.dir")
        assert snapshot(tmp_path) == before
    finally:
        first.kill()
        first.wait()
        first.stdout.close()
    third = cli(args, tmp_path)
    assert third.returncode == 0, third.stderr
    assert json.loads((run / "summary.json").read_text())["steps"] == 4
    assert (run / "train.log").read_text().count("done: step 4") == 1


@pytest.mark.slow
def test_a_corrupt_summary_is_one_line_naming_it(finished_run, copy_of, tmp_path):
    run = copy_of(finished_run)
    (run / "summary.json").write_text('{"test_accuracy": 0.9')  # cut short
    before = snapshot(tmp_path)
    assert_refused(cli([*ARGS, f"hydra.run.dir={run}"], tmp_path), str(run / "summary.json"))
    inspect = run_command([sys.executable, "-m", "reweight.outputs.inspect", str(run)], timeout=300)
    assert_refused(inspect, str(run / "summary.json"))
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_inspect_that_cannot_rebuild_the_images_writes_nothing(tmp_path):
    """Its one error line comes before any file is written (no 'wrote ...' line before it).
    A run on noisy labels (mnist_imbalanced's labels are all true: it lists no suspects)."""
    run = tmp_path / "noisy"
    noisy = [a for a in ARGS if not a.startswith("dataset=")]
    small = "dataset.train_per_class=100"  # suspects.csv scores every training image
    finished = cli(["dataset=mnist_noisy", small, *noisy, f"hydra.run.dir={run}"], tmp_path)
    assert finished.returncode == 0, finished.stderr
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["dataset"].update(root=str(tmp_path / "nowhere"), download=False)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    before = snapshot(tmp_path)
    proc = run_command([sys.executable, "-m", "reweight.outputs.inspect", str(run)], timeout=300)
    assert_refused(proc, "cannot rebuild the run's images", str(tmp_path / "nowhere"))
    assert snapshot(tmp_path) == before


def test_an_unquoted_space_in_a_value_says_to_quote_it(tmp_path):
    proc = cli([*ARGS, f"hydra.run.dir={tmp_path}/my", "runs"], tmp_path)
    assert_refused(proc, "'runs' is not KEY=VALUE", f'"hydra.run.dir={tmp_path}/my runs"')
    assert snapshot(tmp_path) == {}


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_before_the_first_step_is_one_line_and_leaves_nothing(
    tmp_path, data_root, signum, status
):
    """Ctrl-C or SIGTERM while the data are read: the interrupt line, 130 / 143, and neither
    the run folder Hydra made nor anything else left."""
    proc = start_command([*REWEIGHT, *ARGS, f"hydra.run.dir={tmp_path / 'a' / 'run'}"], tmp_path)
    signal_at(proc, "reading MNIST", signum)  # before the first step
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == status, err
    assert err.splitlines() == ["interrupted; run the same command to continue"]
    assert "step 1:" not in out
    assert snapshot(tmp_path) == {}


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


def _tracker_file_in_the_way(tmp: Path, name: str) -> tuple[list[str], str]:
    (tmp / "run").mkdir()
    (tmp / "run" / name).write_text("not a folder")
    logger = "tensorboard" if name == "tensorboard" else "wandb"
    return [f"logger={logger}", f"hydra.run.dir={tmp / 'run'}"], str(tmp / "run" / name)


@pytest.mark.slow
@pytest.mark.parametrize(
    "setup",
    [
        lambda tmp: _tracker_file_in_the_way(tmp, "tensorboard"),
        lambda tmp: _tracker_file_in_the_way(tmp, "wandb"),
        lambda tmp: (
            (tmp / "ro").mkdir(mode=0o555),
            (["logger=wandb", f"logger.wandb.dir={tmp / 'ro'}", f"hydra.run.dir={tmp / 'run'}"],
             f"logger.wandb.dir: cannot write to {tmp / 'ro'}"),
        )[1],
        lambda tmp: (
            (tmp / "ro").mkdir(mode=0o555),
            (["logger=mlflow", f"logger.mlflow.tracking_uri=sqlite:///{tmp / 'ro' / 'm.db'}",
              f"hydra.run.dir={tmp / 'run'}"],
             f"logger.mlflow.tracking_uri: cannot write to {tmp / 'ro'}"),
        )[1],
        lambda tmp: (  # a typo in the scheme: was MLflow's traceback after the first step
            ["logger=mlflow", "logger.mlflow.tracking_uri=htp://localhost:5000",
             f"hydra.run.dir={tmp / 'run'}"],
            "logger.mlflow.tracking_uri='htp://localhost:5000': MLflow has no tracking store",
        ),
    ],
    ids=["tensorboard-file", "wandb-file", "wandb-dir-read-only", "mlflow-store-read-only",
         "mlflow-unknown-scheme"],
)  # fmt: skip
def test_a_tracker_that_cannot_write_is_one_line_before_anything_is_written(tmp_path, setup):
    args, shown = setup(tmp_path)
    before = snapshot(tmp_path)
    try:
        proc = cli([*ARGS, *args], cwd=tmp_path, as_user=True)
        after = snapshot(tmp_path)
    finally:
        chmod_tree(tmp_path, writable=True)
    assert_refused(proc, shown)
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


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [[], ["hydra/launcher=parallel", "hydra.launcher.n_jobs=2"]])
def test_a_sweep_is_validated_whole_before_its_first_job(tmp_path, launcher):
    """One bad value among good ones (the second of three): refused before any job runs, with
    the key and that job's overrides; no sweep folder, nothing written."""
    sweep = tmp_path / "sweep"
    proc = cli(
        ["-m", *ARGS, "trainer.max_steps=4,abc,5", *launcher, f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
    )
    line = assert_refused(proc, "trainer.max_steps", "'trainer.max_steps=abc'")
    assert "job with overrides" in line
    assert snapshot(tmp_path) == {}
    assert "reading MNIST" not in proc.stdout  # no job ran


@pytest.mark.slow
def test_a_failed_job_is_in_the_sweep_table(tmp_path, data_root):
    """A job that fails as it runs (diverges) while another finishes: the sweep ends with the
    failed job's one line (exit 1), and the table is still written, the failure in results.md;
    once the job is run again with a lower rate and finishes, it leaves the failures."""
    sweep = tmp_path / "sweep"
    args = ["-m", *ARGS, *DIVERGES[1:], f"hydra.sweep.dir={sweep}"]
    proc = cli([*args, "optimizer.lr=1e4,0.01"], cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith("error: training loss is nan at step 8 ")
    assert "(job with overrides [" in line and "'optimizer.lr=10000.0']" in line
    with (sweep / "results.csv").open(newline="") as f:
        assert [r["optimizer.lr"] for r in csv.DictReader(f)] == ["0.01"]
    table = (sweep / "results.md").read_text()
    assert "Failed: 1 job(s)." in table
    [failed] = [line for line in table.splitlines() if line.startswith("- job 0 (")]
    assert "`optimizer.lr=10000.0`): training loss is nan at step 8" in failed

    # job 0 continues at a lower rate, job 1 is found finished
    rerun = cli([*args, "optimizer.lr=0.01,0.01"], cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert "Failed" not in (sweep / "results.md").read_text()
    assert not (sweep / "failed").exists()


def test_aggregating_a_folder_that_is_not_a_sweep_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_command(
        [sys.executable, "-m", "reweight.outputs", str(tmp_path / "empty")], timeout=120
    )
    assert_refused(proc, str(tmp_path / "empty"), "hydra.sweep.dir")
    assert snapshot(tmp_path) == {"empty": snapshot(tmp_path)["empty"]}
    assert proc.stdout == ""


@pytest.mark.slow
def test_a_real_full_disk_at_the_checkpoint_is_one_line_and_keeps_the_last_one(tmp_path):
    """The run folder on a real 2 MiB tmpfs (a mount namespace of its own, ``unshare``): the
    checkpoint of step 2 (1.4 MB) fits, that of step 4 does not beside it. One line naming the
    file and the full disk, exit 1; the checkpoint of step 2 kept, no temporary file left."""
    disk, out = tmp_path / "disk", tmp_path / "out"
    disk.mkdir()
    run = disk / "run"
    args = [*ARGS, "trainer.checkpoint_every=2", f"hydra.run.dir={run}"]
    script = (
        f"mount -t tmpfs -o size=2m tmpfs {disk} && "
        f"{sys.executable} -m reweight {' '.join(args)} 2> {out}.stderr; "
        f"echo $? > {out}.rc; ls -A {run} > {out}.ls; "
        f"{sys.executable} -c \"import torch; print(torch.load('{run}/checkpoint.pt', "
        f"weights_only=True)['step'])\" > {out}.step"
    )
    proc = run_command(["unshare", "-Urm", "sh", "-c", script], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert Path(f"{out}.rc").read_text().strip() == "1"
    [line] = Path(f"{out}.stderr").read_text().splitlines()
    assert line.startswith(f"error: no space left on device writing {run / 'checkpoint.pt'}: ")
    assert "resume=true" in line
    assert Path(f"{out}.step").read_text().strip() == "2"
    left = Path(f"{out}.ls").read_text().split()
    assert "checkpoint.pt" in left and not [name for name in left if name.endswith(".tmp")]
    assert "summary.json" not in left


@pytest.mark.slow
@pytest.mark.parametrize(
    "bad",
    [["trainer.batch_size=21"], ["dataset.root={tmp}/nowhere", "dataset.download=false"]],
    ids=["config", "data"],
)
def test_torchrun_bad_input_is_one_line_from_rank_zero(tmp_path, data_root, bad):
    """Under torchrun (2 CPU ranks), a bad config or bad data: one ``error:`` line, from rank
    0, nothing from rank 1 (no traceback of a broken barrier), no run folder; then torchrun's
    own failure summary (its traceback and the ChildFailedError table), and its exit status,
    1."""
    run = tmp_path / "run"
    args = [*ARGS, *(b.format(tmp=tmp_path) for b in bad), f"hydra.run.dir={run}"]
    proc = run_command([*torchrun(), *args], tmp_path)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and bad[0].split("=")[0] in errors[0], proc.stderr
    assert "[rank" not in proc.stderr and "interrupted" not in proc.stderr
    assert str(Path(reweight.cli.run_dir.__file__).parents[1]) not in proc.stderr  # our code
    assert "ChildFailedError" in proc.stderr  # torchrun's summary
    assert snapshot(tmp_path) == {}
