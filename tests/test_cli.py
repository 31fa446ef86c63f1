"""The command line: real runs of `python -m reweight` on the real MNIST of the shared data
folder, a 2 x 2 sweep, resume after SIGKILL, one-line errors, and the wheel outside the repo."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from reweight import cli
from reweight.core import malloc

from .helpers import cli_env, run_command, start_command

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SUMMARY_KEYS = {
    "method",
    "dataset",
    "steps",
    "test_accuracy",
    "test_error",
    "best_test_accuracy",
    "per_class_accuracy",
    "wall_time_s",
    "test_balanced_accuracy",
    "weight_mean_per_class",  # MNIST 4-vs-9 has no corrupted labels: no clean/corrupted keys
    "seed",
    "dataset_seed",
    "dataset_info",
    "run_dir",
    "val_accuracy",
    "val_balanced_accuracy",
    "val_loss",
    "objective",
    "objective_value",
    "objective_is_test",
}
# the Hydra app without Hydra's logging set-up, for in-process calls of cli.main()
QUIET = ["hydra/job_logging=none", "hydra/hydra_logging=none", "hydra.output_subdir=null"]


@pytest.fixture(autouse=True)
def _fresh_hydra():
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


def run_cli(
    args: list[str], cwd: Path, python: str = sys.executable, check: bool = True, timeout=600
) -> subprocess.CompletedProcess:
    proc = run_command([python, "-m", "reweight", *args], cwd, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("summary.json"))


# -- one run -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_single_run_writes_every_output(tmp_path, data_root):
    """The acceptance command, in a subprocess, on the real MNIST, under umask 022."""
    umask = os.umask(0o022)
    try:
        proc = run_cli(["dataset=mnist_imbalanced", "trainer.max_steps=20"], cwd=tmp_path)
    finally:
        os.umask(umask)
    run_dir = tmp_path / "outputs" / "mnist_imbalanced" / "l2rw" / "trainer.max_steps=20" / "seed0"
    # malloc=tuned, the default, asked of glibc (reweight.core.malloc; tests/test_malloc.py)
    kept = "freed memory kept for reuse" if malloc._glibc() else "not glibc: unchanged"
    assert f"malloc: {kept}" in proc.stdout + proc.stderr
    assert run_dirs(tmp_path) == [run_dir]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert (summary["method"], summary["dataset"], summary["steps"]) == (
        "l2rw",
        "mnist_imbalanced",
        20,
    )
    assert 0 <= summary["test_accuracy"] <= 1
    assert summary["test_error"] == pytest.approx(1 - summary["test_accuracy"])
    assert summary["best_test_accuracy"] >= summary["test_accuracy"]
    assert len(summary["per_class_accuracy"]) == 2 and summary["wall_time_s"] > 0
    assert summary["dataset_info"]["split_sizes"] == {
        "train": 4990,
        "meta": 10,
        "test": 1964,
        "val": 10,
    }
    assert summary["run_dir"] == str(run_dir.resolve())

    rows = read_csv(run_dir / "metrics.csv")
    assert rows[-1]["step"] == "20"
    for column in ("train_loss", "meta_loss", "test_accuracy", "weight_mean", "weight_max"):
        assert rows[-1][column] != "", column
    assert float(rows[-1]["test_accuracy"]) == pytest.approx(summary["test_accuracy"])

    for png in ("learning_curves.png", "weight_histogram.png"):
        assert (run_dir / png).read_bytes()[:8] == PNG_MAGIC, png
    resolved = (run_dir / "config.yaml").read_text()
    assert "${" not in resolved and yaml.safe_load(resolved)["trainer"]["max_steps"] == 20
    assert Path(yaml.safe_load(resolved)["dataset"]["root"]) == data_root
    assert (run_dir / ".hydra" / "overrides.yaml").exists()
    assert "done: step 20" in (run_dir / "train.log").read_text()

    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 20 and {"model", "optimizer", "method", "rng"} <= set(checkpoint)
    record = torch.load(run_dir / "weights.pt", weights_only=True)
    assert record["weights"].shape == (4990,) and record["step"] == 20
    assert record["ids"] == [str(i) for i in range(4990)]  # MNIST has no file names: the index
    # every label true (4 vs 9, nothing corrupted): no suspects.csv, and the log says why
    assert not (run_dir / "suspects.csv").exists()
    assert (
        "no suspects.csv: every training label of mnist_imbalanced is its true label"
        in (run_dir / "train.log").read_text()
    )
    info = json.loads((run_dir / "dataset.json").read_text())
    assert yaml.safe_load(resolved)["dataset"]["root"] == info["root"]  # one data folder
    labels = torch.load(run_dir / "labels.pt", weights_only=True)
    assert labels["train_labels"].bincount().tolist() == [20, 4970]
    assert "it/s" not in proc.stderr  # no tqdm bars when stderr is not a terminal
    # every file a run writes, through the one atomic writer or Hydra's open(): 0666 less umask
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in run_dir.rglob("*") if p.is_file()}
    assert {"summary.json", "metrics.csv", "checkpoint.pt", "learning_curves.png"} <= set(modes)
    assert set(modes.values()) == {"0o644"}, modes


def _backticked_files(text: str) -> set[str]:
    return set(re.findall(r"`([\w.]+\.(?:yaml|log|csv|json|pt|png))`", text))


@pytest.mark.slow
def test_the_readme_lists_every_file_a_run_writes(tmp_path, data_root):
    """The README's *Outputs* paragraph names exactly the files of a run with noisy labels, and
    `--help` names each of them (its plots as "PNG plots")."""
    run_dir = tmp_path / "run"
    run_cli(
        ["dataset=mnist_noisy", "dataset.train_per_class=20", "model=mlp", "trainer.max_steps=3",
         "trainer.eval_every=0", "trainer.batch_size=20", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
    )  # fmt: skip
    written = {p.name for p in run_dir.iterdir() if p.is_file()}
    readme = (REPO / "README.md").read_text()
    outputs = readme[readme.index("**Outputs.**") : readme.index("**Resume.**")]
    assert _backticked_files(outputs) == written
    assert "`.hydra/`" in outputs and (run_dir / ".hydra").is_dir()
    help_text = run_cli(["--help"], cwd=tmp_path).stdout
    listed = help_text[help_text.index("A run writes") : help_text.index("Config groups")]
    for name in sorted(written):
        assert name in listed or (name.endswith(".png") and "PNG plots" in listed), name


def test_the_readme_lists_every_option_of_each_group():
    """`optimizer` (sgd, adam, adamw), `scheduler` (...): each list is the group's yaml files."""
    readme = (REPO / "README.md").read_text()
    for group in ("dataset", "optimizer", "scheduler"):
        match = re.search(rf"`{group}` \(([^)]*)\)", readme)
        assert match, group
        listed = {w.strip() for w in match.group(1).replace("\n", " ").split(",")}
        files = {p.stem for p in (REPO / "conf" / group).glob("*.yaml")}
        own = {"image_folder", "tensors"}  # your own data: their own section of the README
        assert listed == files - (own if group == "dataset" else set()), group


