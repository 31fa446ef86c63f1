"""The per-layer engine (``reweight.jvp.per_layer``) against independent references, in float64.

Its JVPs and weighted gradients are checked against per-example gradients from
``torch.func`` (vmap of grad), one layer type and layout at a time; the MW-Net step that uses
it against the unrolled double backward; and the check that keeps models which mix the
examples of a batch off it.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import reweight.metastep
from reweight import L2RW, MWNet
from reweight.jvp import per_layer as ghost
from reweight.jvp.base import Forward
from reweight.jvp.dual import dual_twin_jvp
from reweight.meta import TwinCache, trainable
from reweight.methods import StepInputs
from reweight.models import build_model

from .test_fast import REPLAYS, assert_equal, model_and_batches, mwnet_pair

DT = torch.float64


class Twice(nn.Module):
    """One linear layer called twice per forward (its weights get two calls' gradients)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))


class Sequence3d(nn.Module):
    """Linear layers on (B, T, features) inputs, as in a per-token head."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x))).mean(1)


def conv_net(dims: int, **conv) -> nn.Module:
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[dims]
    return nn.Sequential(
        cls(2, 4, 3, **conv), nn.Tanh(), cls(4, 6, 3, padding=1), nn.ReLU(), pool(2),
        nn.Flatten(), nn.Linear(6 * 2**dims, 3),
    )  # fmt: skip


def frozen_bias() -> nn.Module:
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    model[0].bias.requires_grad_(False)
    return model


CASES = {
    # name: (model factory, input shape); the first convolutions here keep per-example
    # gradients (few weights, a large output), the others their input and output gradient
    "mlp": (lambda: nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)), (5,)),
    "lenet": (lambda: build_model("lenet", num_classes=3, in_channels=1), (1, 28, 28)),
    "conv1d-same": (lambda: conv_net(1, padding="same"), (2, 12)),
    "conv2d-stride-dilation": (lambda: conv_net(2, stride=2, dilation=2, padding=2), (2, 11, 9)),
    "conv2d-groups-nobias": (lambda: conv_net(2, groups=2, bias=False), (2, 8, 8)),
    "conv3d-valid": (lambda: conv_net(3, padding="valid"), (2, 6, 6, 6)),
    "linear-3d": (Sequence3d, (7, 4)),
    "called-twice": (Twice, (4,)),
    "frozen-bias": (frozen_bias, (5,)),
}


def case(name: str, n: int = 6, channels_last: bool = False):
    torch.manual_seed(0)
    factory, shape = CASES[name]
    model = factory().to(DT)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, *shape, generator=g, dtype=DT)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return model, x, torch.randint(0, 3, (n,), generator=g)


def per_example_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """(B, *weight.shape) per trainable weight: the reference, by torch.func."""
    names, weights = trainable(model)
    frozen = {k: v for k, v in model.named_parameters() if not v.requires_grad}

    def loss(params: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, params | frozen, (xi[None],))
        return F.cross_entropy(out, yi[None])

    params = {n: w.detach() for n, w in zip(names, weights, strict=True)}
    per = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return [per[n] for n in names]


def records(model, x, y, slices: int = 1) -> list[ghost.GhostRecord]:
    _, weights = trainable(model)
    layers = ghost.ghost_layers(model, weights)
    out = []
    for xs, ys in zip(x.tensor_split(slices), y.tensor_split(slices), strict=True):
        with ghost.recording(model, layers, len(ys)) as watch:
            losses = F.cross_entropy(model(xs), ys, reduction="none")
        out.append(ghost.finish(weights, watch, losses))
    return out


@pytest.mark.parametrize("slices", [1, 4])
@pytest.mark.parametrize("name", sorted(CASES))
def test_jvp_and_weighted_gradients_equal_per_example_gradients(name: str, slices: int):
    model, x, y = case(name)
    _, weights = trainable(model)
    per = per_example_grads(model, x, y)
    recs = records(model, x, y, slices)
    g = torch.Generator().manual_seed(2)
    u = [torch.randn(w.shape, generator=g, dtype=DT) for w in weights]
    want = sum(p.flatten(1) @ d.flatten() for p, d in zip(per, u, strict=True))
    assert_equal(ghost.jvp_of(recs, u), want)
    # the losses' backward, for two seed vectors from one record (as MW-Net's two updates)
    losses = ghost.losses_of(recs)
    assert_equal(losses.detach(), F.cross_entropy(model(x), y, reduction="none").detach())
    for k in range(2):
        seeds = torch.rand(len(y), generator=g, dtype=DT) - 0.3 * k
        got = torch.autograd.grad((seeds * losses).sum(), weights, retain_graph=True)
        for a, p in zip(got, per, strict=True):
            assert_equal(a, torch.einsum("b,b...->...", seeds, p))


def test_the_first_convolution_keeps_per_example_gradients():
    model, x, y = case("lenet")
    (rec,) = records(model, x, y)
    kept = [c.per_example is not None for c in rec.calls]
    assert kept == [True, False, False, False, False]  # 1→16 channels, 5×5: 416 numbers each
    assert rec.calls[0].x is None and rec.calls[0].g is None


def test_channels_last_lenet():
    model, x, y = case("lenet", channels_last=True)
    _, weights = trainable(model)
    per = per_example_grads(model, x, y)
    (rec,) = records(model, x, y)
    assert rec.calls[1].x.is_contiguous(memory_format=torch.channels_last)
    u = [torch.ones_like(w) for w in weights]
    assert_equal(rec.jvp(u), sum(p.flatten(1).sum(1) for p in per))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), r"BatchNorm in training"),
        (lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval(), r"BatchNorm1d\) has"),
        (lambda: nn.Sequential(nn.Linear(3, 4), nn.PReLU()), r"PReLU\) has trainable weights"),
        (lambda: nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), r"padding_mode"),
        (lambda: nn.Conv2d(2, 2, 4, padding="same"), r"asymmetric 'same' padding"),
    ],
)
def test_structures_the_path_does_not_cover(make, match: str):
    model = make().to(DT)
    with pytest.raises(ghost.Ineligible, match=match):
        ghost.ghost_layers(model, trainable(model)[1])


def test_eval_mode_batchnorm_without_weights_is_covered():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, affine=False), nn.Linear(4, 2))
    model.eval()
    assert len(ghost.ghost_layers(model, trainable(model)[1])) == 2


# ---------------------------------------------------------------------------------------------
# MW-Net's fast step on the per-layer path


def is_per_layer(losses: torch.Tensor) -> bool:
    return type(losses.grad_fn).__name__ == "_GhostLossesBackward"


@pytest.mark.parametrize("chunks", [1, 3, "auto"])
@pytest.mark.parametrize("replay", ["plain", "nesterov"])
@pytest.mark.parametrize("name", ["lenet", "mlp-plain"])
def test_mwnet_per_layer_step_equals_unrolled(name: str, replay: str, chunks):
    model, x, y, xv, yv = plain_model_and_batches(name)
    got, want, method = mwnet_pair(
        model,
        x,
        y,
        xv,
        yv,
        normalize="sum",
        replay=REPLAYS[replay],
        warm=True,
        chunks=chunks,
        engine="per_layer",
    )
    assert method.metastep.planner.jvps == {"per_layer": 1}
    for a, b in zip(got, want, strict=True):
        assert b.abs().max() > 0
        assert_equal(a, b)


def plain_model_and_batches(name: str):
    if name != "mlp-plain":
        return model_and_batches(name)
    model, x, y = case("mlp", n=6)
    g = torch.Generator().manual_seed(3)
    return model, x, y, torch.randn(7, 5, generator=g, dtype=DT), torch.randint(0, 3, (7,))


def mwnet_method(model, chunks="auto", **engine) -> MWNet:
    torch.manual_seed(1)
    method = MWNet(hidden=5, normalize="sum", meta_chunks=chunks, **engine)
    method.setup(model=model, device=torch.device("cpu"))
    return method


def mwnet_step(method: MWNet, model, x, y, xv, yv):
    return method.meta_grads(StepInputs(model, x, y, xv, yv, 0.5, F.cross_entropy))


def test_the_first_step_checks_the_path_and_computes_what_later_steps_do():
    model, x, y, xv, yv = model_and_batches("lenet")
    method = mwnet_method(model)
    assert method.metastep.planner.per_layer_verdict(model) == "check"
    assert method.metastep.planner.plan(model, torch.device("cpu")).reason.startswith(
        "cpu policy: per-layer path, checked on this step"
    )
    first, losses, _ = mwnet_step(method, model, x, y, xv, yv)
    assert is_per_layer(losses) and method.metastep.planner.per_layer_verdict(model) == "ok"
    second, losses, _ = mwnet_step(method, model, x, y, xv, yv)
    assert is_per_layer(losses) and method.metastep.planner.jvps == {"per_layer": 2}
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)  # the checking step's numbers are the path's own
    # a change of mode is a new structure: checked again
    model.eval()
    assert method.metastep.planner.per_layer_verdict(model) == "check"


def test_auto_slices_the_batch_under_the_cuda_policy_only(monkeypatch: pytest.MonkeyPatch):
    """``meta_chunks="auto"``: the cpu policy's least time is one piece; the cuda policy's least
    memory is two slices on the per-layer path, one where BatchNorm couples the examples or
    another engine records the batch."""
    seen = []
    meta_gradient = reweight.metastep.meta_gradient

    def spy(*args):
        seen.append(args[-1])
        return meta_gradient(*args)

    monkeypatch.setattr(reweight.metastep, "meta_gradient", spy)
    for policy in ("cpu", "cuda"):
        model, x, y, xv, yv = model_and_batches("lenet")
        method = mwnet_method(model, engine_policy=policy)
        for _ in range(2):
            mwnet_step(method, model, x, y, xv, yv)
        assert method.metastep.planner.jvps == {"per_layer": 2}
    assert seen == [1, 1, 2, 2]
    model, x, y, xv, yv = model_and_batches("resnet")  # BatchNorm: one piece, no error
    mwnet_step(mwnet_method(model, engine_policy="cuda"), model, x, y, xv, yv)
    model, x, y, xv, yv = model_and_batches("lenet")  # the tape forced: one piece
    mwnet_step(mwnet_method(model, engine="tape", engine_policy="cuda"), model, x, y, xv, yv)
    assert seen == [1, 1, 2, 2, 1, 1]


def test_dropout_in_slices_keeps_the_path(caplog: pytest.LogCaptureFixture):
    """MW-Net's two slices (``"auto"``'s under the cuda policy) draw a dropout model's masks
    per slice. The first step's check compares the per-layer JVP with dual numbers in the same
    slices, so the model keeps the path (it was refused, as if its examples interacted, while
    the reference drew one mask for the whole batch)."""
    torch.manual_seed(0)
    drop = [nn.Dropout(0.5), nn.Dropout(0.5)]  # two: one piece draws them in another order
    model = nn.Sequential(nn.Linear(5, 16), drop[0], nn.Linear(16, 16), drop[1], nn.Linear(16, 3))
    model = model.to(DT)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 5, generator=g, dtype=DT), torch.randint(0, 3, (8,), generator=g)
    xv, yv = torch.randn(7, 5, generator=g, dtype=DT), torch.randint(0, 3, (7,), generator=g)
    with caplog.at_level(logging.WARNING, logger="reweight.jvp.planner"):
        method = mwnet_method(model, chunks=2)
        for _ in range(2):
            _, losses, _ = mwnet_step(method, model, x, y, xv, yv)
    assert "does not fit" not in caplog.text
    assert method.metastep.planner.per_layer_verdict(model) == "ok"
    assert is_per_layer(losses) and method.metastep.planner.jvps == {"per_layer": 2}
    # the reference in one piece would draw other masks: the slices are what the check needs
    _, weights = trainable(model)
    direction = [torch.randn(w.shape, generator=g, dtype=DT) for w in weights]
    fwd = Forward(model, weights, x, y, F.cross_entropy, lambda: TwinCache().bound(model), False)
    layers = ghost.ghost_layers(model, weights)
    with fwd.rng.replay():
        sliced = ghost.PerLayerRecording(fwd, layers, chunks=2).jvp(direction)
    assert_equal(sliced, dual_twin_jvp(fwd, direction, chunks=2))
    assert not ghost.agree(sliced, dual_twin_jvp(fwd, direction))


def l2rw_update(model: nn.Module, verdict: str, x, y, xv, yv) -> tuple[torch.Tensor, list]:
    """L2RW's weights and the real update's parameters after one step, as the Trainer makes
    it, by a planner whose per-layer verdict on ``model`` is ``verdict`` before the step
    (``"check"``: this step checks the path; ``"ok"``: a step on another batch checked it)."""
    method = L2RW()
    method.setup(model=model, device=torch.device("cpu"))
    if verdict == "ok":  # the step leaves a model without BatchNorm as it was
        method.step(StepInputs(model, xv, yv, x, y, 0.1, F.cross_entropy))
    assert method.metastep.planner.per_layer_verdict(model) == verdict
    model.zero_grad(set_to_none=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    out = method.step(StepInputs(model, x, y, xv, yv, 0.1, F.cross_entropy, optimizer))
    (out.weights * out.losses).sum().backward()
    optimizer.step()
    assert method.metastep.planner.per_layer_verdict(model) == "ok"
    assert method.metastep.planner.last_engine == "per_layer"
    return out.weights.detach(), [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("batch", ["fresh", "fitted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_a_checking_step_computes_what_an_unchecked_step_does(dtype: torch.dtype, batch: str):
    """One L2RW step and update of LeNet from one state, checked on this step or before: the
    same weights and parameters, bit for bit (a resumed run checks on its first step, which in
    the uninterrupted run was an unchecked one). "fitted": a batch of one class the model
    already predicts at float32 losses of 1e-7..1e-6 (on MNIST 4-vs-9 such a batch once failed
    the check, whose loss-based JVPs were then below rounding, and sent the run to the tape)."""
    model, x, y, xv, yv = model_and_batches("lenet")
    if batch == "fitted":
        with torch.no_grad():
            model.classifier[-1].bias.copy_(torch.tensor([0.0, 10.0]))
        y, yv = torch.ones_like(y), torch.ones_like(yv)  # a clean batch of that class too
    model, x, xv = model.to(dtype), x.to(dtype), xv.to(dtype)
    start = copy.deepcopy(model.state_dict())
    losses = F.cross_entropy(model(x), y, reduction="none")
    assert (losses.max() < 1e-5) == (batch == "fitted")
    checked = l2rw_update(model, "check", x, y, xv, yv)
    model.load_state_dict(start)
    unchecked = l2rw_update(model, "ok", x, y, xv, yv)
    assert checked[0].abs().max() > 0 and not torch.equal(checked[1][0], start["features.0.weight"])
    assert torch.equal(checked[0], unchecked[0])
    for a, b in zip(checked[1], unchecked[1], strict=True):
        assert torch.equal(a, b)


class MixesExamples(nn.Module):
    """Subtracts the batch mean between its layers: the examples interact, without BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 7), nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(torch.tanh(h - h.mean(0, keepdim=True)))


