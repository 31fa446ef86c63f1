"""reweight.outputs: metrics.csv, summary.json, the plots and the sweep table (no training)."""

from __future__ import annotations

import csv
import json
import logging
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

import reweight.outputs as outputs
from reweight.outputs import (
    MetricsCSV,
    aggregate_sweep,
    plot_learning_curves,
    plot_weight_histogram,
    write_metrics_csv,
    write_summary,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Rows shaped like the Trainer's history: a log row, then an evaluation row with test columns.
HISTORY = [
    {"step": 50.0, "lr": 0.1, "train_loss": 0.9, "meta_loss": 1.1, "weight_mean_clean": 1.2,
     "weight_mean_corrupted": 0.4, "time_s": 1.0},
    {"step": 100.0, "lr": 0.1, "train_loss": 0.7, "meta_loss": math.nan, "weight_mean_clean": 1.3,
     "weight_mean_corrupted": 0.3, "test_accuracy": 0.8, "test_balanced_accuracy": 0.75,
     "time_s": 2.0},
    {"step": 150.0, "lr": 0.01, "train_loss": 0.6, "meta_loss": 0.9, "weight_mean_clean": 1.3,
     "weight_mean_corrupted": 0.2, "time_s": 3.0},
]  # fmt: skip


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_metrics_csv_has_every_column_of_every_row(tmp_path):
    path = write_metrics_csv(tmp_path / "metrics.csv", HISTORY)
    rows = read_csv(path)
    header = list(rows[0])
    assert header[0] == "step" and "test_accuracy" in header and "meta_loss" in header
    assert [r["step"] for r in rows] == ["50", "100", "150"]  # integer steps
    assert rows[0]["test_accuracy"] == "" and float(rows[1]["test_accuracy"]) == 0.8
    assert math.isnan(float(rows[1]["meta_loss"]))
    assert float(rows[2]["train_loss"]) == 0.6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]  # no temporary left


def test_metrics_csv_callback_rewrites_as_rows_come(tmp_path):
    path = tmp_path / "metrics.csv"
    callback = MetricsCSV(path)
    callback(HISTORY[0])
    assert len(read_csv(path)) == 1 and "test_accuracy" not in read_csv(path)[0]
    callback(HISTORY[1])
    rows = read_csv(path)
    assert len(rows) == 2 and rows[1]["test_accuracy"] == "0.8"  # the header grew


def test_metrics_csv_follows_a_history_source(tmp_path):
    """After a resume the Trainer's history already holds the earlier rows; the file shows them."""
    history = [HISTORY[0]]
    callback = MetricsCSV(tmp_path / "metrics.csv", history=lambda: history)
    history.append(HISTORY[1])
    callback(HISTORY[1])
    assert [r["step"] for r in read_csv(tmp_path / "metrics.csv")] == ["50", "100"]


def test_summary_is_strict_json_with_nan_as_null(tmp_path):
    metrics = {
        "method": "l2rw",
        "test_accuracy": 0.9,
        "weight_auc": math.nan,
        "per_class_accuracy": [0.5, math.nan, float("inf")],
        "steps": torch.tensor(7),
        "nested": {"path": tmp_path, "pair": (1, 2)},
    }
    path = write_summary(tmp_path / "summary.json", metrics, extra={"dataset": "mnist_noisy"})

    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    data = json.loads(path.read_text(), parse_constant=refuse)
    assert data["weight_auc"] is None and data["per_class_accuracy"] == [0.5, None, None]
    assert data["steps"] == 7 and data["dataset"] == "mnist_noisy"
    assert data["nested"] == {"path": str(tmp_path), "pair": [1, 2]}
    assert list(data)[:2] == ["method", "test_accuracy"]  # order kept


def test_summary_refuses_what_json_cannot_hold(tmp_path):
    with pytest.raises(TypeError, match="cannot write object"):
        write_summary(tmp_path / "summary.json", {"x": object()})
    assert not (tmp_path / "summary.json").exists()


def test_learning_curves_png(tmp_path):
    path = plot_learning_curves(HISTORY, tmp_path / "curves.png", title="t")
    assert path is not None and path.read_bytes()[:8] == PNG_MAGIC
    assert plot_learning_curves([], tmp_path / "empty.png") is None


@pytest.mark.parametrize("case", ["clean_vs_corrupted", "per_class", "single_group"])
def test_weight_histogram_png(tmp_path, case):
    g = torch.Generator().manual_seed(0)
    weights = torch.rand(200, generator=g) * 2
    corrupted = torch.arange(200) % 4 == 0 if case == "clean_vs_corrupted" else torch.zeros(200)
    labels = torch.arange(200) % 2 if case == "per_class" else None
    path = plot_weight_histogram(
        weights, corrupted, tmp_path / "hist.png", labels=labels, class_names=["4", "9"]
    )
    assert path is not None and path.read_bytes()[:8] == PNG_MAGIC


