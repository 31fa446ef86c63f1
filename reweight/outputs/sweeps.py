"""The table of a sweep: mean ± std of the final test accuracy per configuration, from each job's
``summary.json`` and ``.hydra/overrides.yaml``, into ``results.csv`` and ``results.md``. From the
shell: ``python -m reweight.outputs <sweep_dir>``."""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import io
import json
import logging
import math
import os
import statistics
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from reweight.core.files import (
    FAILED_JOBS,
    OVERRIDES,
    REPLACED_SUFFIX,
    RESULTS_CSV,
    RESULTS_MD,
    SUMMARY,
    atomic_write_text,
)

__all__ = ["aggregate_sweep", "main", "record_job"]

log = logging.getLogger(__name__)

# Metrics averaged over the seeds of a configuration: (summary key, markdown header).
_TABLE_METRICS = (
    ("test_accuracy", "test accuracy (%)"),
    ("test_balanced_accuracy", "balanced accuracy (%)"),
    ("val_accuracy", "val accuracy (%)"),  # the clean validation set: what sweeps optimise
)


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


def _under(sweep: Path, name: str) -> list[Path]:
    """Every ``name`` under ``sweep``, but for those of a run kept beside a job's folder while
    ``resume=false`` replaces it (``<job>.replaced``, not a job of the sweep)."""
    return [
        p
        for p in sweep.rglob(name)
        if not any(part.endswith(REPLACED_SUFFIX) for part in p.relative_to(sweep).parts)
    ]


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else math.nan


def record_job(
    sweep_dir: str | os.PathLike,
    num: int,
    overrides: Sequence[str],
    output_dir: str | os.PathLike,
    error: str | None,
) -> None:
    """Record how job ``num`` of a sweep ended: ``error`` (one line) in
    ``failed/<num>.json``, for the sweep's table; ``None`` (it finished) removes an earlier
    record of a failure."""
    record = Path(sweep_dir) / FAILED_JOBS / f"{num}.json"
    if error is None:
        record.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # only when empty
            record.parent.rmdir()
        return
    record.parent.mkdir(parents=True, exist_ok=True)
    data = {"job": num, "overrides": list(overrides), "dir": str(output_dir), "error": error}
    atomic_write_text(record, json.dumps(data, indent=2) + "\n")


