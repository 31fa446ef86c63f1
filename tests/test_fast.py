"""``meta_grad="fast"`` (the exact first-order identity) against the unrolled reference.

Float64 throughout the equality tests: fast and unrolled must agree to 1e-8 for an MLP, the
LeNet of the MNIST experiment and ResNets with BatchNorm in training mode (batch statistics
couple the examples, so the JVP must be of the whole batch's loss vector), by every engine the
planner can choose or be forced to, and each test that forces an engine asserts that it ran.
"""

from __future__ import annotations

import copy
import functools
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import reweight.functional
import reweight.jvp.planner
import reweight.meta.twins
from reweight import (
    L2RW,
    MWNet,
    Trainer,
    l2rw_eps_grad,
    l2rw_weights,
    mwnet_meta_grads,
    to_meta,
)
from reweight.jvp.dual import dual_forward
from reweight.jvp.tape import TangentTape
from reweight.meta import trainable
from reweight.metastep import MetaStep, StepInputs
from reweight.models import build_model

from .helpers import quiet
from .test_meta import eps_grad_closed_form, make

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


def l2rw_step(model, x, y, xv, yv, **options):
    """The training step's ε-gradient, losses and meta loss, by the engine the planner picks,
    and that planner."""
    step = MetaStep(at_zero=True, **options)
    out = step(StepInputs(model, x, y, xv, yv, LR, F.cross_entropy))
    return out.c, out.losses, float(out.meta_loss), step.planner


@pytest.mark.parametrize("name", MODELS)
def test_l2rw_fast_equals_unrolled(name: str):
    model, x, y, xv, yv = model_and_batches(name)
    want = l2rw_eps_grad(model, x, y, xv, yv, LR, meta_grad="unrolled")
    # the functional form (the model left unchanged: the recorded forward is the twin's) ...
    got = l2rw_eps_grad(model, x, y, xv, yv, LR)  # meta_grad="fast" is the default
    assert (want > 0).any() and (want < 0).any()  # non-trivial weights
    assert_equal(got, want)
    assert_equal(
        l2rw_weights(model, x, y, xv, yv, LR),
        l2rw_weights(model, x, y, xv, yv, LR, meta_grad="unrolled"),
    )
    # ... and the training step (the real model's forward, its losses kept for the update)
    step_grad, losses, meta_loss, _ = l2rw_step(copy.deepcopy(model), x, y, xv, yv)
    assert_equal(step_grad, want)
    assert losses.grad_fn is not None and losses.shape == (len(x),)
    want_loss = F.cross_entropy(to_meta(model)(xv), yv).detach()
    assert meta_loss == pytest.approx(float(want_loss), rel=1e-12, abs=1e-12)


ENGINES_FOR = {  # the engines that can run each model (per_layer: no BatchNorm in training)
    "mlp": ["tape", "dual", "dual_twin", "per_layer"],
    "lenet": ["tape", "dual", "dual_twin", "per_layer"],
    "resnet": ["tape", "dual", "dual_twin"],
    "resnet32": ["tape", "dual_twin"],
}


@pytest.mark.parametrize(
    ("name", "engine"), [(n, e) for n, engines in ENGINES_FOR.items() for e in engines]
)
def test_l2rw_every_engine_equals_unrolled_and_is_the_one_that_ran(name: str, engine: str):
    model, x, y, xv, yv = model_and_batches(name)
    want = l2rw_eps_grad(model, x, y, xv, yv, LR, meta_grad="unrolled")
    step = MetaStep(at_zero=True, engine=engine)
    assert_equal(l2rw_eps_grad(model, x, y, xv, yv, LR, step=step), want)
    planner = step.planner
    assert planner.last_engine == engine and planner.jvps == {engine: 1}
    got, losses, _, planner = l2rw_step(copy.deepcopy(model), x, y, xv, yv, engine=engine)
    assert_equal(got, want)
    assert losses.grad_fn is not None
    assert (
        planner.last_engine == engine
        and planner.current.reason == f"forced: method.engine={engine}"
    )


