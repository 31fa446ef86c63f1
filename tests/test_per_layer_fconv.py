"""The per-layer path on functional convolutions: ``F.conv1d/2d/3d`` called by a module of the
user's own on its own weight and bias (no ``nn.Conv*``), with stride, padding (numbers,
``"same"``, ``"valid"``), dilation and groups, a frozen kernel with a trainable bias, and a
layer small enough to keep per-example gradients. In float64, against per-example gradients
taken one example at a time and against the unrolled meta step, the engine checked to be the
per-layer one (no silent fallback); a mutation check (the calls' terms dropped, the comparison
fails); and the refusal of asymmetric ``"same"`` padding, the step then exact on the tape.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reweight.jvp import per_layer as ghost

from .test_per_layer_shared import (
    assert_each_dropped_call_fails,
    assert_fast_takes_the_path_and_equals_unrolled,
    assert_per_example,
    assert_refused_and_exact_on_tape,
)

DT = torch.float64


class FunConv(nn.Module):
    """A convolution of the user's own: its weight and bias applied by ``F.conv*``."""

    def __init__(self, cin, cout, k, nd, frozen=False, bias=True, **options) -> None:
        super().__init__()
        shape = (cout, cin // options.get("groups", 1), *[k] * nd)
        weight = torch.randn(shape, dtype=DT) * 0.4
        self.weight = nn.Parameter(weight, requires_grad=not frozen)
        self.bias = nn.Parameter(torch.randn(cout, dtype=DT) * 0.3) if bias else None
        self.fn = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
        self.options = options

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, self.weight, self.bias, **self.options)


class Net(nn.Module):
    def __init__(self, *convs: nn.Module, features: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(*convs)
        self.head = nn.Linear(features, 3).to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c in self.convs:
            x = torch.tanh(c(x))
        return self.head(x.flatten(1))


def _net(*convs: nn.Module, shape: tuple[int, ...]):
    torch.manual_seed(0)
    model = Net(*convs, features=1).to(DT)
    with torch.no_grad():
        features = model.convs(torch.zeros(1, *shape, dtype=DT)).numel()
    model.head = nn.Linear(features, 3).to(DT)

    def batch(n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, *shape, generator=g, dtype=DT)
        return x, torch.randint(0, 3, (n,), generator=g)

    return model, batch


MODELS = {
    # stride, dilation and "same" padding (odd kernel: both sides alike)
    "conv1d": lambda: _net(
        FunConv(3, 4, 3, 1, stride=2, dilation=2, padding=2),
        FunConv(4, 4, 5, 1, padding="same"),
        shape=(3, 17),
    ),
    # groups, a frozen kernel with a trainable bias, a numeric padding per dim
    "conv2d": lambda: _net(
        FunConv(4, 6, 3, 2, stride=2, padding=(1, 0), groups=2),
        FunConv(6, 4, 3, 2, frozen=True, padding=1),
        shape=(4, 7, 6),
    ),
    # a layer with fewer weights than outputs per batch: it keeps per-example gradients
    "conv3d": lambda: _net(
        FunConv(2, 3, 2, 3, padding="valid", bias=False),
        FunConv(3, 2, 3, 3, stride=(1, 2, 2), padding=1, groups=1),
        shape=(2, 4, 5, 5),
    ),
}


def _convs(recs: list[ghost.GhostRecord]) -> list:
    return [c for c in recs[0].calls if c.module is None and c.kind == "conv"]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_functional_convolutions_give_per_example_gradients(name: str):
    """Every F.conv call is read as a convolution (none refused, none missed), and the record's
    JVP and weighted gradients equal those of one-example-at-a-time gradients."""
    model, batch = MODELS[name]()
    x, y = batch(5, 1)
    recs = assert_per_example(model, x, y)
    calls = _convs(recs)
    assert len(calls) == 2 and all(c.problem is None for c in calls)
    if name == "conv3d":  # the small layer's per-example gradients, the other's input and δ
        assert [c.per_example is not None for c in calls] == [True, False]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_l2rw_and_mwnet_take_the_path_and_equal_unrolled(name: str):
    assert_fast_takes_the_path_and_equals_unrolled(*MODELS[name]())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_mutation_a_dropped_convolution_fails_the_comparison(name: str):
    """Without a functional convolution's call in the record, the JVP and the weighted
    gradient of its weights are off: the comparisons above would fail."""
    model, batch = MODELS[name]()
    x, y = batch(6, 1)
    assert_each_dropped_call_fails(model, x, y, _convs)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
def test_asymmetric_same_padding_is_refused_and_the_step_stays_exact():
    """An even kernel under "same" pads one side more than the other, which the path's
    convolutions do not model: refused with the reason, and the step exact on the tape."""
    model, batch = _net(FunConv(2, 3, 4, 2, padding="same"), shape=(2, 5, 5))
    (x, y), (xv, yv) = batch(6, 1), batch(5, 2)
    assert_refused_and_exact_on_tape(model, x, y, xv, yv, r"F.conv2d: asymmetric 'same' padding")