def _failed_jobs(sweep: Path) -> list[dict[str, Any]]:
    """The records of ``record_job``, but for jobs that have finished since."""
    out = []
    for path in sorted((sweep / FAILED_JOBS).glob("*.json"), key=_natural_key):
        record = json.loads(path.read_text())
        if not (Path(record.get("dir", "")) / SUMMARY).is_file():
            out.append(record)
    return out


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """The sweep's table is read and written by one process at a time (the jobs of a parallel
    launcher each update it as they end)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def aggregate_sweep(
    sweep_dir: str | os.PathLike, seed_keys: Iterable[str] = ("seed",)
) -> list[dict[str, Any]]:
    """Mean ± std of the final test accuracy (and balanced accuracy) per configuration.

    Reads every ``summary.json`` under ``sweep_dir`` together with its job's
    ``.hydra/overrides.yaml``; a configuration is a job's overrides without ``seed_keys``, so the
    seeds of one configuration are averaged (std: the sample standard deviation, NaN for one
    seed). Writes ``results.csv`` (one column per override key, ``n``, means and stds as
    fractions) and ``results.md`` (percentages; the keys shared by every job listed above the
    table, and the jobs that failed with their error) into ``sweep_dir``, and returns the rows
    of the CSV. ``ValueError`` for a folder that holds no job of a sweep.
    """
    sweep = Path(sweep_dir)
    if not sweep.is_dir():
        raise FileNotFoundError(f"sweep directory {sweep} does not exist")
    with _locked(sweep):
        return _aggregate(sweep, seed_keys)


def _aggregate(sweep: Path, seed_keys: Iterable[str]) -> list[dict[str, Any]]:
    failed = _failed_jobs(sweep)
    if not failed and not _under(sweep, SUMMARY) and not _under(sweep, str(OVERRIDES)):
        raise ValueError(
            f"{sweep} holds no job of a sweep (no {SUMMARY} nor {OVERRIDES} under it): give "
            "the folder of a multirun (its hydra.sweep.dir)"
        )
    seed_keys = set(seed_keys)
    groups: dict[tuple[tuple[str, str], ...], list[dict[str, Any]]] = {}
    for summary_path in sorted(_under(sweep, SUMMARY), key=_natural_key):
        job = summary_path.parent
        overrides = _read_overrides(job / OVERRIDES) if (job / OVERRIDES).exists() else []
        config = tuple((k, v) for k, v in map(_split_override, overrides) if k not in seed_keys)
        groups.setdefault(config, []).append(json.loads(summary_path.read_text()))
    unfinished = sorted(
        (
            p.parent.parent
            for p in _under(sweep, str(OVERRIDES))
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
    objectives = {s.get("objective") for group in groups.values() for s in group}
    objective = objectives.pop() if len(objectives) == 1 else None
    chosen: tuple[float, dict[str, Any]] | None = None
    for config, summaries in groups.items():
        values = dict(config)
        row: dict[str, Any] = {k: values.get(k, "") for k in keys}
        row["n"] = len(summaries)
        for metric, _ in _TABLE_METRICS:
            xs = [s[metric] for s in summaries if isinstance(s.get(metric), int | float)]
            row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std(xs)
        rows.append(row)
        if isinstance(objective, str):
            score, _ = _mean_std([s[objective] for s in summaries if _number(s.get(objective))])
            if not math.isnan(score) and (chosen is None or score > chosen[0]):
                chosen = (score, row)
    if not rows:
        log.warning("no %s under %s: nothing to aggregate", SUMMARY, sweep)
    _write_results_csv(sweep / RESULTS_CSV, rows, keys)
    best = None if chosen is None or objective is None else (objective, *chosen)
    _write_results_md(
        sweep / RESULTS_MD, rows, keys, unfinished=len(unfinished), chosen=best, failed=failed
    )
    log.info("sweep table of %d configuration(s) written to %s", len(rows), sweep / RESULTS_MD)
    return rows


def _write_results_csv(path: Path, rows: list[dict[str, Any]], keys: list[str]) -> None:
    fields = [*keys, "n"] + [f"{m}_{s}" for m, _ in _TABLE_METRICS for s in ("mean", "std")]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, out.getvalue())


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _pct(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "n/a"
    if math.isnan(std):
        return f"{100 * mean:.2f}"
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def _write_results_md(
    path: Path,
    rows: list[dict[str, Any]],
    keys: list[str],
    unfinished: int = 0,
    chosen: tuple[str, float, dict[str, Any]] | None = None,
    failed: Sequence[dict[str, Any]] = (),
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
    if chosen is not None:
        objective, score, row = chosen
        config = ", ".join(f"`{k}={row[k]}`" for k in keys if row[k] != "") or "(default)"
        test = _pct(row["test_accuracy_mean"], row["test_accuracy_std"])
        lines += [
            "",
            f"Configuration chosen by {objective} (the sweep's objective, mean over seeds): "
            f"{config}, {objective} {100 * score:.2f}. Its test accuracy, reported apart and "
            f"not used in the choice: {test} %.",
        ]
        if objective.startswith("test_"):
            lines.append("Warning: the objective is a TEST-SET metric; the number is optimistic.")
    if unfinished:
        lines += ["", f"Left out: {unfinished} job(s) without a summary (failed or unfinished)."]
    if failed:
        lines += ["", f"Failed: {len(failed)} job(s).", ""]
        for job in failed:
            overrides = " ".join(f"`{o}`" for o in job.get("overrides", [])) or "(no overrides)"
            lines.append(f"- job {job.get('job')} ({overrides}): {job.get('error')}")
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
