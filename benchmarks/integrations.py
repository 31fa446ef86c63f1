"""The step cost of each integration against the same model in reweight's own ``Trainer``.

- ``hf``: the tiny ``ViTForImageClassification`` of the noisy-MNIST demo in
  ``ReweightingTrainer`` (HF's loop: its sampler and collator, the trusted batch collated per
  step, AdamW at lr 1e-3, the norm clipped at 1), against ``Trainer.train_step`` on a copy of
  the same model (``SequenceClassifier``: dict in, logits out), the same optimizer and clipping.
- ``lightning``: LeNet in a ``ReweightingModule`` under ``lightning.Trainer`` (SGD lr 0.05,
  momentum 0.9, clipped at 1), against ``Trainer.train_step`` on a copy of LeNet.

Batch 100, trusted batch 100 (noisy MNIST images: the demo's data). The integration's step is
timed from its loop's step-begin hook to its step-end hook (HF ``on_step_begin`` /
``on_step_end``; Lightning ``on_train_batch_start`` / ``on_train_batch_end``): the meta step,
the backward, clipping and the optimizer step, not the loading of the training batch. Between
two of its steps, in the same process, one ``Trainer.train_step`` on a fixed batch is timed
(before the integration's step on even steps, after it on odd ones), so load from other
processes hits both alike. The reweight ``Trainer`` runs NCHW (``channels_last=False``) like
the integrations; its default on CPU, NHWC, would make LeNet's steps faster. The first
``--warmup`` steps of each are not timed (the planner checks its engine on the first step).
The table: median ms per step (interquartile range) and the ratio of the medians.

Usage:
    REWEIGHT_DATA_DIR=data python benchmarks/integrations.py --steps 30 --json integrations.json
    python benchmarks/integrations.py --integrations lightning --methods l2rw
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from reweight import Trainer, TrainerConfig
from reweight.models.hf import SequenceClassifier

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import noisy_mnist_integrations as demo  # the demo's data, models and settings


class Interleaved:
    """Times one integration step (``begin``/``end``) and one reference step between them."""

    def __init__(self, reference: Trainer, batch: tuple, warmup: int) -> None:
        self.reference, self.batch, self.warmup = reference, batch, warmup
        self.ours: list[float] = []  # the integration, s
        self.ref: list[float] = []  # reweight's Trainer, s
        self.step = 0
        self.t0 = 0.0

    def _reference_step(self) -> None:
        t = time.perf_counter()
        self.reference.train_step(*self.batch)
        if self.step >= self.warmup:
            self.ref.append(time.perf_counter() - t)

    def begin(self) -> None:
        if self.step % 2 == 0:
            self._reference_step()
        self.t0 = time.perf_counter()

    def end(self) -> None:
        dt = time.perf_counter() - self.t0
        if self.step >= self.warmup:
            self.ours.append(dt)
        if self.step % 2 == 1:
            self._reference_step()
        self.step += 1


def reference(model: torch.nn.Module, name: str, optimizer: Any, bundle: Any) -> Trainer:
    config = TrainerConfig(
        batch_size=100, meta_batch_size=100, grad_clip=1.0, channels_last=False, progress=False,
        final_weights=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return Trainer(
        model, bundle.train, bundle.meta, method=demo.method(name), optimizer=optimizer,
        config=config,
    )  # fmt: skip


def fixed_batch(bundle: Any, dicts: bool) -> tuple:
    x, y = next(iter(DataLoader(bundle.train, batch_size=100)))
    mx, my = next(iter(DataLoader(bundle.meta, batch_size=100)))
    if dicts:
        x, mx = {"pixel_values": x}, {"pixel_values": mx}
    return x, y, mx, my


def time_hf(name: str, bundle: Any, steps: int, warmup: int) -> Interleaved:
    from transformers import TrainerCallback

    from reweight.integrations.huggingface import ReweightingTrainer

    model = demo.tiny_vit(0)
    ref = reference(
        SequenceClassifier(copy.deepcopy(model)), name,
        lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.0), bundle,
    )  # fmt: skip
    clock = Interleaved(ref, fixed_batch(bundle, dicts=True), warmup)

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.begin()

        def on_step_end(self, args, state, control, **kwargs):
            clock.end()

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as out:
        ReweightingTrainer(
            model=model, args=demo.hf_args(out, steps + warmup, 0, logging_steps=10_000),
            train_dataset=demo.PixelDicts(bundle.train),
            meta_dataset=demo.PixelDicts(bundle.meta), method=demo.method(name),
            meta_batch_size=100, callbacks=[Clock()],
        ).train()  # fmt: skip
    return clock


def time_lightning(name: str, bundle: Any, steps: int, warmup: int) -> Interleaved:
    import lightning as L

    from reweight.models import LeNet

    train, trusted = demo.loaders(bundle, 0)
    module = demo.lightning_module(name, trusted, 0)
    torch.manual_seed(0)
    ref = reference(
        LeNet(num_classes=10), name,
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), bundle,
    )  # fmt: skip
    clock = Interleaved(ref, fixed_batch(bundle, dicts=False), warmup)

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            clock.begin()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.end()

    with tempfile.TemporaryDirectory() as root:
        demo.lightning_trainer(steps + warmup, [Clock()], root).fit(module, train)
    return clock


def summary(times: list[float]) -> dict[str, float]:
    q = statistics.quantiles(times, n=4)
    return {"median_ms": 1e3 * statistics.median(times), "iqr_ms": 1e3 * (q[2] - q[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--integrations", default="hf,lightning")
    parser.add_argument("--methods", default=",".join(demo.METHODS))
    parser.add_argument("--steps", type=int, default=30, help="timed steps of each")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json")
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    bundle = demo.noisy_mnist()
    rows = []
    for integration in a.integrations.split(","):
        run = time_hf if integration == "hf" else time_lightning
        for name in a.methods.split(","):
            clock = run(name, bundle, a.steps, a.warmup)
            ours, ref = summary(clock.ours), summary(clock.ref)
            rows.append(
                {
                    "integration": integration, "method": name, "steps": len(clock.ours),
                    "integration_ms": ours, "trainer_ms": ref,
                    "ratio": ours["median_ms"] / ref["median_ms"],
                }
            )  # fmt: skip
            print(rows[-1], flush=True)
            if a.json:
                Path(a.json).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))
    print("| integration | method | integration, ms (IQR) | reweight Trainer, ms (IQR) | ratio |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        i, t = r["integration_ms"], r["trainer_ms"]
        print(
            f"| {r['integration']} | {r['method']} | {i['median_ms']:.1f} ({i['iqr_ms']:.1f}) | "
            f"{t['median_ms']:.1f} ({t['iqr_ms']:.1f}) | {r['ratio']:.2f} |"
        )


if __name__ == "__main__":
    main()
