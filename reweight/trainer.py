"""The training loop: batches, the method's weights, the real weighted update, evaluation.

Why one file of ~600 lines: the loop reads top to bottom (``fit`` → ``train_step`` →
bookkeeping) in one place; what it calls lives in its own module (batches, weight_stats,
metrics, checkpoint, signals, loggers).

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
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from reweight.batches import BatchStream, shuffled_pass
from reweight.checkpoint import read_checkpoint, restore_rng_state, rng_state, write_checkpoint
from reweight.data.core import save_labels
from reweight.device import channels_last_choice, resolve_device
from reweight.distributed import DistContext, check_batch_split
from reweight.functional import LossFn
from reweight.inputs import Inputs, to_device
from reweight.loggers import Logger, LoggerGroup
from reweight.meta_source import SmallLossMetaSource, drop_rows
from reweight.methods import Method, MethodOutput, StepInputs, build_method
from reweight.metrics import best_accuracy_of, evaluate_classifier, summarize_test
from reweight.outputs.files import CHECKPOINT, METRICS
from reweight.outputs.records import MetricsCSV
from reweight.progress import Heartbeat, phase
from reweight.run_files import write_run_files
from reweight.signals import StopOnSignal, TrainingInterrupted
from reweight.trainer_config import TrainerConfig
from reweight.weight_stats import WeightStats, example_labels, weight_diagnostics

__all__ = ["FitResult", "StepResult", "Trainer", "TrainerConfig"]

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[Any], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


@dataclass
class FitResult:
    history: list[dict[str, float]]  # one row per log step (and per evaluation)
    metrics: dict[str, Any]  # final metrics: test accuracy, per-class accuracy, weight stats


@dataclass
class StepResult:
    """What one real update did (``Trainer.train_step``)."""

    method: MethodOutput  # this process's weights (B,), the meta loss, the zero-sum flag
    loss: float  # Σ wᵢℓᵢ over the global batch: what the update minimised
    mean_loss: float  # the unweighted mean loss of the global batch
    lr: float  # the learning rate the update used


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
        checkpoint_path: where ``fit`` writes the last state (atomically), and its state when
            interrupted (see ``fit``).
        run_dir: a folder for the run's files, as the command line writes them: ``metrics.csv``
            (row by row), ``checkpoint.pt`` (unless ``checkpoint_path`` says otherwise), and
            after training ``summary.json``, ``weights.pt``, ``suspects.csv`` and the plots
            (``reweight.run_files``); ``from_bundle`` adds ``labels.pt`` and ``dataset.json``
            and the dataset's class names and example ids.
        callbacks: called with each history row as it is made.
        val_data: a clean validation set, disjoint from the others, evaluated with the test
            set: ``val_*`` keys in rows and final metrics (what a sweep should optimise).
        loggers: experiment trackers (``reweight.loggers.Logger``): ``log_config(run_config)``
            once after the first step, then each row and the weight histogram; closed when
            ``fit`` returns or raises.
        run_config: what the loggers record as the run's config (default: the TrainerConfig
            and the method's name).
        meta_source: where meta batches come from instead of ``meta_data`` (e.g.
            ``reweight.meta_source.SmallLossMetaSource``: the training set's small-loss
            examples, no clean set); its examples are left out of training batches while they
            serve. ``from_bundle`` builds it from ``dataset.meta_source``.
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
        val_data: Dataset | None = None,
        loggers: Sequence[Logger] = (),
        run_config: dict[str, Any] | None = None,
        run_dir: str | os.PathLike | None = None,
        meta_source: SmallLossMetaSource | None = None,
    ) -> None:
        self.config = cfg = config or TrainerConfig()
        self.dist = DistContext.for_training(process_group)
        if self.dist is not None:
            check_batch_split(cfg.batch_size, self.dist.world_size)
        self.device = resolve_device(cfg.device)
        if cfg.bf16 and self.device.type != "cuda":
            raise ValueError(
                f"trainer.bf16=true needs a CUDA device (trainer.device), got {self.device}"
            )
        self.method = build_method(method) if isinstance(method, str) else method
        self.meta_source = meta_source
        if meta_source is not None and self.dist is not None:
            raise ValueError(
                "dataset.meta_source=small_loss does not run data-parallel yet (each rank would "
                "drop a different number of serving examples from its shard); use one process"
            )
        if self.method.needs_meta and meta_data is None and meta_source is None:
            raise ValueError(f"method {self.method.name!r} needs a clean meta set (meta_data)")
        self.model = model.to(self.device)
        self.channels_last, why = channels_last_choice(cfg.channels_last, model, self.device)
        log.info("memory format: %s (%s)", "NHWC" if self.channels_last else "NCHW", why)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.train_data, self.meta_data, self.test_data = train_data, meta_data, test_data
        self.loss_fn = loss_fn
        factory = optimizer or (lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9))
        self.optimizer = factory(self.model.parameters())
        self.scheduler = scheduler(self.optimizer) if scheduler is not None else None
        n_train = len(train_data)  # type: ignore[arg-type]
        self.train_labels, self.corrupted, self.num_classes = example_labels(
            n_train, train_labels, corrupted, num_classes
        )
        self.run_dir = Path(run_dir) if run_dir is not None else None
        if checkpoint_path is None and self.run_dir is not None:
            checkpoint_path = self.run_dir / CHECKPOINT
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
        self.callbacks = list(callbacks)
        if self.run_dir is not None:
            self.callbacks.append(MetricsCSV(self.run_dir / METRICS, history=lambda: self.history))
        self.bundle: Any = None  # the DataBundle of from_bundle: class names, ids, labels.pt
        self.val_data = val_data
        run_config = run_config or {"trainer": asdict(cfg)}
        self._trackers = LoggerGroup(loggers, {"method": self.method.name, **run_config})
        self._last_weights: Tensor | None = None
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.best_test_accuracy = float("nan")
        self._stats = WeightStats(self.num_classes, self.corrupted, n_train)
        self._setup_done = False
        self._test_eval: tuple[int, dict[str, Any]] | None = None  # (step, result)
        self._elapsed = 0.0

    @classmethod
    def from_bundle(cls, model: nn.Module, bundle: Any, **kwargs: Any) -> Trainer:
        """A Trainer on a ``reweight.data.DataBundle`` (train, meta, validation, test, labels,
        mask)."""
        kwargs.setdefault("val_data", bundle.val)
        source = bundle.info.get("meta_source", {"name": "clean"})
        if source["name"] == "small_loss" and "meta_source" not in kwargs:
            # the training set's small-loss examples; bundle.meta is empty then (build_dataset)
            kwargs["meta_source"] = SmallLossMetaSource(
                bundle.train_labels,
                bundle.num_classes,
                per_class=source["per_class"],
                warmup=source["warmup"],
                refresh=source["refresh"],
                seed=kwargs["config"].seed if kwargs.get("config") else 0,
                corrupted=bundle.corrupted,
            )
        trainer = cls(
            model,
            bundle.train,
            bundle.meta,
            bundle.test,
            train_labels=bundle.train_labels,
            corrupted=bundle.corrupted,
            num_classes=bundle.num_classes,
            **kwargs,
        )
        trainer.bundle = bundle
        return trainer

    # -- the loop ----------------------------------------------------------------------------

    def fit(self, resume: bool = False, on_start: Callable[[], None] | None = None) -> FitResult:
        """Train to ``config.max_steps``; with ``resume`` continue from ``checkpoint_path``.

        ``on_start`` is called once, right after the first optimizer step of this call and
        before that step is logged or checkpointed: a caller that writes nothing until training
        has really started (the CLI's run directory) writes its files there.

        Returns the history and the final metrics (the same keys as ``summary.json``).

        Interrupts (``reweight.signals``): the first SIGINT (Ctrl-C) or SIGTERM (what SLURM
        sends before it kills a job) lets the current step finish, writes the checkpoint (when
        there is a ``checkpoint_path``) and raises ``TrainingInterrupted``, after which
        ``fit(resume=True)`` continues bit for bit; a second signal aborts at once. In
        data-parallel training every process stops after the same step.
        """
        if self.run_dir is not None and self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        status = "FAILED"  # what the trackers record: FINISHED, KILLED (a signal) or FAILED
        try:
            with StopOnSignal(self.checkpoint_path) as stop:
                result = self._fit(resume, stop, on_start)
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            if self.is_main:
                self._trackers.close(status)
        if self.run_dir is not None and self.is_main:
            self._write_run_files(result)
        return result

    def _write_run_files(self, result: FitResult) -> None:
        """``reweight.run_files.write_run_files`` into ``run_dir``, with the bundle's records."""
        bundle, extra = self.bundle, {"run_dir": str(self.run_dir.resolve())}
        if bundle is not None:
            save_labels(bundle, self.run_dir)
            extra["dataset_info"] = bundle.info
        write_run_files(
            self.run_dir,
            self,
            result.metrics,
            dataset=bundle.name if bundle is not None else "data",
            class_names=bundle.class_names if bundle is not None else None,
            ids=bundle.train_ids if bundle is not None else None,
            labels_known=bundle is not None and bundle.info.get("true_labels_known", True),
            extra=extra,
        )

    def _fit(
        self, resume: bool, stop: StopOnSignal, on_start: Callable[[], None] | None
    ) -> FitResult:
        cfg = self.config
        if resume and self.checkpoint_path is not None and self.checkpoint_path.exists():
            self.load_checkpoint(self.checkpoint_path)
            log.info("resumed from %s at step %d", self.checkpoint_path, self.step)
        elif self.step == 0:
            torch.manual_seed(cfg.seed)
        if self.step > 0:  # the trackers get the rows from before, each skipping those it has
            self._trackers.backlog = list(self.history)
        self._setup()
        pin = self.device.type == "cuda"
        shard = (self.dist.rank, self.dist.world_size) if self.dist else (0, 1)
        train_iter = BatchStream(
            self.train_data, cfg.batch_size, cfg.seed, 0, True, cfg.num_workers, pin, shard
        ).iterate(self.step)
        meta_iter = self._meta_batches(stream=1, position=self.step, pin=pin)
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            desc=f"train {self.method.name}",
            disable=not (cfg.show_progress and self.is_main),
            dynamic_ncols=True,
        )
        # without a bar (no terminal), a line with the step and the ETA, first after 3 s
        beat = Heartbeat(log, cfg.max_steps) if bar.disable and self.is_main else None
        t0 = time.perf_counter() - self._elapsed
        while self.step < cfg.max_steps:
            # 1. a training batch and, for meta methods, a clean batch
            idx, x, y = next(train_iter)
            mx = my = None
            if meta_iter is not None:
                _, mx, my = next(meta_iter)
                if self.meta_source is not None:  # examples serving as meta do not train
                    idx, x, y = drop_rows(idx, x, y, self.meta_source.serving())
            # 2-3. the method's weights, the real update on Σ wᵢℓᵢ
            result = self.train_step(x, y, mx, my)
            bar.update(1)
            if beat is not None:
                beat.tick(self.step)
            if on_start is not None:  # the first step of this call is done
                on_start()
                on_start = None
            # 4. bookkeeping: weight statistics, log rows, evaluation
            w = result.method.weights.detach()
            if self.dist is not None:  # statistics over the global batch, on every rank
                w = self.dist.all_gather_cat(w)
                idx = self.dist.all_gather_cat(idx.to(self.device)).cpu()
                y = self.dist.all_gather_cat(y.to(self.device))
            self._stats.add(w, result.method, idx, y, result.loss, result.mean_loss)
            self._last_weights = w * w.numel()  # relative weights B·wᵢ, for the histogram
            self._elapsed = time.perf_counter() - t0
            is_eval = (
                cfg.eval_every and self.step % cfg.eval_every == 0
            ) or self.step == cfg.max_steps
            if self.step % cfg.log_every == 0 or is_eval:
                row = self._log_row(result.lr, evaluate=bool(is_eval))
                bar.set_postfix(loss=f"{row['train_loss']:.4f}", refresh=False)
            # 5. the checkpoint, when due or when a signal asks to stop (SIGINT/SIGTERM to any
            #    rank: its number, max-reduced over ranks, one int per step)
            signum = (
                stop.signum if self.dist is None else self.dist.max_int(stop.signum, self.device)
            )
            due = cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
            if self.checkpoint_path and (due or self.step == cfg.max_steps or signum):
                self._check_finite_parameters()  # every rank: a checkpoint is always finite
                if self.is_main:
                    self.save_checkpoint(self.checkpoint_path)
            if signum:
                self._stop(signum, bar)
        bar.close()
        stop.steps_done = self.step  # the last checkpoint is written: a signal now stops at once
        if stop.signum:  # one that came after the last step's check
            raise TrainingInterrupted(self.step, stop.signum, self.checkpoint_path)
        return FitResult(self.history, self.final_metrics())

    def _log_row(self, lr: float, evaluate: bool) -> dict[str, float]:
        """The history row of this step: the weight window, and test metrics when due."""
        row = {"step": float(self.step), "lr": lr, **self._stats.window_row()}
        if evaluate:
            row.update(self._val_metrics())
        if evaluate and self.test_data is not None:
            ev = self._evaluate_test()
            row.update({f"test_{k}": v for k, v in ev.items() if not isinstance(v, list)})
            self.best_test_accuracy = best_accuracy_of(self.best_test_accuracy, ev["accuracy"])
        row["time_s"] = self._elapsed
        self._emit(row)
        return row

    def train_step(
        self,
        x: Tensor,
        y: Tensor,
        meta_x: Tensor | None = None,
        meta_y: Tensor | None = None,
    ) -> StepResult:
        """One real update; ``fit`` calls it once per step, and so may benchmarks and research
        code with batches of their own.

        The method turns the batch (and the clean batch ``meta_x, meta_y``, which meta methods
        need) into weights w (B,); the real update backpropagates Σᵢ wᵢℓᵢ, steps the optimizer
        and then the schedule; ``step`` counts it. Batches may be on any device. In
        data-parallel training ``x, y`` are this process's shard of the global batch.
        Raises ``FloatingPointError`` (naming the step) if the loss is NaN or infinite.
        """
        cfg = self.config
        self._setup()
        x, y = self._inputs(x), y.to(self.device, non_blocking=True)
        if meta_x is not None and meta_y is not None:
            meta_x, meta_y = self._inputs(meta_x), meta_y.to(self.device)
        # 2. the method's weights (a meta step for l2rw / mwnet)
        self.model.train()
        batch = self._step_inputs(x, y, meta_x, meta_y)
        lr = batch.lr
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
        return StepResult(out, loss_value, float(loss_sum) / batch.n_global, lr)

    def _stop(self, signum: int, bar: Any) -> None:
        """Raise ``TrainingInterrupted`` after the checkpoint of this step is on disk."""
        bar.close()
        if self.dist is not None:
            # No rank exits before rank 0 has written: torchrun answers the first rank to exit
            # by sending SIGTERM to the others.
            self.dist.barrier()
        checkpoint = self.checkpoint_path
        if self.is_main:
            where = f"; checkpoint {checkpoint}" if checkpoint is not None else ""
            log.info("%s: stopped after step %d%s", signal.Signals(signum).name, self.step, where)
        raise TrainingInterrupted(self.step, signum, checkpoint)

    def final_metrics(self) -> dict[str, Any]:
        """Test metrics of the current model plus run statistics (the summary's keys).

        With ``config.final_weights``, also the weight diagnostics of ``example_weights()``:
        mean relative weight of clean and corrupted examples, the AUC with which the weights
        separate them, and the mean weight per class (for up to 10 classes).
        """
        metrics: dict[str, Any] = {"method": self.method.name, "steps": self.step}
        sets = [name for name, d in (("val", self.val_data), ("test", self.test_data)) if d]
        with phase(log, "final evaluation", " and ".join(sets) or "nothing to evaluate"):
            metrics.update(self._val_metrics())
            if self.test_data is not None:
                metrics.update(summarize_test(self._evaluate_test(), self.best_test_accuracy))
        metrics.update(self._stats.summary())
        metrics.update(self.method.describe())  # e.g. meta_engine: which engine ran, and why
        if self.meta_source is not None:  # the trusted set found in the noisy data
            metrics.update(self.meta_source.describe())
        if self.config.final_weights:
            passes = self.config.final_weights
            n = len(self.train_data)  # type: ignore[arg-type]
            with phase(log, "final weights", f"{n} examples, {passes} pass(es)"):
                self.final_example_weights = w = self.example_weights(passes)
            metrics.update(
                weight_diagnostics(w, self.corrupted, self.train_labels, self.num_classes)
            )
        metrics["wall_time_s"] = self._elapsed
        return metrics

    def mean_example_weights(self) -> Tensor:
        """(N,) each training example's mean relative weight over training; NaN if never drawn."""
        return self._stats.mean_weights()

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
        was_training = self.model.training
        self.model.train()
        try:
            for p in range(passes):
                meta_iter = self._meta_batches(stream=2 + p, position=0)
                seed = cfg.seed + 12_345 + p
                scored = shuffled_pass(self.train_data, cfg.batch_size, seed, cfg.num_workers)
                bar = tqdm(
                    scored,
                    total=-(-n // cfg.batch_size),
                    desc=f"final weights, pass {p + 1}/{passes}",
                    leave=False,
                    disable=not (cfg.show_progress and self.is_main),
                    dynamic_ncols=True,
                )
                for idx, x, y in bar:
                    mx = my = None
                    if meta_iter is not None:
                        _, mx, my = next(meta_iter)
                        mx, my = self._inputs(mx), my.to(self.device)
                    batch = self._step_inputs(
                        self._inputs(x), y.to(self.device), mx, my, local=True
                    )
                    with self._autocast():
                        w = self.method.weigh(batch)
                    weights[idx] += w.detach().float().cpu() * len(idx) / passes
        finally:
            self.model.train(was_training)
        return weights

    def _val_metrics(self) -> dict[str, float]:
        """``val_*`` scalars of the validation set ({} without one)."""
        if self.val_data is None:
            return {}
        ev = self.evaluate(self.val_data)
        return {f"val_{k}": v for k, v in ev.items() if not isinstance(v, list)}

    def _evaluate_test(self) -> dict[str, Any]:
        """``evaluate(test_data)``, once per step (the last step's is reused by the summary)."""
        assert self.test_data is not None
        if self._test_eval is None or self._test_eval[0] != self.step:
            self._test_eval = (self.step, self.evaluate(self.test_data))
        return self._test_eval[1]

    def evaluate(self, data: Dataset) -> dict[str, Any]:
        """Accuracy, balanced (mean per-class) accuracy, per-class accuracy and mean loss."""
        loader = DataLoader(
            data,
            batch_size=self.config.eval_batch_size,
            num_workers=self.config.num_workers,
            generator=torch.Generator().manual_seed(0),  # keep the global RNG intact
        )
        return evaluate_classifier(
            self.model,
            loader,
            self.loss_fn,
            prepare=lambda x, y: (self._inputs(x), torch.as_tensor(y).to(self.device)),
            autocast=self._autocast,
            num_classes=self.num_classes,
            progress=self.config.show_progress,
        )

    # -- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly; loadable with ``weights_only=True``."""
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "method": {"name": self.method.name, "state": self.method.state_dict()},
            "rng": rng_state(),
            "history": self.history,
            "best_test_accuracy": self.best_test_accuracy,
            "stats": self._stats.state_dict(),
            "elapsed": self._elapsed,
            "config": asdict(self.config),
            **(
                {"meta_source": self.meta_source.state_dict()}
                if self.meta_source is not None
                else {}
            ),
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
        restore_rng_state(state["rng"])
        self.step = int(state["step"])
        self.history = list(state["history"])
        self.best_test_accuracy = float(state["best_test_accuracy"])
        self._stats.load_state_dict(state["stats"])
        self._elapsed = float(state["elapsed"])
        if self.meta_source is not None:
            self.meta_source.load_state_dict(state["meta_source"])

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Write ``state_dict()`` atomically (``reweight.checkpoint.write_checkpoint``)."""
        write_checkpoint(path, self.state_dict())

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Resume from the file ``save_checkpoint`` wrote; ``CheckpointError`` if it cannot be
        read (see ``read_checkpoint``)."""
        self.load_state_dict(read_checkpoint(path, map_location=self.device))

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

    def _meta_batches(self, stream: int, position: int, pin: bool = False) -> Any:
        """Clean batches from the meta set for meta methods (None for the others), or the
        meta source's batches."""
        if not self.method.needs_meta:
            return None
        if self.meta_source is not None:
            return self.meta_source.batches(self, stream, position)
        assert self.meta_data is not None
        cfg = self.config
        batches = BatchStream(
            self.meta_data, cfg.meta_batch_size, cfg.seed, stream, False, cfg.num_workers, pin
        )
        return batches.iterate(position)

    def _step_inputs(
        self, x: Tensor, y: Tensor, mx: Tensor | None, my: Tensor | None, local: bool = False
    ) -> StepInputs:
        """What the method sees of a batch; ``local``: this process's batch, not a shard."""
        lr = float(self.optimizer.param_groups[0]["lr"])
        dist = None if local else self.dist
        n = len(y)
        return StepInputs(
            self.model,
            x,
            y,
            mx,
            my,
            lr,
            self.loss_fn,
            self.optimizer,
            self.step,
            dist=dist,
            global_batch_size=n * dist.world_size if dist else None,
            offset=n * dist.rank if dist else 0,
        )

    def _inputs(self, x: Inputs) -> Inputs:
        """A batch of inputs on the device, NHWC when ``channels_last`` and the batch is 4-D."""
        x = to_device(x, self.device, non_blocking=True)
        if self.channels_last and isinstance(x, Tensor) and x.dim() == 4:
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
            where = f"at step {self.step + 1} (method {self.method.name})"
            raise FloatingPointError(f"meta loss is {out.meta_loss} {where}")

    def _check_finite_parameters(self) -> None:
        """A finite loss can still step the parameters to inf: never checkpoint those."""
        if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            raise FloatingPointError(
                f"the parameters are not finite after step {self.step} (method "
                f"{self.method.name}); lower the learning rate or set trainer.grad_clip"
            )

    @property
    def loggers(self) -> list[Logger]:
        """The experiment trackers (settable: the CLI adds them once the run dir is known)."""
        return self._trackers.loggers

    @loggers.setter
    def loggers(self, loggers: Sequence[Logger]) -> None:
        self._trackers.loggers = list(loggers)

    @property
    def run_config(self) -> dict[str, Any]:
        """What the trackers record as the run's config (settable, like ``loggers``)."""
        return self._trackers.config

    @run_config.setter
    def run_config(self, config: dict[str, Any]) -> None:
        self._trackers.config = {"method": self.method.name, **config}

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
        self._trackers.log(int(row["step"]), row, self._last_weights)
