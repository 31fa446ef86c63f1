"""Tape programs (reweight.jvp.program): a forward recorded once per model and signature, later
forwards followed op by op. A followed forward's JVP against an independent reference
(dual numbers through the twin, torch.func) in float64, training steps against the unrolled
reference, and every way a forward can depart from its program (an op, a scalar, which weight
an op reads, a shape) caught: that step's JVP exact by dual numbers, the next one recorded."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reweight import MWNet
from reweight.jvp.base import Stale
from reweight.jvp.dual import dual_forward
from reweight.jvp.planner import Planner
from reweight.jvp.program import MAX_STALE, FollowingTape, split
from reweight.jvp.tape import LeanTapeRecording, TangentTape, TapeRecording
from reweight.meta import to_meta, trainable
from reweight.metastep import StepInputs

from .test_fast import DropNet, InPlaceNet, assert_equal, model_and_batches

DT = torch.float64


def reference(model: nn.Module, x, y, direction, seed: int) -> torch.Tensor:
    """The JVP of the per-example losses by dual numbers through the twin (the dropout masks
    of ``torch.manual_seed(seed)``)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        return dual_forward(to_meta(model), trainable(model)[1], direction, x, y, F.cross_entropy)[
            1
        ]


def directions(model: nn.Module, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in trainable(model)[1]]


@pytest.mark.parametrize("name", ["dropout", "in-place", "resnet", "lenet"])
def test_a_followed_forward_replays_its_own_primals(name: str):
    """Recorded on one batch, followed on another (other values, other dropout masks, the
    weights moved in place as an optimizer does): the replay reads what the followed forward
    computed, not what the recorded one did."""
    if name in ("dropout", "in-place"):
        torch.manual_seed(0)
        model = (DropNet() if name == "dropout" else InPlaceNet()).double().train()
        batches = [(torch.randn(10, 4, dtype=DT), torch.randint(0, 3, (10,))) for _ in range(3)]
    else:
        model, x, y, xv, yv = model_and_batches(name)
        batches = [(x, y), (xv[: len(x)], yv[: len(x)]), (x.flip(0), y.flip(0))]
    weights = trainable(model)[1]
    tape = TangentTape(weights, program=True)
    torch.manual_seed(5)
    with tape:
        losses = F.cross_entropy(model(batches[0][0]), batches[0][1], reduction="none")
    tape.jvp(directions(model, 0), losses)
    program = tape.freeze()
    assert program is not None and program.kept
    for i, (x, y) in enumerate(batches[1:], start=1):
        with torch.no_grad():
            for w in weights:
                w.add_(0.05 * torch.randn_like(w))
        follow = FollowingTape(weights, program)
        torch.manual_seed(5 + i)
        with follow:
            losses = F.cross_entropy(model(x), y, reduction="none")
        got = follow.jvp(directions(model, i), losses)
        assert follow.stale is None
        want = reference(model, x, y, directions(model, i), 5 + i)
        assert want.abs().max() > 1e-3
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    assert all(ref.value is None for ref in program.kept)  # nothing held between steps


STEP = {"n": 0}  # the step a Departing forward is at (the model's twin reads it too)


