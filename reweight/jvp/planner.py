"""The ``Planner`` a method owns: what it knows of each model, the recording, the report.

It keeps the facts the choice needs (``reweight.jvp.choice``: whether a model keeps its
examples apart, verified on its first step; whether the tape could replay its forward; the
cuda policy's timings), asks ``choose`` for a plan, records the training forward by the
planned engine (``reweight.jvp.base.ENGINE_SPECS`` says what each can run), and counts which
engine computed each JVP. A forced engine (``engine="tape"`` etc.) is used as given; one that
cannot run the model is an error, never a silent fallback. ``current`` is the latest plan
(engine and reason, logged at INFO whenever it changes), ``last_engine`` the engine that
computed the latest JVP and ``jvps`` how many each engine computed: tests assert on them, and
``describe()`` puts them in a run's summary.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from reweight.core import inputs as batch_inputs
from reweight.jvp.base import ENGINE_SPECS, ENGINES, Forward, Recording, Stale, Unsupported
from reweight.jvp.choice import POLICIES, Facts, Plan, choose, general
from reweight.jvp.dual import DualRecording, DualTwinRecording, dual_twin_jvp
from reweight.jvp.per_layer import Ineligible, Layers, PerLayerRecording, agree, ghost_layers
from reweight.jvp.program import ModelPrograms
from reweight.jvp.tape import LeanTapeRecording, TapeRecording
from reweight.jvp.timing import Timing, keep_rank0_verdict
from reweight.meta import LossFn, TwinCache, trainable
from reweight.meta.kernels import has_rnn
from reweight.meta.twins import modules_of, structure

__all__ = ["POLICIES", "Plan", "Planner"]

log = logging.getLogger(__name__)


class Planner:
    """Chooses, records with, and reports the forward-mode engine of one method.

    It knows engines by what they can run, not methods by name: a method whose JVP direction
    exists before the training forward (L2RW's, at w = 0: ``direction_first``) can use ``dual``;
    one whose direction exists only after its virtual step (a weighting net's) cannot.

    Args:
        engine: ``"auto"`` or one of ``tape``, ``dual``, ``dual_twin``, ``per_layer``.
        policy: ``"auto"`` (the batch's device), ``"cpu"`` or ``"cuda"``.
        direction_first: the JVP's direction is known before the training forward.
        label: the method's name, for log lines.
        twins: the method's twin cache (a new one by default).

    Example:
        >>> import torch, torch.nn as nn, torch.nn.functional as F
        >>> planner = Planner(engine="tape")
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
        >>> rec = planner.record(model, x, y, F.cross_entropy, update=False)
        >>> u = [torch.randn_like(p) for p in model.parameters()]
        >>> rec.jvp(u).shape, planner.last_engine
        (torch.Size([5]), 'tape')
    """

    def __init__(
        self,
        engine: str = "auto",
        policy: str = "auto",
        *,
        direction_first: bool = True,
        label: str = "meta step",
        twins: TwinCache | None = None,
    ) -> None:
        if engine not in ("auto", *ENGINES):
            raise ValueError(f"method.engine must be one of {['auto', *ENGINES]}, got {engine!r}")
        if policy not in POLICIES:
            raise ValueError(
                f"method.engine_policy must be one of {list(POLICIES)}, got {policy!r}"
            )
        if engine != "auto" and ENGINE_SPECS[engine].direction_first and not direction_first:
            raise ValueError(
                f"method.engine={engine} cannot run {label}: {ENGINE_SPECS[engine].summary} need "
                "the JVP's direction before the training forward, and this method's exists only "
                "after its virtual step; use method.engine=dual_twin or auto"
            )
        self.engine, self.policy, self.label = engine, policy, label
        self.direction_first = direction_first
        self.twins = twins if twins is not None else TwinCache()
        self.current: Plan | None = None  # the plan of the latest recording
        self.last_engine: str | None = None  # the engine that computed the latest JVP
        self.jvps: dict[str, int] = {}  # JVPs computed, by engine
        self._logged: Plan | None = None
        # model -> (key, "check" | "ok" | "no", layers, why not)
        self._per_layer: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, str, Layers, str]] = (
            weakref.WeakKeyDictionary()
        )
        # model -> (structure, why the tape cannot replay its forward)
        self._no_tape: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, str]] = (
            weakref.WeakKeyDictionary()
        )
        # model -> its tape programs (``reweight.jvp.program``)
        self._programs: weakref.WeakKeyDictionary[nn.Module, ModelPrograms] = (
            weakref.WeakKeyDictionary()
        )
        # model -> the cuda policy's timings of its candidates
        self._timings: weakref.WeakKeyDictionary[nn.Module, Timing] = weakref.WeakKeyDictionary()
        self._timing: Timing | None = None  # the latest recorded model's, for describe()
        self.clock: Callable[[], float] = time.perf_counter  # seconds; the cuda policy's timer

    # -- choosing ---------------------------------------------------------------------------

    def plan(
        self, model: nn.Module, device: torch.device, weights: Sequence[Tensor] | None = None
    ) -> Plan:
        """The engine the next training-step recording of ``model`` would use, and why
        (``weights``: those its JVPs are taken for; default every trainable one)."""
        return self._decide(model, _weights(model, weights), device)[0]

    def per_layer_verdict(
        self,
        model: nn.Module,
        device: torch.device | str = "cpu",
        weights: Sequence[Tensor] | None = None,
    ) -> str:
        """``"check"`` (its first step will check it), ``"ok"`` or ``"no"``: whether ``model``,
        in its current structure and modes, takes the per-layer path."""
        weights = _weights(model, weights)
        return self._per_layer_state(model, weights, torch.device(device), _walk(model))[0]

    def check(
        self, model: nn.Module, device: torch.device, weights: Sequence[Tensor] | None = None
    ) -> None:
        """Refuse, before the first step, a forced engine that the model's structure rules out."""
        if self.engine == "per_layer":
            self.plan(model, device, weights)

    def policy_for(self, device: torch.device) -> str:
        """The policy in force for a batch on ``device``: ``"cpu"`` or ``"cuda"``."""
        if self.policy != "auto":
            return self.policy
        return "cpu" if device.type == "cpu" else "cuda"

    def _per_layer_state(
        self,
        model: nn.Module,
        weights: Sequence[Tensor],
        device: torch.device,
        walk: _Walk,
    ) -> tuple[str, Layers, str]:
        """("ok" | "check" | "no", layers, why not) for the model's current structure and modes
        (``walk``: the model's modules and structure, taken once a step)."""
        if torch.is_autocast_enabled(device.type):
            return "no", Layers({}), "autocast is on"
        key = (
            walk.structure,
            tuple(m.training for m in walk.modules),
            tuple(id(w) for w in weights),
        )
        entry = self._per_layer.get(model)
        if entry is None or entry[0] != key:
            try:
                entry = (key, "check", ghost_layers(model, weights), "")
            except Ineligible as err:
                entry = (key, "no", Layers({}), str(err))
            self._per_layer[model] = entry
        return entry[1], entry[2], entry[3]

    def _set_per_layer(self, model: nn.Module, state: str, why: str = "") -> None:
        entry = self._per_layer.get(model)
        if entry is not None:
            layers = entry[2] if state == "ok" else Layers({})
            self._per_layer[model] = (entry[0], state, layers, why)

    def _facts(
        self,
        model: nn.Module,
        state: str,
        why: str,
        device: torch.device,
        walk: _Walk,
    ) -> Facts:
        """What ``choose`` needs of ``model`` (``walk``: its modules and structure); under the
        cuda policy its timings (made on first use), which ``describe`` then reports."""
        policy, key = self.policy_for(device), walk.structure
        refused = self._no_tape.get(model)
        tape_off = refused[1] if refused is not None and refused[0] == key else None
        recurrent = has_rnn(model, walk.modules)
        timing = None
        if policy == "cuda" and not recurrent and tape_off is None:
            timing = self._timings.get(model)
            if timing is None or timing.key != key:
                timing = self._timings[model] = Timing(key)
        self._timing = timing
        return Facts(type(model).__name__, policy, state, why, recurrent, tape_off, timing)

    def _decide(
        self, model: nn.Module, weights: Sequence[Tensor], device: torch.device
    ) -> tuple[Plan, Layers, bool]:
        """(plan, layers, check): ``check`` when the per-layer path runs for the first time on
        this (model, structure, mode) and is to be compared with an exact JVP."""
        if self.engine not in ("auto", "per_layer"):
            return choose(None, self.engine)[0], Layers({}), False
        walk = _walk(model)  # one walk of the model per step
        state, layers, why = self._per_layer_state(model, weights, device, walk)
        if self.engine == "per_layer":
            policy = self.policy_for(device)
            facts = Facts(type(model).__name__, policy, state, why, False, None, None)
        else:
            facts = self._facts(model, state, why, device, walk)
        plan, check = choose(facts, self.engine)
        return plan, (layers if plan.engine == "per_layer" else Layers({})), check

    def _note(self, plan: Plan) -> None:
        self.current = plan
        timing = plan.timing and self._logged is not None and self._logged.timing
        if plan != self._logged and not timing:  # the timed candidates are logged once
            log.info("%s meta-gradient engine: %s (%s)", self.label, plan.engine, plan.reason)
            self._logged = plan

    # -- recording --------------------------------------------------------------------------

    def record(
        self,
        model: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        loss_fn: LossFn,
        *,
        direction: Sequence[Tensor] | None = None,
        chunks: int = 1,
        update: bool = True,
        weights: Sequence[Tensor] | None = None,
    ) -> Recording:
        """Record the forward of a training batch by the planned engine.

        ``direction``, when the JVP's direction is known before the forward (L2RW), lets the
        dual-number engines compute it in the forward. ``chunks`` slices the per-layer path's
        forward. With ``update`` the forward is the real model's and its losses carry the real
        update's graph; without, it runs through the bound twin and the model, its ``.grad``
        and its BatchNorm statistics are left unchanged. ``weights``: the weights whose JVPs
        and weighted gradients are asked for (default: every trainable one); the update's
        losses reach every trainable weight whatever they are.
        """
        weights = _weights(model, weights)
        twin = lambda: self.twins.bound(model)  # noqa: E731 (bound afresh at each use)
        fwd = Forward(model if update else twin(), weights, inputs, targets, loss_fn, twin, update)
        device = batch_inputs.device(inputs)
        plan, layers, check = self._decide(model, weights, device)
        self._note(plan)
        start = self._now(device) if plan.timing and update else None
        if plan.engine == "per_layer":
            rec = self._record_per_layer(model, fwd, layers, chunks, check)
            if rec is not None:
                return self._planned(model, fwd, rec)
            plan = self._decide(model, weights, device)[0]  # off the path now
            self._note(plan)
        if plan.engine == "tape":
            # the cuda policy holds no training graph across MW-Net's meta pass (L2RW's comes
            # before the recorded forward)
            lean = update and direction is None and self.policy_for(device) == "cuda"
            programs = self._programs.get(model)
            if programs is None:
                programs = self._programs[model] = ModelPrograms()
            rec = (LeanTapeRecording if lean else TapeRecording)(fwd, programs)
        elif plan.engine == "dual":
            if direction is None:
                raise RuntimeError("internal error: the dual engine needs the direction first")
            rec = DualRecording(fwd, direction)
        else:
            rec = DualTwinRecording(fwd, direction)
        timer = None
        if start is not None:  # stopped when the step's losses for the real update exist
            engine = plan.engine
            timer = lambda ran: self._timed(model, engine, ran, device, start)  # noqa: E731
        return self._planned(model, fwd, rec, timer)

    def _planned(
        self,
        model: nn.Module,
        fwd: Forward,
        rec: Recording,
        timer: Callable[[str], None] | None = None,
    ) -> Recording:
        """``rec`` as handed out: its outcomes come back to this planner through callbacks."""
        return _Planned(
            fwd,
            rec,
            on_unsupported=lambda why: self._refuse_tape(model, why),
            on_jvp=self._ran,
            on_update=timer,
        )

    def _record_per_layer(
        self, model: nn.Module, fwd: Forward, layers: Layers, chunks: int, check: bool
    ) -> Recording | None:
        """The per-layer recording, after the model's check on a checking step. None when the
        model turns out not to fit (the caller records by a general engine)."""
        name, forced = type(model).__name__, self.engine == "per_layer"
        try:
            if check and not _agrees(fwd, layers, chunks):
                if forced:
                    raise ValueError(
                        f"method.engine=per_layer cannot run {name}: its per-layer JVP differs "
                        "from the exact one (the forward mixes the examples of a batch or uses "
                        "a weight outside its layer); use method.engine=auto"
                    )
                self._set_per_layer(model, "no", "its per-layer JVP differs from the exact one")
                device = batch_inputs.device(fwd.inputs)
                log.warning(
                    "meta_grad='fast': %s does not fit the per-layer path (its per-layer JVP "
                    "differs from the exact one: the forward mixes the examples of a batch or "
                    "uses a weight outside its layer); using %s",
                    name,
                    general(self._facts(model, "no", "", device, _walk(model))).engine,
                )
                return None
            rec = PerLayerRecording(fwd, layers, chunks)
        except Ineligible as err:
            if forced:
                raise ValueError(
                    f"method.engine=per_layer cannot run {name}: {err}; use method.engine=auto"
                ) from err
            self._set_per_layer(model, "no", str(err))
            # not the user's to act on: the exact general engine runs (the next plan says so)
            log.info("per-layer path off for %s: %s", name, err)
            fwd.rng.rewind()  # the general engine's forward draws what this one drew
            return None
        if check:
            self._set_per_layer(model, "ok")
        return rec

    # -- outcomes ---------------------------------------------------------------------------

    def _refuse_tape(self, model: nn.Module, why: str) -> None:
        if self.engine == "tape":
            raise ValueError(
                f"method.engine=tape cannot run {type(model).__name__}: the tangent tape cannot "
                f"replay its forward ({why}); use method.engine=auto or dual_twin"
            )
        self._no_tape[model] = (structure(model), why)
        log.warning(
            "meta_grad='fast': the tangent tape cannot replay %s's forward (%s); using dual "
            "numbers through the twin instead (exact, one more forward per step)",
            type(model).__name__,
            why,
        )

    def _now(self, device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return self.clock()

    def _timed(
        self, model: nn.Module, engine: str, ran: str, device: torch.device, start: float
    ) -> None:
        """A timed step of ``model`` planned for ``engine`` (from its recording to its update's
        losses); ``ran``: the engine that computed its JVP."""
        timing = self._timings.get(model)
        if timing is None or ran != engine or timing.verdict is not None:
            return  # the tape fell back (the model leaves the timing), or it was decided
        timing.add(engine, self._now(device) - start)  # the verdict is logged as the next plan
        keep_rank0_verdict(timing, device)  # once decided: rank 0's, on every rank

    def _ran(self, engine: str) -> None:
        self.last_engine = engine
        self.jvps[engine] = self.jvps.get(engine, 0) + 1

    def describe(self) -> dict[str, Any]:
        """The latest plan and the JVPs computed per engine, for a run's summary."""
        plan = self.current
        out: dict[str, Any] = {
            "engine": plan.engine if plan else None,
            "reason": plan.reason if plan else "no meta step taken yet",
            "jvps": dict(self.jvps),
        }
        programs = list(self._programs.values())
        if programs:  # forwards the tape followed from a program, and those that departed
            out["tape_programs"] = {
                "signatures": sum(len(p.programs) for p in programs),
                "followed": sum(p.followed for p in programs),
                "stale": sum(p.stale for p in programs),
            }
        if self._timing is not None and any(self._timing.seconds.values()):
            # the cuda policy's timings, ms per step
            out["timed_ms"] = {
                e: [round(1e3 * t, 3) for t in ts] for e, ts in self._timing.seconds.items()
            }
        return out


@dataclass(frozen=True)
class _Walk:
    """One walk of a model, taken once a step: its modules (``modules_of``) and ``structure``
    (what its buffers hold is left out: a forward that writes one every step, a counter or a
    running average, changes neither what the per-layer path can read nor the timings)."""

    modules: list[nn.Module]
    structure: tuple


def _walk(model: nn.Module) -> _Walk:
    modules = modules_of(model)
    return _Walk(modules, structure(model, modules))


def _weights(model: nn.Module, weights: Sequence[Tensor] | None) -> list[Tensor]:
    """The weights a recording's JVPs are for: those given, else every trainable one."""
    return list(weights) if weights is not None else trainable(model)[1]


def _agrees(fwd: Forward, layers: Layers, chunks: int) -> bool:
    """Whether the per-layer JVP of the batch equals an exact one (dual numbers through the
    twin) to rounding, for ``_probe_loss`` in the direction ``_probe``; ``Ineligible`` when the
    per-layer forward finds the model unfit.

    Runs the twin, not ``fwd.module``: nothing is written to the model, and nothing here feeds
    the step, whose own forward comes after and draws the random numbers this one drew (both
    forwards of the check replay them, and the generator is left as it was).
    """
    with fwd.rng.replay():
        twin = fwd.twin()
        probe = Forward(twin, fwd.weights, fwd.inputs, fwd.targets, _probe_loss, fwd.twin, False)
        direction = _probe(fwd.weights)
        per_layer = PerLayerRecording(probe, layers, chunks).jvp(direction)
        # the exact JVP in the same slices: a model with dropout draws its masks per slice
        return agree(per_layer, dual_twin_jvp(probe, direction, chunks))


def _probe_loss(outputs: Tensor, targets: Tensor, reduction: str = "none") -> Tensor:
    """The check's per-example losses (B,): ⟨r, outputᵢ⟩ for one fixed random r.

    Linear in the outputs, so its JVPs are as large as the outputs' tangents whatever the batch
    (the training loss's vanish with its gradient once the model fits a batch, leaving only
    rounding to compare).
    """
    if not isinstance(outputs, Tensor) or outputs.dim() < 1:
        raise Ineligible("the model's output is not one batched tensor")
    gen = torch.Generator().manual_seed(1)
    r = torch.randn(outputs.shape[1:], generator=gen).to(outputs.device, outputs.dtype)
    return (outputs * r).reshape(len(outputs), -1).sum(1)


def _probe(weights: Sequence[Tensor]) -> list[Tensor]:
    """A fixed random direction, one tensor per weight (its own generator: the run's random
    stream is untouched), in which a checking step compares two JVPs."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(w.shape, generator=gen).to(w.device, w.dtype) for w in weights]


class _Planned(Recording):
    """An engine's recording as the planner hands it out: it falls back when the tape cannot
    replay the forward (or fails, when the tape was forced) and reports which engine computed
    each JVP, and when the update's losses exist, through the callbacks it is given."""

    def __init__(
        self,
        fwd: Forward,
        rec: Recording,
        *,
        on_unsupported: Callable[[str], None],
        on_jvp: Callable[[str], None],
        on_update: Callable[[str], None] | None = None,
    ) -> None:
        self.fwd, self.rec = fwd, rec
        self.engine, self.values = rec.engine, rec.values
        self.on_unsupported, self.on_jvp = on_unsupported, on_jvp
        self.on_update = on_update  # called once with the engine, when the update's losses exist

    def jvp(self, direction: Sequence[Tensor]) -> Tensor:
        try:
            out = self.rec.jvp(direction)
        except Unsupported as err:
            if isinstance(err, Stale):  # this step only: the next forward is recorded afresh
                log.info("meta_grad='fast': %s; this step's JVP by dual numbers", err)
            else:
                self.on_unsupported(str(err))  # raises when the tape was forced
            out, self.engine = dual_twin_jvp(self.fwd, direction), "dual_twin"
        self.on_jvp(self.engine)
        return out

    def weighted_grads(self, seeds: Tensor) -> list[Tensor | None]:
        return self.rec.weighted_grads(seeds)

    def update_losses(self) -> Tensor:
        losses = self.rec.update_losses()
        if self.on_update is not None:
            self.on_update(self.engine)
            self.on_update = None
        return losses
