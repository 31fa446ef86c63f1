"""Edges of the per-layer path (reweight.jvp.per_layer, through the planner), in float64:

- a dilated ``padding="same"`` convolution: symmetric (every ``dilation * (kernel - 1)`` even)
  it is read per layer, exactly; asymmetric in any dimension it is ruled out by structure, and
  the MW-Net step falls back to an exact engine rather than breaking;
- the check that keeps a model whose examples interact slightly off the path: its JVPs must
  agree to rounding (√eps of the largest entry), not to a looser tolerance;
- a model that writes a buffer in its forward every step is checked once, not every step.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reweight import L2RW, l2rw_eps_grad
from reweight.jvp import per_layer as ghost
from reweight.jvp import planner
from reweight.meta import trainable, twins
from reweight.metastep import StepInputs

from .test_fast import assert_equal
from .test_ghost import DT, assert_checked_step, per_example_grads, records


def dilated_same(kernel, dilation) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, kernel, padding="same", dilation=dilation),
        nn.Tanh(),
        nn.Conv2d(4, 5, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(20, 3),
    )


def batches(model: nn.Module, shape=(2, 9, 10), n: int = 6, mix=None):
    torch.manual_seed(0)
    model = model.to(DT)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, *shape, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)
    xv = torch.randn(n + 1, *shape, generator=g, dtype=DT)
    return model, x, y, xv, torch.randint(0, 3, (n + 1,), generator=g)


SYMMETRIC = [(3, 2), (2, 2), ((2, 3), (2, 1)), ((5, 3), (3, 4))]
ASYMMETRIC = [(4, 3), ((2, 3), (1, 1)), ((3, 2), (2, 3)), ((3, 4), (2, 1))]


@pytest.mark.parametrize(("kernel", "dilation"), SYMMETRIC, ids=str)
def test_a_symmetric_dilated_same_convolution_is_read_per_layer_exactly(kernel, dilation):
    model, x, y, xv, yv = batches(dilated_same(kernel, dilation))
    _, weights = trainable(model)
    assert len(ghost.ghost_layers(model, weights)) == 3
    per = per_example_grads(model, x, y)
    g = torch.Generator().manual_seed(2)
    u = [torch.randn(w.shape, generator=g, dtype=DT) for w in weights]
    want = sum(p.flatten(1) @ d.flatten() for p, d in zip(per, u, strict=True))
    assert_equal(ghost.jvp_of(records(model, x, y), u), want)
    # the MW-Net step takes the path (checked on this step) and equals the unrolled one
    assert_checked_step(model, x, y, xv, yv, verdict="ok", engine="per_layer", nonzero=True)


# torch's own note on the zero-padded copy it makes for these convolutions (warned once)
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")
@pytest.mark.parametrize(("kernel", "dilation"), ASYMMETRIC, ids=str)
def test_an_asymmetric_dilated_same_convolution_falls_back(kernel, dilation):
    model, x, y, xv, yv = batches(dilated_same(kernel, dilation))
    with pytest.raises(ghost.Ineligible, match=r"0: asymmetric 'same' padding"):
        ghost.ghost_layers(model, trainable(model)[1])
    assert_checked_step(model, x, y, xv, yv, verdict="no", engine="tape", nonzero=True)


# -- the agreement check ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("scale", [1.0, 2.0**20, 2.0**-20])
def test_agree_is_rounding_of_the_largest_entry(dtype: torch.dtype, scale: float):
    """Apart by 1/4 of √eps·max: agree; by 4 × √eps·max: not, whichever side is larger."""
    tol = math.sqrt(torch.finfo(dtype).eps)
    a = torch.tensor([1.0, -0.5, 0.25, 0.0, -0.125], dtype=dtype) * scale
    for factor, agrees in ((0.25, True), (4.0, False)):
        b = a.clone()
        b[2] += factor * tol * scale
        assert ghost.agree(a, b) is agrees, (factor, scale)
        assert ghost.agree(b, a) is agrees, (factor, scale)


class SlightlyMixes(nn.Module):
    """Subtracts a small multiple of the batch mean between its layers: each example's loss
    depends a little (relatively ~1e-5) on the others'. No BatchNorm: only the check sees it."""

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c
        self.a, self.b = nn.Linear(5, 7), nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(torch.tanh(h - self.c * h.mean(0, keepdim=True)))