def test_train_function_returns_the_objective(tmp_path):
    """`train(cfg)` from Python, with the compose API (what sweepers optimise is its value)."""
    overrides = [
        "model=mlp",
        "method=mwnet",
        "dataset.n_train=2000",
        "trainer.max_steps=4",
        "trainer.log_every=2",
        "trainer.eval_every=2",
    ]
    with initialize_config_module("reweight.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    objective = cli.train(cfg, run_dir=tmp_path)  # the validation accuracy, never the test's
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert objective == summary["val_accuracy"] and summary["method"] == "mwnet"
    assert summary["objective"] == "val_accuracy" and summary["objective_is_test"] is False
    # run again: found finished, the recorded objective returned
    assert cli.train(cfg, run_dir=tmp_path) == objective
    assert [r["step"] for r in read_csv(tmp_path / "metrics.csv")] == ["2", "4"]
    assert (tmp_path / "weight_histogram.png").exists()


# -- sweeps --------------------------------------------------------------------------------------


def test_multirun_2x2_writes_four_jobs_and_the_table(tmp_path):
    sweep = tmp_path / "sweep"
    run_cli(
        [
            "-m",
            "method=erm,random",
            "seed=0,1",
            "model=mlp",
            "trainer.max_steps=3",
            "trainer.eval_every=0",
            "trainer.final_weights=0",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    jobs = run_dirs(sweep)
    assert [j.name for j in jobs] == ["0", "1", "2", "3"]
    accuracy: dict[str, list[float]] = {"erm": [], "random": []}
    seen = set()
    for job in jobs:
        overrides = tuple(yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()))
        seen.add(overrides)
        summary = json.loads((job / "summary.json").read_text())
        assert f"method={summary['method']}" in overrides and summary["steps"] == 3
        accuracy[summary["method"]].append(summary["test_accuracy"])
    assert len(seen) == 4  # each job its own configuration and directory
    table = read_csv(sweep / "results.csv")
    assert [(r["method"], r["n"]) for r in table] == [("erm", "2"), ("random", "2")]
    for row in table:
        values = accuracy[row["method"]]
        assert float(row["test_accuracy_mean"]) == pytest.approx(sum(values) / 2)
    md = (sweep / "results.md").read_text()
    assert "| method | n | test accuracy (%) |" in md and " ± " in md


@pytest.mark.slow
def test_parallel_sweep_with_the_joblib_launcher(tmp_path):
    pytest.importorskip(
        "hydra_plugins.hydra_joblib_launcher",
        reason="the optional launcher hydra-joblib-launcher (reweight[joblib]) is not installed",
    )
    sweep = tmp_path / "sweep"
    args = ["model=mlp", "trainer.max_steps=3", "trainer.eval_every=0", "trainer.final_weights=0"]
    run_cli(
        ["-m", "hydra/launcher=parallel", "threads=1", "method=erm,random", *args,
         f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
    )  # fmt: skip
    assert [j.name for j in run_dirs(sweep)] == ["0", "1"]
    assert [r["method"] for r in read_csv(sweep / "results.csv")] == ["erm", "random"]


# -- resume --------------------------------------------------------------------------------------

RESUME_ARGS = [
    "dataset=mnist_imbalanced",
    "method=l2rw",
    "method.meta_grad=unrolled",
    "trainer.max_steps=40",
    "trainer.checkpoint_every=10",
    "trainer.batch_size=20",
    "trainer.log_every=10",
    "trainer.eval_every=0",
    "trainer.final_weights=0",
]


def _checkpoint_step(path: Path) -> int:
    try:  # written atomically (a temporary file, then os.replace): never half a file
        return int(torch.load(path, weights_only=True)["step"])
    except FileNotFoundError:
        return -1


@pytest.mark.slow
def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path):
    """Kill a run after a checkpoint (step 10, 20 or 30 of 40), run the same command again: the
    final parameters equal those of an uninterrupted run, bit for bit."""
    reference, victim_dir = tmp_path / "reference", tmp_path / "resumed"
    reference.mkdir()
    victim_dir.mkdir()
    command = [sys.executable, "-m", "reweight", *RESUME_ARGS]
    logs = {name: (tmp_path / f"{name}.err").open("w") for name in ("reference", "victim")}
    uninterrupted, victim = (
        start_command(command, cwd, stdout=subprocess.DEVNULL, stderr=logs[name])
        for cwd, name in ((reference, "reference"), (victim_dir, "victim"))
    )
    try:
        deadline = time.monotonic() + 300
        step = -1
        while step < 10:
            assert victim.poll() is None, "the run ended before the kill"
            assert time.monotonic() < deadline, "no checkpoint at step >= 10 within 300 s"
            time.sleep(0.05)
            found = list(victim_dir.rglob("checkpoint.pt"))
            step = _checkpoint_step(found[0]) if found else -1
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=60)
        step = _checkpoint_step(found[0])
        assert 10 <= step < 40, f"killed at step {step}: the run was too fast to interrupt"
        assert victim.returncode == -signal.SIGKILL
        assert not (found[0].parent / "summary.json").exists()

        resumed = run_cli(RESUME_ARGS, cwd=victim_dir)  # the same command, the same directory
        assert f"at step {step}" in resumed.stdout  # "resumed from ... at step k"
        assert uninterrupted.wait(timeout=600) == 0, (tmp_path / "reference.err").read_text()
    finally:
        for proc in (victim, uninterrupted):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs.values():
            log.close()

    [a], [b] = run_dirs(reference), run_dirs(victim_dir)
    assert a.relative_to(reference) == b.relative_to(victim_dir)
    state_a = torch.load(a / "checkpoint.pt", weights_only=True)
    state_b = torch.load(b / "checkpoint.pt", weights_only=True)
    assert state_a["step"] == state_b["step"] == 40
    for name, tensor in state_a["model"].items():
        assert torch.equal(tensor, state_b["model"][name]), name
    rows_a, rows_b = read_csv(a / "metrics.csv"), read_csv(b / "metrics.csv")
    for row_a, row_b in zip(rows_a, rows_b, strict=True):
        assert {**row_a, "time_s": ""} == {**row_b, "time_s": ""}
    summary_a = json.loads((a / "summary.json").read_text())
    summary_b = json.loads((b / "summary.json").read_text())
    assert summary_a["test_accuracy"] == summary_b["test_accuracy"]
    assert summary_a["per_class_accuracy"] == summary_b["per_class_accuracy"]


# -- errors --------------------------------------------------------------------------------------


def run_main(monkeypatch, capsys, tmp_path, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["reweight", *args, *QUIET, f"hydra.run.dir={tmp_path}"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["dataset=imagenet"], "dataset=imagenet is not an option of 'dataset'; allowed: "
         "animal10n, cifar100_lt, cifar100_noisy, cifar10_lt, cifar10_noisy, cifar10n, "
         "clothing1m, food101n, image_folder, mini_webvision, mnist_imbalanced"),
        (["method=l2w"], "allowed: class_balanced, cmwnet, erm, l2rw, mwnet, mwnet_sum, random"),
        (["method.name=l2w"], "method.name must be one of ['class_balanced', 'cmwnet', 'erm',"),
        (["trainer.max_steps=0"], "trainer.max_steps must be >= 1, got 0"),
        (["trainer.max_steps=ten"], "trainer.max_steps must be an integer, got 'ten'"),
        (["trainer.maxsteps=5"], "trainer.maxsteps is not a config key; keys of trainer: "
         "max_steps, batch_size"),
        (["dataset.proportion=1.5"], "proportion must be a number in (0, 1); got 1.5"),
        (["optimizer.lr=fast"], "optimizer.lr must be a number, got 'fast'"),
        (["optimizer.lr=-1"], "optimizer (SGD): Invalid learning rate: -1"),
        (["scheduler=multistep"], "scheduler.milestones has no value"),
        (["seed=-1"], "seed must be an integer >= 0, got -1"),
        (["model.name=alexnet"], "model name 'alexnet' is unknown; allowed: ['lenet', 'mlp'"),
        (["method=mwnet", "method.normalize=max"], "method.normalize must be one of"),
    ],
)  # fmt: skip
def test_bad_override_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path, args, expected):
    code, err = run_main(monkeypatch, capsys, tmp_path, *args)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert expected in err


