"""The tangent tape's rule for ``add`` / ``sub`` with ``alpha`` (reweight.jvp.rules): a model
that writes ``torch.sub(a, b, alpha=...)``, ``torch.add(..., alpha=...)`` or their in-place
forms gets the JVP ``torch.func.jvp`` computes, in float64; and the fast L2RW meta-gradient of
such a model equals the unrolled one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp

from reweight.functional import l2rw_eps_grad
from reweight.jvp.tape import TangentTape
from reweight.meta import trainable
from reweight.metastep import MetaStep

DT = torch.float64


class AlphaNet(nn.Module):
    """Every form of add/sub with alpha: both operands with tangents, only ``other`` with one
    (``self`` a constant), in-place on an activation, and a negative alpha."""

    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.alpha = alpha
        self.a, self.b = nn.Linear(4, 6), nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.a(x), self.b(x)
        h = torch.sub(a, b, alpha=self.alpha)  # d = da - alpha * db
        h = torch.add(h, torch.tanh(b), alpha=-0.5 * self.alpha)
        h = torch.sub(torch.ones_like(h), h, alpha=self.alpha)  # self has no tangent
        h = 2.0 * torch.tanh(h)  # a fresh tensor: tanh keeps its own output for backward
        h.add_(a, alpha=self.alpha)  # in place, on an activation
        h.sub_(torch.sin(b), alpha=0.25 * self.alpha)
        return self.head(h)


def reference_jvp(model, weights, names, direction, x, y) -> torch.Tensor:
    def losses(*ws):
        out = functional_call(model, dict(zip(names, ws, strict=True)), (x,))
        return F.cross_entropy(out, y, reduction="none")

    return jvp(losses, tuple(w.detach() for w in weights), tuple(direction))[1]


@pytest.mark.parametrize("alpha", [2.5, -0.75, 1.0])
def test_tape_jvp_of_add_and_sub_with_alpha_equals_torch_func(alpha: float):
    torch.manual_seed(0)
    model = AlphaNet(alpha).to(DT)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 4, generator=g, dtype=DT), torch.randint(0, 3, (8,), generator=g)
    names, weights = trainable(model)
    direction = [torch.randn(w.shape, generator=g, dtype=DT) for w in weights]
    tape = TangentTape(weights)
    with tape:
        losses = F.cross_entropy(model(x), y, reduction="none")
    assert tape.error is None
    got = tape.jvp(direction, losses)
    want = reference_jvp(model, weights, names, direction, x, y)
    assert want.abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_fast_l2rw_through_the_tape_equals_unrolled_for_alpha_ops():
    """The whole meta step, on the tape (forced): what a user of such a model gets."""
    torch.manual_seed(0)
    model = AlphaNet(2.5).to(DT)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 4, generator=g, dtype=DT), torch.randint(0, 3, (8,), generator=g)
    xv, yv = torch.randn(6, 4, generator=g, dtype=DT), torch.randint(0, 3, (6,), generator=g)
    want = l2rw_eps_grad(model, x, y, xv, yv, 0.5, meta_grad="unrolled")
    step = MetaStep(at_zero=True, engine="tape")
    got = l2rw_eps_grad(model, x, y, xv, yv, 0.5, step=step)
    assert step.planner.jvps == {"tape": 1}
    assert want.abs().max() > 1e-4
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
