"""The planner's cuda policy, run on the CPU: MW-Net's lean tape and the timed choice.

Off CPU no training graph is held across a meta pass, so MW-Net's tape records the real
forward after the meta pass (``LeanTapeRecording``), and the policy times the tape and dual
numbers through the twin on a model's first training steps and keeps the faster. The timing
tests drive the planner's clock by hand: which engine "is faster" is theirs to say, so the
verdict is deterministic; the numbers are checked against the unrolled reference at every step.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F

import reweight.metastep
from reweight import MWNet, l2rw_eps_grad, mwnet_meta_grads, to_meta
from reweight.jvp import Planner
from reweight.jvp.timing import CANDIDATES, TIMED_STEPS
from reweight.metastep import MetaStep, StepInputs

from .test_fast import (
    LR,
    InPlaceNet,
    assert_equal,
    model_and_batches,
)

CPU = torch.device("cpu")


class Clock:
    """A planner clock on which a training step by ``engine`` lasts ``seconds[engine]``: the
    planner reads it when it records a step and when the step's update losses exist."""

    def __init__(self, planner: Planner, seconds: dict[str, float]) -> None:
        self.planner, self.seconds, self.now = planner, seconds, 0.0

    def __call__(self) -> float:
        self.now += self.seconds[self.planner.current.engine] / 2
        return self.now


def unrolled_reference(model, x, y, xv, yv, method: MWNet):
    twin = to_meta(model)
    losses = F.cross_entropy(model(x), y, reduction="none")
    return mwnet_meta_grads(twin, losses, method.vnet, xv, yv, LR)[0]


@pytest.mark.parametrize("faster", CANDIDATES)
def test_mwnet_times_both_engines_then_keeps_the_faster(
    faster: str, caplog: pytest.LogCaptureFixture
):
    model, x, y, xv, yv = model_and_batches("resnet")
    torch.manual_seed(1)
    method = MWNet(hidden=5, engine_policy="cuda")
    method.setup(model=model, device=CPU)
    want = unrolled_reference(copy.deepcopy(model), x, y, xv, yv, method)
    slower = next(e for e in CANDIDATES if e != faster)
    method.metastep.planner.clock = Clock(method.metastep.planner, {faster: 2.0, slower: 3.0})
    ran = []
    with caplog.at_level(logging.INFO, logger="reweight.jvp.planner"):
        for _ in range(TIMED_STEPS * len(CANDIDATES) + 2):
            batch = StepInputs(model, x, y, xv, yv, LR, F.cross_entropy)
            got, losses, _ = method.meta_grads(batch)  # the net is not stepped: same φ
            ran.append(method.metastep.planner.last_engine)
            for a, b in zip(got, want, strict=True):
                assert_equal(a, b)
            assert losses.grad_fn is not None
    # in turn, the tape first; then the faster one only
    assert ran == [*CANDIDATES] * TIMED_STEPS + [faster, faster]
    assert method.metastep.planner.jvps == {faster: TIMED_STEPS + 2, slower: TIMED_STEPS}
    plan = method.metastep.planner.current
    assert plan.engine == faster and not plan.timing
    assert plan.reason.startswith("cuda policy: the faster per step") and "1000.0 ms" in plan.reason
    timed = method.describe()["meta_engine"]["timed_ms"]
    assert timed == {faster: [1000.0] * TIMED_STEPS, slower: [1500.0] * TIMED_STEPS}
    # one line when the timing starts, one with its verdict
    assert caplog.text.count("timing tape and dual_twin") == 1
    assert caplog.text.count(f"mwnet meta-gradient engine: {faster} (cuda policy: the faster") == 1


def test_the_first_timed_step_of_each_engine_is_warm_up():
    """A slow first step (one-time set-up) does not decide: the later steps do."""
    model, x, y, xv, yv = model_and_batches("resnet")
    step = MetaStep(at_zero=True, engine_policy="cuda")
    planner = step.planner
    # tape, dual_twin, tape, ...: dual_twin's first step is the fastest of all, tape's slowest
    steps = iter([9.0, 0.1, 1.0, 2.0, 1.0, 2.0])
    clock = {"now": 0.0, "start": True}

    def tick() -> float:  # each step lasts the next value of ``steps``
        if clock["start"]:
            clock["step"] = next(steps)
        else:
            clock["now"] += clock["step"]
        clock["start"] = not clock["start"]
        return clock["now"]

    planner.clock = tick
    want = l2rw_eps_grad(model, x, y, xv, yv, LR, meta_grad="unrolled")
    for _ in range(TIMED_STEPS * len(CANDIDATES)):
        got = step(StepInputs(model, x, y, xv, yv, LR, F.cross_entropy)).c
        assert_equal(got, want)
    assert planner.plan(model, CPU).engine == "tape"


