"""The tape's BatchNorm tangent in training mode by both of its routes: torch's fused backward
kernel (the input's tangent has the input's dtype, as in a model's replay) and the per-channel
formula it falls back to (another dtype), each checked to be the route taken and against an
independent reference: ``torch.func.jvp`` in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import jvp
from torch.utils._python_dispatch import TorchDispatchMode

from reweight.jvp.tape import TangentTape

aten = torch.ops.aten


class _Ops(TorchDispatchMode):
    """The aten ops run under it, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _rand(*shape: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_fused_kernel_gives_the_tangent(affine, channels_last):
    """Same dtype: native_batch_norm_backward is the route (no per-channel means are taken),
    and the tangent is torch.func.jvp's to float64 rounding, γ̇ and β̇ included."""
    x = _rand(6, 3, 4, 5, seed=0)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = _rand(3, seed=1) + 2.0, _rand(3, seed=2)
    dx, dw, db = _rand(6, 3, 4, 5, seed=3), _rand(3, seed=4), _rand(3, seed=5)
    seeds = [t.detach().requires_grad_() for t in ((x, w, b) if affine else (x,))]
    dirs = [dx, dw, db] if affine else [dx]

    def f(x, w=None, b=None):
        return F.batch_norm(x * 1.0, None, None, w, b, True, eps=1e-3)

    tape = TangentTape(seeds)
    with tape:
        out = f(*seeds)
    ops = _Ops()
    with ops:
        got = tape.jvp(dirs, out)
    assert "native_batch_norm_backward" in ops.ops
    assert "mean" not in ops.ops  # the formula's per-channel means are not taken
    want = jvp(f, tuple(s.detach() for s in seeds), tuple(dirs))[1]
    assert want.abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_another_dtype_takes_the_formula():
    """A float64 tangent on a float32 input, which the fused kernel would refuse: the per-channel
    formula, against torch.func.jvp at the input in float64 (float32's rounding of x and the
    statistics bounds the difference)."""
    x32 = _rand(6, 3, 4, seed=0, dtype=torch.float32)
    w, b = _rand(3, seed=1, dtype=torch.float32) + 2.0, _rand(3, seed=2, dtype=torch.float32)
    dx = _rand(6, 3, 4, seed=3)
    seeds = [x32.detach().requires_grad_(), w.detach().requires_grad_()]
    dw = _rand(3, seed=4, dtype=torch.float32)

    def f(x, w):
        return F.batch_norm(x * 1.0, None, None, w, b.to(x.dtype), True, eps=1e-3)

    tape = TangentTape(seeds)
    with tape:
        out = f(*seeds)
    ops = _Ops()
    with ops:
        got = tape.jvp([dx, dw], out)
    assert "native_batch_norm_backward" not in ops.ops and "mean" in ops.ops
    want = jvp(f, (x32.double(), w.double()), (dx, dw.double()))[1]
    assert want.abs().max() > 1e-2
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