@pytest.mark.parametrize(("name", "want"), [("lenet", "per_layer"), ("resnet", "tape")])
def test_cuda_policy_on_cpu_picks_what_a_gpu_would(name: str, want: str):
    """policy="cuda" runs on the CPU what the planner picks on a GPU: never dual numbers
    through the real model (its graph kept: more memory than unrolled). Here a first step:
    per layer, or the first of the candidates the policy times (tests/test_cuda_policy.py)."""
    model, x, y, xv, yv = model_and_batches(name)
    reference = l2rw_eps_grad(model, x, y, xv, yv, LR, meta_grad="unrolled")
    got, _, _, planner = l2rw_step(model, x, y, xv, yv, engine_policy="cuda")
    assert_equal(got, reference)
    assert planner.last_engine == want and planner.current.reason.startswith("cuda policy")


def test_the_functional_form_and_the_step_make_the_same_choice():
    """l2rw_eps_grad(meta_grad="fast") and L2RW().step: the same planner choice, the same
    number (here the tangent tape, for a model with BatchNorm on CPU)."""
    model, x, y, xv, yv = model_and_batches("resnet")
    method = L2RW()
    functional = MetaStep(at_zero=True)
    got = l2rw_eps_grad(model, x, y, xv, yv, LR, step=functional)
    out = method.step(StepInputs(copy.deepcopy(model), x, y, xv, yv, LR, F.cross_entropy))
    assert functional.planner.last_engine == method.metastep.planner.last_engine == "tape"
    torch.testing.assert_close(out.weights, reweight.functional.normalize_l2rw(got), rtol=0, atol=0)


def test_l2rw_fast_is_the_closed_form_without_batchnorm():
    """g_i = −lr·⟨∇θℓᵢ, ∇θL_meta⟩, one per-example gradient at a time."""
    model, x, y, xv, yv = model_and_batches("lenet")
    got = l2rw_eps_grad(model, x, y, xv, yv, LR, meta_grad="fast")
    assert_equal(got, eps_grad_closed_form(model, x, y, xv, yv, LR))


@pytest.mark.parametrize(
    ("name", "engine"),
    [("resnet", e) for e in ENGINES_FOR["resnet"]] + [("lenet", "per_layer"), ("resnet", "auto")],
)
def test_l2rw_fast_leaves_the_model_untouched(name: str, engine: str):
    model, x, y, xv, yv = model_and_batches(name)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    before = state_of(model)
    step = MetaStep(at_zero=True, engine=engine)
    for _ in range(2):  # a per-layer path's checking step, then an ordinary one
        l2rw_eps_grad(model, x, y, xv, yv, LR, step=step)
    assert step.planner.last_engine == ("tape" if engine == "auto" else engine)
    for k, v in model.state_dict().items():  # parameters and BatchNorm statistics
        assert torch.equal(v, before[k]), k
    assert all(torch.equal(p.grad, torch.full_like(p, 0.25)) for p in model.parameters())
    assert model.training


# ---------------------------------------------------------------------------------------------
# Meta-Weight-Net


def mwnet_pair(
    model,
    x,
    y,
    xv,
    yv,
    *,
    normalize: str,
    replay: dict | None,
    warm: bool,
    chunks: int | str = 1,
    detach_loss: bool = True,
    **engine,
):
    """∂L_meta/∂φ by fast and by unrolled from the same state (and a real optimizer).

    ``engine``: the method's ``engine`` / ``engine_policy``. Returns (fast, unrolled, method).
    """
    opt = None
    if replay is not None:
        # lr 0: a warm-up step creates momentum buffers and leaves θ where it is; then the
        # replayed step's learning rate (the optimizer's own)
        opt = torch.optim.SGD(model.parameters(), lr=0.0, **replay)
        if warm:  # momentum buffers exist: not SGD's first step
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        opt.param_groups[0]["lr"] = LR
    torch.manual_seed(1)
    method = MWNet(
        hidden=5,
        normalize=normalize,
        detach_loss=detach_loss,
        replay_optimizer=replay is not None,
        meta_chunks=chunks,
        **engine,
    )
    assert method.metastep.meta_grad == "fast"  # the default
    method.setup(model=model, device=torch.device("cpu"))
    start = state_of(model)
    got, losses, meta_loss = method.meta_grads(
        StepInputs(model, x, y, xv, yv, LR, F.cross_entropy, opt)
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
        detach_loss=detach_loss,
        optimizer=opt,
    )
    assert meta_loss == pytest.approx(float(want_loss), rel=1e-12, abs=1e-12)
    return got, want, method


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
        got, want, method = mwnet_pair(
            model, x, y, xv, yv, normalize=normalize, replay=REPLAYS[replay], warm=warm
        )
        assert method.metastep.planner.last_engine == ("tape" if "resnet" in name else "per_layer")
        assert len(got) == len(want) == 4
        for a, b in zip(got, want, strict=True):
            assert b.abs().max() > 0
            assert_equal(a, b)


