"""NCHW against NHWC (``trainer.channels_last``): milliseconds per full training step on CPU.

Each case builds two ``Trainer`` objects from one seed, one with ``channels_last=False`` and one
with ``True``, and times ``Trainer.train_step`` (the method's meta step, the weighted backward,
the optimizer step) on fixed random batches. The two run interleaved, one step each per round
in alternating order, so load from other processes hits both alike; the table gives the median
and the interquartile range of each, and the ratio of the medians (NCHW / NHWC: above 1, NHWC
is faster). The largest parameter difference between the two trainers after their first step
says that NHWC changes only the rounding (the same sums in another order; like any change of
summation order, e.g. the thread count, such differences grow over a run's steps).

What ``trainer.channels_last=auto`` (the default) decides from: on for CPU models with 2-D
convolutions (``reweight.core.device.channels_last_choice``).

Usage:
    python benchmarks/channels_last.py                          # lenet and resnet32, l2rw
    python benchmarks/channels_last.py --models lenet --methods erm,l2rw,mwnet --steps 40
    python benchmarks/channels_last.py --models lenet --methods erm,l2rw,mwnet --dtype float64
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch.utils.data import TensorDataset

from reweight import Trainer, TrainerConfig
from reweight.models import build_model

CASES = {  # model: (input shape, classes, batch, meta batch)
    "lenet": ((1, 28, 28), 10, 100, 100),
    "resnet32": ((3, 32, 32), 10, 32, 32),
    "mlp": ((1, 28, 28), 10, 100, 100),
}


def _trainer(
    name: str, method: str, channels_last: bool, dtype: torch.dtype = torch.float32
) -> tuple[Trainer, tuple]:
    shape, k, batch, meta = CASES[name]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, *shape, generator=g), torch.randint(0, k, (batch,), generator=g)
    mx, my = torch.randn(meta, *shape, generator=g), torch.randint(0, k, (meta,), generator=g)
    x, mx = x.to(dtype), mx.to(dtype)
    torch.manual_seed(0)
    model = build_model(name, num_classes=k, in_channels=shape[0], input_shape=shape).to(dtype)
    config = TrainerConfig(
        batch_size=batch, meta_batch_size=meta, channels_last=channels_last, progress=False
    )
    trainer = Trainer(
        model,
        TensorDataset(x, y),
        TensorDataset(mx, my),
        method=method,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
        config=config,
    )
    return trainer, (x, y, mx, my)


@torch.no_grad()
def _max_diff(a: Trainer, b: Trainer) -> float:
    pairs = zip(a.model.parameters(), b.model.parameters(), strict=True)
    return max(float((p - q).abs().max()) for p, q in pairs)


def run_case(
    name: str, method: str, steps: int, warmup: int, dtype: torch.dtype = torch.float32
) -> dict:
    pair = {fmt: _trainer(name, method, fmt, dtype) for fmt in (False, True)}
    times: dict[bool, list[float]] = {False: [], True: []}
    diff = float("nan")
    for i in range(warmup + steps):
        for fmt in (False, True) if i % 2 == 0 else (True, False):
            trainer, batch = pair[fmt]
            start = time.perf_counter()
            trainer.train_step(*batch)
            if i >= warmup:
                times[fmt].append(time.perf_counter() - start)
        if i == 0:  # one step each from the same start: what the memory format changes
            diff = _max_diff(pair[False][0], pair[True][0])
    row = {"model": name, "method": method, "first_step_diff": diff}
    for fmt, key in ((False, "nchw"), (True, "nhwc")):
        q = statistics.quantiles(times[fmt], n=4)
        row[key] = (1000 * statistics.median(times[fmt]), 1000 * q[0], 1000 * q[2])
    row["ratio"] = row["nchw"][0] / row["nhwc"][0]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lenet,resnet32")
    parser.add_argument("--methods", default="l2rw")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per format")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(
        f"torch {torch.__version__}, {args.dtype}, {args.threads} thread(s), "
        f"{os.cpu_count()} CPU(s), "
        f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min)"
    )
    print(
        "| model | method | NCHW ms (median, p25–p75) | NHWC ms (median, p25–p75) "
        "| NCHW / NHWC | param diff after 1 step |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for name in args.models.split(","):
        for method in args.methods.split(","):
            r = run_case(name, method, args.steps, args.warmup, dtype)
            a, b = r["nchw"], r["nhwc"]
            print(
                f"| {name} | {method} | {a[0]:.1f} ({a[1]:.1f}–{a[2]:.1f}) "
                f"| {b[0]:.1f} ({b[1]:.1f}–{b[2]:.1f}) | {r['ratio']:.2f} "
                f"| {r['first_step_diff']:.1e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