def test_missing_data_root_is_one_line(monkeypatch, capsys, tmp_path):
    missing = tmp_path / "no-data"
    code, err = run_main(
        monkeypatch, capsys, tmp_path, f"dataset.root={missing}", "dataset.download=false"
    )
    assert code == 2 and err.count("\n") == 1
    assert f"MNIST not found at {missing.resolve() / 'MNIST' / 'raw'}" in err
    assert "dataset.root" in err  # the fix is named


def test_bad_override_in_a_subprocess(tmp_path):
    """What a user sees: one line on stderr, nothing else, exit status 2."""
    proc = run_cli(["method=l2w"], cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: method=l2w is not an option of 'method'; "
        "allowed: class_balanced, cmwnet, erm, l2rw, mwnet, mwnet_sum, random"
    ]
    assert proc.stdout == "" and not (tmp_path / "outputs").exists()


def test_help_lists_groups_and_examples(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["reweight", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "python -m reweight -m method=erm,l2rw,mwnet seed=0,1,2" in out
    assert "method: class_balanced, cmwnet, erm, l2rw, mwnet, mwnet_sum, random" in out
    assert "model: lenet, lstm, mlp, resnet32, torchvision, vit_tiny, wrn28_10" in out
    experiments = next(line for line in out.splitlines() if line.strip().startswith("experiment:"))
    assert "cmwnet_animal10n, cmwnet_clothing1m" in experiments
    assert "l2rw_cifar10_noisy, l2rw_clothing1m" in experiments


# -- the wheel -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_wheel_runs_outside_the_repository(tmp_path, data_root):
    """Build the wheel, install it into a fresh virtual environment, run it from elsewhere.

    The new environment finds torch, Hydra etc. through a .pth line pointing at this
    environment's site-packages (so the test needs no network), but its `reweight` is the
    wheel's: a path line in a .pth file does not run that folder's own .pth files, so this
    environment's editable install of the checkout is not seen.
    """
    src = tmp_path / "src"  # build from a copy: no build/ or egg-info in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("reweight", "conf"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    build = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", dist, src],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    [wheel] = dist.glob("reweight-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = str(venv / "bin" / "python")
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(purelib, "_reweight_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [*pip, "--python", python, "install", "--no-deps", "--no-index", wheel],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run(
        [python, "-c", "import reweight, reweight.conf; print(reweight.__file__)"],
        cwd=elsewhere,
        env=cli_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(venv), where

    helped = run_cli(["--help"], cwd=elsewhere, python=python)
    assert "method: class_balanced, cmwnet, erm, l2rw, mwnet, mwnet_sum, random" in helped.stdout
    script = (venv / "bin" / "reweight").read_text()  # the [project.scripts] entry point
    assert script.startswith(f"#!{python}") and "from reweight.cli import main" in script
    assert "from reweight.outputs import main" in (venv / "bin" / "reweight-aggregate").read_text()

    args = ["model=mlp", "trainer.max_steps=3", "trainer.eval_every=0", "trainer.final_weights=0"]
    run_cli(["dataset=mnist_imbalanced", *args], cwd=elsewhere, python=python)
    [run_dir] = run_dirs(elsewhere)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["dataset_info"]["root"] == str(data_root.resolve())