# (model, engine, policy): the cuda policy's tape is MW-Net's lean tape (the real forward
# recorded after the meta pass, tests/test_cuda_policy.py)
MWNET_ENGINES = [
    (n, e, "auto") for n, engines in ENGINES_FOR.items() for e in engines if e != "dual"
] + [("resnet", "tape", "cuda"), ("resnet32", "tape", "cuda")]


@pytest.mark.parametrize("detach_loss", [True, False], ids=["detached", "through-losses"])
@pytest.mark.parametrize(("name", "engine", "policy"), MWNET_ENGINES)
def test_mwnet_every_engine_equals_unrolled_and_is_the_one_that_ran(
    name: str, engine: str, policy: str, detach_loss: bool
):
    """Each engine MW-Net can use, with the replayed optimizer (a later step, with buffers),
    with the net fed detached losses and (detach_loss=False, s = ∂(Σwᵢℓᵢ)/∂ℓ) not."""
    for normalize in ("none", "sum"):
        model, x, y, xv, yv = model_and_batches(name)
        got, want, method = mwnet_pair(
            model,
            x,
            y,
            xv,
            yv,
            normalize=normalize,
            replay=REPLAYS["momentum"],
            warm=True,
            detach_loss=detach_loss,
            engine=engine,
            engine_policy=policy,
        )
        assert method.metastep.planner.last_engine == engine and method.metastep.planner.jvps == {
            engine: 1
        }
        for a, b in zip(got, want, strict=True):
            assert b.abs().max() > 0
            assert_equal(a, b)


@pytest.mark.parametrize("detach_loss", [True, False])
@pytest.mark.parametrize(("name", "want"), [("lenet", "per_layer"), ("resnet", "tape")])
def test_mwnet_cuda_policy_on_cpu(name: str, want: str, detach_loss: bool):
    """What the planner runs on a GPU, run here: per layer, or (a first step) the lean tape,
    the first candidate the policy times (no training graph held across the meta pass)."""
    model, x, y, xv, yv = model_and_batches(name)
    got, reference, method = mwnet_pair(
        model,
        x,
        y,
        xv,
        yv,
        normalize="sum",
        replay=REPLAYS["nesterov"],
        warm=True,
        detach_loss=detach_loss,
        engine_policy="cuda",
    )
    assert method.metastep.planner.last_engine == want
    for a, b in zip(got, reference, strict=True):
        assert_equal(a, b)


