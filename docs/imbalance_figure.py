"""Turn an MNIST 4-vs-9 sweep directory into the paper-style figure and a markdown table.

    python docs/imbalance_figure.py multirun/<sweep> --out docs/results/mnist_imbalance

Reads every job's resolved config (``.hydra/config.yaml``) and ``summary.json``, groups by
method and ``dataset.proportion``, and plots balanced test error (mean ± std over seeds) against
the proportion of nines, one line per method, next to the values read off Ren et al. (2018).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from omegaconf import OmegaConf

# Ren et al. 2018, class-imbalance figure, values read off the plot (about ±0.3 points).
PAPER = {
    "erm": {0.9: 1.7, 0.95: 2.9, 0.98: 5.9, 0.99: 10.5, 0.995: 18.0},
    "l2rw": {0.9: 1.25, 0.95: 1.45, 0.98: 2.0, 0.99: 2.5, 0.995: 3.6},
}


def collect(sweep: Path, metric: str, scale: float = 100.0) -> dict[str, dict[float, list[float]]]:
    """{method: {proportion: [metric × scale, one per seed]}} from a sweep directory (or a
    folder of several): every job that has finished, i.e. has a summary.json."""
    out: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for summary in sorted(sweep.glob("**/summary.json")):
        cfg = OmegaConf.load(summary.parent / ".hydra" / "config.yaml")
        values = json.loads(summary.read_text())
        out[cfg.method.name][float(cfg.dataset.proportion)].append(scale * values[metric])
    if not out:
        raise SystemExit(f"no summary.json under {sweep}")
    return out


def cost_table(sweep: Path) -> str:
    """Wall time per job and, for L2RW, the batches whose weights were all zero."""
    wall = collect(sweep, "wall_time_s", 1.0)
    zero = collect(sweep, "zero_sum_batches", 1.0)
    lines = [
        "| method | p | jobs | wall time per job (s, mean) | zero-sum batches (mean) |",
        "|---|---|---:|---:|---:|",
    ]
    for method in sorted(wall):
        for p in sorted(wall[method]):
            times, zeros = wall[method][p], zero[method][p]
            lines.append(
                f"| {method} | {p} | {len(times)} | {statistics.fmean(times):.0f} | "
                f"{statistics.fmean(zeros):.0f} |"
            )
    return "\n".join(lines) + "\n"


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def table(results: dict[str, dict[float, list[float]]]) -> str:
    props = sorted({p for by_p in results.values() for p in by_p})
    head = "| method | " + " | ".join(f"p = {p}" for p in props) + " |"
    lines = [head, "|---|" + "---|" * len(props)]
    for method in sorted(results):
        cells = []
        for p in props:
            xs = results[method].get(p, [])
            m, s = mean_std(xs) if xs else (math.nan, math.nan)
            cells.append(f"{m:.2f} ± {s:.2f} (n={len(xs)})" if xs else "–")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    for method, by_p in PAPER.items():
        lines.append(
            f"| {method} (paper, read off the plot) | "
            + " | ".join(f"≈{by_p.get(p, math.nan):g}" for p in props)
            + " |"
        )
    return "\n".join(lines) + "\n"


def figure(results: dict[str, dict[float, list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for method in sorted(results):
        props = sorted(results[method])
        stats = [mean_std(results[method][p]) for p in props]
        ax.errorbar(
            props,
            [m for m, _ in stats],
            yerr=[s for _, s in stats],
            marker="o",
            capsize=3,
            label=method,
        )
    for method, by_p in PAPER.items():
        ax.plot(list(by_p), list(by_p.values()), ls=":", color="grey", marker="x")
        ax.annotate(f"{method} (paper)", (0.995, by_p[0.995]), fontsize=7, color="grey")
    ax.set_xlabel("proportion of the majority class (nines)")
    ax.set_ylabel("balanced test error (%)")
    ax.set_title("MNIST 4 vs 9, LeNet")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", type=Path, help="the multirun directory of the sweep")
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix")
    parser.add_argument("--metric", default="test_balanced_error")
    args = parser.parse_args()
    results = collect(args.sweep, args.metric)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(table(results) + "\n" + cost_table(args.sweep))
    figure(results, args.out.with_suffix(".png"))
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
