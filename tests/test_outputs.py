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


# -- what the plots draw: every PNG read back by its size and by the texts of its artists ------


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) in pixels from a PNG's IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.fixture
def drawn(monkeypatch) -> dict[str, object]:
    """Every figure the plots save, by file name, kept (closed) for its artists to be read."""
    from reweight.outputs import plots

    figures: dict[str, object] = {}
    save = plots._save

    def keep(fig, path):
        figures[Path(path).name] = fig
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return figures


def texts(fig) -> list[str]:
    """Every non-empty text drawn in a figure: titles, labels, tick labels, legend entries."""
    from matplotlib.text import Text

    return [t.get_text() for t in fig.findobj(Text) if t.get_text().strip()]


def check_png(path: Path, fig) -> None:
    """The PNG is the figure at 100 dpi (the size the plots promise), within a pixel."""
    width, height = png_size(path)
    w, h = fig.get_size_inches() * 100
    assert abs(width - w) <= 1 and abs(height - h) <= 1, (width, height, w, h)


# A short run of a 2-class imbalanced dataset: one evaluation, at the last step.
SHORT = [
    {"step": float(s), "train_loss": 0.7 * 0.5**s, "train_loss_unweighted": 0.8 * 0.5**s,
     "meta_loss": 0.9 * 0.6**s, "weight_mean_class0": 1.0 + 0.01 * s,
     "weight_mean_class1": 1.0 - 0.01 * s}
    for s in range(1, 21)
]  # fmt: skip
SHORT[-1] = {**SHORT[-1], "test_accuracy": 0.9, "test_balanced_accuracy": 0.85}


def test_learning_curves_png(tmp_path, drawn):
    path = plot_learning_curves(
        SHORT, tmp_path / "curves.png", title="t", class_names=["4", "9"], max_steps=20
    )
    assert path is not None
    fig = drawn["curves.png"]
    check_png(path, fig)
    words = texts(fig)
    assert {"4", "9"} <= set(words) and not any(w.startswith("class") for w in words)
    assert "loss (log scale)" in words and "meta loss (log scale)" in words
    loss, meta, accuracy, weight = fig.axes
    assert loss.get_yscale() == meta.get_yscale() == "log"  # the losses fall by 6 decades
    assert weight.get_yscale() == "linear"
    for ax in fig.axes:  # one test point at step 20 sits on the run's axis, not on 19.5-20.5
        assert ax.get_xlim()[0] == 0 and ax.get_xlim()[1] >= 20
    low, high = accuracy.get_ylim()  # 0.85 and 0.9 measured: ±0.02 around them, not ±5 %
    assert (round(low, 3), round(high, 3)) == (0.83, 0.92)
    assert plot_learning_curves([], tmp_path / "empty.png") is None


def test_learning_curves_without_class_names_say_class_k(tmp_path, drawn):
    plot_learning_curves(HISTORY[:1] + SHORT[:2], tmp_path / "curves.png")
    words = texts(drawn["curves.png"])
    assert "clean" in words and "corrupted" in words  # HISTORY's rows are corrupted ones
    plot_learning_curves(SHORT, tmp_path / "classes.png")
    assert {"class 0", "class 1"} <= set(texts(drawn["classes.png"]))


@pytest.mark.parametrize("case", ["clean_vs_corrupted", "per_class", "single_group"])
def test_weight_histogram_png(tmp_path, case, drawn):
    g = torch.Generator().manual_seed(0)
    weights = torch.rand(200, generator=g) * 2
    corrupted = torch.arange(200) % 4 == 0 if case == "clean_vs_corrupted" else torch.zeros(200)
    labels = torch.arange(200) % 2 if case == "per_class" else None
    path = plot_weight_histogram(
        weights, corrupted, tmp_path / "hist.png", labels=labels, class_names=["4", "9"]
    )
    assert path is not None
    check_png(path, drawn["hist.png"])
    legend = {w for w in texts(drawn["hist.png"]) if "(n=" in w}
    assert (
        legend
        == {
            "clean_vs_corrupted": {"clean (n=150)", "corrupted (n=50)"},
            "per_class": {"4 (n=100)", "9 (n=100)"},
            "single_group": {"all (none corrupted) (n=200)"},
        }[case]
    )


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


# -- the PNGs of real runs on the real MNIST ------------------------------------------------------

TINY_RUN = [
    "model=mlp",
    "trainer.max_steps=6",
    "trainer.eval_every=0",
    "trainer.log_every=1",
    "trainer.batch_size=20",
    "threads=1",
]