@pytest.mark.parametrize("chunks", [2, 3, 7, 9])
@pytest.mark.parametrize("name", ["mlp", "lenet"])
def test_mwnet_meta_chunks_give_the_same_gradient(name: str, chunks: int):
    """The meta batch (7 examples) in uneven slices, more slices than examples included."""
    model, x, y, xv, yv = model_and_batches(name)
    got, want, _ = mwnet_pair(
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
        (
            {"meta_chunks": 2, "meta_grad": "unrolled"},
            r"method\.meta_chunks=2 needs meta_grad=fast",
        ),
    ],
)
def test_mwnet_meta_chunks_bad_values(kwargs: dict, match: str):
    with pytest.raises(ValueError, match=match):
        MWNet(**kwargs)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: L2RW(engine="jvp"), r"method\.engine must be one of \['auto', 'tape', 'dual', "),
        (lambda: MWNet(engine_policy="gpu"), r"method\.engine_policy must be one of \['auto', "),
        (
            lambda: MWNet(engine="dual"),
            r"method\.engine=dual cannot run mwnet: .*use method\.engine=dual_twin",
        ),
        (
            lambda: L2RW(meta_grad="unrolled", engine="tape"),
            r"method\.engine=tape / method\.engine_policy=auto choose how meta_grad=fast",
        ),
    ],
)
def test_engine_arguments_are_checked_at_construction(make, match: str):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("method", [L2RW, MWNet])
def test_a_forced_per_layer_path_is_refused_at_setup_for_batchnorm(method):
    model = model_and_batches("resnet")[0]
    with pytest.raises(
        ValueError,
        match=r"method\.engine=per_layer cannot run SmallResNet: BatchNorm in training mode "
        r"\(stem\.1\); use method\.engine=auto",
    ):
        method(engine="per_layer").setup(model=model, device=torch.device("cpu"))


def test_describe_says_which_engine_ran_and_why():
    model, x, y, xv, yv = model_and_batches("resnet")
    method = MWNet(hidden=5)
    assert method.describe()["meta_engine"]["engine"] is None  # no step yet
    method.setup(model=model, device=torch.device("cpu"))
    method.step(StepInputs(model, x, y, xv, yv, LR, F.cross_entropy))
    engine = method.describe()["meta_engine"]
    assert engine["engine"] == "tape" and engine["jvps"] == {"tape": 1}
    assert engine["reason"].startswith("cpu policy: tangent tape")
    assert "BatchNorm in training mode" in engine["reason"]
    assert MWNet(meta_grad="unrolled").describe()["meta_engine"]["engine"] == "unrolled"


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
        config=quiet(max_steps=steps, batch_size=32, meta_batch_size=16),
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
    """With BatchNorm the tape; without, every step per layer (the first one checked)."""

    def build(mode: str):  # MW-Net's weighting net starts from the same draws in every run
        torch.manual_seed(1)
        return make_method(mode)

    method = build("fast")
    fast = train(method, batchnorm=batchnorm)
    engine = "tape" if batchnorm else "per_layer"
    planner = method.metastep.planner
    assert planner.jvps == {engine: 30}
    if batchnorm:  # the second forward recorded as a program, every later one followed
        programs = planner.describe()["tape_programs"]
        assert programs == {"signatures": 1, "followed": 28, "stale": 0}
    unrolled = train(build("unrolled"), batchnorm=batchnorm)
    moved = train(build("fast"), steps=1, batchnorm=batchnorm)
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
    _, weights = trainable(model)
    gen = torch.Generator().manual_seed(seed)
    direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in weights]
    torch.manual_seed(5)  # the same dropout mask in both forwards
    tape = TangentTape(weights)
    with tape:
        losses = F.cross_entropy(model(x), y, reduction="none")
    got = tape.jvp(direction, losses)
    torch.manual_seed(5)
    with torch.no_grad():
        want = dual_forward(to_meta(model), weights, direction, x, y, F.cross_entropy)[1]
    return tape, got, want


@pytest.mark.parametrize("model", [DropNet(), InPlaceNet()], ids=["dropout", "in-place"])
def test_tape_replays_dropout_and_in_place_ops(model: nn.Module):
    model = model.double().train()
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    tape, got, want = tape_and_dual(model, x, y)
    assert tape.error is None
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


class BNConvNet(nn.Module):
    """BatchNorm2d with and without affine weights, a frozen one, one on the input (its input
    has no tangent, its weights have), and BatchNorm1d."""

    def __init__(self) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm2d(2)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4, affine=False)
        self.bn3 = nn.BatchNorm2d(4)
        self.bn3.weight.requires_grad_(False)
        self.fc, self.bn4 = nn.Linear(4, 6), nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn3(torch.tanh(self.bn2(torch.relu(self.bn1(self.conv(self.bn0(x)))))))
        return self.head(torch.tanh(self.bn4(self.fc(h.mean((2, 3))))))


