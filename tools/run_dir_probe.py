"""The run-directory probe of issue #24: a signal at every phase of ``python -m reweight``, then
the command its interrupt line names, and what the run directory says after each.
``python tools/run_dir_probe.py`` runs every case and prints one table row per case; ``--quick``
a few; ``--markdown`` the table as the README shows it.

Each case is one phase (``PHASES``: from the config check to the last file written), one signal
(SIGINT or SIGTERM) and one starting point (``fresh``: no run folder; ``replace``: the folder
holds a finished run of another config and the command says ``resume=false``). The signal is real
and delivered at a fixed point: the CLI runs under a small wrapper (``_INJECT``) that wraps the
function that begins the phase (or the writer of the phase's file, between ``torch.save`` and the
rename) so that the process sends the signal to itself once, there. Nothing else is changed: the
handlers, the exit status and the files are the app's own.

After the interrupted command the probe checks (``check_interrupted``): the exit status
(130 / 143); exactly one stderr line, the interrupt line; no temporary file left anywhere; a run
that never made its first step left the folder exactly as it was; ``summary.json`` (the marker of
a finished run) only beside every file it promises; a checkpoint at the step the line names, with
``metrics.csv`` up to that step; every file readable; a finished run that was being replaced kept
whole (in place, or in ``<run dir>.replaced``); the trackers (``logger=...``) agreeing with the
folder: MLflow's run KILLED and W&B's exit code non-zero unless ``summary.json`` is there. Then
the command the interrupt line names is run (``check_rerun``): exit 0, the run finished with
every file, nothing left beside, its model and ``metrics.csv`` equal, bit for bit, to those of
the same run never interrupted, and every tracker saying FINISHED (MLflow) and 0 (W&B's last
session).

Example::

    python tools/run_dir_probe.py --quick            # 2 cases, about a minute on one core
    python tools/run_dir_probe.py --markdown         # every case (~20 min on one core)
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ARGS = (
    "dataset=mnist_noisy",  # noisy labels: suspects.csv and the weight histogram are written too
    "dataset.noise_rate=0.4",
    "dataset.train_per_class=30",  # 300 training images: the final passes over them are quick
    "trainer.max_steps=4",
    "trainer.batch_size=20",
    "trainer.meta_batch_size=20",
    "trainer.eval_every=0",
    "trainer.log_every=1",
    "trainer.checkpoint_every=2",
    "trainer.final_weights=1",
    "threads=1",
)
"""One tiny run: 4 steps, a checkpoint at steps 2 and 4, a log row every step."""
MAX_STEPS = 4
OLD_RUN = ("seed=1",)
"""What the finished run that ``replace`` starts from differs by (with ``ARGS``)."""

# The files of a finished run of ARGS (a run that says it is finished must hold each one).
FINISHED_FILES = (
    "config.yaml",
    ".hydra/config.yaml",
    ".hydra/hydra.yaml",
    ".hydra/overrides.yaml",
    "train.log",
    "labels.pt",
    "dataset.json",
    "checkpoint.pt",
    "metrics.csv",
    "weights.pt",
    "suspects.csv",
    "learning_curves.png",
    "weight_histogram.png",
    "summary.json",
)

# The signal goes at one point of the run: `hook(...)` wraps the function that begins a phase,
# `during_write(...)` the writer of one file (after its bytes are in the temporary file, before
# the rename). Everything is looked up from the app's own modules, wherever they live.
_INJECT = r"""
import functools, os, runpy, signal, sys
from pathlib import Path
phase, signum = sys.argv[1], getattr(signal, sys.argv[2])
del sys.argv[1:3]
import reweight, reweight.cli
app = sys.modules[reweight.cli.train.__module__]
trainer_mod = sys.modules[reweight.Trainer.__module__]
files_mod = sys.modules[app.write_run_files.__module__]
run_dir_mod = sys.modules[app.RunDir.__module__]
fired = []

def fire():
    if not fired:
        fired.append(phase)
        os.kill(os.getpid(), signum)  # Python runs the handler before the next line

def hook(owner, name, when=lambda *a, **k: True):
    original = getattr(owner, name)
    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        if when(*args, **kwargs):
            fire()
        return original(*args, **kwargs)
    setattr(owner, name, wrapper)

def during_write(module, filename, nth=1):
    original, seen = module.atomic_write, []
    def atomic_write(path, write):
        def writing(f):
            write(f)
            if Path(path).name == filename:
                seen.append(path)
                if len(seen) == nth:
                    fire()
        return original(path, writing)
    module.atomic_write = atomic_write

