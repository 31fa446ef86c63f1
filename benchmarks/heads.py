"""Two heads of the project, timed against each other: does a change make a step slower?

One worker process per head (that head first on ``PYTHONPATH``) builds the variants with that
head's own ``benchmarks/meta_step.py`` (same model, same data, same seed) and waits. The parent
then asks the workers in turn for a block of steps of one variant, alternating the heads block
after block (old, new, new, old, ...) and rotating the variants, so that the two heads are
never more than a block apart in time. Each step is timed twice: by the wall clock and by the
worker's CPU time (``time.process_time``, one thread), which a busy machine inflates far less:
time spent waiting for a core is not counted. The table gives the medians per step and the
ratio new / old of each, and each head's ratio to its own plain step.

    git worktree add /tmp/old-head 875eab7
    python benchmarks/heads.py /tmp/old-head . --rounds 20 --models lenet,resnet32
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HEADS = ("old", "new")


def worker(root: Path, model: str, variants: list[str], warmup: int) -> None:
    """Build ``variants`` of ``model`` with ``root``'s meta_step.py, then answer ``VARIANT K``
    lines with K steps' times (a JSON list of [wall s, cpu s] per step)."""
    import torch

    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("meta_step", root / "benchmarks/meta_step.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules["meta_step"] = bench
    spec.loader.exec_module(bench)
    case = bench.CASES[model][0]
    if hasattr(bench, "batches"):  # the head's own batches (token ids for a text model)
        data = bench.batches(case)
    else:  # a head older than meta_step.batches: images, or token ids for a BERT
        gen = torch.Generator().manual_seed(1)

        def inputs(n: int):
            if case.model.startswith("bert"):
                return bench.tokens(n, case.shape[0], gen)
            return torch.randn(n, *case.shape, generator=gen)

        x = inputs(case.batch)
        y = torch.randint(0, case.num_classes, (case.batch,), generator=gen)
        mx = inputs(case.meta_batch)
        my = torch.randint(0, case.num_classes, (case.meta_batch,), generator=gen)
        data = (x, y, mx, my)
    steps, *_ = bench.build_variants(case, torch.device("cpu"), False, data, False, variants)
    for _ in range(warmup):
        for step in steps.values():
            step()
    print(json.dumps(sorted(steps)), flush=True)
    for line in sys.stdin:
        name, count = line.split()
        times = []
        for _ in range(int(count)):
            wall, cpu_time = time.perf_counter(), time.process_time()
            steps[name]()
            times.append((time.perf_counter() - wall, time.process_time() - cpu_time))
        print(json.dumps(times), flush=True)


def tune_malloc() -> None:
    """glibc's mmap and trim thresholds lifted to 2 GiB, as ``reweight.core.malloc`` lifts them
    for a CPU run of the CLI; done here so that a head older than that module is tuned alike
    (the environment would not do: with glibc's variables set to 2 GiB, a 7 MiB tensor was
    still faulted in at every allocation; README, "your own process")."""
    libc = ctypes.CDLL(None)
    for param in (-1, -3):  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD (malloc.h)
        if libc.mallopt(param, 2**31 - 1) != 1:
            raise SystemExit("mallopt refused: use --malloc system")


def start(
    root: Path, model: str, variants: list[str], warmup: int, malloc: str
) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--worker", str(root.resolve()), "--models", model]
    cmd += ["--variants", ",".join(variants), "--warmup", str(warmup), "--malloc", malloc]
    env = {**os.environ, "PYTHONPATH": str(root.resolve()), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def ask(proc: subprocess.Popen, line: str) -> list:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def compare(roots: dict[str, Path], model: str, args: argparse.Namespace) -> list[str]:
    """Table rows for ``model``: per variant, both heads' medians and their ratios."""
    variants = ["plain", *args.variants.split(",")]
    procs = {head: start(roots[head], model, variants, args.warmup, args.malloc) for head in HEADS}
    built = {head: json.loads(procs[head].stdout.readline()) for head in HEADS}  # type: ignore[union-attr]
    common = [v for v in variants if all(v in built[h] for h in HEADS)]
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in range(args.rounds):
        order = common[r % len(common) :] + common[: r % len(common)]
        for i, variant in enumerate(order):
            for head in HEADS if (r + i) % 2 == 0 else HEADS[::-1]:
                block = ask(procs[head], f"{variant} {args.block}")
                times.setdefault((head, variant), []).extend(map(tuple, block))
        print(f"{model}: round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
    for proc in procs.values():
        proc.communicate()

    def median(head: str, variant: str, clock: int) -> float:
        return statistics.median(t[clock] for t in times[head, variant]) * 1e3

    rows = []
    for variant in common:
        cells = [model, variant]
        for clock in (1, 0):  # cpu, wall
            old, new = median("old", variant, clock), median("new", variant, clock)
            cells += [f"{old:.1f}", f"{new:.1f}", f"{new / old:.3f}"]
        plain = [median(h, variant, 1) / median(h, "plain", 1) for h in HEADS]
        cells += [f"{plain[0]:.3f}", f"{plain[1]:.3f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", type=Path, nargs="?", help="a checkout of the old head")
    parser.add_argument("new", type=Path, nargs="?", help="a checkout of the new head")
    parser.add_argument("--rounds", type=int, default=20, help="blocks per variant and head")
    parser.add_argument("--block", type=int, default=3, help="steps per block")
    parser.add_argument("--models", default="lenet,resnet32")
    parser.add_argument("--variants", default="l2rw/fast,mwnet/fast")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each variant")
    parser.add_argument(
        "--malloc",
        default="tuned",
        choices=("tuned", "system"),
        help="glibc's malloc in both workers: tuned (as the CLI runs on a CPU: "
        "reweight.core.malloc's limits) or system (its defaults)",
    )
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        if args.malloc == "tuned":
            tune_malloc()
        return worker(args.worker, args.models, args.variants.split(","), args.warmup)
    if args.old is None or args.new is None:
        parser.error("give the old and the new head's checkouts")
    roots = {"old": args.old, "new": args.new}
    rows = [row for model in args.models.split(",") for row in compare(roots, model, args)]
    print(
        "| model | variant | old cpu ms | new cpu ms | new / old (cpu) | old wall ms | new wall ms "
        "| new / old (wall) | old × plain (cpu) | new × plain (cpu) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
