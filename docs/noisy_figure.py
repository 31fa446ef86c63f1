"""Turn the noisy-MNIST sweeps into a figure and a markdown table (docs/noisy_mnist.md).

    python docs/noisy_figure.py outputs/sweeps/mnist_noisy_uniform outputs/sweeps/mnist_noisy_flip \
        --out docs/results/mnist_noisy

Reads every finished job (``summary.json``, ``metrics.csv`` and ``.hydra/config.yaml``) under
the given sweep directories and groups the jobs by noise setting and method. The figure has one
panel per noise setting: test accuracy over training, mean ± std over seeds, one line per
method. The table gives, per setting and method, the final test accuracy, the best test accuracy
seen during training (an optimistic number: it is picked on the test set, shown only to say how
far the final one fell), the final weights' clean-vs-corrupted AUC (every training example
scored once at the end; 0.5 for methods whose weights ignore the labels' quality), the AUC of
the training batches' weights at step 300 (near ERM's peak) and at the end (``weight_auc`` of
``metrics.csv``), and the wall time per job.

A run of a cheaper or changed mode is its own row, named by the method and what differs:
``mwnet every=10`` (``method.meta_every``), ``l2rw head`` (``method.meta_params``), ``l2rw
small_loss`` (``dataset.meta_source``); ``cmwnet`` is CMW-Net.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from omegaconf import OmegaConf

METHODS = ("erm", "class_balanced", "l2rw", "mwnet", "cmwnet")  # the order of lines and rows
AUC_STEP = 300  # the step of the early weight AUC in the table (ERM peaks near it)
Setting = tuple[str, float]  # (noise_type, noise_rate)


def collect(sweeps: list[Path]) -> dict[Setting, dict[str, list[dict]]]:
    """{(noise_type, noise_rate): {method: [job, one per seed]}}; a job is its summary plus its
    test-accuracy curve (``curve``: [(step, accuracy)])."""
    out: dict[Setting, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for sweep in sweeps:
        for summary in sorted(sweep.glob("**/summary.json")):
            cfg = OmegaConf.load(summary.parent / ".hydra" / "config.yaml")
            job = json.loads(summary.read_text())
            with open(summary.parent / "metrics.csv", newline="") as f:
                rows = list(csv.DictReader(f))
            job["curve"] = [
                (int(r["step"]), float(r["test_accuracy"])) for r in rows if r.get("test_accuracy")
            ]
            job["auc_curve"] = {
                int(r["step"]): float(r["weight_auc"]) for r in rows if r.get("weight_auc")
            }
            setting = (str(cfg.dataset.noise_type), float(cfg.dataset.noise_rate))
            out[setting][variant(cfg)].append(job)
    if not out:
        raise SystemExit(f"no summary.json under {', '.join(map(str, sweeps))}")
    return out


def variant(cfg) -> str:
    """The row's name: the method, and the mode when it is not the default one."""
    method, tags = cfg.method, []
    if method.get("meta_every", 1) != 1:
        tags.append(f"every={method.meta_every}")
    if str(method.get("meta_params", "all")) != "all":
        tags.append(str(method.meta_params))
    if cfg.dataset.get("meta_source", "clean") != "clean":
        tags.append(str(cfg.dataset.meta_source))
    return " ".join([str(method.name), *tags])


def _order(names) -> list[str]:
    """Methods in METHODS order, each method's default mode first."""
    return sorted(names, key=lambda v: (METHODS.index(v.split()[0]), v))


def _auc_at(jobs: list[dict], step: int | None) -> str:
    """Mean ± std over jobs of the training weights' AUC at ``step`` (None: the last row)."""
    curves = [j["auc_curve"] for j in jobs if j["auc_curve"]]
    values = [c[max(c) if step is None else step] for c in curves if step is None or step in c]
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "–"
    m, s = mean_std(values)
    return f"{m:.2f}" if math.isnan(s) else f"{m:.2f} ± {s:.2f}"


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else math.nan


def _pct(xs: list[float]) -> str:
    m, s = mean_std([100 * x for x in xs])
    return f"{m:.1f}" if math.isnan(s) else f"{m:.1f} ± {s:.1f}"


def table(results: dict[Setting, dict[str, list[dict]]]) -> str:
    lines = [
        "| noise | method | seeds | final test acc. (%) | best during training (%) "
        f"| weight AUC (final) | batch weight AUC, step {AUC_STEP} / last "
        "| wall time per job (s) |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for setting in sorted(results):
        for method in _order(results[setting]):
            jobs = results[setting][method]
            auc = mean_std([j["weight_auc"] for j in jobs])
            lines.append(
                f"| {setting[0]} {setting[1]:.0%} | {method} | {len(jobs)} "
                f"| {_pct([j['test_accuracy'] for j in jobs])} "
                f"| {_pct([j['best_test_accuracy'] for j in jobs])} "
                f"| {auc[0]:.3f}{'' if math.isnan(auc[1]) else f' ± {auc[1]:.3f}'} "
                f"| {_auc_at(jobs, AUC_STEP)} / {_auc_at(jobs, None)} "
                f"| {statistics.fmean(j['wall_time_s'] for j in jobs):.0f} |"
            )
    return "\n".join(lines) + "\n"


def figure(results: dict[Setting, dict[str, list[dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted(results)
    variants = _order({v for setting in settings for v in results[setting]})
    colors = {v: f"C{i % 10}" for i, v in enumerate(variants)}  # one colour per row, all panels
    fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 3.6), squeeze=False)
    for ax, setting in zip(axes[0], settings, strict=True):
        for method in _order(results[setting]):
            curves = [dict(j["curve"]) for j in results[setting][method]]
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            stats = [mean_std([100 * c[s] for c in curves]) for s in steps]
            mean = [m for m, _ in stats]
            std = [0.0 if math.isnan(s) else s for _, s in stats]
            ax.plot(steps, mean, color=colors[method], label=method)
            low = [m - s for m, s in zip(mean, std, strict=True)]
            high = [m + s for m, s in zip(mean, std, strict=True)]
            ax.fill_between(steps, low, high, color=colors[method], alpha=0.2)
        ax.set_title(f"{setting[0]} noise {setting[1]:.0%}")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%), mean ± std over seeds")
    handles = [plt.Line2D([], [], color=colors[v], label=v) for v in variants]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(variants), 6), fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweeps", nargs="+", type=Path, help="sweep directories")
    parser.add_argument("--out", type=Path, required=True, help="path stem of the .png and .md")
    args = parser.parse_args()
    results = collect(args.sweeps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure(results, args.out.with_suffix(".png"))
    args.out.with_suffix(".md").write_text(table(results))
    print(table(results), end="")


if __name__ == "__main__":
    main()
