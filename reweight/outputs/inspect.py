"""``python -m reweight.outputs.inspect RUN_DIR [--top N]``: a finished run's most suspect labels.

Prints the top ``N`` rows of ``RUN_DIR/suspects.csv`` (most suspect first: see
:mod:`reweight.outputs.suspects`) and writes next to it ``suspects_scatter.png`` (weight against
final loss, clean and corrupted in two colours when the corruption is known) and, for image data,
``suspects.png`` (the ``N`` most suspect images, each captioned with its id, ``given →
predicted`` and the model's probability of the predicted label;
the dataset is rebuilt from the run's ``config.yaml``, which is quick: everything is seeded).
With precision@k in ``summary.json`` (synthetic corruption), prints it beside the small-loss
baseline. A missing or unreadable run file is one ``error:`` line, exit status 2.

The report (table and precision) is this command's output, written to stdout in one piece by
``main``; what it did besides (the PNGs written) is logged (``reweight.outputs.inspect``, INFO,
shown on stderr when run as a command).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from reweight.core.files import (
    RESOLVED_CONFIG,
    SUMMARY,
    SUSPECTS,
    SUSPECTS_PNG,
    SUSPECTS_SCATTER_PNG,
)
from reweight.outputs.plots import plot_suspect_grid, plot_weight_vs_loss

__all__ = ["main", "read_suspects"]

log = logging.getLogger(__name__)

_SHOWN = ("rank", "id", "given_label", "predicted_label", "probability", "loss", "final_weight")


def read_suspects(run_dir: str | Path) -> list[dict[str, str]]:
    """The rows of ``run_dir/suspects.csv``, most suspect first; ``FileNotFoundError`` naming
    the file if the run has none."""
    path = Path(run_dir) / SUSPECTS
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: give the folder of a finished run (python -m reweight "
            "writes suspects.csv at its end where the labels may be noisy: synthetic noise or "
            "your own data, not a dataset whose labels are all true, e.g. mnist_imbalanced)"
        )
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if rows and "loss" not in rows[0]:
        raise ValueError(f"{path} is not a suspects.csv (no loss column): run the training again")
    return rows


def _weight(row: dict[str, str]) -> float:
    return float(row["final_weight"] or row["mean_weight"] or "nan")


def _images(run_dir: Path, rows: list[dict[str, str]]) -> list[Any] | None:
    """The training inputs of ``rows`` if the run's data are images, else None."""
    config = run_dir / RESOLVED_CONFIG
    if not config.is_file():
        return None
    dataset = dict(yaml.safe_load(config.read_text())["dataset"])
    if dataset.get("name") == "tensors":
        return None
    from reweight.data import build_dataset

    bundle = build_dataset(**dataset)
    first = bundle.train[int(rows[0]["index"])][0]
    if first.dim() != 3 or first.shape[0] not in (1, 3):
        return None
    return [bundle.train[int(r["index"])][0] for r in rows]


def _table(rows: Sequence[dict[str, str]]) -> str:
    def cell(row: dict[str, str], key: str) -> str:
        value = row[key]
        if key == "id" and len(value) > 40:
            value = "..." + value[-37:]
        return value

    widths = {k: max(len(k), *(len(cell(r, k)) for r in rows)) for k in _SHOWN}
    lines = ["  ".join(k.ljust(widths[k]) for k in _SHOWN)]
    lines += ["  ".join(cell(r, k).ljust(widths[k]) for k in _SHOWN) for r in rows]
    return "\n".join(lines)


def _ranking_lines(summary: dict[str, Any]) -> list[str]:
    ranking = summary.get("suspect_ranking")
    if not ranking:
        return []
    k = ranking["num_corrupted"]
    lines = [f"{k} labels known corrupted; precision@k (k = {k}) of the rankings:"]
    for name, label in (("weight", "lowest weight"), ("small_loss", "highest loss (baseline)")):
        p = ranking[name]["precision_at_k"]
        lines.append(f"  {label}: {p:.3f}" if p is not None and not math.isnan(p) else "")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Print the top suspects of a run and write its PNGs; 0 on success, 2 on a bad run dir."""
    parser = argparse.ArgumentParser(
        prog="python -m reweight.outputs.inspect",
        description="The most suspect training labels of a run (RUN_DIR/suspects.csv), with "
        "suspects_scatter.png and, for images, suspects.png written into RUN_DIR.",
    )
    parser.add_argument("run_dir", help="the folder of a finished run")
    parser.add_argument("--top", type=int, default=20, help="how many suspects (default 20)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    if args.top < 1:
        sys.stderr.write(f"error: --top must be >= 1, got {args.top}\n")
        return 2
    summary_path = run_dir / SUMMARY
    try:  # the run's record first: a damaged summary.json is named before anything else
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        rows = read_suspects(run_dir)
    except json.JSONDecodeError as err:
        sys.stderr.write(
            f"error: cannot read {summary_path} ({err}): run the training again to write it\n"
        )
        return 2
    except (OSError, ValueError) as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    top = rows[: args.top]
    try:  # before anything is printed or written: an error is then the only line
        images = _images(run_dir, top) if top else None
    except (OSError, ValueError) as err:
        sys.stderr.write(f"error: cannot rebuild the run's images: {err}\n")
        return 2
    report = [
        f"{len(rows)} training examples in {run_dir / SUSPECTS}; the {len(top)} most suspect:",
        _table(top),
        *(line for line in _ranking_lines(summary) if line),
    ]
    sys.stdout.write("\n".join(report) + "\n")
    known = bool(rows) and rows[0]["corrupted"] != ""
    title = f"{summary.get('method', '?')} on {summary.get('dataset', '?')}"
    scatter = plot_weight_vs_loss(
        [_weight(r) for r in rows],
        [float(r["loss"]) for r in rows],
        [r["corrupted"] == "1" for r in rows] if known else None,
        run_dir / SUSPECTS_SCATTER_PNG,
        title=title,
    )
    if scatter is not None:
        log.info("wrote %s", scatter)
    if images is not None:
        grid = plot_suspect_grid(images, top, run_dir / SUSPECTS_PNG, title=title)
        if grid is not None:
            log.info("wrote %s", grid)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
