"""What a run leaves on disk, and the table of a sweep: pure file I/O, no Hydra.

- ``MetricsCSV``: a ``Trainer`` callback that keeps ``metrics.csv`` equal to the history so far.
- ``write_summary``: ``summary.json``, atomically, NaN written as ``null``.
- ``plot_learning_curves`` / ``plot_weight_histogram``: PNGs (matplotlib, imported lazily; should
  it fail to import, one warning and ``None``).
- ``aggregate_sweep``: mean ± std of the final test accuracy per configuration of a sweep, from
  each job's ``summary.json`` and ``.hydra/overrides.yaml``, into ``results.csv`` and
  ``results.md``. From the shell: ``python -m reweight.outputs <sweep_dir>``.

Example:
    >>> import json, math, tempfile
    >>> from pathlib import Path
    >>> d = Path(tempfile.mkdtemp())
    >>> for seed, acc in [(0, 0.90), (1, 0.92)]:
    ...     job = d / str(seed)
    ...     (job / ".hydra").mkdir(parents=True)
    ...     _ = (job / ".hydra" / "overrides.yaml").write_text(f"- method=l2rw\\n- seed={seed}\\n")
    ...     _ = write_summary(job / "summary.json", {"test_accuracy": acc, "test_loss": math.nan})
    >>> rows = aggregate_sweep(d)
    >>> rows[0]["method"], rows[0]["n"], round(rows[0]["test_accuracy_mean"], 2)
    ('l2rw', 2, 0.91)
    >>> print((d / "results.md").read_text().splitlines()[2])
    | method | n | test accuracy (%) | balanced accuracy (%) |
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import logging
import math
import os
import statistics
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from reweight.fileio import atomic_write, atomic_write_text

__all__ = [
    "RESULTS_CSV",
    "RESULTS_MD",
    "MetricsCSV",
    "aggregate_sweep",
    "plot_learning_curves",
    "plot_weight_histogram",
    "write_metrics_csv",
    "write_summary",
]

log = logging.getLogger(__name__)

RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
SUMMARY = "summary.json"
OVERRIDES = Path(".hydra") / "overrides.yaml"

# Metrics averaged over the seeds of a configuration: (summary key, markdown header).
_TABLE_METRICS = (
    ("test_accuracy", "test accuracy (%)"),
    ("test_balanced_accuracy", "balanced accuracy (%)"),
)


# -- metrics.csv --------------------------------------------------------------------------------


def write_metrics_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``rows`` (the Trainer's history) as CSV, atomically.

    Columns: ``step`` first, then every other key in the order it first appears (evaluation
    rows add the ``test_*`` columns); a row without a column leaves it empty.
    """
    columns: dict[str, None] = {"step": None}
    for row in rows:
        columns.update(dict.fromkeys(row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(k, v) for k, v in row.items()})
    return atomic_write_text(path, out.getvalue())


def _csv_value(key: str, value: Any) -> Any:
    if key == "step" and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


class MetricsCSV:
    """A ``Trainer`` callback that rewrites ``metrics.csv`` with every row so far.

    The file is small (one row per ``log_every`` steps), so each row rewrites it whole and
    atomically: the header stays right when evaluation rows bring new columns, and a killed run
    leaves a complete file. With ``history`` (a callable returning the Trainer's history), the
    file follows that list instead of the rows seen by this callback, which keeps the rows from
    before a resume::

        metrics = MetricsCSV(run_dir / "metrics.csv", history=lambda: trainer.history)
    """

    def __init__(
        self,
        path: str | os.PathLike,
        history: Callable[[], Sequence[Mapping[str, Any]]] | None = None,
    ) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        self._history = history

    def __call__(self, row: Mapping[str, Any]) -> None:
        self.rows.append(dict(row))
        self.write()

    def write(self) -> Path:
        return write_metrics_csv(self.path, self._history() if self._history else self.rows)


# -- summary.json -------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """Plain JSON values: NaN and ±inf become None, tuples lists, paths strings, 0-d tensors
    (anything with ``.item()``) numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item"):
        return _jsonable(value.item())
    raise TypeError(f"cannot write {type(value).__name__} to JSON: {value!r}")