class WeightOutsideItsLayer(nn.Module):
    """Uses a layer's weight a second time directly (a tied head)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        return self.b(h + F.linear(h, self.a.weight))


def assert_checked_step(model, x, y, xv, yv, *, verdict: str, engine: str, nonzero=False):
    """MW-Net's first step (plain SGD, ``normalize="sum"``), the one that checks the per-layer
    path: the planner's verdict on the model, the engine that ran, and the fast gradients equal
    to the unrolled ones (each non-zero where ``nonzero``). Returns the method."""
    got, want, method = mwnet_pair(model, x, y, xv, yv, normalize="sum", replay=None, warm=False)
    assert method.metastep.planner.per_layer_verdict(model) == verdict
    assert method.metastep.planner.last_engine == engine
    for a, b in zip(got, want, strict=True):
        if nonzero:
            assert b.abs().max() > 0
        assert_equal(a, b)
    return method


def test_an_output_modified_in_place_is_refused():
    """ReLU(inplace=True) right after a layer rewrites the output the record would hold."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(inplace=True), nn.Linear(7, 3)).to(DT)
    x, y = torch.randn(6, 5, dtype=DT), torch.randint(0, 3, (6,))
    with pytest.raises(ghost.Ineligible, match=r"Linear: its input or output was modified"):
        records(model, x, y)
    # the step's first (checking) forward finds it too, and goes on by the exact general path
    xv, yv = torch.randn(7, 5, dtype=DT), torch.randint(0, 3, (7,))
    assert_checked_step(model, x, y, xv, yv, verdict="no", engine="tape")
    with pytest.raises(ValueError, match=r"engine=per_layer cannot run Sequential: Linear: its"):
        mwnet_step(mwnet_method(model, engine="per_layer"), model, x, y, xv, yv)


