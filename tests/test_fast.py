"""``meta_grad="fast"`` (the exact first-order identity) against the unrolled reference.

Float64 throughout the equality tests: fast and unrolled must agree to 1e-8 for an MLP, the
LeNet of the MNIST experiment and ResNets with BatchNorm in training mode (batch statistics
couple the examples, so the JVP must be of the whole batch's loss vector).
"""

from __future__ import annotations

import copy
import doctest
import functools
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import reweight.fast
from reweight import (
    L2RW,
    MWNet,
    Trainer,
    TrainerConfig,
    l2rw_eps_grad,
    l2rw_weights,
    mwnet_meta_grads,
    to_meta,
)
from reweight.fast import (
    _dual_jvp,
    _TangentTape,
    _taped_losses,
    _trainable,
    _warn_fallback,
    l2rw_eps_grad_fast,
    l2rw_fast_step,
    mwnet_fast_step,
)
from reweight.methods import StepInputs
from reweight.models import build_model

from .test_meta import make

LR = 0.5
ATOL = 1e-8


def model_and_batches(name: str, n: int = 6):
    """A float64 model in training mode, a training batch and a meta batch."""
    if name in ("mlp", "resnet"):  # from test_meta: non-trivial BatchNorm affine and statistics
        return make(name, n=n)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "lenet":
        model, shape, k = build_model("lenet", num_classes=2, in_channels=1), (1, 28, 28), 2
    elif name == "resnet32":
        model, shape, k = build_model("resnet32", num_classes=3), (3, 16, 16), 3
    else:
        raise KeyError(name)
    model = model.double().train()
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    xv = torch.randn(n + 1, *shape, generator=g, dtype=torch.float64)
    return model, x, torch.randint(0, k, (n,), generator=g), xv, torch.randint(0, k, (n + 1,))


MODELS = ["mlp", "lenet", "resnet", "resnet32"]