def test_slight_interaction_between_examples_keeps_the_model_off_the_path():
    model, x, y, xv, yv = batches(SlightlyMixes(1e-5), shape=(5,))
    # the per-layer JVP is off by far more than rounding and far less than 1 %
    _, weights = trainable(model)
    g = torch.Generator().manual_seed(2)
    u = [torch.randn(w.shape, generator=g, dtype=DT) for w in weights]
    exact = torch.func.jvp(
        lambda *ws: torch.nn.functional.cross_entropy(
            torch.func.functional_call(model, dict(zip(trainable(model)[0], ws, strict=True)), x),
            y,
            reduction="none",
        ),
        tuple(w.detach() for w in weights),
        tuple(u),
    )[1]
    approx = ghost.jvp_of(records(model, x, y), u)
    gap = float((approx - exact).abs().max() / exact.abs().max())
    assert 1e-7 < gap < 1e-3, gap
    assert_checked_step(model, x, y, xv, yv, verdict="no", engine="tape")


class Counting(nn.Module):
    """Writes a buffer in every training forward (the examples seen so far), as a running
    statistic of the user's own would."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("seen", torch.zeros((), dtype=DT))
        self.body = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen += len(x)
        return self.body(x)


def test_a_buffer_written_every_step_does_not_repeat_the_check(monkeypatch):
    """The per-layer path is checked once per (model, structure, mode): what a buffer holds is
    neither, so 4 L2RW steps of a model that writes one in its forward check once, and each
    step runs per layer and equals the unrolled one."""
    checks = []
    real = planner._agrees
    monkeypatch.setattr(planner, "_agrees", lambda *a, **k: checks.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model = Counting().to(DT)
    method = L2RW()
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(6, 5, generator=g, dtype=DT), torch.randint(0, 3, (6,), generator=g)
        xv, yv = torch.randn(5, 5, generator=g, dtype=DT), torch.randint(0, 3, (5,), generator=g)
        want = l2rw_eps_grad(model, x, y, xv, yv, 0.5, meta_grad="unrolled")
        out = method.metastep(StepInputs(model, x, y, xv, yv, 0.5, F.cross_entropy))
        assert method.metastep.planner.last_engine == "per_layer"
        assert float(want.abs().max()) > 1e-3
        assert_equal(out.c, want)
    assert len(checks) == 1
    assert float(model.seen) >= 4 * 6  # the forward did write it, every step


def test_a_buffer_written_every_step_refreshes_the_twin_without_rebuilding_it(monkeypatch):
    """The twin's copy of a buffer the model writes follows it (a fresh tensor each time) and
    the twin is built once; a buffer moved to another dtype rebuilds it."""
    built = []
    real = twins.to_meta
    monkeypatch.setattr(twins, "to_meta", lambda m: built.append(1) or real(m))
    torch.manual_seed(0)
    model = Counting().to(DT)
    cache = twins.TwinCache()
    copies = []
    for _ in range(3):
        model(torch.randn(4, 5, dtype=DT))  # writes model.seen
        twin = cache.bound(model)
        assert torch.equal(twin.seen, model.seen) and twin.seen is not model.seen
        copies.append(twin.seen)
    assert len(built) == 1
    assert [float(c) for c in copies] == [4.0, 8.0, 12.0]  # each copy kept its value
    model.seen = model.seen.float()  # another dtype: a rebuild
    assert cache.bound(model).seen.dtype == torch.float32
    assert len(built) == 2


def test_a_buffer_tied_under_two_names_stays_tied_in_the_refreshed_twin():
    """One tensor registered as a buffer of two modules: after a write the twin's fresh copy is
    one tensor under both names, as a rebuild's deepcopy would make it."""

    class Shift(nn.Module):
        def __init__(self, shift: torch.Tensor) -> None:
            super().__init__()
            self.register_buffer("shift", shift)

    shared = torch.zeros(3, dtype=DT)
    model = nn.Sequential(Shift(shared), Shift(shared))
    cache = twins.TwinCache()
    cache.bound(model)
    model[0].shift += 1  # written through one name: the other sees it too
    twin = cache.bound(model)
    assert twin[0].shift is twin[1].shift
    assert twin[0].shift is not shared and torch.equal(twin[0].shift, shared)