def _train(run_dir: Path, *overrides: str) -> None:
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from reweight import cli

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("reweight.conf", version_base="1.3"):
            cfg = compose("config", overrides=[*TINY_RUN, *overrides])
        cli.train(cfg, run_dir=run_dir)
    finally:
        GlobalHydra.instance().clear()


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.mark.slow
def test_the_pngs_of_an_imbalanced_run_name_its_classes(tmp_path, data_root, drawn):
    """mnist_imbalanced (4 vs 9): curves and histogram say 4 and 9, never class0 / class1."""
    _train(tmp_path, "dataset=mnist_imbalanced", "dataset.n_train=300", "dataset.proportion=0.9")
    for name in ("learning_curves.png", "weight_histogram.png"):
        check_png(tmp_path / name, drawn[name])
        words = texts(drawn[name])
        assert not [w for w in words if "class" in w], words
    assert {"4", "9"} <= set(texts(drawn["learning_curves.png"]))
    assert {"4 (n=25)", "9 (n=265)"} <= set(texts(drawn["weight_histogram.png"])), texts(
        drawn["weight_histogram.png"]
    )


@pytest.mark.slow
def test_suspects_png_shows_id_labels_and_probability_without_overlap(
    tmp_path, data_root, drawn, capsys
):
    from reweight.outputs import inspect as inspect_cli

    _train(tmp_path, "dataset=mnist_noisy", "dataset.train_per_class=20")
    assert inspect_cli.main([str(tmp_path), "--top", "16"]) == 0
    top = read_csv(tmp_path / "suspects.csv")[:16]
    fig = drawn["suspects.png"]
    check_png(tmp_path / "suspects.png", fig)
    captions = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert captions == [
        f"{r['id']}\n{r['given_label']} → {r['predicted_label']}\np = {float(r['probability']):.2f}"
        for r in top
    ]
    heading = fig.get_suptitle()
    assert "id; given label → predicted label; p = the model's probability of it" in heading
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()  # the figure was closed after its savefig
    fig.draw(renderer)  # the layout of the saved PNG (same size, same dpi)
    images = [ax.get_window_extent(renderer) for ax in fig.axes]
    titles = [ax.title.get_window_extent(renderer) for ax in fig.axes]
    for i, title in enumerate(titles):  # no caption runs into another image or the heading
        assert not any(_overlaps(title, box) for j, box in enumerate(images) if j != i)
        assert not _overlaps(title, fig._suptitle.get_window_extent(renderer))
    check_png(tmp_path / "suspects_scatter.png", drawn["suspects_scatter.png"])
    assert {"clean (" , "corrupted ("} <= {w[: w.index("(") + 1] for w in texts(
        drawn["suspects_scatter.png"]) if "(" in w}  # fmt: skip


def _readme_outputs() -> set[str]:
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    outputs = readme[readme.index("**Outputs.**") : readme.index("**Resume.**")]
    return set(re.findall(r"`([\w.]+\.(?:yaml|log|csv|json|pt|png))`", outputs))


@pytest.mark.slow
def test_a_trainer_with_a_run_dir_writes_the_clis_run_files(tmp_path, data_root):
    """From Python, Trainer.from_bundle(..., run_dir=...): every file of the README's outputs
    list (which test_cli keeps equal to what the CLI writes) but the CLI's own config.yaml and
    train.log, with the same contents' shape."""
    from reweight import Trainer, TrainerConfig
    from reweight.data import build_dataset
    from reweight.models import build_model

    bundle = build_dataset("mnist_noisy", train_per_class=20)
    torch.manual_seed(0)
    trainer = Trainer.from_bundle(
        build_model("mlp", num_classes=10, in_channels=1, input_shape=(1, 28, 28)),
        bundle,
        method="l2rw",
        config=TrainerConfig(max_steps=3, batch_size=20, eval_every=0, log_every=1, progress=False),
        run_dir=tmp_path / "run",
    )
    result = trainer.fit()
    run_dir = tmp_path / "run"
    written = {p.name for p in run_dir.iterdir() if p.is_file()}
    assert written == _readme_outputs() - {"config.yaml", "train.log"}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["dataset"] == "mnist_noisy"
    assert summary["test_accuracy"] == pytest.approx(result.metrics["test_accuracy"])
    assert summary["suspect_ranking"]["num_corrupted"] == bundle.info["num_corrupted"]
    record = torch.load(run_dir / "weights.pt", weights_only=True)
    assert record["ids"] == [str(i) for i in range(len(bundle.train))]
    assert len(read_csv(run_dir / "metrics.csv")) == 3
    assert len(read_csv(run_dir / "suspects.csv")) == len(bundle.train)
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"] == 3