def assert_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal to 1e-8, absolute, or relative to the largest entry when that exceeds 1."""
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL * max(1.0, float(want.abs().max())))


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# L2RW


@pytest.mark.parametrize("name", MODELS)
def test_l2rw_fast_equals_unrolled(name: str):
    model, x, y, xv, yv = model_and_batches(name)
    want = l2rw_eps_grad(model, x, y, xv, yv, LR, meta_grad="unrolled")
    # the functional form (a dual-number forward through the twin) ...
    got = l2rw_eps_grad(model, x, y, xv, yv, LR, meta_grad="fast")
    assert (want > 0).any() and (want < 0).any()  # non-trivial weights
    assert_equal(got, want)
    assert_equal(
        l2rw_weights(model, x, y, xv, yv, LR, meta_grad="fast"),
        l2rw_weights(model, x, y, xv, yv, LR, meta_grad="unrolled"),
    )
    # ... and the training step (the real model's forward, taped, then its tangents replayed)
    tape_grad, losses, meta_loss = l2rw_fast_step(
        StepInputs(copy.deepcopy(model), x, y, xv, yv, LR, F.cross_entropy)
    )
    assert_equal(tape_grad, want)
    assert losses.grad_fn is not None and losses.shape == (len(x),)
    want_loss = F.cross_entropy(to_meta(model)(xv), yv).detach()
    assert meta_loss == pytest.approx(float(want_loss), rel=1e-12, abs=1e-12)


def test_l2rw_fast_is_the_closed_form_without_batchnorm():
    """g_i = −lr·⟨∇θℓᵢ, ∇θL_meta⟩, one per-example gradient at a time."""
    model, x, y, xv, yv = model_and_batches("lenet")
    params = list(model.parameters())
    meta = torch.autograd.grad(F.cross_entropy(model(xv), yv), params)
    want = []
    for i in range(len(x)):
        gi = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params)
        want.append(-LR * sum((a * b).sum() for a, b in zip(gi, meta, strict=True)))
    got = l2rw_eps_grad(model, x, y, xv, yv, LR, meta_grad="fast")
    assert_equal(got, torch.stack(want))


def test_l2rw_fast_leaves_the_model_untouched():
    model, x, y, xv, yv = model_and_batches("resnet")
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    before = state_of(model)
    l2rw_eps_grad(model, x, y, xv, yv, LR, meta_grad="fast")
    l2rw_eps_grad_fast(model, x, y, xv, yv, LR)
    for k, v in model.state_dict().items():  # parameters and BatchNorm statistics
        assert torch.equal(v, before[k]), k
    assert all(torch.equal(p.grad, torch.full_like(p, 0.25)) for p in model.parameters())
    assert model.training


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 8)
        self.bn = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


@pytest.mark.parametrize("method", [L2RW(meta_grad="fast"), MWNet(hidden=8, meta_grad="fast")])
def test_batchnorm_statistics_move_once_per_fast_step(method):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 3, generator=g), torch.randint(0, 2, (48,), generator=g)
    torch.manual_seed(0)
    model = BNNet()
    reference = copy.deepcopy(model).train()
    cfg = TrainerConfig(
        max_steps=3, batch_size=16, meta_batch_size=8, progress=False, final_weights=0
    )
    # lr = 0 keeps θ fixed: the statistics must be exactly those of one forward per step
    Trainer(
        model,
        TensorDataset(x, y),
        TensorDataset(x[:8], y[:8]),
        method=method,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.0),
        config=cfg,
    ).fit()
    from reweight.batches import BatchStream

    stream = BatchStream(TensorDataset(x, y), 16, cfg.seed, 0, True, 0, False).iterate(0)
    for _ in range(3):
        reference(next(stream)[1])
    torch.testing.assert_close(model.bn.running_mean, reference.bn.running_mean)
    torch.testing.assert_close(model.bn.running_var, reference.bn.running_var)
    assert int(model.bn.num_batches_tracked) == 3


# ---------------------------------------------------------------------------------------------
# Meta-Weight-Net


def mwnet_pair(
    model, x, y, xv, yv, *, normalize: str, replay: dict | None, warm: bool, chunks: int = 1
):
    """∂L_meta/∂φ by fast and by unrolled from the same state (and a real optimizer)."""
    opt = None
    if replay is not None:
        # lr 0: a warm-up step creates momentum buffers and leaves θ where it is (the virtual
        # step's learning rate is StepInputs.lr)
        opt = torch.optim.SGD(model.parameters(), lr=0.0, **replay)
        if warm:  # momentum buffers exist: not SGD's first step
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    method = MWNet(
        hidden=5,
        normalize=normalize,
        replay_optimizer=replay is not None,
        meta_grad="fast",
        meta_chunks=chunks,
    )
    method.setup(model=model, device=torch.device("cpu"))
    start = state_of(model)
    got, losses, meta_loss = mwnet_fast_step(
        method, StepInputs(model, x, y, xv, yv, LR, F.cross_entropy, opt)
    )
    assert losses.grad_fn is not None
    model.load_state_dict(start)  # the fast step's forward moved the BatchNorm statistics
    twin = to_meta(model)
    want, want_loss = mwnet_meta_grads(
        twin,
        F.cross_entropy(model(x), y, reduction="none"),
        method.vnet,
        xv,
        yv,
        LR,
        normalize=normalize,
        sgd_kwargs=method.sgd_kwargs(model, opt),
    )
    assert meta_loss == pytest.approx(float(want_loss), rel=1e-12, abs=1e-12)
    return got, want


REPLAYS = {
    "plain": None,
    "momentum": {"momentum": 0.9, "weight_decay": 1e-3, "dampening": 0.3},
    "nesterov": {"momentum": 0.9, "weight_decay": 1e-3, "nesterov": True},
}


@pytest.mark.parametrize("replay", sorted(REPLAYS))
@pytest.mark.parametrize("normalize", ["none", "sum"])
@pytest.mark.parametrize("name", MODELS)
def test_mwnet_fast_equals_unrolled(name: str, normalize: str, replay: str):
    cases = [False] if REPLAYS[replay] is None else [False, True]  # SGD's first step, a later one
    for warm in cases:
        model, x, y, xv, yv = model_and_batches(name)
        got, want = mwnet_pair(
            model, x, y, xv, yv, normalize=normalize, replay=REPLAYS[replay], warm=warm
        )
        assert len(got) == len(want) == 4
        for a, b in zip(got, want, strict=True):
            assert b.abs().max() > 0
            assert_equal(a, b)


@pytest.mark.parametrize("name", ["lenet", "resnet"])
def test_dual_number_path_of_the_steps(name: str, monkeypatch: pytest.MonkeyPatch):
    """Off TAPE_DEVICES (e.g. CUDA) the steps use dual-number forwards: exact too."""
    monkeypatch.setattr(reweight.fast, "TAPE_DEVICES", set())
    model, x, y, xv, yv = model_and_batches(name)
    want = l2rw_eps_grad(model, x, y, xv, yv, LR, meta_grad="unrolled")
    start = state_of(model)
    got, losses, _ = l2rw_fast_step(StepInputs(model, x, y, xv, yv, LR, F.cross_entropy))
    assert_equal(got, want)
    assert losses.grad_fn is not None
    model.load_state_dict(start)
    got, want = mwnet_pair(
        model, x, y, xv, yv, normalize="sum", replay=REPLAYS["nesterov"], warm=True
    )
    for a, b in zip(got, want, strict=True):
        assert_equal(a, b)


@pytest.mark.parametrize("chunks", [2, 3, 7, 9])
@pytest.mark.parametrize("name", ["mlp", "lenet"])
def test_mwnet_meta_chunks_give_the_same_gradient(name: str, chunks: int):
    """The meta batch (7 examples) in uneven slices, more slices than examples included."""
    model, x, y, xv, yv = model_and_batches(name)
    got, want = mwnet_pair(
        model, x, y, xv, yv, normalize="sum", replay=REPLAYS["momentum"], warm=True, chunks=chunks
    )
    for a, b in zip(got, want, strict=True):
        assert b.abs().max() > 0
        assert_equal(a, b)


@pytest.mark.parametrize("name", ["resnet", "resnet32"])
def test_mwnet_meta_chunks_refuse_batchnorm(name: str):
    model = model_and_batches(name)[0]
    method = MWNet(meta_grad="fast", meta_chunks=2)
    with pytest.raises(ValueError, match=r"method\.meta_chunks=2 would change .* BatchNorm"):
        method.setup(model=model, device=torch.device("cpu"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"meta_chunks": 0}, r"method\.meta_chunks must be 'auto' or an integer >= 1, got 0"),
        ({"meta_chunks": 2.5, "meta_grad": "fast"}, r"meta_chunks must be 'auto' or an integer"),
        ({"meta_chunks": "some"}, r"meta_chunks must be 'auto' or an integer >= 1, got 'some'"),
        ({"meta_chunks": 2}, r"method\.meta_chunks=2 needs meta_grad=fast"),
    ],
)
def test_mwnet_meta_chunks_bad_values(kwargs: dict, match: str):
    with pytest.raises(ValueError, match=match):
        MWNet(**kwargs)


def test_mwnet_fast_needs_detached_losses():
    model, x, y, xv, yv = model_and_batches("mlp")
    method = MWNet(detach_loss=False, meta_grad="fast")
    method.setup(model=model, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"meta_grad='fast' requires method\.detach_loss=true"):
        method.step(StepInputs(model, x, y, xv, yv, LR, F.cross_entropy))


# ---------------------------------------------------------------------------------------------
# Training: fast and unrolled follow the same trajectory


def train(method, steps: int = 30, batchnorm: bool = True) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 5, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * torch.randn(400, generator=g, dtype=torch.float64) > 0).long()
    y[:100] = 1 - y[:100]  # some flipped labels
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(16) if batchnorm else nn.Identity()
    model = nn.Sequential(nn.Linear(5, 16), norm, nn.ReLU(), nn.Linear(16, 2)).double()
    Trainer(
        model,
        TensorDataset(x, y),
        TensorDataset(x[:40], y[:40]),
        method=method,
        optimizer=functools.partial(torch.optim.SGD, lr=0.2, momentum=0.9, weight_decay=1e-3),
        config=TrainerConfig(
            max_steps=steps, batch_size=32, meta_batch_size=16, progress=False, final_weights=0
        ),
    ).fit()
    return model


@pytest.mark.parametrize(
    "make_method",
    [
        lambda mode: L2RW(meta_grad=mode),
        lambda mode: MWNet(
            hidden=8, lr=1e-2, normalize="sum", replay_optimizer=True, meta_grad=mode
        ),
    ],
    ids=["l2rw", "mwnet"],
)
@pytest.mark.parametrize("batchnorm", [True, False], ids=["batchnorm", "per-layer"])
def test_training_fast_follows_unrolled(make_method, batchnorm: bool):
    """With BatchNorm the tape; without, MW-Net's steps after the first are per layer."""
    fast = train(make_method("fast"), batchnorm=batchnorm)
    unrolled = train(make_method("unrolled"), batchnorm=batchnorm)
    moved = train(make_method("fast"), steps=1, batchnorm=batchnorm)
    if not batchnorm and isinstance(make_method("fast"), MWNet):  # checked, then taken
        assert reweight.fast._PER_LAYER[fast][1] == "ok"
    for (name, a), b, c in zip(
        fast.state_dict().items(),
        unrolled.state_dict().values(),
        moved.state_dict().values(),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9, msg=name)
        if a.is_floating_point() and name.endswith("weight"):
            assert not torch.allclose(a, c), name  # 30 steps went somewhere