@pytest.mark.parametrize("train", [True, False], ids=["batch-statistics", "running-statistics"])
def test_tape_batchnorm_rule_equals_dual_numbers(train: bool):
    """The tape's own BatchNorm tangent (from the statistics the forward saved) against
    forward AD's, in both modes (running statistics made non-trivial)."""
    torch.manual_seed(0)
    model = BNConvNet().double()
    with torch.no_grad():
        for bn in (model.bn0, model.bn1, model.bn2, model.bn3, model.bn4):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            if bn.affine:
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)
    model.train(train)
    x, y = torch.randn(7, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    tape, got, want = tape_and_dual(model, x, y)
    assert tape.error is None
    assert sum(e.func is torch.ops.aten.native_batch_norm.default for e in tape.entries) == 5
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_tape_falls_back_with_a_warning_unless_forced(caplog: pytest.LogCaptureFixture):
    model = InPlaceNet(scale=True).double().train()
    x, y = torch.randn(10, 4).double(), torch.randint(0, 3, (10,))
    tape = TangentTape(trainable(model)[1])
    with tape:
        F.cross_entropy(model(x), y, reduction="none")
    assert tape.error is not None and "mul_" in tape.error
    xv, yv = torch.randn(7, 4).double(), torch.randint(0, 3, (7,))
    want = l2rw_eps_grad(model, x, y, xv, yv, LR, meta_grad="unrolled")
    step, trained = MetaStep(at_zero=True), copy.deepcopy(model)
    with caplog.at_level(logging.WARNING, logger="reweight.jvp.planner"):
        for _ in range(2):  # the first step finds out, the second plans for it
            out = step(StepInputs(trained, x, y, xv, yv, LR, F.cross_entropy))
            assert_equal(out.c, want)
    planner = step.planner
    assert caplog.text.count("cannot replay") == 1 and "mul_" in caplog.text
    assert planner.jvps == {"dual_twin": 2}
    assert planner.current.engine == "dual_twin" and "cannot replay" in planner.current.reason
    with pytest.raises(ValueError, match=r"method\.engine=tape cannot run InPlaceNet: .*mul_"):
        l2rw_eps_grad(model, x, y, xv, yv, LR, engine="tape")


@pytest.mark.parametrize("method", ["l2rw", "mwnet"])
def test_dual_twin_replays_the_dropout_masks(method: str):
    """Dual numbers through the twin run the batch through the model again: with the random
    state of the recorded forward, so its dropout masks are the real forward's (the tape
    replays the recorded masks: the two agree). MW-Net's lean tape (the cuda policy's) draws
    them in the twin's forward and redraws them in the real forward it records."""
    torch.manual_seed(0)
    model = DropNet().double().train()
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    xv, yv = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    results = {}
    runs = [("tape", "auto"), ("dual_twin", "auto")]
    runs += [("tape", "cuda")] if method == "mwnet" else []
    for engine, policy in runs:
        torch.manual_seed(3)
        if method == "l2rw":
            got, losses, *_ = l2rw_step(copy.deepcopy(model), x, y, xv, yv, engine=engine)
            results[engine, policy] = [got, losses.detach()]
        else:
            torch.manual_seed(1)
            m = MWNet(hidden=5, engine=engine, engine_policy=policy)
            m.setup(model=model, device=torch.device("cpu"))
            torch.manual_seed(3)
            grads, losses, _ = m.meta_grads(
                StepInputs(copy.deepcopy(model), x, y, xv, yv, LR, F.cross_entropy)
            )
            results[engine, policy] = [*grads, losses.detach()]
            assert m.metastep.planner.last_engine == engine
        results[engine, policy].append(torch.rand(3))  # the random stream continues alike
    for other in runs[1:]:
        for a, b in zip(results[runs[0]], results[other], strict=True):
            assert_equal(a, b)


def test_tape_under_cpu_bf16_autocast():
    model = build_model("lenet", num_classes=2, in_channels=1).train()
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 2, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tape, got, want = tape_and_dual(model, x, y)
    assert tape.error is None and got.dtype == want.dtype
    assert (got - want).abs().max() <= 0.02 * want.abs().max()
