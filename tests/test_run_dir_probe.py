"""Issue #24's wider probe (tools/run_dir_probe.py): SIGINT / SIGTERM at every phase of a real
``python -m reweight`` run on the real MNIST, then the command the interrupt line names; the run
directory must tell the truth after each (the checks are the probe's: ``check_interrupted`` and
``check_rerun``).

The default suite runs ``QUICK`` (two cases); every phase x signal x starting point, every tracker
and an option of every config group are the exhaustive probe (``probe``: minutes a case, several
CLI runs each; deselected by default, run with ``python -m pytest -m probe``).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.test_tracker_records import mlflow_history, tb_events, wandb_history
from tests.test_tracking import _mlflow_status, _wandb_records

_PATH = Path(__file__).resolve().parents[1] / "tools" / "run_dir_probe.py"
_spec = importlib.util.spec_from_file_location("run_dir_probe", _PATH)
probe = importlib.util.module_from_spec(_spec)
sys.modules["run_dir_probe"] = probe  # dataclasses look their module up
_spec.loader.exec_module(probe)

ALL = probe.cases(quick=False)
QUICK = [case for case in ALL if case in probe.QUICK]
REST = [case for case in ALL if case not in probe.QUICK]


def ids(case: tuple[str, str, str]) -> str:
    return "-".join(case)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_root):
    """The run never interrupted, and the finished run that ``replace`` starts from."""
    return probe.Reference(tmp_path_factory.mktemp("probe"))


def assert_truthful(out) -> None:
    assert out.problems == [], f"{out.phase} {out.signal} {out.start}: {out.problems}"


def test_the_probe_covers_every_phase_signal_and_start():
    assert len(ALL) == len(probe.PHASES) * 2 * 2 == len(set(ALL))
    assert set(probe.QUICK) <= set(ALL) and len(QUICK) == len(probe.QUICK)
    assert set(probe.PHASES) == set(probe.HOOKS_NAMED)  # each phase has its injection point


@pytest.mark.parametrize("case", QUICK, ids=ids)
def test_a_signal_leaves_a_truthful_run_dir(tmp_path, reference, case):
    assert_truthful(probe.probe(*case, tmp_path, reference))


@pytest.mark.slow
@pytest.mark.probe
@pytest.mark.parametrize("case", REST, ids=ids)
def test_a_signal_at_every_phase_leaves_a_truthful_run_dir(tmp_path, reference, case):
    assert_truthful(probe.probe(*case, tmp_path, reference))


# -- every tracker (offline) ---------------------------------------------------------------------

TRACKERS = ("logger=[tensorboard,mlflow,wandb]",)


@pytest.mark.slow
@pytest.mark.probe
@pytest.mark.parametrize("phase", ["mid_training", "final_eval", "plots", "summary"])
def test_every_tracker_agrees_with_the_run_dir_after_a_signal(tmp_path_factory, data_root, phase):
    """SIGTERM at ``phase`` with TensorBoard, MLflow and W&B (offline), then the rerun: the run
    directory is truthful, and each tracker holds every step exactly once, the values of
    ``metrics.csv``; MLflow's run ends FINISHED, W&B's last session exits 0 (an earlier one,
    interrupted in training or while the run's files were written, did not: the probe's
    ``tracker_problems``)."""
    import csv

    root = tmp_path_factory.mktemp(f"trackers-{phase}")
    ref = probe.Reference(root, TRACKERS)
    tmp = root / "case"
    tmp.mkdir()
    out = probe.probe(phase, "SIGTERM", "fresh", tmp, ref)
    assert_truthful(out)
    run = tmp / "run"
    with (run / "metrics.csv").open(newline="") as f:
        lr = {int(r["step"]): float(r["lr"]) for r in csv.DictReader(f)}
    steps = list(range(1, probe.MAX_STEPS + 1))
    assert sorted(lr) == steps
    scalars, _ = tb_events(run / "tensorboard")
    assert [s for s, _ in scalars["lr"]] == steps  # once each, in order
    run_id = (run / "mlflow_run_id.txt").read_text().strip()
    assert [s for s, _ in mlflow_history(f"sqlite:///{run / 'mlflow.db'}", run_id, "lr")] == steps
    assert _mlflow_status(run) == "FINISHED"
    wandb_steps = sorted(
        step
        for path in sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
        for step, row in wandb_history(path).items()
        if "lr" in row
    )
    assert wandb_steps == steps
    exits = [r.exit.exit_code for r in _wandb_records(run) if r.WhichOneof("record_type") == "exit"]
    assert exits[-1] == 0
    assert exits[0] != 0  # the interrupted session (in the report too: not finished)


# -- a non-default option of every config group ---------------------------------------------------

GROUPS = [
    "method=erm",
    "method=random",
    "method=class_balanced",
    "method=mwnet",
    "method=mwnet_sum",
    "method=cmwnet",
    "meta_grad=unrolled",
    "optimizer=adam",
    "optimizer=adamw",
    "scheduler=multistep",
    "scheduler=cosine",
    "model=mlp",
    "logger=tensorboard",
]


@pytest.mark.slow
@pytest.mark.probe
@pytest.mark.parametrize("option", GROUPS)
def test_every_config_group_resumes_truthfully(tmp_path_factory, data_root, option):
    """SIGTERM in the middle of training and at the last checkpoint, with one option of a
    config group changed: truthful, and the rerun equals that option's run never
    interrupted."""
    root = tmp_path_factory.mktemp(option.replace("=", "-"))
    ref = probe.Reference(root, (option,))
    for phase in ("mid_training", "last_checkpoint"):
        tmp = root / phase
        tmp.mkdir()
        assert_truthful(probe.probe(phase, "SIGTERM", "fresh", tmp, ref))
