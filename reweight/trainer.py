"""The training loop: batches, the method's weights, the real weighted update, evaluation.

Example (plain Python objects, no Hydra):
    >>> import torch, torch.nn as nn
    >>> from torch.utils.data import TensorDataset
    >>> from reweight import Trainer, TrainerConfig
    >>> g = torch.Generator().manual_seed(0)
    >>> x, y = torch.randn(200, 2, generator=g), torch.randint(0, 2, (200,), generator=g)
    >>> train, meta = TensorDataset(x[:180], y[:180]), TensorDataset(x[180:], y[180:])
    >>> trainer = Trainer(nn.Linear(2, 2), train, meta, meta, method="l2rw",
    ...                   optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
    ...                   config=TrainerConfig(max_steps=5, batch_size=20, progress=False))
    >>> result = trainer.fit()
    >>> result.metrics["steps"], 0 <= result.metrics["test_accuracy"] <= 1
    (5, True)
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from reweight.distributed import DistContext
from reweight.fileio import atomic_write
from reweight.functional import LossFn
from reweight.methods import Method, MethodOutput, StepInputs, build_method
from reweight.metrics import auc, per_class_accuracy

__all__ = ["FitResult", "Trainer", "TrainerConfig", "weight_diagnostics"]

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[Any], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


@dataclass
class TrainerConfig:
    """Loop settings. Steps count real optimizer updates."""

    max_steps: int = 1000  # optimizer steps in all
    batch_size: int = 100  # training examples per step
    meta_batch_size: int = 100  # clean examples per meta step (capped at the meta set's size)
    eval_every: int = 500  # evaluate the test set every N steps (0: only at the end)
    eval_batch_size: int = 1000
    log_every: int = 50  # one history row per N steps
    grad_clip: float | None = None  # clip the global gradient norm of the real update
    seed: int = 0  # training seed: data order, dropout, augmentation (not data corruption)
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", or "auto"
    bf16: bool = False  # bf16 autocast for forward passes (CUDA only)
    channels_last: bool = False  # NHWC memory format for the model and 4-D inputs (convnets)
    num_workers: int = 0  # DataLoader workers
    checkpoint_every: int = 0  # write the checkpoint every N steps (0: only at the end)
    progress: bool | None = None  # tqdm bars; None: only when stderr is a terminal
    final_weights: int = 1  # passes that score every training example's weight at the end (0: off)

    def __post_init__(self) -> None:
        for key in ("max_steps", "batch_size", "meta_batch_size", "eval_batch_size", "log_every"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"trainer.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("eval_every", "checkpoint_every", "num_workers"):
            if int(getattr(self, key)) < 0:
                raise ValueError(f"trainer.{key} must be >= 0, got {getattr(self, key)}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"trainer.grad_clip must be > 0 or null, got {self.grad_clip}")


@dataclass
class FitResult:
    history: list[dict[str, float]]  # one row per log step (and per evaluation)
    metrics: dict[str, Any]  # final metrics: test accuracy, per-class accuracy, weight stats


class _BatchStream:
    """Deterministic, resumable batches: epoch e is a permutation seeded by (seed, stream, e).

    The position is the number of batches drawn so far, so a resumed run continues with
    exactly the batches an uninterrupted one would have drawn.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int,
        stream: int,
        drop_last: bool,
        num_workers: int,
        pin_memory: bool,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        self.dataset = dataset
        self.rank, self.world = shard
        self.n = len(dataset)  # type: ignore[arg-type]
        self.batch_size = min(batch_size, self.n)
        self.seed, self.stream = seed, stream
        self.per_epoch = (
            self.n // self.batch_size if drop_last else math.ceil(self.n / self.batch_size)
        )
        self.num_workers, self.pin_memory = num_workers, pin_memory

    def _generator(self, epoch: int, offset: int = 0) -> torch.Generator:
        key = self.seed * 1_000_003 + self.stream * 7_919 + epoch * 104_729 + offset
        return torch.Generator().manual_seed(key % 2**62)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        perm = torch.randperm(self.n, generator=self._generator(epoch)).tolist()
        b = self.batch_size
        return [perm[i * b : (i + 1) * b] for i in range(self.per_epoch)]

    def iterate(self, position: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        epoch, offset = divmod(position, self.per_epoch)
        while True:
            global_batches = self._epoch_batches(epoch)[offset:]
            k = self.batch_size // self.world  # this rank's contiguous slice of each batch
            batches = [b[self.rank * k : (self.rank + 1) * k] for b in global_batches]
            # The loader's own generator (not the global RNG) seeds its workers, so starting
            # a loader mid-epoch on resume leaves the global RNG stream untouched.
            loader = DataLoader(
                self.dataset,
                batch_sampler=batches,
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                generator=self._generator(epoch, offset + 1),
            )
            for idx, (x, y) in zip(batches, loader, strict=True):
                yield torch.as_tensor(idx), x, torch.as_tensor(y)
            epoch, offset = epoch + 1, 0


class _WeightStats:
    """Running statistics of the weights: a window (reset at each log row) and run totals."""

    def __init__(self, num_classes: int | None, corrupted: Tensor | None, n: int) -> None:
        self.num_classes = num_classes
        self.corrupted = corrupted
        # per-example sums of the relative weight received in real updates
        self.received = torch.zeros(n, dtype=torch.float64)
        self.visits = torch.zeros(n, dtype=torch.float64)
        self.totals: dict[str, float] = {"zero_sum_batches": 0.0}
        self.reset_window()

    def reset_window(self) -> None:
        self.w: list[Tensor] = []
        self.idx: list[Tensor] = []
        self.y: list[Tensor] = []
        self.losses: list[float] = []
        self.mean_losses: list[float] = []
        self.meta_losses: list[float] = []

    def add(
        self, w: Tensor, out: MethodOutput, idx: Tensor, y: Tensor, loss: float, mean_loss: float
    ) -> None:
        """Record a (global) batch's weights ``w``; ``out`` for the meta loss and zero sum."""
        rel = w.detach().float().cpu() * len(w)  # 1 = uniform weight
        self.received.index_add_(0, idx.cpu(), rel.double())
        self.visits.index_add_(0, idx.cpu(), torch.ones_like(rel, dtype=torch.float64))
        self.w.append(rel)
        self.idx.append(idx.cpu())
        self.y.append(y.cpu())
        self.losses.append(loss)
        self.mean_losses.append(mean_loss)
        if out.meta_loss is not None:
            self.meta_losses.append(out.meta_loss)
        self.totals["zero_sum_batches"] += float(out.zero_sum)

    def window_row(self) -> dict[str, float]:
        w, y = torch.cat(self.w), torch.cat(self.y)
        row = {
            "train_loss": sum(self.losses) / len(self.losses),
            "train_loss_unweighted": sum(self.mean_losses) / len(self.mean_losses),
            "meta_loss": (
                sum(self.meta_losses) / len(self.meta_losses) if self.meta_losses else float("nan")
            ),
            "weight_mean": float(w.mean()),
            "weight_std": float(w.std()) if len(w) > 1 else 0.0,
            "weight_max": float(w.max()),
            "weight_zero_frac": float((w == 0).double().mean()),
            "zero_sum_batches": self.totals["zero_sum_batches"],
        }
        if self.corrupted is not None:
            c = self.corrupted[torch.cat(self.idx)]
            row["weight_mean_clean"] = float(w[~c].mean()) if (~c).any() else float("nan")
            row["weight_mean_corrupted"] = float(w[c].mean()) if c.any() else float("nan")
            row["weight_auc"] = auc(w, ~c)
        if self.num_classes is not None and self.num_classes <= 10:
            for k in range(self.num_classes):
                row[f"weight_mean_class{k}"] = (
                    float(w[y == k].mean()) if (y == k).any() else float("nan")
                )
        self.reset_window()
        return row

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {"zero_sum_batches": int(self.totals["zero_sum_batches"])}
        seen = self.visits > 0
        if self.corrupted is not None and seen.any():
            # each example's mean weight over the real updates it took part in
            mean, c = self.received[seen] / self.visits[seen], self.corrupted[seen]
            out["train_weight_mean_clean"] = float(mean[~c].mean()) if (~c).any() else math.nan
            out["train_weight_mean_corrupted"] = float(mean[c].mean()) if c.any() else math.nan
            out["train_weight_auc"] = auc(mean, ~c)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "totals": dict(self.totals),
            "received": self.received,
            "visits": self.visits,
            "window": {
                "w": list(self.w),
                "idx": list(self.idx),
                "y": list(self.y),
                "losses": list(self.losses),
                "mean_losses": list(self.mean_losses),
                "meta_losses": list(self.meta_losses),
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.totals = dict(state["totals"])
        self.received, self.visits = state["received"].double(), state["visits"].double()
        for key, value in state["window"].items():
            setattr(self, key, list(value))


class Trainer:
    """Train an ordinary ``nn.Module`` with per-example weights from a method.

    Each step: the method turns the training batch (and a clean meta batch, for meta methods)
    into weights w (B,); the real update backpropagates Σᵢ wᵢℓᵢ through the model and steps the
    optimizer; the schedule steps once per update. Evaluation on ``test_data`` every
    ``config.eval_every`` steps and at the end.

    Args:
        model: the network (plain ``nn.Module``; moved to ``config.device``).
        train_data, meta_data, test_data: datasets of ``(x, y)``; ``meta_data`` is the clean
            set (required by ``l2rw`` and ``mwnet``).
        method: a name (``erm``, ``random``, ``class_balanced``, ``l2rw``, ``mwnet``) or a
            ``Method`` instance.
        optimizer: a callable taking the parameters (e.g. ``functools.partial(torch.optim.SGD,
            lr=0.1, momentum=0.9)``); default SGD with lr 0.01 and momentum 0.9.
        scheduler: a callable taking the optimizer, stepped after every update (milestones
            count steps), or None.
        train_labels, corrupted, num_classes: per-example observed labels and corruption mask of
            ``train_data`` (enable class-balanced weights and the clean-vs-corrupted weight
            diagnostics); ``from_bundle`` fills them from a ``reweight.data.DataBundle``.
        loss_fn: called as ``loss_fn(outputs, targets, reduction="none")`` and
            ``loss_fn(outputs, targets)``.
        checkpoint_path: where ``fit`` writes the last state (atomically).
        callbacks: called with each history row as it is made.
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: Dataset,
        meta_data: Dataset | None = None,
        test_data: Dataset | None = None,
        *,
        method: str | Method = "erm",
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        config: TrainerConfig | None = None,
        loss_fn: LossFn = F.cross_entropy,
        train_labels: Tensor | None = None,
        corrupted: Tensor | None = None,
        num_classes: int | None = None,
        checkpoint_path: str | os.PathLike | None = None,
        callbacks: Sequence[Callable[[dict[str, float]], None]] = (),
        process_group: Any = None,
    ) -> None:
        self.config = cfg = config or TrainerConfig()
        self.dist = _dist_context(process_group)
        if self.dist is not None and cfg.batch_size % self.dist.world_size:
            raise ValueError(
                f"trainer.batch_size ({cfg.batch_size}) must be divisible by the number of "
                f"processes ({self.dist.world_size}): each takes an equal shard of every batch"
            )
        self.device = _resolve_device(cfg.device)
        if cfg.bf16 and self.device.type != "cuda":
            raise ValueError(
                f"trainer.bf16=true needs a CUDA device (trainer.device), got {self.device}"
            )
        self.method = build_method(method) if isinstance(method, str) else method
        if self.method.needs_meta and meta_data is None:
            raise ValueError(f"method {self.method.name!r} needs a clean meta set (meta_data)")
        self.model = model.to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.train_data, self.meta_data, self.test_data = train_data, meta_data, test_data
        self.loss_fn = loss_fn
        factory = optimizer or (lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9))
        self.optimizer = factory(self.model.parameters())
        self.scheduler = scheduler(self.optimizer) if scheduler is not None else None
        if train_labels is not None and len(train_labels) != len(train_data):  # type: ignore[arg-type]
            raise ValueError(
                f"train_labels has {len(train_labels)} entries, train_data {len(train_data)}"
            )  # type: ignore[arg-type]
        if corrupted is not None and len(corrupted) != len(train_data):  # type: ignore[arg-type]
            raise ValueError(
                f"corrupted has {len(corrupted)} entries, train_data {len(train_data)}"
            )  # type: ignore[arg-type]
        self.train_labels = train_labels
        # clean-vs-corrupted diagnostics only when something is corrupted (not for pure imbalance)
        has_corrupted = corrupted is not None and bool(corrupted.any())
        self.corrupted = corrupted.bool().cpu() if has_corrupted else None
        if num_classes is None and train_labels is not None:
            num_classes = int(train_labels.max()) + 1
        self.num_classes = num_classes
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
        self.callbacks = list(callbacks)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.best_test_accuracy = float("nan")
        self._stats = _WeightStats(num_classes, self.corrupted, len(train_data))  # type: ignore[arg-type]
        self._setup_done = False
        self._test_eval: tuple[int, dict[str, Any]] | None = None  # (step, result)
        self._elapsed = 0.0

    @classmethod
    def from_bundle(cls, model: nn.Module, bundle: Any, **kwargs: Any) -> Trainer:
        """A Trainer on a ``reweight.data.DataBundle`` (train, meta, test, labels, mask)."""
        return cls(
            model,
            bundle.train,
            bundle.meta,
            bundle.test,
            train_labels=bundle.train_labels,
            corrupted=bundle.corrupted,
            num_classes=bundle.num_classes,
            **kwargs,
        )

    # -- the loop ----------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> FitResult:
        """Train to ``config.max_steps``; with ``resume`` continue from ``checkpoint_path``.

        Returns the history and the final metrics (the same keys as ``summary.json``).
        """
        cfg = self.config
        if resume and self.checkpoint_path is not None and self.checkpoint_path.exists():
            self.load_checkpoint(self.checkpoint_path)
            log.info("resumed from %s at step %d", self.checkpoint_path, self.step)
        elif self.step == 0:
            torch.manual_seed(cfg.seed)
        self._setup()
        pin = self.device.type == "cuda"
        shard = (self.dist.rank, self.dist.world_size) if self.dist else (0, 1)
        train_iter = _BatchStream(
            self.train_data, cfg.batch_size, cfg.seed, 0, True, cfg.num_workers, pin, shard
        ).iterate(self.step)
        meta_iter = None
        if self.method.needs_meta:
            assert self.meta_data is not None
            meta_iter = _BatchStream(
                self.meta_data, cfg.meta_batch_size, cfg.seed, 1, False, cfg.num_workers, pin
            ).iterate(self.step)
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            desc=f"train {self.method.name}",
            disable=not (_show_progress(cfg) and self.is_main),
            dynamic_ncols=True,
        )
        t0 = time.perf_counter() - self._elapsed
        while self.step < cfg.max_steps:
            # 1. a training batch and, for meta methods, a clean batch
            idx, x, y = next(train_iter)
            x, y = self._inputs(x), y.to(self.device, non_blocking=True)
            mx = my = None
            if meta_iter is not None:
                _, mx, my = next(meta_iter)
                mx, my = self._inputs(mx), my.to(self.device)
            # 2. the method's weights (a meta step for l2rw / mwnet)
            self.model.train()
            lr = float(self.optimizer.param_groups[0]["lr"])
            n_local = len(y)
            batch = StepInputs(
                self.model,
                x,
                y,
                mx,
                my,
                lr,
                self.loss_fn,
                self.optimizer,
                self.step,
                dist=self.dist,
                global_batch_size=n_local * self.dist.world_size if self.dist else None,
                offset=n_local * self.dist.rank if self.dist else 0,
            )
            with self._autocast():
                out = self.method.step(batch)
                losses = out.losses
                if losses is None:
                    losses = self.loss_fn(self.model(x), y, reduction="none")  # (B,)
            # 3. the real update on Σ wᵢℓᵢ
            loss = (out.weights.to(losses.dtype) * losses).sum()
            loss_sum = losses.detach().sum()
            if self.dist is not None:  # the global loss, for logging and the NaN check
                loss_value = float(self.dist.all_reduce_sum(loss.detach()))
                loss_sum = self.dist.all_reduce_sum(loss_sum)
            else:
                loss_value = float(loss.detach())  # CPU-GPU sync, once per step
            self._check_finite(loss_value, out)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.dist is not None:  # Σ over ranks = the single-process gradient
                self.dist.sum_gradients(list(self.model.parameters()))
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            self.step += 1
            bar.update(1)
            # 4. bookkeeping: weight statistics, log rows, evaluation, checkpoints
            n_global = batch.n_global
            w = out.weights.detach()
            if self.dist is not None:  # statistics over the global batch, on every rank
                w = self.dist.all_gather_cat(w)
                idx = self.dist.all_gather_cat(idx.to(self.device)).cpu()
                y = self.dist.all_gather_cat(y)
            self._stats.add(w, out, idx, y, loss_value, float(loss_sum) / n_global)
            self._elapsed = time.perf_counter() - t0
            is_eval = (
                cfg.eval_every and self.step % cfg.eval_every == 0
            ) or self.step == cfg.max_steps
            if self.step % cfg.log_every == 0 or is_eval:
                row = {"step": float(self.step), "lr": lr, **self._stats.window_row()}
                if is_eval and self.test_data is not None:
                    row.update(
                        {
                            f"test_{k}": v
                            for k, v in self._evaluate_test().items()
                            if not isinstance(v, list)
                        }
                    )
                    acc = row["test_accuracy"]
                    if math.isnan(self.best_test_accuracy) or acc > self.best_test_accuracy:
                        self.best_test_accuracy = acc
                row["time_s"] = self._elapsed
                self._emit(row)
                bar.set_postfix(loss=f"{row['train_loss']:.4f}", refresh=False)
            if (
                self.checkpoint_path is not None
                and self.is_main
                and (
                    (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0)
                    or self.step == cfg.max_steps
                )
            ):
                self.save_checkpoint(self.checkpoint_path)
        bar.close()
        return FitResult(self.history, self.final_metrics())

    def final_metrics(self) -> dict[str, Any]:
        """Test metrics of the current model plus run statistics (the summary's keys).

        With ``config.final_weights``, also the weight diagnostics of ``example_weights()``:
        mean relative weight of clean and corrupted examples, the AUC with which the weights
        separate them, and the mean weight per class (for up to 10 classes).
        """
        metrics: dict[str, Any] = {"method": self.method.name, "steps": self.step}
        if self.test_data is not None:
            ev = self._evaluate_test()
            best = self.best_test_accuracy
            metrics.update(
                {
                    "test_accuracy": ev["accuracy"],
                    "test_error": 1 - ev["accuracy"],
                    "test_balanced_accuracy": ev["balanced_accuracy"],
                    "test_balanced_error": 1 - ev["balanced_accuracy"],
                    "test_loss": ev["loss"],
                    "best_test_accuracy": ev["accuracy"]
                    if math.isnan(best)
                    else max(best, ev["accuracy"]),
                    "per_class_accuracy": ev["per_class_accuracy"],
                }
            )
        metrics.update(self._stats.summary())
        metrics.update(self.method.describe())  # e.g. meta_engine: which engine ran, and why
        if self.config.final_weights:
            self.final_example_weights = w = self.example_weights(self.config.final_weights)
            metrics.update(
                weight_diagnostics(w, self.corrupted, self.train_labels, self.num_classes)
            )
        metrics["wall_time_s"] = self._elapsed
        return metrics

    def example_weights(self, passes: int = 1) -> Tensor:
        """The relative weight (B·wᵢ; 1 is uniform) of every training example, now.

        Each pass visits the training set once in seeded random batches of ``batch_size``,
        each with a clean meta batch, through ``method.weigh``; the result is the mean over
        ``passes`` (different batch compositions average out the batch-to-batch noise of L2RW's
        clamped weights). Nothing is updated: not the model, its BatchNorm statistics or the
        method's state. Returns a (N,) tensor in dataset order.
        """
        cfg = self.config
        self._setup()
        n = len(self.train_data)  # type: ignore[arg-type]
        weights = torch.zeros(n)
        lr = float(self.optimizer.param_groups[0]["lr"])
        was_training = self.model.training
        self.model.train()
        try:
            for p in range(passes):
                gen = torch.Generator().manual_seed(cfg.seed + 12_345 + p)
                order = torch.randperm(n, generator=gen).tolist()
                batches = [order[i : i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
                loader = DataLoader(
                    self.train_data,
                    batch_sampler=batches,
                    num_workers=cfg.num_workers,
                    generator=gen,
                )
                meta_iter = None
                if self.method.needs_meta:
                    assert self.meta_data is not None
                    meta_iter = _BatchStream(
                        self.meta_data,
                        cfg.meta_batch_size,
                        cfg.seed,
                        2 + p,
                        False,
                        cfg.num_workers,
                        False,
                    ).iterate(0)
                for idx, (x, y) in zip(batches, loader, strict=True):
                    mx = my = None
                    if meta_iter is not None:
                        _, mx, my = next(meta_iter)
                        mx, my = self._inputs(mx), my.to(self.device)
                    batch = StepInputs(
                        self.model,
                        self._inputs(x),
                        torch.as_tensor(y).to(self.device),
                        mx,
                        my,
                        lr,
                        self.loss_fn,
                        self.optimizer,
                        self.step,
                    )
                    with self._autocast():
                        w = self.method.weigh(batch)
                    weights[idx] += w.detach().float().cpu() * len(idx) / passes
        finally:
            self.model.train(was_training)
        return weights

    def _evaluate_test(self) -> dict[str, Any]:
        """``evaluate(test_data)``, once per step (the last step's is reused by the summary)."""
        assert self.test_data is not None
        if self._test_eval is None or self._test_eval[0] != self.step:
            self._test_eval = (self.step, self.evaluate(self.test_data))
        return self._test_eval[1]

    @torch.no_grad()
    def evaluate(self, data: Dataset) -> dict[str, Any]:
        """Accuracy, balanced (mean per-class) accuracy, per-class accuracy and mean loss."""
        was_training = self.model.training
        self.model.eval()
        preds, targets, loss_sum = [], [], 0.0
        loader = DataLoader(
            data,
            batch_size=self.config.eval_batch_size,
            num_workers=self.config.num_workers,
            generator=torch.Generator().manual_seed(0),
        )  # keep global RNG intact
        for x, y in tqdm(loader, desc="eval", leave=False, disable=not _show_progress(self.config)):
            x, y = self._inputs(x), torch.as_tensor(y).to(self.device)
            with self._autocast():
                out = self.model(x)
            loss_sum += float(self.loss_fn(out.float(), y, reduction="sum"))
            preds.append(out.argmax(1).cpu())
            targets.append(y.cpu())
        self.model.train(was_training)
        pred, target = torch.cat(preds), torch.cat(targets)
        k = self.num_classes or int(max(pred.max(), target.max())) + 1
        per_class = per_class_accuracy(pred == target, target, k)
        present = [a for a in per_class if not math.isnan(a)]
        return {
            "accuracy": float((pred == target).double().mean()),
            "balanced_accuracy": sum(present) / len(present),
            "loss": loss_sum / len(target),
            "per_class_accuracy": per_class,
        }

    # -- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly; loadable with ``weights_only=True``."""
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "method": {"name": self.method.name, "state": self.method.state_dict()},
            "rng": {
                "cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
            "history": self.history,
            "best_test_accuracy": self.best_test_accuracy,
            "stats": self._stats.state_dict(),
            "elapsed": self._elapsed,
            "config": asdict(self.config),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["method"]["name"] != self.method.name:
            raise ValueError(
                f"checkpoint was written by method {state['method']['name']!r}, "
                f"this run uses {self.method.name!r}"
            )
        self._setup()
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.method.load_state_dict(state["method"]["state"])
        torch.set_rng_state(state["rng"]["cpu"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step = int(state["step"])
        self.history = list(state["history"])
        self.best_test_accuracy = float(state["best_test_accuracy"])
        self._stats.load_state_dict(state["stats"])
        self._elapsed = float(state["elapsed"])

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Write ``state_dict()`` atomically (``reweight.fileio.atomic_write``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        atomic_write(path, lambda f: torch.save(state, f))

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        self.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))

    # -- helpers -----------------------------------------------------------------------------

    def _setup(self) -> None:
        if not self._setup_done:
            self.method.setup(
                model=self.model,
                train_labels=self.train_labels,
                num_classes=self.num_classes,
                device=self.device,
            )
            self._setup_done = True

    def _inputs(self, x: Tensor) -> Tensor:
        """A batch of inputs on the device, NHWC when ``channels_last`` and the batch is 4-D."""
        x = x.to(self.device, non_blocking=True)
        if self.config.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.config.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _check_finite(self, loss: float, out: MethodOutput) -> None:
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"training loss is {loss} at step {self.step + 1} (method {self.method.name}); "
                "lower the learning rate, set trainer.grad_clip, or check the data for NaN/Inf"
            )
        if out.meta_loss is not None and not math.isfinite(out.meta_loss):
            raise FloatingPointError(
                f"meta loss is {out.meta_loss} at step {self.step + 1} (method {self.method.name})"
            )

    @property
    def is_main(self) -> bool:
        """True in one process, and on rank 0 in data-parallel training (the one that writes)."""
        return self.dist is None or self.dist.is_main

    def _emit(self, row: dict[str, float]) -> None:
        self.history.append(row)
        if not self.is_main:
            return
        log.info(
            "step %d: %s",
            int(row["step"]),
            ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "step" and not math.isnan(v)),
        )
        for callback in self.callbacks:
            callback(row)


def weight_diagnostics(
    weights: Tensor, corrupted: Tensor | None, labels: Tensor | None, num_classes: int | None
) -> dict[str, Any]:
    """Mean weight of clean and corrupted examples, their AUC, and mean weight per class."""
    out: dict[str, Any] = {"weight_mean": float(weights.mean())}
    if corrupted is not None:
        c = corrupted.bool()
        out["weight_mean_clean"] = float(weights[~c].mean()) if (~c).any() else float("nan")
        out["weight_mean_corrupted"] = float(weights[c].mean()) if c.any() else float("nan")
        out["weight_auc"] = auc(weights, ~c)
    if labels is not None and num_classes is not None and num_classes <= 10:
        out["weight_mean_per_class"] = [
            float(weights[labels == k].mean()) if (labels == k).any() else float("nan")
            for k in range(num_classes)
        ]
    return out


def _dist_context(process_group: Any) -> DistContext | None:
    """Data-parallel when given a process group, or when torch.distributed runs with W > 1."""
    import torch.distributed as dist

    if process_group is None and not (dist.is_available() and dist.is_initialized()):
        return None
    ctx = DistContext.from_group(process_group)
    return ctx if ctx.world_size > 1 else None


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"trainer.device={device!r} but CUDA is not available; use 'cpu' or 'auto'"
        )
    return dev


def _show_progress(cfg: TrainerConfig) -> bool:
    return cfg.progress if cfg.progress is not None else sys.stderr.isatty()
