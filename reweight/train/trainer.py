"""The training loop: batches, the method's weights, the real weighted update, bookkeeping.

It reads top to bottom (``fit`` → ``train_step`` → bookkeeping); what it calls lives in its
own module: the batch streams (``batches``), evaluation (``metrics.Evaluation``), weight
statistics and the final scoring (``weight_stats``), the rows and their readers
(``history``), checkpoints, signals, and the run's files (``run_files``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from reweight.core.device import Placement
from reweight.core.distributed import DistContext, check_batch_split
from reweight.core.files import CHECKPOINT, METRICS
from reweight.core.progress import Heartbeat, phase
from reweight.functional import LossFn
from reweight.methods import Method, StepInputs, build_method
from reweight.outputs.records import MetricsCSV
from reweight.train.batches import BatchStream
from reweight.train.checkpoint import (
    load_trainer_state,
    read_checkpoint,
    trainer_state,
    write_checkpoint,
)
from reweight.train.config import TrainerConfig
from reweight.train.guards import check_finite_loss, check_finite_parameters
from reweight.train.history import FitResult, History, StepResult
from reweight.train.loggers import Logger
from reweight.train.meta_source import SmallLossMetaSource, drop_rows, meta_source_for
from reweight.train.metrics import Evaluation
from reweight.train.run_files import write_trainer_files
from reweight.train.signals import StopOnSignal, TrainingInterrupted
from reweight.train.update import weighted_update
from reweight.train.weight_stats import (
    WeightStats,
    example_labels,
    score_example_weights,
    weight_diagnostics,
)

__all__ = ["FitResult", "StepResult", "Trainer", "TrainerConfig"]

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[Any], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


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
        method: a name in ``reweight.methods.METHODS`` or a ``Method`` instance.
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
        run_dir: a folder for the run's files, as the command line writes them
            (``reweight.train.run_files``; ``from_bundle`` adds the dataset's records).
        callbacks: called with each history row as it is made.
        val_data: a clean validation set, disjoint from the others, evaluated with the test
            set: ``val_*`` keys in rows and final metrics (what a sweep should optimise).
        loggers: experiment trackers (``reweight.train.loggers.Logger``): ``log_config(run_config)``
            once after the first step, then each row and the weight histogram; closed by ``fit``.
        run_config: what the loggers record as the run's config (default: the TrainerConfig
            and the method's name).
        meta_source: where meta batches come from instead of ``meta_data`` (e.g.
            ``reweight.train.meta_source.SmallLossMetaSource``: the training set's small-loss
            examples, no clean set); its examples are left out of training batches while they
            serve. ``from_bundle`` builds it from ``dataset.meta_source``.
        extra_tests: more test sets by name, evaluated wherever ``test_data`` is, as
            ``test_<name>_*`` keys (e.g. mini-WebVision's ``imagenet``; see ``from_bundle``).
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
        extra_tests: Mapping[str, Dataset] | None = None,
    ) -> None:
        self.config = cfg = config or TrainerConfig()
        self.dist = DistContext.for_training(process_group)
        if self.dist is not None:
            check_batch_split(cfg.batch_size, self.dist.world_size)
        self.placement, self.model = Placement.of(model, cfg.device, cfg.channels_last, cfg.bf16)
        self.device = self.placement.device
        self.method = build_method(method) if isinstance(method, str) else method
        self.meta_source = meta_source
        if meta_source is not None:
            meta_source.check_single_process(self.dist)
        if self.method.needs_meta and meta_data is None and meta_source is None:
            raise ValueError(f"method {self.method.name!r} needs a clean meta set (meta_data)")
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
        if self.run_dir is not None:  # the checkpoint and metrics.csv in it, by default
            checkpoint_path = checkpoint_path or self.run_dir / CHECKPOINT
            csv = MetricsCSV(self.run_dir / METRICS, history=lambda: self.history)
            callbacks = [*callbacks, csv]
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
        self.val_data, self.bundle = val_data, None  # bundle: from_bundle's DataBundle
        evaluated = (self.num_classes, cfg, val_data, test_data, extra_tests)
        self.evaluation = Evaluation(self.model, loss_fn, self.placement, *evaluated)
        run_config = {"method": self.method.name, **(run_config or {"trainer": asdict(cfg)})}
        self.records = History(callbacks, loggers, run_config, self.is_main)
        self._stats = WeightStats(self.num_classes, self.corrupted, n_train)
        self._last_weights: Tensor | None = None
        self.step, self._elapsed, self._setup_done = 0, 0.0, False

    @classmethod
    def from_bundle(cls, model: nn.Module, bundle: Any, **kwargs: Any) -> Trainer:
        """A Trainer on a ``reweight.data.DataBundle`` (train, meta, validation, test, labels,
        mask)."""
        kwargs.setdefault("val_data", bundle.val)
        kwargs.setdefault("extra_tests", bundle.extra_tests)
        if "meta_source" not in kwargs:  # the small-loss set: bundle.meta is empty then
            config = kwargs.get("config")
            kwargs["meta_source"] = meta_source_for(bundle, config.seed if config else 0)
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

    def fit(
        self,
        resume: bool = False,
        on_start: Callable[[], None] | None = None,
        on_end: Callable[[FitResult], None] | None = None,
    ) -> FitResult:
        """Train to ``config.max_steps``; with ``resume`` continue from ``checkpoint_path``.

        ``on_start()`` runs once, right after this call's first optimizer step, before that step
        is logged or checkpointed (the CLI writes its run directory there). ``on_end(result)``
        runs once training is over and ``run_dir``'s files are written, before the trackers
        close: they record FINISHED only if it returns (FAILED if it raises, KILLED on a
        signal), so a caller's own files (the CLI's report, ``summary.json``) belong there.

        Returns the history and the final metrics (the same keys as ``summary.json``).

        Interrupts (``reweight.train.signals``): the first SIGINT (Ctrl-C) or SIGTERM (what SLURM
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
            # the run's files before the trackers' status: a run is FINISHED once they are
            if self.run_dir is not None and self.is_main:
                write_trainer_files(self, result)
            if on_end is not None:
                on_end(result)
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            self.records.close(status)
        return result

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
            self.records.resumed()
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
            _, mx, my = next(meta_iter) if meta_iter is not None else (None, None, None)
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
            self._elapsed = time.perf_counter() - t0
            loss = self._bookkeeping(result, idx, y)
            if loss is not None:
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            # 5. the checkpoint, when due or when a signal asks to stop
            signum = self._checkpoint(stop.signum)
            if signum:
                bar.close()
                stop.stop(self.step, signum, self.dist, self.is_main)
        bar.close()
        stop.steps_done = self.step  # the last checkpoint is written: a signal now stops at once
        if stop.signum:  # one that came after the last step's check
            raise TrainingInterrupted(self.step, stop.signum, self.checkpoint_path)
        return self.final_result()

    def _bookkeeping(self, result: StepResult, idx: Tensor, y: Tensor) -> float | None:
        """The weight statistics of the step (over the global batch, on every rank), and its
        history row when due (with the evaluation when due); the row's training loss."""
        cfg = self.config
        w = result.method.weights.detach()
        if self.dist is not None:
            w = self.dist.all_gather_cat(w)
            idx = self.dist.all_gather_cat(idx.to(self.device)).cpu()
            y = self.dist.all_gather_cat(y.to(self.device))
        self._stats.add(w, result.method, idx, y, result.loss, result.mean_loss)
        self._last_weights = w * w.numel()  # relative weights B·wᵢ, for the histogram
        is_eval = (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == cfg.max_steps
        if self.step % cfg.log_every == 0 or is_eval:
            return self._log_row(result.lr, evaluate=bool(is_eval))["train_loss"]
        return None

    def _checkpoint(self, signum: int) -> int:
        """Write the checkpoint when due, at the last step, or when a signal asks to stop
        (SIGINT/SIGTERM to any rank: its number, max-reduced over ranks, one int per step);
        the signal's number (0: none)."""
        cfg = self.config
        if self.dist is not None:
            signum = self.dist.max_int(signum, self.device)
        due = cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
        if self.checkpoint_path and (due or self.step == cfg.max_steps or signum):
            # every rank checks: a checkpoint is always finite
            check_finite_parameters(self.model, self.step, self.method.name)
            if self.is_main:
                self.save_checkpoint(self.checkpoint_path)
        return signum

    def _log_row(self, lr: float, evaluate: bool) -> dict[str, float]:
        """The history row of this step: the weight window, and test metrics when due."""
        row = {"step": float(self.step), "lr": lr, **self._stats.window_row()}
        if evaluate:
            row.update(self.evaluation.row(self.step))
        row["time_s"] = self._elapsed
        self.records.emit(row, self._last_weights)
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
        x, y = self.placement.inputs(x), y.to(self.device, non_blocking=True)
        if meta_x is not None and meta_y is not None:
            meta_x, meta_y = self.placement.inputs(meta_x), meta_y.to(self.device)
        # 2. the method's weights (a meta step for l2rw / mwnet)
        self.model.train()
        batch = self._step_inputs(x, y, meta_x, meta_y)
        with self.placement.autocast():
            out = self.method.step(batch)
            losses = out.losses
            if losses is None:
                losses = self.loss_fn(self.model(x), y, reduction="none")  # (B,)
        # 3. the real update on Σ wᵢℓᵢ (NaN or inf: FloatingPointError naming the step)
        step, name = self.step + 1, self.method.name
        loss, loss_sum = weighted_update(
            self.model,
            self.optimizer,
            self.scheduler,
            out.weights,
            losses,
            grad_clip=cfg.grad_clip,
            dist=self.dist,
            check=lambda value: check_finite_loss(value, out.meta_loss, step, name),
        )
        self.step += 1
        return StepResult(out, loss, float(loss_sum) / batch.n_global, batch.lr)

    def final_result(self) -> FitResult:
        """The history and the final metrics: the evaluation of the current model plus run
        statistics (the summary's keys).

        With ``config.final_weights``, also every training example's weight now
        (``example_weights``) and its diagnostics: mean relative weight of clean and corrupted
        examples, the AUC with which the weights separate them, and the mean weight per class
        (for up to 10 classes).
        """
        metrics: dict[str, Any] = {"method": self.method.name, "steps": self.step}
        with phase(log, "final evaluation", self.evaluation.sets()):
            metrics.update(self.evaluation.summary(self.step))
        metrics.update(self._stats.summary())
        metrics.update(self.method.describe())  # e.g. meta_engine: which engine ran, and why
        if self.meta_source is not None:  # the trusted set found in the noisy data
            metrics.update(self.meta_source.describe())
        weights = None
        if self.config.final_weights:
            passes = self.config.final_weights
            n = len(self.train_data)  # type: ignore[arg-type]
            with phase(log, "final weights", f"{n} examples, {passes} pass(es)"):
                weights = self.example_weights(passes)
            metrics.update(
                weight_diagnostics(weights, self.corrupted, self.train_labels, self.num_classes)
            )
        metrics["wall_time_s"] = self._elapsed
        return FitResult(self.history, metrics, weights)

    def mean_example_weights(self) -> Tensor:
        """(N,) each training example's mean relative weight over training; NaN if never drawn."""
        return self._stats.mean_weights()

    def example_weights(self, passes: int = 1) -> Tensor:
        """(N,) the relative weight (B·wᵢ; 1 is uniform) of every training example, now
        (``reweight.train.weight_stats.score_example_weights``; nothing is updated)."""
        cfg = self.config
        self._setup()
        return score_example_weights(
            self.method, self.model, self.train_data, self.placement,
            meta_batches=lambda stream: self._meta_batches(stream, position=0),
            step_inputs=lambda x, y, mx, my: self._step_inputs(x, y, mx, my, local=True),
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            num_workers=cfg.num_workers,
            passes=passes,
            progress=cfg.show_progress and self.is_main,
        )  # fmt: skip

    def evaluate(self, data: Dataset) -> dict[str, Any]:
        """Accuracy, balanced (mean per-class) accuracy, per-class accuracy and mean loss."""
        return self.evaluation.evaluate(data)

    # -- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (``checkpoint.trainer_state``)."""
        return trainer_state(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state_dict()`` (``checkpoint.load_trainer_state``)."""
        load_trainer_state(self, state, setup=self._setup)

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Write ``state_dict()`` atomically (``reweight.train.checkpoint.write_checkpoint``)."""
        write_checkpoint(path, self.state_dict())

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Resume from the file ``save_checkpoint`` wrote; ``CheckpointError`` if it cannot be
        read (see ``read_checkpoint``)."""
        self.load_state_dict(read_checkpoint(path, map_location=self.device))

    # -- helpers -----------------------------------------------------------------------------

    def _setup(self) -> None:
        if not self._setup_done:
            labels, k = self.train_labels, self.num_classes
            self.method.setup(
                model=self.model, train_labels=labels, num_classes=k, device=self.device
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
        cfg, data = self.config, self.meta_data
        batches = BatchStream(
            data, cfg.meta_batch_size, cfg.seed, stream, False, cfg.num_workers, pin
        )
        return batches.iterate(position)

    def _step_inputs(
        self, x: Tensor, y: Tensor, mx: Tensor | None, my: Tensor | None, local: bool = False
    ) -> StepInputs:
        """What the method sees of a batch; ``local``: this process's batch, not a shard."""
        lr, n = float(self.optimizer.param_groups[0]["lr"]), len(y)
        dist = None if local else self.dist
        return StepInputs(
            *(self.model, x, y, mx, my, lr, self.loss_fn, self.optimizer, self.step),
            dist=dist,
            global_batch_size=n * dist.world_size if dist else None,
            offset=n * dist.rank if dist else 0,
        )

    @property
    def channels_last(self) -> bool:
        """The model trains in NHWC (``config.channels_last``, resolved for this device)."""
        return self.placement.channels_last

    @property
    def history(self) -> list[dict[str, float]]:
        """One row per log step (and per evaluation), this run's from the start."""
        return self.records.rows

    @property
    def callbacks(self) -> list[Callable[[dict[str, float]], None]]:
        """Called with each history row as it is made (on the process that writes)."""
        return self.records.callbacks

    @property
    def is_main(self) -> bool:
        """True in one process, and on rank 0 in data-parallel training (the one that writes)."""
        return self.dist is None or self.dist.is_main