def at_step(n):
    return lambda self, *a, **k: self.step == n

HOOKS = {
    "config": lambda: hook(reweight.cli.ValidateConfig, "on_run_start"),
    "setup": lambda: hook(app.RunDir, "check"),
    "data": lambda: hook(app, "build_dataset"),
    "model": lambda: hook(reweight.Trainer, "from_bundle"),
    "first_step": lambda: hook(reweight.Trainer, "train_step", when=at_step(0)),
    "commit": lambda: hook(app, "save_labels"),
    "mid_training": lambda: hook(reweight.Trainer, "train_step", when=at_step(2)),
    "checkpoint": lambda: during_write(sys.modules[trainer_mod.write_checkpoint.__module__],
                                       "checkpoint.pt", nth=1),
    "last_checkpoint": lambda: during_write(
        sys.modules[trainer_mod.write_checkpoint.__module__], "checkpoint.pt", nth=2),
    "final_eval": lambda: hook(reweight.Trainer, "final_result"),
    "final_weights": lambda: hook(reweight.Trainer, "example_weights"),
    "metrics_csv": lambda: hook(files_mod, "write_metrics_csv"),
    "weights_pt": lambda: during_write(files_mod, "weights.pt"),
    "suspects_csv": lambda: hook(files_mod, "write_suspects"),
    "plots": lambda: hook(files_mod, "plot_learning_curves"),
    "summary": lambda: during_write(sys.modules[files_mod.atomic_write.__module__],
                                    "summary.json"),
    "finish": lambda: hook(app.RunDir, "finish"),
}
HOOKS[phase]()
runpy.run_module("reweight", run_name="__main__", alter_sys=True)
"""

HOOKS_NAMED = tuple(re.findall(r'^    "(\w+)": lambda', _INJECT, re.MULTILINE))
"""The phases ``_INJECT`` can send a signal in (``PHASES`` describes each)."""

PHASES = {
    "config": "the config check, before Hydra makes the run folder",
    "setup": "the run folder's check (RunDir.check)",
    "data": "reading the data",
    "model": "building the Trainer (the model and the method built)",
    "first_step": "the first training step (before the run's files are written)",
    "commit": "writing the run's records after the first step (labels.pt, dataset.json)",
    "mid_training": "training, step 3 of 4",
    "checkpoint": "writing checkpoint.pt at step 2 (inside the atomic write)",
    "last_checkpoint": "writing checkpoint.pt at the last step",
    "final_eval": "the final evaluation",
    "final_weights": "scoring every example's final weight",
    "metrics_csv": "writing the final metrics.csv",
    "weights_pt": "writing weights.pt (inside the atomic write)",
    "suspects_csv": "writing suspects.csv",
    "plots": "drawing the plots",
    "summary": "writing summary.json (inside the atomic write)",
    "finish": "after summary.json: removing the replaced run",
}
SIGNALS = ("SIGINT", "SIGTERM")
STARTS = ("fresh", "replace")
QUICK = (
    ("mid_training", "SIGTERM", "replace"),
    ("finish", "SIGINT", "replace"),
)
"""The reduced set the default test suite runs (the full matrix is marked slow)."""

_NOT_THE_RUN = ("wandb-cache", "wandb-config")  # the offline trackers' own caches
_LINE = re.compile(r"^interrupted(?: at step (\d+))?; (.+?) to continue(?: \(.+\))?$")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclasses.dataclass
class Outcome:
    """What one case did: the interrupted command, then the one its line says to run."""

    phase: str
    signal: str
    start: str
    status: int | None = None
    line: str = ""
    committed: bool = False  # the interrupted run wrote its records (made its first step)
    checkpoint_step: int | None = None
    finished_after_signal: bool = False  # summary.json there after the interrupted command
    rerun_status: int | None = None
    rerun: str = ""  # what the rerun did: "continued", "started over", "nothing to do"
    problems: list[str] = dataclasses.field(default_factory=list)

    def row(self) -> str:
        ok = "ok" if not self.problems else "; ".join(self.problems)
        step = "-" if self.checkpoint_step is None else str(self.checkpoint_step)
        return (
            f"| {self.phase} | {self.signal} | {self.start} | {self.status} | "
            f"{'yes' if self.committed else 'no'} | {step} | "
            f"{'yes' if self.finished_after_signal else 'no'} | {self.rerun or '-'} | {ok} |"
        )


HEADER = (
    "| phase | signal | start | exit | files written | checkpoint step | finished | "
    "the rerun | verdict |\n|---|---|---|---|---|---|---|---|---|"
)


def env(tmp: Path) -> dict[str, str]:
    """The CLI's environment: one thread, no inherited HYDRA_FULL_ERROR, trackers offline."""
    out = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "PYTHONPATH")}
    out.update(
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        WANDB_DIR=str(tmp),
        WANDB_CACHE_DIR=str(tmp / "wandb-cache"),
        WANDB_CONFIG_DIR=str(tmp / "wandb-config"),
        MLFLOW_TRACKING_URI="",
    )
    return out