# ---------------------------------------------------------------------------------------------
# The tangent tape


class DropNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.dropout(torch.tanh(self.fc1(x)), 0.4, self.training))


class InPlaceNet(nn.Module):
    """torchvision-style in-place ReLU and residual ``+=``; ``scale`` adds an unsupported
    in-place op (``mul_`` on an activation)."""

    def __init__(self, scale: bool = False) -> None:
        super().__init__()
        self.fc1, self.bn = nn.Linear(4, 8), nn.BatchNorm1d(8)
        self.fc2, self.fc3 = nn.Linear(8, 8), nn.Linear(8, 3)
        self.relu = nn.ReLU(inplace=True)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.bn(self.fc1(x)))
        out = self.fc2(h)
        if self.scale:
            out.mul_(2.0)
        out += h
        return self.fc3(self.relu(out))


def tape_and_dual(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int = 0):
    _, weights = _trainable(model)
    gen = torch.Generator().manual_seed(seed)
    direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in weights]
    torch.manual_seed(5)  # the same dropout mask in both forwards
    losses, tape = _taped_losses(model, weights, x, y, F.cross_entropy)
    got = tape.jvp(direction, losses)
    torch.manual_seed(5)
    from reweight.fast import _bound_twin

    want = _dual_jvp(_bound_twin(model), weights, direction, x, y, F.cross_entropy)
    return tape, got, want