def test_a_functional_call_is_not_timed():
    """Entry points that leave the model unchanged have no update losses: they use the current
    candidate and time nothing."""
    model, x, y, xv, yv = model_and_batches("resnet")
    step = MetaStep(at_zero=True, engine_policy="cuda")
    planner = step.planner
    want = l2rw_eps_grad(model, x, y, xv, yv, LR, meta_grad="unrolled")
    for _ in range(2 * TIMED_STEPS * len(CANDIDATES)):
        assert_equal(l2rw_eps_grad(model, x, y, xv, yv, LR, step=step), want)
    assert planner.jvps == {"tape": 2 * TIMED_STEPS * len(CANDIDATES)}
    assert planner.current.timing


def test_mwnet_lean_tape_runs_the_real_forward_after_the_meta_pass(monkeypatch):
    """The cuda policy's tape holds no training graph across the meta pass: the real model's
    forward (the one the tape records) comes after the meta gradient at θ′; the cpu policy's
    comes before it, its graph serving the virtual step."""
    events: list[str] = []
    meta_gradient = reweight.metastep.meta_gradient

    def logged(*args, **kwargs):
        events.append("meta pass")
        return meta_gradient(*args, **kwargs)

    monkeypatch.setattr(reweight.metastep, "meta_gradient", logged)
    for policy, want in [("cuda", ["meta pass", "real forward"]), ("cpu", None)]:
        model, x, y, xv, yv = model_and_batches("resnet")
        model.register_forward_pre_hook(
            lambda m, _, real=model: events.append("real forward") if m is real else None
        )
        method = MWNet(hidden=5, engine="tape", engine_policy=policy)
        method.setup(model=model, device=CPU)
        events.clear()
        method.meta_grads(StepInputs(model, x, y, xv, yv, LR, F.cross_entropy))
        assert events == (want or ["real forward", "meta pass"])
        assert method.metastep.planner.last_engine == "tape"


@pytest.mark.parametrize("method", ["l2rw", "mwnet"])
def test_a_model_the_tape_cannot_replay_leaves_the_timing(
    method: str, caplog: pytest.LogCaptureFixture
):
    """Its first step falls back to dual numbers through the twin (the same numbers); from
    then on the model takes dual_twin, untimed."""
    torch.manual_seed(0)
    model = InPlaceNet(scale=True).double().train()
    x, y = torch.randn(10, 4).double(), torch.randint(0, 3, (10,))
    xv, yv = torch.randn(7, 4).double(), torch.randint(0, 3, (7,))
    with caplog.at_level(logging.WARNING, logger="reweight.jvp.planner"):
        if method == "l2rw":
            want = l2rw_eps_grad(model, x, y, xv, yv, LR, meta_grad="unrolled")
            step = MetaStep(at_zero=True, engine_policy="cuda")
            planner = step.planner
            for _ in range(3):
                got = step(StepInputs(model, x, y, xv, yv, LR, F.cross_entropy)).c
                assert_equal(got, want)
        else:
            torch.manual_seed(1)
            mw = MWNet(hidden=5, engine_policy="cuda")
            mw.setup(model=model, device=CPU)
            want = unrolled_reference(copy.deepcopy(model), x, y, xv, yv, mw)
            for _ in range(3):
                got, losses, _ = mw.meta_grads(StepInputs(model, x, y, xv, yv, LR, F.cross_entropy))
                assert losses.grad_fn is not None
                for a, b in zip(got, want, strict=True):
                    assert_equal(a, b)
            planner = mw.metastep.planner
    assert caplog.text.count("cannot replay") == 1
    assert planner.jvps == {"dual_twin": 3}
    assert planner.current.engine == "dual_twin" and "cannot replay" in planner.current.reason
    assert "timed_ms" not in planner.describe()


def _timing_worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank of a gloo group timing the candidates on a clock of its own: rank 0 finds
    the tape faster, rank 1 dual numbers; each writes the engine it kept."""
    from .helpers import gloo_group

    with gloo_group(rank, world, port):
        model, x, y, xv, yv = model_and_batches("resnet")
        step = MetaStep(at_zero=True, engine_policy="cuda")
        faster = CANDIDATES[rank % 2]
        slower = next(e for e in CANDIDATES if e != faster)
        step.planner.clock = Clock(step.planner, {faster: 2.0, slower: 3.0})
        ran = []
        for _ in range(TIMED_STEPS * len(CANDIDATES) + 2):
            step(StepInputs(model, x, y, xv, yv, LR, F.cross_entropy))
            ran.append(step.planner.last_engine)
        torch.save({"ran": ran, "kept": step.planner.plan(model, CPU).engine}, f"{out}/{rank}.pt")


def test_every_rank_keeps_rank_0s_verdict(tmp_path):
    """Two ranks whose own timings disagree run the engine rank 0 chose, from the step the
    verdict is made on (as one process on the global batch would run one engine)."""
    import torch.multiprocessing as mp

    from .helpers import free_port

    mp.spawn(_timing_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    timed = [*CANDIDATES] * TIMED_STEPS
    for r in results:
        assert r["kept"] == CANDIDATES[0]  # rank 0's faster one
        assert r["ran"] == [*timed, CANDIDATES[0], CANDIDATES[0]]
