"""``reweight.jvp.choice.choose``: the plan and its reason for every branch, word for word (the
reason is what a run's log and summary say ran and why), and the per-layer check flag."""

from __future__ import annotations

import pytest

from reweight.jvp.choice import POLICIES, Facts, Plan, choose
from reweight.jvp.timing import Timing


def facts(**changes) -> Facts:
    base = dict(model="Net", policy="cpu", per_layer="no", per_layer_off="BatchNorm",
                recurrent=False, tape_off=None, timing=None)  # fmt: skip
    return Facts(**{**base, **changes})


def timed(tape: float, dual: float) -> Timing:
    t = Timing(key=("Net",))
    for _ in range(3):
        t.add("tape", tape)
        t.add("dual_twin", dual)
    return t


OFF = "; per-layer path off: BatchNorm"


def test_the_policies():
    assert POLICIES == ("auto", "cpu", "cuda")


def test_a_forced_engine_is_used_as_given():
    assert choose(None, "tape") == (Plan("tape", "forced: method.engine=tape"), False)
    assert choose(facts(per_layer="check"), "per_layer") == (
        Plan("per_layer", "forced: method.engine=per_layer"), True
    )  # fmt: skip
    assert choose(facts(per_layer="ok"), "per_layer")[1] is False
    with pytest.raises(ValueError) as info:
        choose(facts(), "per_layer")
    assert str(info.value) == (
        "method.engine=per_layer cannot run Net: BatchNorm; use method.engine=auto"
    )


def test_the_general_engines_and_their_reasons():
    assert choose(facts()) == (Plan(
        "tape", "cpu policy: tangent tape (one recorded forward, tangents replayed)" + OFF
    ), False)  # fmt: skip
    assert choose(facts(recurrent=True, policy="cuda")) == (Plan(
        "dual_twin", "cuda policy: dual numbers through the twin (the tangent tape cannot "
        "replay the in-place ops of recurrent cells)" + OFF
    ), False)  # fmt: skip
    assert choose(facts(tape_off="an op without a rule")) == (Plan(
        "dual_twin", "cpu policy: the tangent tape cannot replay Net's forward (an op without "
        "a rule); dual numbers through the twin" + OFF
    ), False)  # fmt: skip
    assert choose(facts(policy="cuda"))[0].engine == "tape"  # no timing yet: the tape
    plan, check = choose(facts(policy="cuda", timing=Timing(key=("Net",))))
    assert (plan, check) == (Plan(
        "tape", "cuda policy: timing tape and dual_twin on the first 6 training steps, in turn "
        "(the step's peak memory stays near a plain step's with either)" + OFF, timing=True
    ), False)  # fmt: skip
    t = timed(tape=0.003, dual=0.002)
    assert choose(facts(policy="cuda", timing=t)) == (Plan(
        "dual_twin", f"cuda policy: the faster per step on this model's first steps "
        f"({t.summary()}); neither holds a training graph across the meta pass" + OFF
    ), False)  # fmt: skip
    assert choose(facts(policy="cuda", timing=timed(tape=0.001, dual=0.002)))[0].engine == "tape"


def test_the_per_layer_path_and_its_check():
    assert choose(facts(per_layer="ok")) == (Plan(
        "per_layer", "cpu policy: Net keeps the examples of a batch apart (checked on its "
        "first step): per-layer JVPs and weighted gradients"
    ), False)  # fmt: skip
    assert choose(facts(per_layer="check", recurrent=True)) == (Plan(
        "per_layer", "cpu policy: per-layer path, checked on this step against an exact JVP "
        "(if Net mixes the examples of a batch: dual_twin)"
    ), True)  # fmt: skip