def test_weight_histogram_checks_lengths(tmp_path):
    with pytest.raises(ValueError, match="weights has 3 entries, corrupted 2"):
        plot_weight_histogram([1.0, 1.0, 1.0], [True, False], tmp_path / "hist.png")


def test_plots_are_skipped_with_one_warning_without_matplotlib(tmp_path, monkeypatch, caplog):
    from reweight.outputs import plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    plots._pyplot.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="reweight.outputs"):
            assert plot_learning_curves(HISTORY, tmp_path / "curves.png") is None
            assert plot_weight_histogram([1.0], [False], tmp_path / "hist.png") is None
    finally:
        plots._pyplot.cache_clear()  # the next test imports the real matplotlib again
    assert caplog.text.count("matplotlib cannot be imported") == 1  # once, not once per plot
    assert not list(tmp_path.iterdir())


def make_job(sweep: Path, num: int, overrides: list[str], summary: dict) -> None:
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    write_summary(job / "summary.json", summary)


ACCURACY = {("erm", 0): 0.80, ("erm", 1): 0.84, ("l2rw", 0): 0.90, ("l2rw", 1): 0.93}


@pytest.fixture
def sweep(tmp_path) -> Path:
    """A 2 x 2 sweep (method x seed) plus one job that failed before writing its summary."""
    for num, ((method, seed), acc) in enumerate(ACCURACY.items()):
        make_job(
            tmp_path,
            num,
            [f"method={method}", f"seed={seed}", "trainer.max_steps=20"],
            {"test_accuracy": acc, "test_balanced_accuracy": acc - 0.1},
        )
    (tmp_path / "4" / ".hydra").mkdir(parents=True)  # a job that failed: no summary.json
    (tmp_path / "4" / ".hydra" / "overrides.yaml").write_text("- method=mwnet\n- seed=0\n")
    return tmp_path


def test_aggregate_sweep_mean_and_std_per_configuration(sweep):
    rows = aggregate_sweep(sweep)
    assert [r["method"] for r in rows] == ["erm", "l2rw"]
    for row in rows:
        accs = [a for (m, _), a in ACCURACY.items() if m == row["method"]]
        assert row["n"] == 2 and row["trainer.max_steps"] == "20" and "seed" not in row
        assert row["test_accuracy_mean"] == pytest.approx(statistics.fmean(accs))
        assert row["test_accuracy_std"] == pytest.approx(statistics.stdev(accs))
        assert row["test_balanced_accuracy_mean"] == pytest.approx(statistics.fmean(accs) - 0.1)
    table = read_csv(sweep / "results.csv")
    assert [r["method"] for r in table] == ["erm", "l2rw"] and table[0]["n"] == "2"
    assert float(table[1]["test_accuracy_mean"]) == pytest.approx(0.915)
    md = (sweep / "results.md").read_text()
    assert "| method | n | test accuracy (%) | balanced accuracy (%) |" in md
    assert "| erm | 2 | 82.00 ± 2.83 | 72.00 ± 2.83 |" in md
    assert "`trainer.max_steps=20`" in md  # shared by every job: above the table, not a column
    assert "Left out: 1 job(s) without a summary" in md  # job 4


def test_aggregate_sweep_other_seed_keys_and_single_seed(tmp_path):
    make_job(tmp_path, 0, ["dataset.seed=0", "method=erm"], {"test_accuracy": 0.5})
    make_job(tmp_path, 1, ["dataset.seed=1", "method=erm"], {"test_accuracy": 0.7})
    make_job(tmp_path, 2, ["dataset.seed=0", "method=mwnet"], {"test_accuracy": 0.6})
    rows = aggregate_sweep(tmp_path, seed_keys=["seed", "dataset.seed"])
    assert [(r["method"], r["n"]) for r in rows] == [("erm", 2), ("mwnet", 1)]
    assert math.isnan(rows[1]["test_accuracy_std"])  # one seed: no spread
    assert math.isnan(rows[0]["test_balanced_accuracy_mean"])  # not in these summaries
    md = (tmp_path / "results.md").read_text()
    assert "| mwnet | 1 | 60.00 | n/a |" in md


def test_aggregate_sweep_orders_jobs_numerically(tmp_path):
    make_job(tmp_path, 10, ["method=erm"], {"test_accuracy": 0.5})
    make_job(tmp_path, 2, ["method=mwnet"], {"test_accuracy": 0.6})
    assert [r["method"] for r in aggregate_sweep(tmp_path)] == ["mwnet", "erm"]


def test_aggregate_command_line(sweep, capsys):
    assert outputs.main([str(sweep)]) == 0
    assert "| l2rw | 2 | 91.50 ± 2.12 |" in capsys.readouterr().out
    assert outputs.main([str(sweep / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error: sweep directory")
