"""Which engine computes a method's JVPs, and why: a pure function of what is known.

With ``engine="auto"`` the choice is made per model × device × method:

    policy   model keeps its examples apart (verified)   otherwise
    cpu      per_layer                                   tape
    cuda     per_layer                                   tape or dual_twin, the faster per
                                                         step on the model's first steps

(dual_twin wherever the tape cannot replay the model's forward: recurrent cells, ops without a
rule.) The policy is the batch's device (``cpu``; ``cuda`` for any other device) unless
``policy`` says otherwise, so what the planner would run on a GPU can be run and measured on a
CPU.

Why. On CPU the tangent tape is the least time: the training batch goes through the network
once, the replay computes only tangents. For MW-Net it keeps that forward's graph across the
meta pass (ResNet-32: 1.99× a plain step's peak memory). Off CPU the planner never picks an
engine whose peak memory exceeds the unrolled step's, nor holds a training graph across a
meta pass: not dual numbers through the real model with its graph kept (``dual``: 3.95×, more
than unrolled), and MW-Net's tape records the real forward after the meta pass
(``LeanTapeRecording``: 1.13×). That leaves two candidates, and which is faster depends on the
hardware: the tape saves a forward of the batch, but its ``TorchDispatchMode`` costs Python
work per op, which dominates when the device outruns the host (a small model on a GPU). On a
2-core CPU (docs/benchmarks.md, ninth run), ResNet-32 at batch 100: the tape 11 % (L2RW) and
7 % (MW-Net) faster per step; at batch 2 on 8×8 images: 17 % slower and as fast. So the cuda
policy times both on a model's first training steps
(``TIMED_STEPS`` each, in turn, synchronizing the device around each, from the recording to
the real update's losses; the first of each is warm-up) and keeps the faster, as
``torch.backends.cudnn.benchmark`` picks convolution kernels. Both are exact, so the choice
changes results only by rounding; force ``engine`` to pin it (a run timed again after a
resume may pick the other). In a data-parallel run every rank keeps rank 0's verdict
(``reweight.jvp.timing.keep_rank0_verdict``).

The per-layer path (``reweight.jvp.per_layer``) is the least time and keeps no
training graph across MW-Net's meta pass, but is exact only for a model whose examples do not
interact: its structure is checked first, then on the first step of every (model, structure,
mode) the model itself is checked (``_agrees``): a forward of the twin, apart from the step's
own, whose per-layer JVP in a fixed random direction is compared with an exact one (dual
numbers through the twin). Its loss is a fixed random linear function of the outputs, not the
training loss, whose JVPs vanish on a batch the model already fits: on MNIST 4-vs-9, a resumed
run's first batch (one class, float32 losses ≤ 2.4e-7) had JVPs of 2e-5 that the two engines'
rounding (3e-6) made "differ", and LeNet was sent to the tape. The check feeds nothing into its
step and leaves the random stream as it was, so a checking step computes what an unchecked
step of its verdict computes: per layer if the JVPs agree to rounding, else by the general
engine (where the model then stays); a resumed run equals an uninterrupted one, bit for bit
(under the cpu policy: the cuda policy's timed choice may differ between runs).

A forced engine (``engine="tape"`` etc.) is used as given; one that cannot run the model is an
error, never a silent fallback. ``current`` is the latest plan (engine and reason, logged at
INFO whenever it changes), ``last_engine`` the engine that computed the latest JVP and ``jvps``
how many each engine computed: tests assert on them, and ``describe()`` puts them in a run's
summary.

``choose`` decides from ``Facts`` (what the planner knows of one model on one device) and the
forced engine; it changes nothing. What each engine can run is declared in
``reweight.jvp.base.ENGINE_SPECS``; the ``Planner`` keeps the facts, records, and reports.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from reweight.jvp.base import ENGINE_SPECS
from reweight.jvp.timing import CANDIDATES, TIMED_STEPS, Timing

__all__ = ["POLICIES", "Facts", "Plan", "choose"]

POLICIES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Plan:
    """An engine and the reason it was chosen (one short sentence); ``timing`` while the cuda
    policy times its candidates on a model's first steps."""

    engine: str
    reason: str
    timing: bool = False


@dataclass(frozen=True)
class Facts:
    """What is known of one model, in its current structure and modes, on one device."""

    model: str  # its class name, for the reasons
    policy: str  # "cpu" or "cuda" (the device's, unless the method names one)
    per_layer: str  # "check" (its first step checks it), "ok" or "no"
    per_layer_off: str  # why not, when "no"
    recurrent: bool  # recurrent cells: the tape cannot replay their in-place gate ops
    tape_off: str | None  # why the tape cannot replay its forward, once a step found out
    timing: Timing | None  # the cuda policy's timings of its candidates (None: cpu policy)


def general(facts: Facts) -> Plan:
    """The engine for a model the per-layer path does not serve."""
    policy = facts.policy
    if facts.recurrent and not ENGINE_SPECS["tape"].recurrent:
        return Plan(
            "dual_twin",
            f"{policy} policy: dual numbers through the twin (the tangent tape cannot replay "
            "the in-place ops of recurrent cells)",
        )
    if facts.tape_off is not None:
        return Plan(
            "dual_twin",
            f"{policy} policy: the tangent tape cannot replay {facts.model}'s forward "
            f"({facts.tape_off}); dual numbers through the twin",
        )
    if policy == "cpu" or facts.timing is None:
        return Plan("tape", "cpu policy: tangent tape (one recorded forward, tangents replayed)")
    timing = facts.timing
    if timing.verdict is not None:
        return Plan(
            timing.verdict,
            f"cuda policy: the faster per step on this model's first steps "
            f"({timing.summary()}); neither holds a training graph across the meta pass",
        )
    return Plan(
        timing.next(),
        f"cuda policy: timing {' and '.join(CANDIDATES)} on the first "
        f"{TIMED_STEPS * len(CANDIDATES)} training steps, in turn (the step's peak memory "
        "stays near a plain step's with either)",
        timing=True,
    )


def choose(facts: Facts | None, forced: str = "auto") -> tuple[Plan, bool]:
    """(plan, check): the engine of the next recording and why; ``check`` when the per-layer
    path runs for the first time on this (model, structure, mode) and is to be compared with
    an exact JVP. ``forced``: the method's ``engine`` (``"auto"``: choose); ``facts`` may be
    None only for an engine forced other than ``per_layer`` (used as given)."""
    if forced not in ("auto", "per_layer"):
        return Plan(forced, f"forced: method.engine={forced}"), False
    assert facts is not None
    if forced == "per_layer":
        if facts.per_layer == "no":
            raise ValueError(
                f"method.engine=per_layer cannot run {facts.model}: {facts.per_layer_off}; "
                "use method.engine=auto"
            )
        return Plan("per_layer", "forced: method.engine=per_layer"), facts.per_layer == "check"
    policy, other = facts.policy, general(facts)
    if facts.per_layer == "ok":
        reason = (
            f"{policy} policy: {facts.model} keeps the examples of a batch apart (checked on its "
            "first step): per-layer JVPs and weighted gradients"
        )
        return Plan("per_layer", reason), False
    if facts.per_layer == "check":
        reason = (
            f"{policy} policy: per-layer path, checked on this step against an exact JVP "
            f"(if {facts.model} mixes the examples of a batch: {other.engine})"
        )
        return Plan("per_layer", reason), True
    return replace(
        other, reason=f"{other.reason}; per-layer path off: {facts.per_layer_off}"
    ), False