class Departing(nn.Module):
    """A forward that departs from its first step's ops at steps in ``at``, in one of five
    ways: another op, another scalar argument, another weight of the same shape, a result of
    another shape (a constant's width, broadcast), or a weight where a buffer was."""

    def __init__(self, how: str, at: set[int]) -> None:
        super().__init__()
        self.how, self.at = how, at
        self.fc1, self.other, self.fc2 = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 3)
        self.bn = nn.BatchNorm1d(8)
        self.P = nn.Parameter(torch.randn(4, 8))
        self.register_buffer("B", torch.randn(4, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        odd = STEP["n"] in self.at
        first = self.other if odd and self.how == "weight" else self.fc1
        h = self.bn(first(x))
        if self.how == "buffer":  # mm(x, B) depends on no weight; mm(x, P) does
            h = h + torch.mm(x, self.P if odd else self.B)
        h = (torch.sigmoid if odd and self.how == "op" else torch.tanh)(h)
        if self.how == "scalar":
            h = h * (3.0 if odd else 2.0)
        if self.how == "shape":  # s + zeros (n, k) is s broadcast k times: k·ṡ once summed
            s = h.sum(1, keepdim=True) + h.new_zeros(len(h), 6 if odd else 8)
            h = h * s.sum(1, keepdim=True)
        return self.fc2(h)


@pytest.mark.parametrize("policy", ["cpu", "cuda"], ids=["graph-kept", "lean"])
@pytest.mark.parametrize("how", ["op", "scalar", "weight", "shape", "buffer"])
def test_a_departing_forward_is_caught_and_its_step_is_exact(how: str, policy: str):
    """Under either policy's tape (the cuda policy's records the forward at its JVP)."""
    torch.manual_seed(0)
    model = Departing(how, at={3}).double().train()
    planner = Planner(engine="tape", policy=policy, direction_first=False)
    g = torch.Generator().manual_seed(1)
    engines = []
    for step in range(1, 6):
        x = torch.randn(9, 4, generator=g, dtype=DT)
        y = torch.randint(0, 3, (9,), generator=g)
        u = directions(model, step)
        STEP["n"] = step
        rec = planner.record(model, x, y, F.cross_entropy)
        assert isinstance(rec.rec, LeanTapeRecording if policy == "cuda" else TapeRecording)
        got = rec.jvp(u)
        engines.append(planner.last_engine)
        want = reference(model, x, y, u, 0)
        assert want.abs().max() > 1e-3
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10, msg=f"step {step}")
    # step 1 recorded, 2 recorded as a program, 3 departed from it (dual numbers), 4 recorded
    # as a program again, 5 followed
    assert engines == ["tape", "tape", "dual_twin", "tape", "tape"]
    assert planner.describe()["tape_programs"] == {"signatures": 1, "followed": 1, "stale": 1}


def test_a_model_that_keeps_departing_is_recorded_in_full():
    torch.manual_seed(0)
    model = Departing("scalar", at=set(range(2, 40, 2))).double().train()
    planner = Planner(engine="tape", policy="cpu")
    x, y = torch.randn(9, 4, dtype=DT), torch.randint(0, 3, (9,))
    for step in range(1, 2 * MAX_STALE + 4):
        STEP["n"] = step
        got = planner.record(model, x, y, F.cross_entropy).jvp(directions(model, step))
        assert_equal(got, reference(model, x, y, directions(model, step), 0))
    programs = planner.describe()["tape_programs"]
    assert programs["stale"] == MAX_STALE and programs["signatures"] == 0
    assert planner.jvps == {"tape": 2 * MAX_STALE + 3 - MAX_STALE, "dual_twin": MAX_STALE}


@pytest.mark.parametrize("policy", ["cpu", "cuda"], ids=["graph-kept", "lean"])
def test_mwnet_training_follows_its_program_and_equals_unrolled(policy: str):
    """MW-Net's tape under both policies (the lean one records the real forward after the
    meta pass), a batch of another size in between (a second signature): every step equal to
    the unrolled reference, and every forward after each signature's second followed."""
    model, x, y, xv, yv = model_and_batches("resnet", n=8)
    sizes = [8, 8, 5, 8, 5, 8]
    results = {}
    for mode in ("fast", "unrolled"):
        torch.manual_seed(1)
        kw = {"engine": "tape", "engine_policy": policy} if mode == "fast" else {}
        method = MWNet(hidden=5, meta_grad=mode, **kw)
        trained = copy.deepcopy(model)
        method.setup(model=trained, device=torch.device("cpu"))
        opt = torch.optim.SGD(trained.parameters(), lr=0.1)
        for n in sizes:
            out = method.step(StepInputs(trained, x[:n], y[:n], xv, yv, 0.1, F.cross_entropy))
            opt.zero_grad()
            (out.weights.detach() * out.losses).sum().backward()
            opt.step()
        results[mode] = (trained, method)
    for a, b in zip(
        results["fast"][0].state_dict().values(),
        results["unrolled"][0].state_dict().values(),
        strict=True,
    ):
        assert_equal(a, b)
    planner = results["fast"][1].metastep.planner
    assert planner.jvps == {"tape": len(sizes)}
    # each size: its first forward recorded, its second recorded as a program, then followed
    assert planner.describe()["tape_programs"] == {"signatures": 2, "followed": 2, "stale": 0}


def test_a_followed_jvp_of_another_tensor_is_stale():
    """A program replays the tangent of the tensor its recording was asked for; asked for
    another, a followed tape refuses (the recorded one would answer, by its own ids)."""
    w = torch.randn(4, 3, dtype=DT, requires_grad=True)
    x, d = torch.randn(5, 4, dtype=DT), torch.randn(4, 3, dtype=DT)
    tape = TangentTape([w], program=True)
    with tape:
        out = torch.tanh(x @ w).sum(1)
    tape.jvp([d], out)
    program = tape.freeze()
    for asked in ("intermediate", "output"):
        follow = FollowingTape([w], program)
        with follow:
            h = x @ w
            out = torch.tanh(h).sum(1)
        if asked == "intermediate":
            with pytest.raises(Stale, match="another tensor"):
                follow.jvp([d], h)
        else:
            want = torch.func.jvp(lambda v: torch.tanh(x @ v).sum(1), (w.detach(),), (d,))[1]
            torch.testing.assert_close(follow.jvp([d], out), want, rtol=0, atol=1e-12)


def test_split_tells_a_tensor_from_none_in_an_index_list():
    """x[:, i, j] and x[i, :, j] are aten.index(x, [None, i, j]) and (x, [i, None, j]): the
    same tensors, in other places; what a program compares must differ."""
    x, i, j = torch.zeros(3, 3, 3), torch.tensor([0, 1]), torch.tensor([1, 2])
    a = split((x, [None, i, j]), {})
    b = split((x, [i, None, j]), {})
    assert a[0] == [x, i, j] and b[0] == [x, i, j]
    assert a[1] != b[1]
    assert split((x, [None, i, j]), {"k": 2})[1] != split((x, [None, i, j]), {"k": 3})[1]


def test_a_signature_seen_once_makes_no_program():
    """A program costs its recording 10–30 %: a planner that records a signature once (a
    functional call's) makes none; the second forward of a signature is recorded as one."""
    model, x, y, _, _ = model_and_batches("resnet")
    planner = Planner(engine="tape", policy="cpu")
    counts = []
    for _ in range(3):
        planner.record(model, x, y, F.cross_entropy, update=False).jvp(directions(model, 0))
        counts.append(dict(planner.describe()["tape_programs"]))
    assert [c["signatures"] for c in counts] == [0, 1, 1]
    assert [c["followed"] for c in counts] == [0, 0, 1]
    tape = TangentTape(trainable(model)[1])  # no program asked for
    with tape:
        losses = F.cross_entropy(model(x), y, reduction="none")
    tape.jvp(directions(model, 0), losses)
    assert tape.error is None and tape.freeze() is None