class KeywordCall(nn.Module):
    """Calls a layer with a keyword argument: the recording cannot see its input."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 7), nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(input=torch.tanh(self.a(x)))


def test_a_call_the_recording_cannot_read_is_refused_without_breaking_the_forward():
    torch.manual_seed(0)
    model = KeywordCall().to(DT)
    x, y = torch.randn(6, 5, dtype=DT), torch.randint(0, 3, (6,))
    with pytest.raises(ghost.Ineligible, match=r"Linear: not called on one tensor with a graph"):
        records(model, x, y)
    xv, yv = torch.randn(7, 5, dtype=DT), torch.randint(0, 3, (7,))
    # the checking step finishes on the general path
    assert_checked_step(model, x, y, xv, yv, verdict="no", engine="tape")


@pytest.mark.parametrize("cls", [MixesExamples, WeightOutsideItsLayer])
def test_the_check_keeps_models_off_the_path(cls, caplog: pytest.LogCaptureFixture):
    torch.manual_seed(0)
    model = cls().to(DT)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 5, generator=g, dtype=DT), torch.randint(0, 3, (6,), generator=g)
    xv, yv = torch.randn(7, 5, generator=g, dtype=DT), torch.randint(0, 3, (7,), generator=g)
    records(model, x, y)  # its structure looks fine, and it records without complaint
    with caplog.at_level(logging.WARNING, logger="reweight.jvp.planner"):
        # the checking step goes on by the general engine, the tape on CPU
        method = assert_checked_step(model, x, y, xv, yv, verdict="no", engine="tape")
    assert "does not fit the per-layer path" in caplog.text
    assert method.metastep.planner.jvps == {"tape": 1}
    _, losses, _ = mwnet_step(method, model, x, y, xv, yv)
    assert not is_per_layer(losses) and method.metastep.planner.last_engine == "tape"
    # and computed what every later step does: one slice by "auto", the same engine
    method = mwnet_method(model)
    first, _, _ = mwnet_step(method, model, x, y, xv, yv)
    assert method.metastep.planner.per_layer_verdict(model) == "no"
    second, _, _ = mwnet_step(method, model, x, y, xv, yv)
    assert method.metastep.planner.jvps == {"tape": 2}
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"per_layer cannot run .*: its per-layer JVP differs"):
        mwnet_step(mwnet_method(model, engine="per_layer"), model, x, y, xv, yv)


def test_a_forced_engine_is_the_one_that_runs():
    """engine="tape" keeps a model that fits the per-layer path on the tape, every step."""
    model, x, y, xv, yv = model_and_batches("lenet")
    method = mwnet_method(model, engine="tape")
    for _ in range(2):
        _, losses, _ = mwnet_step(method, model, x, y, xv, yv)
        assert not is_per_layer(losses)
    assert method.metastep.planner.jvps == {"tape": 2}