def cli(
    args: Sequence[str], cwd: Path, inject: tuple[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``python -m reweight ARGS``; ``inject=(phase, signal)``: under ``_INJECT``."""
    head = ["-m", "reweight"] if inject is None else ["-c", _INJECT, *inject]
    return subprocess.run(
        [sys.executable, *head, *args],
        cwd=cwd,
        env=env(cwd),
        capture_output=True,
        text=True,
        timeout=900,
        preexec_fn=_sigint_default,
    )


def _sigint_default() -> None:
    """In the child, before the CLI starts: SIGINT at its default. A probe started in the
    background (``nohup``, ``&`` in a script) has SIGINT ignored, which its children inherit,
    and the CLI rightly leaves an ignored signal ignored: its SIGINT cases would finish."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def snapshot(root: Path, skip: Sequence[str] = ()) -> dict[str, tuple]:
    """Every path under ``root``: kind, mode, and for files size and content hash."""
    tree = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if any(rel == s or rel.startswith(s + os.sep) for s in skip):
            continue
        st = path.lstat()
        is_file = stat.S_ISREG(st.st_mode)
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if is_file else None
        tree[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), digest)
    return tree


def model_state(run: Path) -> dict:
    import torch

    return torch.load(run / "checkpoint.pt", weights_only=True)["model"]


def metric_rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open(newline="") as f:
        return [{k: v for k, v in row.items() if k != "time_s"} for row in csv.DictReader(f)]


@dataclasses.dataclass
class Reference:
    """The run of ``ARGS`` never interrupted, and the finished run of another config that
    ``replace`` starts from; each made once, into ``root``."""

    root: Path
    extra: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.done = self.root / "reference"
        self.old = self.root / "old"
        for folder, more in ((self.done, ()), (self.old, OLD_RUN)):
            if not (folder / "summary.json").is_file():
                proc = cli([*ARGS, *self.extra, *more, f"hydra.run.dir={folder}"], self.root)
                if proc.returncode != 0:
                    raise RuntimeError(f"reference run failed:\n{proc.stderr[-3000:]}")
        self.model = model_state(self.done)
        self.rows = metric_rows(self.done)


def readable(run: Path) -> list[str]:
    """The files of ``run`` that cannot be read as what they claim to be."""
    import torch
    import yaml

    bad = []
    for path in sorted(run.rglob("*")):
        if not path.is_file():
            continue
        name = path.name
        try:
            if name.endswith(".json"):
                json.loads(path.read_text())
            elif name.endswith((".yaml", ".yml")):
                yaml.safe_load(path.read_text())
            elif name.endswith(".pt"):
                torch.load(path, weights_only=True)
            elif name.endswith(".png") and path.read_bytes()[:8] != PNG_MAGIC:
                raise ValueError("not a PNG")
            elif name.endswith(".csv"):
                with path.open(newline="") as f:
                    rows = list(csv.reader(f))
                if not rows or any(len(r) != len(rows[0]) for r in rows):
                    raise ValueError("ragged rows")
        except Exception as err:  # any failure to read is the finding
            bad.append(f"{path.name} unreadable ({type(err).__name__})")
    return bad


def tracker_endings(run: Path) -> dict[str, object]:
    """How each tracker of ``run`` says the run ended: MLflow's run status, the exit code of
    W&B's last offline session (None: it has none). A tracker never opened is absent."""
    import warnings

    from reweight.core.files import MLFLOW_DB, MLFLOW_RUN_ID, WANDB_DIR
    from reweight.train.trackers import _read_wandb_records

    out: dict[str, object] = {}
    if (run / MLFLOW_RUN_ID).is_file():
        import mlflow

        with warnings.catch_warnings():  # MLflow's SQL store uses APIs SQLAlchemy deprecates
            warnings.simplefilter("ignore", DeprecationWarning)
            client = mlflow.tracking.MlflowClient(f"sqlite:///{run / MLFLOW_DB}")
            out["mlflow"] = client.get_run((run / MLFLOW_RUN_ID).read_text().strip()).info.status
    sessions = sorted((run / WANDB_DIR).glob("offline-run-*/run-*.wandb"))  # oldest first
    if sessions:
        codes = [
            r.exit.exit_code
            for path in sessions
            for r in _read_wandb_records(path)
            if r.WhichOneof("record_type") == "exit"
        ]
        out["wandb"] = codes[-1] if codes else None
    return out


def tracker_problems(run: Path, finished: bool) -> list[str]:
    """Each tracker that disagrees with the run directory: a finished run is FINISHED in
    MLflow and exits 0 in W&B; an interrupted one is KILLED and exits non-zero."""
    endings = tracker_endings(run)
    want = {"mlflow": "FINISHED", "wandb": 0} if finished else {"mlflow": "KILLED"}
    problems = [
        f"{name} says {endings[name]!r}, not {value!r}"
        for name, value in want.items()
        if name in endings and endings[name] != value
    ]
    if not finished and "wandb" in endings and endings["wandb"] in (0, None):
        problems.append(f"wandb's last session exits {endings['wandb']!r}, not non-zero")
    return problems


def check_interrupted(
    out: Outcome, proc: subprocess.CompletedProcess, tmp: Path, run: Path, before: dict
) -> None:
    """The run folder after the interrupted command (see the module docstring)."""
    import torch

    signum = getattr(signal, out.signal)
    out.status = proc.returncode
    problems = out.problems
    if proc.returncode != 128 + signum:
        problems.append(f"exit {proc.returncode}, not {128 + signum}")
    lines = proc.stderr.splitlines()
    out.line = lines[-1] if lines else ""
    if len(lines) != 1 or not _LINE.match(lines[0]):
        problems.append(f"stderr is not the interrupt line: {proc.stderr[-600:]!r}")
    temporary = [str(p.relative_to(tmp)) for p in tmp.rglob("*.tmp")]
    if temporary:
        problems.append(f"temporary files left: {temporary}")
    replaced = run.with_name(run.name + ".replaced")
    out.committed = (run / "config.yaml").is_file() and (
        out.start == "fresh" or (run / "config.yaml").read_bytes() != before["config"]
    )
    after = snapshot(tmp, skip=_NOT_THE_RUN)
    if not out.committed and after != before["tree"]:
        problems.append("the folder changed though the run wrote no records")
    if out.start == "replace":  # the finished run: whole in place, or whole beside
        kept = replaced if replaced.is_dir() else run
        finished_new = (run / "summary.json").is_file() and out.committed
        if not finished_new and snapshot(kept) != before["old"]:
            problems.append(f"the finished run it replaces is not whole in {kept.name}")
        if replaced.is_dir() and not out.committed:
            problems.append(f"{replaced.name} made by a run that wrote nothing")
    out.finished_after_signal = (run / "summary.json").is_file() and (
        out.start == "fresh" or out.committed
    )
    if out.finished_after_signal:
        missing = [f for f in FINISHED_FILES if not (run / f).is_file()]
        if missing:
            problems.append(f"summary.json without {missing}")
        if replaced.exists() and out.phase != "finish":  # there: the next command removes it
            problems.append(f"finished, {replaced.name} still there")
    if out.committed and (run / "checkpoint.pt").is_file():
        out.checkpoint_step = int(torch.load(run / "checkpoint.pt", weights_only=True)["step"])
        match = _LINE.match(out.line)
        if match and match.group(1) and int(match.group(1)) != out.checkpoint_step:
            problems.append(f"line says step {match.group(1)}, checkpoint {out.checkpoint_step}")
        if (run / "metrics.csv").is_file():
            steps = [int(r["step"]) for r in metric_rows(run)]
            if steps != list(range(1, len(steps) + 1)) or steps[-1] < out.checkpoint_step:
                problems.append(f"metrics.csv steps {steps}, checkpoint {out.checkpoint_step}")
    if run.is_dir():
        problems.extend(readable(run))
    if out.committed:  # before, the trackers' files are those of the run it replaces
        problems.extend(tracker_problems(run, out.finished_after_signal))


def check_rerun(out: Outcome, proc: subprocess.CompletedProcess, run: Path, ref: Reference) -> None:
    """The folder after the command the interrupt line names: the run finished, equal to the
    run never interrupted."""
    out.rerun_status = proc.returncode
    text = proc.stdout + proc.stderr
    out.rerun = (
        "nothing to do"
        if "nothing to do" in text
        else "continued"
        if "resumed from" in text
        else "started over"
    )
    problems = out.problems
    if out.rerun == "started over" and out.checkpoint_step is not None:
        problems.append(
            f"the line says {out.line!r}, but that command started over (checkpoint at step "
            f"{out.checkpoint_step})"
        )
    if proc.returncode != 0 or proc.stderr.strip():
        problems.append(f"rerun: exit {proc.returncode} {proc.stderr[-600:]!r}")
        return
    missing = [f for f in FINISHED_FILES if not (run / f).is_file()]
    if missing:
        problems.append(f"rerun: finished without {missing}")
        return
    summary = json.loads((run / "summary.json").read_text())
    if summary.get("steps") != MAX_STEPS or summary.get("seed") != 0:
        problems.append(f"rerun: summary.json of another run ({summary.get('steps')} steps)")
    replaced = run.with_name(run.name + ".replaced")
    if replaced.exists():
        problems.append(f"rerun: {replaced.name} left")
    state = model_state(run)
    if any(not state[k].equal(v) for k, v in ref.model.items()):
        problems.append("rerun: the model differs from the run never interrupted")
    if metric_rows(run) != ref.rows:
        problems.append("rerun: metrics.csv differs from the run never interrupted")
    problems.extend(f"rerun: {p}" for p in readable(run))
    problems.extend(f"rerun: {p}" for p in tracker_problems(run, finished=True))


def rerun_args(line: str, args: list[str]) -> list[str]:
    """The command the interrupt line names: the same one, or with the change it says."""
    match = _LINE.match(line)
    how = match.group(2) if match else "run the same command"
    changed = re.findall(r"\b(resume=\w+)", how)
    if not changed:
        return args
    return [a for a in args if not a.startswith("resume=")] + changed


def probe(
    phase: str, signame: str, start: str, tmp: Path, ref: Reference, extra: Sequence[str] = ()
) -> Outcome:
    """One case in the empty folder ``tmp``: the interrupted command, then the command its
    line names; the findings in ``Outcome.problems`` (none: the folder told the truth)."""
    out = Outcome(phase, signame, start)
    run = tmp / "run"
    args = [*ARGS, *ref.extra, *extra, f"hydra.run.dir={run}"]
    if start == "replace":
        shutil.copytree(ref.old, run, copy_function=shutil.copy2)
        args.append("resume=false")
    before = {
        "tree": snapshot(tmp, skip=_NOT_THE_RUN),
        "old": snapshot(run) if run.is_dir() else {},
        "config": (run / "config.yaml").read_bytes() if run.is_dir() else b"",
    }
    proc = cli(args, tmp, inject=(phase, signame))
    check_interrupted(out, proc, tmp, run, before)
    again = cli(rerun_args(out.line, args), tmp)
    check_rerun(out, again, run, ref)
    return out


def cases(quick: bool) -> list[tuple[str, str, str]]:
    if quick:
        return list(QUICK)
    return [(p, s, start) for start in STARTS for p in PHASES for s in SIGNALS]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the reduced set only")
    parser.add_argument("--markdown", action="store_true", help="print the table only")
    parser.add_argument("--phase", action="append", help="only these phases (repeatable)")
    parser.add_argument("--start", choices=STARTS, help="only this starting point")
    parser.add_argument("--signal", choices=SIGNALS, help="only this signal")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    parser.add_argument("extra", nargs="*", help="more overrides for every run (KEY=VALUE)")
    opts = parser.parse_args(argv)
    root = opts.keep or Path(tempfile.mkdtemp(prefix="run_dir_probe-"))
    root.mkdir(parents=True, exist_ok=True)
    ref = Reference(root, tuple(opts.extra))
    outcomes = []
    print(HEADER, flush=True)
    for phase, signame, start in cases(opts.quick):
        if (
            (opts.phase and phase not in opts.phase)
            or (opts.start and start != opts.start)
            or (opts.signal and signame != opts.signal)
        ):
            continue
        tmp = root / f"{phase}-{signame}-{start}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        t0 = time.perf_counter()
        out = probe(phase, signame, start, tmp, ref)
        outcomes.append(out)
        timing = "" if opts.markdown else f" {time.perf_counter() - t0:.0f} s"
        print(out.row() + timing, flush=True)
    if opts.keep is None:
        shutil.rmtree(root, ignore_errors=True)
    bad = [o for o in outcomes if o.problems]
    if not opts.markdown:
        print(f"{len(outcomes) - len(bad)} of {len(outcomes)} cases truthful", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
