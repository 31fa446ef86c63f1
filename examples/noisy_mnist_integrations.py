"""Noisy MNIST through the integrations: a tiny HF ViT in ``transformers.Trainer`` and LeNet in
Lightning, each with erm, mwnet (``mwnet_sum``) and l2rw; test accuracy along the way.

The data of ``experiment=mwnet_mnist_noisy`` (``reweight.data.build_dataset``: 500 training
images per class, 40 % uniform noise, 100 clean trusted images, dataset seed 0), batch 100,
trusted batch 100, the gradient norm clipped at 1.

- ``--integration hf``: ``ViTForImageClassification`` from a config (random init: 28×28, patches
  of 7, width 64, 2 layers, 4 heads) in ``ReweightingTrainer``, HF's AdamW at lr 1e-3, constant.
- ``--integration lightning``: ``LeNet`` in a ``ReweightingModule`` under ``lightning.Trainer``,
  SGD lr 0.05, momentum 0.9 (the experiment's optimizer).

Run (the commands of the results in docs/integrations.md; ``--seed`` the training seed)::

    REWEIGHT_DATA_DIR=data python examples/noisy_mnist_integrations.py --integration lightning \\
        --steps 300 --eval-every 50 --json lightning.json
    REWEIGHT_DATA_DIR=data python examples/noisy_mnist_integrations.py --integration hf \\
        --steps 300 --eval-every 50 --json hf.json   # and --steps 1000 --eval-every 100

Prints one row per method: final and peak test accuracy (and the step of the peak), the
wall time, and the seconds per step.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from reweight import L2RW, MWNet
from reweight.data import build_dataset

METHODS = ("erm", "mwnet", "l2rw")
log = logging.getLogger("noisy_mnist_integrations")


def noisy_mnist(seed: int = 0):
    """The data of experiment=mwnet_mnist_noisy (conf/experiment/mwnet_mnist_noisy.yaml)."""
    return build_dataset(
        "mnist_noisy", seed=seed, noise_type="uniform", noise_rate=0.4, train_per_class=500,
        meta_per_class=10, val_per_class=10,
    )  # fmt: skip


def method(name: str) -> Any:
    """A method as the presets build it: mwnet is ``method=mwnet_sum`` (w = v / Σv)."""
    if name == "mwnet":
        return MWNet(normalize="sum")
    if name == "l2rw":
        return L2RW()
    return name  # erm


@torch.no_grad()
def accuracy(predict: Callable[[Tensor], Tensor], test: Dataset, batch: int = 1000) -> float:
    """Test accuracy, %, of ``predict(x) -> logits``."""
    right = total = 0
    for x, y in DataLoader(test, batch_size=batch):
        right += int((predict(x).argmax(1) == y).sum())
        total += len(y)
    return 100.0 * right / total


class Curve:
    """Test accuracy every ``every`` steps and at the last; the step times."""

    def __init__(self, every: int, steps: int) -> None:
        self.every, self.steps = every, steps
        self.points: list[tuple[int, float]] = []
        self.t0 = time.perf_counter()

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.steps

    def add(self, step: int, acc: float) -> None:
        self.points.append((step, acc))
        log.info("step %d: test accuracy %.2f %%", step, acc)

    def summary(self) -> dict[str, Any]:
        peak_step, peak = max(self.points, key=lambda p: p[1])
        wall = time.perf_counter() - self.t0
        return {
            "final": self.points[-1][1],
            "peak": peak,
            "peak_step": peak_step,
            "curve": self.points,
            "wall_s": wall,
        }


# -- HuggingFace ------------------------------------------------------------------------------


class PixelDicts(Dataset):
    """(image, label) -> HF's {"pixel_values", "labels"}."""

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        x, y = self.data[i]
        return {"pixel_values": x, "labels": int(y)}


def tiny_vit(seed: int) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=28, patch_size=7, num_channels=1, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=128, num_labels=10,
    )  # fmt: skip
    return ViTForImageClassification(config)


def hf_args(out: str, steps: int, seed: int, **kw: Any) -> Any:
    from transformers import TrainingArguments

    base = dict(
        output_dir=out, per_device_train_batch_size=100, max_steps=steps, learning_rate=1e-3,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        logging_steps=50, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        seed=seed, dataloader_num_workers=0,
    )  # fmt: skip
    return TrainingArguments(**{**base, **kw})