@pytest.mark.parametrize("model", [DropNet(), InPlaceNet()], ids=["dropout", "in-place"])
def test_tape_replays_dropout_and_in_place_ops(model: nn.Module):
    model = model.double().train()
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    tape, got, want = tape_and_dual(model, x, y)
    assert tape.error is None
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_tape_falls_back_with_a_warning(caplog: pytest.LogCaptureFixture):
    model, x, y = InPlaceNet(scale=True).double().train(), torch.randn(10, 4).double(), None
    y = torch.randint(0, 3, (10,))
    tape = _TangentTape(_trainable(model)[1])
    with tape:
        F.cross_entropy(model(x), y, reduction="none")
    assert tape.error is not None and "mul_" in tape.error
    xv, yv = torch.randn(7, 4).double(), torch.randint(0, 3, (7,))
    _warn_fallback.cache_clear()  # it warns once per model and reason
    with caplog.at_level(logging.WARNING, logger="reweight.fast"):
        got, _, _ = l2rw_fast_step(
            StepInputs(copy.deepcopy(model), x, y, xv, yv, LR, F.cross_entropy)
        )
    assert "cannot replay" in caplog.text and "mul_" in caplog.text
    want = l2rw_eps_grad(model, x, y, xv, yv, LR, meta_grad="unrolled")
    assert_equal(got, want)


def test_tape_under_cpu_bf16_autocast():
    model = build_model("lenet", num_classes=2, in_channels=1).train()
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 2, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tape, got, want = tape_and_dual(model, x, y)
    assert tape.error is None and got.dtype == want.dtype
    assert (got - want).abs().max() <= 0.02 * want.abs().max()


def test_docstring_example_runs():
    result = doctest.testmod(reweight.fast, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