def write_summary(
    path: str | os.PathLike,
    metrics: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``metrics`` (and ``extra``, which wins on a shared key) as JSON, atomically.

    NaN and infinities are written as ``null`` (strict JSON); keys keep their order.
    """
    payload = _jsonable({**metrics, **(extra or {})})
    text = json.dumps(payload, indent=2, allow_nan=False) + "\n"
    return atomic_write_text(path, text)


# -- plots --------------------------------------------------------------------------------------


@functools.cache
def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, or None when it cannot be imported (a base
    dependency, so only a broken install; warned once per process, not once per plot)."""
    try:
        import matplotlib
    except ImportError as err:
        log.warning("matplotlib cannot be imported (%s): no plots; pip install matplotlib", err)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for row in history:
        value = row.get(key)
        if value is not None and isinstance(value, int | float) and math.isfinite(value):
            xs.append(float(row["step"]))
            ys.append(float(value))
    return xs, ys


def plot_learning_curves(
    history: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str | None = None
) -> Path | None:
    """Four panels over optimizer steps: training losses, meta loss, test accuracy and the mean
    relative weight of clean and corrupted examples (of each class when nothing is corrupted).
    Returns the PNG's path, or None when matplotlib is missing or ``history`` is empty."""
    if not history:
        log.warning("no history rows: no learning curves")
        return None
    plt = _pyplot()
    if plt is None:
        return None
    panels = (
        (
            "loss",
            (("train_loss", "weighted train loss"), ("train_loss_unweighted", "mean train loss")),
        ),
        ("meta loss", (("meta_loss", "meta loss (clean batch)"),)),
        (
            "test accuracy",
            (("test_accuracy", "accuracy"), ("test_balanced_accuracy", "balanced accuracy")),
        ),
    )
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    weight_curves = (("weight_mean_clean", "clean"), ("weight_mean_corrupted", "corrupted"))
    if not _series(history, "weight_mean_corrupted")[0]:  # nothing corrupted: per class
        classes = sorted(
            {k for row in history for k in row if k.startswith("weight_mean_class")},
            key=lambda k: int(k.removeprefix("weight_mean_class")),
        )
        weight_curves = tuple((k, k.removeprefix("weight_mean_")) for k in classes) or (
            ("weight_mean", "all"),
        )
    panels = (*panels, ("mean relative weight (1 = uniform)", weight_curves))
    for ax, (ylabel, curves) in zip(axes.flat, panels, strict=True):
        drawn = 0
        for key, label in curves:
            xs, ys = _series(history, key)
            if xs:
                ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=label)
                drawn += 1
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    if title:
        fig.suptitle(title)
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)


def plot_weight_histogram(
    weights: Sequence[float] | Any,
    corrupted: Sequence[bool] | Any | None,
    path: str | os.PathLike,
    labels: Sequence[int] | Any | None = None,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
) -> Path | None:
    """Histogram of every training example's relative weight (1 = uniform), clean vs corrupted.

    ``weights`` and ``corrupted`` are (N,) sequences or tensors. When no example is corrupted
    (an imbalanced dataset) and ``labels`` are given, the groups are the classes instead (up to
    10). Returns the PNG's path, or None when matplotlib is missing.
    """
    plt = _pyplot()
    if plt is None:
        return None
    w = [float(v) for v in _tolist(weights)]
    groups: list[tuple[str, list[float]]]
    mask = [bool(c) for c in _tolist(corrupted)] if corrupted is not None else [False] * len(w)
    if len(mask) != len(w):
        raise ValueError(f"weights has {len(w)} entries, corrupted {len(mask)}")
    if any(mask):
        groups = [
            ("clean", [v for v, c in zip(w, mask, strict=True) if not c]),
            ("corrupted", [v for v, c in zip(w, mask, strict=True) if c]),
        ]
    elif labels is not None and len(set(_tolist(labels))) <= 10:
        ys = [int(y) for y in _tolist(labels)]
        names = list(class_names or [])
        groups = [
            (
                names[k] if k < len(names) else f"class {k}",
                [v for v, y in zip(w, ys, strict=True) if y == k],
            )
            for k in sorted(set(ys))
        ]
    else:
        groups = [("all (none corrupted)", w)]
    top = max(w) if w else 1.0
    bins = [top * i / 40 for i in range(41)] if top > 0 else 40
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    for name, values in groups:
        if values:
            # density per group: a 2 % minority stays visible beside the majority
            ax.hist(values, bins=bins, alpha=0.55, density=True, label=f"{name} (n={len(values)})")
    ax.set_xlabel("relative weight B·wᵢ at the end of training (1 = uniform)")
    ax.set_ylabel("density")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)


def _tolist(values: Any) -> list:
    return values.tolist() if hasattr(values, "tolist") else list(values)


# -- sweeps -------------------------------------------------------------------------------------


def _read_overrides(path: Path) -> list[str]:
    import yaml  # PyYAML comes with omegaconf

    items = yaml.safe_load(path.read_text()) or []
    if not isinstance(items, list):
        raise ValueError(f"{path} should hold a list of KEY=VALUE overrides, got {items!r}")
    return [str(item) for item in items]


