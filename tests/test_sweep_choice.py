"""The configuration a sweep table names as chosen by the objective (reweight.outputs.sweeps):
the one with the highest mean objective over its seeds, never the worst, the last or the one
with the best test accuracy; real job folders on disk, as Hydra's multirun leaves them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from reweight.outputs import aggregate_sweep
from tests.test_outputs import make_job

# (method, seed): (val_accuracy, test_accuracy). By the mean validation accuracy mwnet wins
# (0.91) ahead of l2rw (0.88) and erm (0.70); by test accuracy l2rw would win (0.86 > 0.75).
JOBS = {
    ("erm", 0): (0.70, 0.60),
    ("erm", 1): (0.70, 0.62),
    ("mwnet", 0): (0.90, 0.74),
    ("mwnet", 1): (0.92, 0.76),
    ("l2rw", 0): (0.88, 0.86),
    ("l2rw", 1): (0.88, 0.86),
}


def write_jobs(sweep: Path, jobs: dict, objective: str | dict = "val_accuracy") -> None:
    for num, ((method, seed), (val, test)) in enumerate(jobs.items()):
        name = objective if isinstance(objective, str) else objective[method]
        make_job(
            sweep,
            num,
            [f"method={method}", f"seed={seed}"],
            {"objective": name, "val_accuracy": val, "test_accuracy": test},
        )


def chosen_line(sweep: Path) -> str | None:
    lines = [
        line
        for line in (sweep / "results.md").read_text().splitlines()
        if line.startswith("Configuration chosen by")
    ]
    assert len(lines) <= 1, lines
    return lines[0] if lines else None


def test_the_table_names_the_configuration_with_the_best_mean_objective(tmp_path: Path):
    write_jobs(tmp_path, JOBS)
    rows = aggregate_sweep(tmp_path)
    assert [r["method"] for r in rows] == ["erm", "mwnet", "l2rw"]  # the winner in the middle
    line = chosen_line(tmp_path)
    assert line is not None
    match = re.fullmatch(
        r"Configuration chosen by val_accuracy \(the sweep's objective, mean over seeds\): "
        r"`method=(\w+)`, val_accuracy ([\d.]+)\. Its test accuracy, reported apart and not "
        r"used in the choice: ([\d.]+) ± ([\d.]+) %\.",
        line,
    )
    assert match is not None, line
    assert match.group(1) == "mwnet"
    assert float(match.group(2)) == pytest.approx(91.0)  # the mean over its two seeds
    assert (float(match.group(3)), float(match.group(4))) == pytest.approx((75.0, 1.41), abs=0.01)


def test_the_choice_follows_the_objective_not_the_table_order(tmp_path: Path):
    """The same jobs with the validation accuracies turned around: now erm is the best."""
    flipped = {k: (1.6 - val, test) for k, (val, test) in JOBS.items()}
    write_jobs(tmp_path, flipped)
    aggregate_sweep(tmp_path)
    line = chosen_line(tmp_path)
    assert line is not None and "`method=erm`, val_accuracy 90.00." in line
    assert "Its test accuracy, reported apart and not used in the choice: 61.00 ± 1.41 %" in line


def test_jobs_without_the_objective_value_are_not_chosen(tmp_path: Path):
    """A configuration whose jobs recorded no objective value (null: NaN in summary.json) is
    in the table but never the chosen one, however good its test accuracy."""
    write_jobs(tmp_path, {("erm", 0): (0.5, 0.5), ("mwnet", 0): (None, 0.99)})
    aggregate_sweep(tmp_path)
    line = chosen_line(tmp_path)
    assert line is not None and "`method=erm`, val_accuracy 50.00." in line
    assert "| mwnet | 1 | 99.00 | n/a | n/a |" in (tmp_path / "results.md").read_text()


def test_no_choice_is_named_when_the_jobs_disagree_on_the_objective(tmp_path: Path):
    write_jobs(
        tmp_path,
        {("erm", 0): (0.5, 0.5), ("mwnet", 0): (0.9, 0.6)},
        objective={"erm": "val_accuracy", "mwnet": "val_balanced_accuracy"},
    )
    rows = aggregate_sweep(tmp_path)
    assert len(rows) == 2 and chosen_line(tmp_path) is None
