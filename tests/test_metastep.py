"""The one meta step (``reweight.metastep``): a method written outside the package, and a virtual
step over part of the model, against references written here with ``torch.func``.

The references take the model's weights as a dict, the virtual SGD step
θ′ = θ − lr·∇θ Σᵢ wᵢℓᵢ(θ) over the chosen parameters only (the others stay at θ) by
``torch.func.grad`` over ``functional_call``, the meta loss at θ′, and its gradient with respect
to ε (L2RW, w = ε at 0) or to the weighting net's parameters φ. Float64; the package must agree
to 1e-8 in both ``meta_grad`` modes and with every engine that can run the model, and each
forced engine must be the one that ran.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad

from reweight import L2RW, MWNet, Trainer, WeightingNetMethod, select_params
from reweight.metastep import MetaStep, StepInputs

from .helpers import quiet

LR, ATOL, CLASSES = 0.5, 1e-8, 3


class ConvBN(nn.Module):
    """A small convnet with BatchNorm (the examples of a batch interact: no per-layer path)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, track_running_stats=False)  # torch.func: no buffer writes
        self.fc = nn.Linear(4 * 6 * 6, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.tanh(self.bn(self.conv(x))).flatten(1))


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, CLASSES)
    )


MODELS = {"mlp": (mlp, (5,)), "convbn": (ConvBN, (1, 6, 6))}
# what each model's fast step can be forced to (per_layer: no BatchNorm in training mode)
ENGINES = {
    "mlp": ["auto", "tape", "dual", "dual_twin", "per_layer"],
    "convbn": ["auto", "tape", "dual", "dual_twin"],
}


def setup(name: str, seed: int = 0):
    make, shape = MODELS[name]
    torch.manual_seed(seed)
    model = make().double().train()
    x, xv = (
        torch.randn(12, *shape, dtype=torch.float64),
        torch.randn(7, *shape, dtype=torch.float64),
    )
    y, yv = torch.randint(0, CLASSES, (12,)), torch.randint(0, CLASSES, (7,))
    return model, x, y, xv, yv


