"""Two heads' ``Trainer.fit`` timed against each other: the whole loop, data included.

``benchmarks/heads.py`` times a method's step on batches already made; this times what a user
waits for, ``fit`` over a dataset in memory (drawing the batches, the meta batches, the steps,
the log rows; no evaluation, no final weights), so a change to the data path shows. Each run
is a fresh process with one head first on ``PYTHONPATH`` and one thread; the heads alternate
run after run (old, new, new, old, ...), and each run reports its CPU time
(``time.process_time``, which waiting for a core does not inflate) and wall time in ``fit``.
The table gives the medians and the ratio new / old.

    git worktree add /tmp/old-head 76f7c7c
    python benchmarks/fit_heads.py /tmp/old-head . --rounds 6
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

# name: (model, dataset class, examples, input shape, classes, steps, batch)
CASES = {
    "mlp": ("mlp", "TensorDataset", 2000, (2,), 2, 400, 100),
    "lenet": ("lenet", "TensorData", 5000, (1, 28, 28), 2, 40, 100),
}


def worker(case: str, method: str) -> None:
    """One ``fit`` of ``case`` with ``method``; prints its CPU and wall seconds as JSON."""
    import time

    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    from reweight import Trainer, TrainerConfig
    from reweight.data.core import TensorData
    from reweight.models import build_model

    torch.set_num_threads(1)
    model_name, kind, n, shape, k, steps, batch = CASES[case]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, *shape, generator=g), torch.randint(0, k, (n,), generator=g)
    mx, my = torch.randn(100, *shape, generator=g), torch.randint(0, k, (100,), generator=g)
    make = TensorDataset if kind == "TensorDataset" else TensorData
    torch.manual_seed(0)
    if model_name == "mlp":
        model = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 2))
    else:
        model = build_model(model_name, num_classes=k, in_channels=shape[0], input_shape=shape)
    config = TrainerConfig(
        max_steps=steps,
        batch_size=batch,
        meta_batch_size=100,
        eval_every=0,
        log_every=50,
        final_weights=0,
        progress=False,
    )
    trainer = Trainer(model, make(x, y), make(mx, my), method=method, config=config)
    cpu, wall = time.process_time(), time.perf_counter()
    trainer.fit()
    import reweight

    seconds = [time.process_time() - cpu, time.perf_counter() - wall]
    print(json.dumps([*seconds, str(Path(reweight.__file__).parent.parent)]))


def run(root: Path, case: str, method: str) -> list[float]:
    """One worker run of this file with ``root``'s package first on the path."""
    env = {**os.environ, "PYTHONPATH": str(root.resolve()), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, __file__, "--worker", case, method],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    cpu, wall, package = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(package) == root.resolve(), f"{package} imported instead of {root}"
    return [cpu, wall]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path, nargs="?")
    parser.add_argument("new", type=Path, nargs="?")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=6, help="runs per head, case and method")
    parser.add_argument("--cases", default="mlp,lenet")
    parser.add_argument("--methods", default="erm,l2rw,mwnet")
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    print("| case | method | old CPU s | new CPU s | new / old (CPU) | new / old (wall) |")
    print("|---|---|---:|---:|---:|---:|")
    for case in args.cases.split(","):
        for method in args.methods.split(","):
            times: dict[str, list[list[float]]] = {"old": [], "new": []}
            for r in range(args.rounds):
                order = ("old", "new") if r % 2 == 0 else ("new", "old")
                for head in order:
                    times[head].append(run(getattr(args, head), case, method))
            med = {h: [statistics.median(t[i] for t in times[h]) for i in (0, 1)] for h in times}
            print(
                f"| {case} | {method} | {med['old'][0]:.2f} | {med['new'][0]:.2f} "
                f"| {med['new'][0] / med['old'][0]:.2f} | {med['new'][1] / med['old'][1]:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