def run_hf(name: str, bundle: Any, steps: int, every: int, seed: int) -> dict[str, Any]:
    from transformers import TrainerCallback

    from reweight.integrations.huggingface import ReweightingTrainer

    model = tiny_vit(seed)
    curve = Curve(every, steps)

    def predict(x: Tensor) -> Tensor:
        return model(pixel_values=x).logits

    class Evaluate(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if curve.due(state.global_step):
                model.eval()
                curve.add(state.global_step, accuracy(predict, bundle.test))
                model.train()

    torch.manual_seed(seed)  # the weighting net's initialisation
    with tempfile.TemporaryDirectory() as out:
        trainer = ReweightingTrainer(
            model=model, args=hf_args(out, steps, seed), train_dataset=PixelDicts(bundle.train),
            meta_dataset=PixelDicts(bundle.meta), method=method(name), meta_batch_size=100,
            callbacks=[Evaluate()],
        )  # fmt: skip
        trainer.train()
    return curve.summary()


# -- Lightning --------------------------------------------------------------------------------


def lightning_module(name: str, trusted: DataLoader, seed: int) -> Any:
    from reweight.integrations.lightning import ReweightingModule
    from reweight.models import LeNet

    class NoisyMNIST(ReweightingModule):
        def __init__(self) -> None:
            torch.manual_seed(seed)  # the weighting net's initialisation
            super().__init__(method(name), trusted)
            torch.manual_seed(seed)
            self.net = LeNet(num_classes=10)

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            x, y = batch
            return self.reweigh(self.net, x, y).loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.net.parameters(), lr=0.05, momentum=0.9)

    return NoisyMNIST()


def lightning_trainer(steps: int, callbacks: list[Any], root: str) -> Any:
    import lightning as L

    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, gradient_clip_val=1.0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=root, callbacks=callbacks,
    )  # fmt: skip


def loaders(bundle: Any, seed: int) -> tuple[DataLoader, DataLoader]:
    train = DataLoader(
        bundle.train, batch_size=100, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    trusted = DataLoader(
        bundle.meta, batch_size=100, shuffle=True,
        generator=torch.Generator().manual_seed(seed + 1),
    )  # fmt: skip
    return train, trusted


def run_lightning(name: str, bundle: Any, steps: int, every: int, seed: int) -> dict[str, Any]:
    import lightning as L

    curve = Curve(every, steps)
    train, trusted = loaders(bundle, seed)
    module = lightning_module(name, trusted, seed)

    class Evaluate(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if curve.due(trainer.global_step):
                pl_module.net.eval()
                curve.add(trainer.global_step, accuracy(pl_module.net, bundle.test))
                pl_module.net.train()

    with tempfile.TemporaryDirectory() as root:
        lightning_trainer(steps, [Evaluate()], root).fit(module, train)
    return curve.summary()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--integration", choices=["hf", "lightning"], required=True)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0, help="the training seed (data: seed 0)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the results here")
    a = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in ("lightning", "transformers", "reweight"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(a.threads)
    bundle = noisy_mnist()
    run = run_hf if a.integration == "hf" else run_lightning
    results = {}
    for name in a.methods.split(","):
        results[name] = r = run(name, bundle, a.steps, a.eval_every, a.seed)
        log.info(
            "%s %s: final %.2f %%, peak %.2f %% (step %d), %.0f s",
            a.integration, name, r["final"], r["peak"], r["peak_step"], r["wall_s"],
        )  # fmt: skip
        if a.json:  # after each method, so a long run keeps what it has
            with open(a.json, "w") as f:
                json.dump({"args": vars(a), "results": results}, f, indent=1)
    print(f"| {a.integration} | final | peak (step) | s/step |")
    print("|---|---:|---:|---:|")
    for name, r in results.items():
        print(
            f"| {name} | {r['final']:.1f} | {r['peak']:.1f} ({r['peak_step']}) | "
            f"{r['wall_s'] / a.steps:.3f} |"
        )


if __name__ == "__main__":
    main()
