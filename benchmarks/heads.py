"""Two heads of the project, timed against each other: does a change make a step slower?

Runs each head's own ``benchmarks/meta_step.py`` in a subprocess with that head first on
``PYTHONPATH``, alternating heads round after round (old, new, new, old, ...), so that a slow
patch of a shared machine falls on both alike. Each run times its variants interleaved in one
process and reports each as a ratio to the plain SGD step of the same run; the medians of
those ratios over the rounds are compared, new / old (a ratio of ratios: the machine's speed
cancels). Milliseconds are shown too.

    git worktree add /tmp/old-head 875eab7
    python benchmarks/heads.py /tmp/old-head . --rounds 4 --models lenet,resnet32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run_head(root: Path, args: argparse.Namespace) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [
            sys.executable,
            str(root / "benchmarks" / "meta_step.py"),
            "--threads", "1",
            "--device", "cpu",
            "--no-memory",
            "--models", args.models,
            "--cases", args.cases,
            "--variants", args.variants,
            "--steps", str(args.steps),
            "--warmup", "3",
            "--json", str(out),
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(root.resolve())}
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return json.loads(out.read_text())["rows"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", type=Path, help="a checkout of the old head")
    parser.add_argument("new", type=Path, help="a checkout of the new head")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--models", default="lenet,resnet32")
    parser.add_argument("--cases", default="100/100")
    parser.add_argument("--variants", default="l2rw/fast,mwnet/fast")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    heads = {"old": args.old, "new": args.new}
    ratios: dict[tuple[str, str, str], list[float]] = {}
    ms: dict[tuple[str, str, str], list[float]] = {}
    for r in range(args.rounds):
        order = ["old", "new"] if r % 2 == 0 else ["new", "old"]
        for head in order:
            for row in run_head(heads[head], args):
                key = (row["model"], row["variant"], head)
                ratios.setdefault(key, []).append(row["ratio"])
                ms.setdefault(key, []).append(row["median_ms"])
            print(f"round {r + 1}/{args.rounds}: {head} done", file=sys.stderr, flush=True)
    print("| model | variant | old ms | new ms | old × plain | new × plain | new / old |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for model, variant in sorted({(m, v) for m, v, _ in ratios}):
        old = statistics.median(ratios[model, variant, "old"])
        new = statistics.median(ratios[model, variant, "new"])
        old_ms = statistics.median(ms[model, variant, "old"])
        new_ms = statistics.median(ms[model, variant, "new"])
        print(
            f"| {model} | {variant} | {old_ms:.1f} | {new_ms:.1f} | {old:.3f} | {new:.3f} "
            f"| {new / old:.3f} |"
        )


if __name__ == "__main__":
    main()