def _split_override(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep:
        return item.lstrip("~+"), ""  # a deletion (~key) has no value
    return key.lstrip("~+"), value


def _natural_key(path: Path) -> tuple[tuple[int, int, str], ...]:
    """Job folders in numeric order: 2 before 10."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.parts)


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else math.nan


def aggregate_sweep(
    sweep_dir: str | os.PathLike, seed_keys: Iterable[str] = ("seed",)
) -> list[dict[str, Any]]:
    """Mean ± std of the final test accuracy (and balanced accuracy) per configuration.

    Reads every ``summary.json`` under ``sweep_dir`` together with its job's
    ``.hydra/overrides.yaml``; a configuration is a job's overrides without ``seed_keys``, so the
    seeds of one configuration are averaged (std: the sample standard deviation, NaN for one
    seed). Writes ``results.csv`` (one column per override key, ``n``, means and stds as
    fractions) and ``results.md`` (percentages; the keys shared by every job listed above the
    table) into ``sweep_dir``, and returns the rows of the CSV.
    """
    sweep = Path(sweep_dir)
    if not sweep.is_dir():
        raise FileNotFoundError(f"sweep directory {sweep} does not exist")
    seed_keys = set(seed_keys)
    groups: dict[tuple[tuple[str, str], ...], list[dict[str, Any]]] = {}
    for summary_path in sorted(sweep.rglob(SUMMARY), key=_natural_key):
        job = summary_path.parent
        overrides = _read_overrides(job / OVERRIDES) if (job / OVERRIDES).exists() else []
        config = tuple((k, v) for k, v in map(_split_override, overrides) if k not in seed_keys)
        groups.setdefault(config, []).append(json.loads(summary_path.read_text()))
    unfinished = sorted(
        (
            p.parent.parent
            for p in sweep.rglob(str(OVERRIDES))
            if not (p.parent.parent / SUMMARY).exists()
        ),
        key=_natural_key,
    )
    if unfinished:
        log.warning(
            "%d job(s) without %s (failed or unfinished), left out: %s",
            len(unfinished),
            SUMMARY,
            ", ".join(str(p.relative_to(sweep)) for p in unfinished),
        )
    keys = list(dict.fromkeys(k for config in groups for k, _ in config))
    rows: list[dict[str, Any]] = []
    for config, summaries in groups.items():
        values = dict(config)
        row: dict[str, Any] = {k: values.get(k, "") for k in keys}
        row["n"] = len(summaries)
        for metric, _ in _TABLE_METRICS:
            xs = [s[metric] for s in summaries if isinstance(s.get(metric), int | float)]
            row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std(xs)
        rows.append(row)
    if not rows:
        log.warning("no %s under %s: nothing to aggregate", SUMMARY, sweep)
    _write_results_csv(sweep / RESULTS_CSV, rows, keys)
    _write_results_md(sweep / RESULTS_MD, rows, keys, unfinished=len(unfinished))
    log.info("sweep table of %d configuration(s) written to %s", len(rows), sweep / RESULTS_MD)
    return rows


def _write_results_csv(path: Path, rows: list[dict[str, Any]], keys: list[str]) -> None:
    fields = [*keys, "n"] + [f"{m}_{s}" for m, _ in _TABLE_METRICS for s in ("mean", "std")]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, out.getvalue())


def _pct(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "n/a"
    if math.isnan(std):
        return f"{100 * mean:.2f}"
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def _write_results_md(
    path: Path, rows: list[dict[str, Any]], keys: list[str], unfinished: int = 0
) -> None:
    # with several configurations, keys equal in all of them go above the table
    shared = [k for k in keys if len(rows) > 1 and len({str(r[k]) for r in rows}) == 1]
    varying = [k for k in keys if k not in shared]
    lines = ["# Sweep results", ""]
    headers = [*varying, "n", *(header for _, header in _TABLE_METRICS)]
    lines.append("| " + " | ".join(headers) + " |")
    lines.append("|" + "|".join(" --- " for _ in headers) + "|")
    for row in rows:
        cells = [str(row[k]) if row[k] != "" else "(default)" for k in varying]
        cells.append(str(row["n"]))
        cells += [_pct(row[f"{m}_mean"], row[f"{m}_std"]) for m, _ in _TABLE_METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if shared:
        lines.append("Shared by every job: " + ", ".join(f"`{k}={rows[0][k]}`" for k in shared))
        lines.append("")
    lines.append("Final test accuracy, mean ± sample std over the seeds (n) of each configuration.")
    if unfinished:
        lines += ["", f"Left out: {unfinished} job(s) without a summary (failed or unfinished)."]
    atomic_write_text(path, "\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m reweight.outputs SWEEP_DIR``: (re)write a sweep's results table."""
    parser = argparse.ArgumentParser(
        prog="python -m reweight.outputs",
        description="Aggregate a sweep: mean ± std of the final test accuracy per configuration "
        "into SWEEP_DIR/results.csv and SWEEP_DIR/results.md.",
    )
    parser.add_argument("sweep_dir", help="the multirun directory (holds one folder per job)")
    parser.add_argument(
        "--seed-keys",
        nargs="+",
        default=["seed"],
        help="override keys averaged over rather than told apart (default: seed)",
    )
    args = parser.parse_args(argv)
    try:
        aggregate_sweep(args.sweep_dir, seed_keys=args.seed_keys)
    except (OSError, ValueError) as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    sys.stdout.write((Path(args.sweep_dir) / RESULTS_MD).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