def _params(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _virtual(model, theta, moved, x, y, w):
    """θ′ = θ − lr·∇θ Σᵢ wᵢℓᵢ(θ) over ``moved`` (the other weights stay at θ)."""

    def weighted(th):
        return (w * F.cross_entropy(functional_call(model, th, (x,)), y, reduction="none")).sum()

    g = grad(weighted)(theta)
    return {k: theta[k] - LR * g[k] if k in moved else theta[k] for k in theta}


def reference_eps_grad(model, x, y, xv, yv, moved) -> Tensor:
    theta = _params(model)

    def meta(eps):
        new = _virtual(model, theta, moved, x, y, eps)
        return F.cross_entropy(functional_call(model, new, (xv,)), yv)

    return grad(meta)(torch.zeros(len(y), dtype=torch.float64))


def reference_phi_grads(model, net_fn, phi, x, y, xv, yv, moved) -> dict[str, Tensor]:
    """∂L_meta(θ′(φ))/∂φ for w = net_fn(φ, ℓ.detach(), y) / B."""
    theta = _params(model)

    def meta(p):
        losses = F.cross_entropy(functional_call(model, theta, (x,)), y, reduction="none")
        w = net_fn(p, losses.detach(), y) / len(y)
        new = _virtual(model, theta, moved, x, y, w)
        return F.cross_entropy(functional_call(model, new, (xv,)), yv)

    return grad(meta)(phi)


def assert_close(got: Tensor, want: Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    err = float((got - want).abs().max())
    assert err <= ATOL, f"max |error| {err:.3g}"


# ---------------------------------------------------------------------------------------------
# A method from outside: a weighting net fed the loss and the one-hot label, defined here only


class LabelNet(nn.Module):
    """v(ℓ, y; φ) = sigmoid(MLP([ℓ, onehot(y)]))."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1 + CLASSES, 6), nn.Tanh(), nn.Linear(6, 1))

    def forward(self, losses: Tensor, labels: Tensor) -> Tensor:  # (B,), (B,) -> (B,)
        onehot = F.one_hot(labels, CLASSES).to(losses.dtype)
        return torch.sigmoid(self.net(torch.cat([losses[:, None], onehot], 1))).reshape(-1)


class LabelAware(WeightingNetMethod):
    name = "label_aware"

    def __init__(self, **options) -> None:
        super().__init__(LabelNet(), lr=1e-2, **options)

    def net_output(self, losses: Tensor, batch: StepInputs) -> Tensor:
        return self.vnet(losses, batch.targets)


def label_net_fn(net: LabelNet):
    return lambda p, losses, y: functional_call(net, p, (losses, y))


def method_runs():
    """(mode, engine) pairs: every engine the fast mode can be forced to on the MLP (not
    ``dual``: a weighting net's direction exists only after the training forward), and
    unrolled."""
    return [("fast", e) for e in ENGINES["mlp"] if e != "dual"] + [("unrolled", "auto")]


@pytest.mark.parametrize(("mode", "engine"), method_runs())
def test_a_method_from_outside_gets_the_reference_gradient(mode: str, engine: str):
    model, x, y, xv, yv = setup("mlp")
    torch.manual_seed(1)
    method = LabelAware(meta_grad=mode, engine=engine)
    method.setup(model=model, device=torch.device("cpu"))
    phi = _params(method.vnet)
    want = reference_phi_grads(
        model, label_net_fn(method.vnet), phi, x, y, xv, yv, set(_params(model))
    )
    got, losses, _ = method.meta_grads(StepInputs(model, x, y, xv, yv, LR, F.cross_entropy))
    assert min(float(w.abs().max()) for w in want.values()) > 1e-6  # not between zeros
    for g, k in zip(got, phi, strict=True):
        assert_close(g, want[k])
    assert losses.grad_fn is not None
    if mode == "fast":
        ran = "per_layer" if engine == "auto" else engine
        assert method.metastep.planner.last_engine == ran


def reference_trajectory(model, net, batches, moved) -> tuple[dict, dict]:
    """Three Trainer steps of LabelAware written out: φ's Adam step on the reference
    hypergradient, then the real SGD step on Σ wᵢℓᵢ with weights from the updated net."""
    theta, phi = _params(model), {k: v.requires_grad_() for k, v in _params(net).items()}
    adam = torch.optim.Adam(phi.values(), lr=1e-2, weight_decay=1e-4)
    fn = label_net_fn(net)
    for x, y, xv, yv in batches:
        frozen = copy.deepcopy(model)
        frozen.load_state_dict(theta, strict=False)
        g = reference_phi_grads(
            frozen, fn, {k: v.detach() for k, v in phi.items()}, x, y, xv, yv, moved
        )
        for k, p in phi.items():
            p.grad = g[k]
        adam.step()
        with torch.no_grad():
            losses = F.cross_entropy(functional_call(model, theta, (x,)), y, reduction="none")
            w = fn({k: v.detach() for k, v in phi.items()}, losses, y) / len(y)

        def weighted(th, w=w, x=x, y=y):
            return (
                w * F.cross_entropy(functional_call(model, th, (x,)), y, reduction="none")
            ).sum()

        step = grad(weighted)(theta)
        theta = {k: theta[k] - LR * step[k] for k in theta}
    return theta, {k: v.detach() for k, v in phi.items()}


@pytest.mark.parametrize("meta_params", ["all", "head"])
@pytest.mark.parametrize(("mode", "engine"), method_runs())
def test_the_trainer_trains_a_method_from_outside(mode: str, engine: str, meta_params: str):
    model, *_ = setup("mlp")
    gen = torch.Generator().manual_seed(5)
    batches = [
        (
            torch.randn(12, 5, generator=gen, dtype=torch.float64),
            torch.randint(0, CLASSES, (12,), generator=gen),
            torch.randn(7, 5, generator=gen, dtype=torch.float64),
            torch.randint(0, CLASSES, (7,), generator=gen),
        )
        for _ in range(3)
    ]
    torch.manual_seed(1)
    method = LabelAware(meta_grad=mode, engine=engine, meta_params=meta_params)
    method.setup(model=model, device=torch.device("cpu"))  # the net in the model's dtype
    start = _params(method.vnet)
    moved = set(select_params(model, meta_params))
    want_theta, want_phi = reference_trajectory(model, method.vnet, batches, moved)
    data = torch.utils.data.TensorDataset(batches[0][0], batches[0][1])
    trainer = Trainer(
        model,
        data,
        meta_data=data,
        method=method,
        optimizer=lambda p: torch.optim.SGD(p, lr=LR),
        config=quiet(),
    )
    for x, y, xv, yv in batches:
        trainer.train_step(x, y, xv, yv)
    for k, v in model.named_parameters():
        assert_close(v.detach(), want_theta[k])
    for k, v in method.vnet.named_parameters():
        assert_close(v.detach(), want_phi[k])
    assert all(not torch.equal(v, start[k]) for k, v in want_phi.items())  # the net learned


# ---------------------------------------------------------------------------------------------
# A parameter subset: the virtual step moves only the chosen parameters


SUBSETS = {
    "mlp": {"head": ["4.weight", "4.bias"], "pattern": ["2", "4.bias"]},
    "convbn": {"head": ["fc.weight", "fc.bias"], "pattern": ["conv*", "bn.weight"]},
}


def subset_cases(method: str):
    for name in MODELS:
        for subset in SUBSETS[name]:
            engines = ENGINES[name]
            if subset == "head" and "per_layer" not in engines:
                # BatchNorm in the body, upstream of the head only: the head's per-example
                # gradients are exact, and the per-layer path reads them
                engines = [*engines, "per_layer"]
            for engine in engines:
                if method == "mwnet" and engine == "dual":
                    continue
                yield name, subset, "fast", engine
            yield name, subset, "unrolled", "auto"


@pytest.mark.parametrize(("name", "subset", "mode", "engine"), list(subset_cases("l2rw")))
def test_l2rw_over_a_parameter_subset_equals_the_reference(name, subset, mode, engine):
    model, x, y, xv, yv = setup(name)
    spec = "head" if subset == "head" else SUBSETS[name]["pattern"]
    moved = select_params(model, spec)
    assert set(moved) == set(SUBSETS[name]["head"] if subset == "head" else _expand(model, spec))
    want = reference_eps_grad(copy.deepcopy(model), x, y, xv, yv, set(moved))
    full = reference_eps_grad(copy.deepcopy(model), x, y, xv, yv, set(_params(model)))
    assert float((want - full).abs().max()) > 1e-4  # the subset changes the answer
    method = L2RW(meta_grad=mode, engine=engine, meta_params=spec)
    method.setup(model=model, device=torch.device("cpu"))
    out = method.metastep(StepInputs(model, x, y, xv, yv, LR, F.cross_entropy))
    assert_close(out.c, want)
    if mode == "fast" and engine != "auto":
        assert method.metastep.planner.last_engine == engine
    assert method.describe()["meta_engine"]["params"] == spec


@pytest.mark.parametrize(("name", "subset", "mode", "engine"), list(subset_cases("mwnet")))
def test_mwnet_over_a_parameter_subset_equals_the_reference(name, subset, mode, engine):
    model, x, y, xv, yv = setup(name)
    spec = "head" if subset == "head" else SUBSETS[name]["pattern"]
    torch.manual_seed(1)
    method = MWNet(hidden=5, meta_grad=mode, engine=engine, meta_params=spec)
    method.setup(model=model, device=torch.device("cpu"))
    phi = _params(method.vnet)

    def net_fn(p, losses, _y):
        return functional_call(method.vnet, p, (losses.reshape(-1, 1),)).reshape(-1)

    moved = set(select_params(model, spec))
    state = copy.deepcopy(model.state_dict())  # the fast step's forward moves BN statistics
    want = reference_phi_grads(copy.deepcopy(model), net_fn, phi, x, y, xv, yv, moved)
    got, _, _ = method.meta_grads(StepInputs(model, x, y, xv, yv, LR, F.cross_entropy))
    model.load_state_dict(state)
    assert min(float(w.abs().max()) for w in want.values()) > 1e-7
    for g, k in zip(got, phi, strict=True):
        assert_close(g, want[k])
    if mode == "fast" and engine != "auto":
        assert method.metastep.planner.last_engine == engine


def _expand(model: nn.Module, patterns: list[str]) -> list[str]:
    """The reference's reading of module-name patterns, written out for these models."""
    names = [n for n, _ in model.named_parameters()]
    out = []
    for n in names:
        module = n.rpartition(".")[0]
        if any(
            n == p or module == p or (p.endswith("*") and module.startswith(p[:-1]))
            for p in patterns
        ):
            out.append(n)
    return out


def test_the_subset_is_checked_before_the_first_step():
    model = mlp()
    assert select_params(model, "all") == [n for n, _ in model.named_parameters()]
    no_match = r"method\.meta_params=\['fc\*'\] matches no trainable parameter of Sequential"
    with pytest.raises(ValueError, match=no_match + r" \(its parameters: 0\.weight"):
        L2RW(meta_params=["fc*"]).setup(model=model, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"method\.meta_params must be 'all', 'head' or a list"):
        MWNet(meta_params="last")
    frozen = mlp()
    frozen[4].requires_grad_(False)  # the head of the trainable part is the middle layer
    assert select_params(frozen, "head") == ["2.weight", "2.bias"]


def test_a_fresh_meta_step_refuses_a_seed_function_at_zero_and_needs_one_otherwise():
    model, x, y, xv, yv = setup("mlp")
    batch = StepInputs(model, x, y, xv, yv, LR, F.cross_entropy)
    with pytest.raises(ValueError, match="give a seed function unless at_zero"):
        MetaStep(at_zero=True)(batch, lambda losses: losses)
    with pytest.raises(ValueError, match="give a seed function unless at_zero"):
        MetaStep()(batch)
    with pytest.raises(ValueError, match=r"method\.engine=dual cannot run mwnet"):
        MWNet(engine="dual")


@pytest.mark.parametrize("name", ["l2rw", "mwnet"])
def test_a_resumed_run_counts_every_sessions_jvps(tmp_path, name: str):
    """summary.json's meta_engine.jvps after a resume: the JVPs of both sessions (4 + 4)."""
    model, *_ = setup("mlp")
    gen = torch.Generator().manual_seed(4)
    data = torch.utils.data.TensorDataset(
        torch.randn(64, 5, generator=gen, dtype=torch.float64),
        torch.randint(0, CLASSES, (64,), generator=gen),
    )

    def trainer(steps: int) -> Trainer:
        method = L2RW() if name == "l2rw" else MWNet(hidden=5)
        return Trainer(
            copy.deepcopy(model),
            data,
            meta_data=data,
            method=method,
            optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
            checkpoint_path=tmp_path / "checkpoint.pt",
            config=quiet(max_steps=steps, batch_size=8, meta_batch_size=8),
        )

    trainer(4).fit()
    resumed = trainer(8).fit(resume=True)
    assert sum(resumed.metrics["meta_engine"]["jvps"].values()) == 8
