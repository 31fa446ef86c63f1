"""The virtual step replays the real optimizer: ``reweight.meta.OptimizerReplay`` against
``torch.optim`` itself, and L2RW's ε-gradients and MW-Net's weighting-net gradients with a
replayed SGD-momentum / nesterov / Adam / AdamW in both ``meta_grad`` modes against a reference
written here: ``torch.func.functional_call`` and the optimizer's update unrolled by hand from
the real optimizer's state, differentiated by autograd. Float64 throughout.
"""

from __future__ import annotations

import copy
import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from reweight import L2RW, MWNet, l2rw_eps_grad, l2rw_weights
from reweight.functional import normalize_l2rw
from reweight.meta import OptimizerReplay, sgd_step
from reweight.methods import StepInputs

from .test_cli import run_cli

ATOL = 1e-8

# name: (optimizer class, keyword arguments of the single group)
OPTIMIZERS = {
    "sgd_momentum": (torch.optim.SGD, {"lr": 0.3, "momentum": 0.9, "dampening": 0.2}),
    "sgd_momentum_wd": (
        torch.optim.SGD,
        {"lr": 0.3, "momentum": 0.9, "dampening": 0.2, "weight_decay": 0.05},
    ),
    "sgd_nesterov_wd": (
        torch.optim.SGD,
        {"lr": 0.3, "momentum": 0.8, "nesterov": True, "weight_decay": 0.05},
    ),
    "adam": (torch.optim.Adam, {"lr": 0.02, "betas": (0.8, 0.9), "eps": 1e-3}),
    "adam_wd": (
        torch.optim.Adam,
        {"lr": 0.02, "betas": (0.8, 0.9), "eps": 1e-3, "weight_decay": 0.1},
    ),
    "adam_amsgrad": (
        torch.optim.Adam,
        {"lr": 0.02, "betas": (0.8, 0.9), "eps": 1e-3, "amsgrad": True},
    ),
    "adam_amsgrad_wd": (
        torch.optim.Adam,
        {"lr": 0.02, "betas": (0.8, 0.9), "eps": 1e-3, "weight_decay": 0.1, "amsgrad": True},
    ),
    "adamw": (torch.optim.AdamW, {"lr": 0.02, "betas": (0.8, 0.9), "eps": 1e-3}),
    "adamw_wd": (
        torch.optim.AdamW,
        {"lr": 0.02, "betas": (0.8, 0.9), "eps": 1e-3, "weight_decay": 0.2},
    ),
    "adam_default_eps": (torch.optim.Adam, {"lr": 1e-3}),
}


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def batches(n: int = 8):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    xv = torch.randn(n - 3, 4, generator=g, dtype=torch.float64)
    yv = torch.randint(0, 3, (n - 3,), generator=g)
    return x, y, xv, yv


def make_optimizer(model: nn.Module, name: str, groups: bool = False) -> torch.optim.Optimizer:
    """The optimizer ``name``; with ``groups`` two parameter groups (the first layer with its
    own lr and no weight decay, as a transformer's no-decay group)."""
    cls, kwargs = OPTIMIZERS[name]
    if not groups:
        return cls(model.parameters(), **kwargs)
    first = {"params": list(model[0].parameters()), "lr": kwargs["lr"] * 2.5, "weight_decay": 0}
    return cls([first, {"params": list(model[2].parameters())}], **kwargs)


def warm_up(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    """``steps`` real steps on random batches (the optimizer's state is then non-trivial)."""
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        x = torch.randn(5, 4, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (5,), generator=g)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)


def setup(name: str, steps: int, groups: bool = False):
    model = mlp()
    opt = make_optimizer(model, name, groups)
    warm_up(model, opt, steps)
    return model, opt


def real_step(model: nn.Module, opt: torch.optim.Optimizer, grads: list[Tensor]) -> list[Tensor]:
    """θ after ``opt.step()`` with ``grads``, on deep copies (the originals are unchanged)."""
    model, opt = copy.deepcopy((model, opt))
    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad = g.clone()
    opt.step()
    return [p.detach().clone() for p in model.parameters()]


def random_grads(model: nn.Module, seed: int = 3) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in model.parameters()]


def group_lrs(model: nn.Module, opt: torch.optim.Optimizer) -> list[float]:
    lr_of = {id(p): float(gr["lr"]) for gr in opt.param_groups for p in gr["params"]}
    return [lr_of[id(p)] for p in model.parameters()]


CASES = [(name, steps) for name in OPTIMIZERS for steps in (0, 3)]  # first step, a later one


# ---------------------------------------------------------------------------------------------
# The replay against torch.optim's real step


@pytest.mark.parametrize("groups", [False, True], ids=["one-group", "two-groups"])
@pytest.mark.parametrize(("name", "steps"), CASES)
def test_replayed_values_are_torch_optims_real_step(name: str, steps: int, groups: bool):
    model, opt = setup(name, steps, groups)
    before = copy.deepcopy(opt.state_dict())
    grads = random_grads(model)
    replay = OptimizerReplay(opt, model)
    new, _ = replay.values(list(model.parameters()), grads)
    for a, b in zip(new, real_step(model, opt, grads), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # the differentiable step lands there too
    params = {n: p.detach().requires_grad_() for n, p in model.named_parameters()}
    loss = sum((p * g).sum() for p, g in zip(params.values(), grads, strict=True))
    stepped = replay.step(params, loss)
    for a, b in zip(stepped.values(), new, strict=True):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=1e-12)
    assert str(opt.state_dict()) == str(before)  # read, never changed


@pytest.mark.parametrize("groups", [False, True], ids=["one-group", "two-groups"])
@pytest.mark.parametrize(("name", "steps"), CASES)
def test_replayed_jacobian_is_the_real_steps_and_the_differentiable_steps(
    name: str, steps: int, groups: bool
):
    """D (∂θ′/∂g = −lr·D) against central differences of torch.optim's real step (every
    element at once: the step is elementwise) and against autograd's Jacobian of the
    differentiable step (the whole Jacobian: it is diagonal)."""
    model, opt = setup(name, steps, groups)
    weights, grads = list(model.parameters()), random_grads(model)
    replay = OptimizerReplay(opt, model)
    _, scales = replay.values(weights, grads)
    h = 1e-6
    up = real_step(model, opt, [g + h for g in grads])
    down = real_step(model, opt, [g - h for g in grads])
    for lr, s, a, b in zip(group_lrs(model, opt), scales, up, down, strict=True):
        assert not isinstance(s, float) or name.startswith("sgd")
        want = -(a - b) / (2 * h)  # lr·D: compared in θ's units, where rounding is ~1e-10
        torch.testing.assert_close(lr * s * torch.ones_like(want), want, rtol=1e-6, atol=1e-9)
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach().requires_grad_() for n, p in zip(names, weights, strict=True)}

    def stepped(*gs: Tensor) -> tuple[Tensor, ...]:
        loss = sum((p * g).sum() for p, g in zip(params.values(), gs, strict=True))
        new = replay.step(params, loss)
        return tuple(new[n] for n in names)

    # autograd's own Jacobian: the step differentiates ``loss`` with torch.autograd.grad, which
    # torch.func's transforms do not trace (jacrev would see θ′ as constant in g)
    jac = torch.autograd.functional.jacobian(stepped, tuple(grads), vectorize=True)
    for k, (lr, s, g) in enumerate(zip(group_lrs(model, opt), scales, grads, strict=True)):
        for j, other in enumerate(grads):
            block = jac[k][j].reshape(g.numel(), other.numel())
            want = torch.diag(-lr * (s * torch.ones_like(g)).reshape(-1)) if j == k else 0 * block
            torch.testing.assert_close(block, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["adam", "adamw_wd", "adam_amsgrad"])
def test_first_adam_step_at_zero_gradient_has_the_limit_derivative_not_nan(name: str):
    """v′ = 0 where g = 0 on Adam's first step: √v′'s autograd derivative would be inf·0 = NaN;
    the step's derivative there is its limit (1−β₁)/(1−β₁)/eps = 1/eps (Adam's L2 term would
    move g off 0, so these are the cases without it)."""
    model, opt = setup(name, 0)
    _, kwargs = OPTIMIZERS[name]
    params = {n: p.detach().requires_grad_() for n, p in model.named_parameters()}
    eps = torch.zeros((), dtype=torch.float64, requires_grad=True)
    direction = random_grads(model)
    loss = eps * sum((p * d).sum() for p, d in zip(params.values(), direction, strict=True))
    replay = OptimizerReplay(opt, model)
    new = replay.step(params, loss)  # g = eps·direction, at eps = 0
    for (n, _), d in zip(model.named_parameters(), direction, strict=True):
        (dnew,) = torch.autograd.grad(new[n].sum(), eps, retain_graph=True)
        want = -kwargs["lr"] / kwargs["eps"] * d.sum()
        assert math.isfinite(float(dnew))
        torch.testing.assert_close(dnew, want, rtol=1e-12, atol=0)
    _, scales = replay.values(list(model.parameters()), [None] * 4)
    for s in scales:
        torch.testing.assert_close(s, torch.full_like(s, 1 / kwargs["eps"]), rtol=1e-12, atol=0)


def test_plain_sgd_replay_is_sgd_step():
    """SGD without momentum or weight decay replays to the plain virtual step."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    params = {n: p.detach().requires_grad_() for n, p in model.named_parameters()}
    x, y, _, _ = batches()
    loss = F.cross_entropy(functional_call(model, params, (x,)), y)
    want = sgd_step(params, loss, 0.3)
    got = OptimizerReplay(opt, model).step(params, loss)
    for n in params:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# The reference: functional_call and each optimizer's update written out, from its real state


def hand_step(
    model: nn.Module, opt: torch.optim.Optimizer, params: dict[str, Tensor], grads: list[Tensor]
) -> dict[str, Tensor]:
    """θ′ for ``grads`` (with graph), the real optimizer's next step written out by hand."""
    group_of = {id(p): gr for gr in opt.param_groups for p in gr["params"]}
    new = {}
    for (name, p), g in zip(model.named_parameters(), grads, strict=True):
        gr, st, theta = group_of[id(p)], opt.state.get(p, {}), params[name]
        lr, wd = float(gr["lr"]), gr["weight_decay"]
        if isinstance(opt, torch.optim.SGD):
            d = g + wd * theta
            if gr["momentum"]:
                buf = st.get("momentum_buffer")
                buf = d if buf is None else gr["momentum"] * buf + (1 - gr["dampening"]) * d
                d = d + gr["momentum"] * buf if gr["nesterov"] else buf
            new[name] = theta - lr * d
            continue
        b1, b2 = gr["betas"]
        if isinstance(opt, torch.optim.AdamW):
            theta = theta * (1 - lr * wd)
        else:
            g = g + wd * theta
        t = float(st["step"]) + 1 if st else 1.0
        if st:
            m = b1 * st["exp_avg"] + (1 - b1) * g
            v = b2 * st["exp_avg_sq"] + (1 - b2) * g**2
            if gr["amsgrad"]:
                v = torch.maximum(st["max_exp_avg_sq"], v)
            root = v.sqrt()
        else:  # v = 0: √v′ = √(1−β₂)·|g|, whose autograd derivative at g = 0 is 0, not NaN
            m = (1 - b1) * g
            root = math.sqrt(1 - b2) * g.abs()
        m_hat = m / (1 - b1**t)
        new[name] = theta - lr * m_hat / (root / math.sqrt(1 - b2**t) + gr["eps"])
    return new


def reference_eps_grad(model, opt, x, y, xv, yv) -> Tensor:
    """∂L_meta(θ′(ε))/∂ε at ε = 0 with θ′ the real optimizer's step on Σ εᵢℓᵢ."""
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    eps = torch.zeros(len(y), dtype=torch.float64, requires_grad=True)
    losses = F.cross_entropy(functional_call(model, params, (x,)), y, reduction="none")
    grads = torch.autograd.grad((eps * losses).sum(), list(params.values()), create_graph=True)
    new = hand_step(model, opt, params, list(grads))
    meta = F.cross_entropy(functional_call(model, new, (xv,)), yv)
    (g,) = torch.autograd.grad(meta, eps)
    return g


def reference_phi_grads(model, opt, vnet, x, y, xv, yv) -> list[Tensor]:
    """∂L_meta(θ′(φ))/∂φ, w = vnet(ℓ detached)/B, θ′ the real optimizer's step on Σ wᵢℓᵢ."""
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    phi = {n: p.detach().clone().requires_grad_() for n, p in vnet.named_parameters()}
    losses = F.cross_entropy(functional_call(model, params, (x,)), y, reduction="none")
    w = functional_call(vnet, phi, (losses.detach().reshape(-1, 1),)).reshape(-1) / len(y)
    grads = torch.autograd.grad((w * losses).sum(), list(params.values()), create_graph=True)
    new = hand_step(model, opt, params, list(grads))
    meta = F.cross_entropy(functional_call(model, new, (xv,)), yv)
    return list(torch.autograd.grad(meta, list(phi.values())))


def state_of(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[list[Tensor], str]:
    return [p.detach().clone() for p in model.parameters()], str(opt.state_dict())


REFERENCE_CASES = [
    pytest.param(name, steps, groups, id=f"{name}-{steps}steps{'-groups' if groups else ''}")
    for name in OPTIMIZERS
    if name != "adam_default_eps"
    for steps, groups in ((0, False), (3, False), (3, True))
]


@pytest.mark.parametrize("meta_grad", ["fast", "unrolled"])
@pytest.mark.parametrize(("name", "steps", "groups"), REFERENCE_CASES)
def test_l2rw_eps_grad_replays_the_optimizer(name: str, steps: int, groups: bool, meta_grad: str):
    model, opt = setup(name, steps, groups)
    x, y, xv, yv = batches()
    want = reference_eps_grad(model, opt, x, y, xv, yv)
    before = state_of(model, opt)
    got = l2rw_eps_grad(model, x, y, xv, yv, None, meta_grad=meta_grad, optimizer=opt)
    assert want.abs().max() > 1e-6
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL * max(1, float(want.abs().max())))
    after = state_of(model, opt)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0], strict=True))
    assert before[1] == after[1]
    if steps and name.startswith(("sgd_momentum", "adam")):  # the replay changes the answer
        plain = l2rw_eps_grad(model, x, y, xv, yv, float(opt.param_groups[0]["lr"]))
        assert (plain - want).abs().max() > 1e-3 * want.abs().max()


@pytest.mark.parametrize("engine", ["dual", "tape", "dual_twin", "per_layer"])
@pytest.mark.parametrize("name", ["sgd_nesterov_wd", "adam_wd", "adamw_wd"])
def test_l2rw_replay_by_every_engine(name: str, engine: str):
    """``dual`` needs the JVP's direction lr·D ⊙ v′ before the training forward."""
    model, opt = setup(name, 3, groups=True)
    x, y, xv, yv = batches()
    want = normalize_l2rw(reference_eps_grad(model, opt, x, y, xv, yv))
    method = L2RW(engine=engine, replay_optimizer=True)
    method.setup(model=model, device=torch.device("cpu"))
    out = method.step(StepInputs(model, x, y, xv, yv, 123.0, F.cross_entropy, opt))
    assert method.metastep.planner.last_engine == engine
    assert out.weights.sum() > 0
    torch.testing.assert_close(out.weights, want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("meta_grad", ["fast", "unrolled"])
def test_l2rw_method_and_weights_replay_the_optimizer(meta_grad: str):
    model, opt = setup("adamw_wd", 3)
    x, y, xv, yv = batches()
    want = normalize_l2rw(reference_eps_grad(model, opt, x, y, xv, yv))
    got = l2rw_weights(model, x, y, xv, yv, None, meta_grad=meta_grad, optimizer=opt)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    method = L2RW(meta_grad=meta_grad, replay_optimizer=True)
    method.setup(model=model, device=torch.device("cpu"))
    batch = StepInputs(model, x, y, xv, yv, 0.02, F.cross_entropy, opt)
    torch.testing.assert_close(method.weigh(batch), want, rtol=0, atol=ATOL)
    out = method.step(batch)
    torch.testing.assert_close(out.weights, want, rtol=0, atol=ATOL)
    assert out.losses is not None and out.losses.grad_fn is not None


@pytest.mark.parametrize("meta_grad", ["fast", "unrolled"])
@pytest.mark.parametrize(("name", "steps", "groups"), REFERENCE_CASES)
def test_mwnet_grads_replay_the_optimizer(name: str, steps: int, groups: bool, meta_grad: str):
    model, opt = setup(name, steps, groups)
    x, y, xv, yv = batches()
    torch.manual_seed(5)
    method = MWNet(hidden=5, replay_optimizer=True, meta_grad=meta_grad)
    method.setup(model=model, device=torch.device("cpu"))
    want = reference_phi_grads(model, opt, method.vnet, x, y, xv, yv)
    before = state_of(model, opt)
    got, losses, _ = method.meta_grads(StepInputs(model, x, y, xv, yv, 9.0, F.cross_entropy, opt))
    assert losses.grad_fn is not None
    for a, b in zip(got, want, strict=True):
        assert b.abs().max() > 1e-9
        torch.testing.assert_close(a, b, rtol=0, atol=ATOL * max(1, float(b.abs().max())))
    after = state_of(model, opt)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0], strict=True))
    assert before[1] == after[1]


# ---------------------------------------------------------------------------------------------
# Refusals: one line, naming what is wrong and what is supported


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda ps: torch.optim.RMSprop(ps),
            r"^replay_optimizer cannot replay RMSprop in the virtual step; supported: "
            r"torch\.optim\.SGD, torch\.optim\.Adam and torch\.optim\.AdamW$",
        ),
        (
            lambda ps: torch.optim.SGD(ps, lr=0.1, maximize=True),
            r"^replay_optimizer cannot replay SGD\(maximize=True\): the virtual step descends "
            r"the training loss; use maximize=False$",
        ),
        (
            lambda ps: torch.optim.AdamW(ps, maximize=True),
            r"^replay_optimizer cannot replay AdamW\(maximize=True\)",
        ),
    ],
    ids=["rmsprop", "sgd-maximize", "adamw-maximize"],
)
@pytest.mark.parametrize("method", ["l2rw", "mwnet"])
@pytest.mark.parametrize("meta_grad", ["fast", "unrolled"])
def test_refusals(make, message: str, method: str, meta_grad: str):
    model = mlp()
    opt = make(model.parameters())
    with pytest.raises(ValueError, match=message):
        OptimizerReplay(opt, model)
    m = L2RW(meta_grad=meta_grad, replay_optimizer=True)
    if method == "mwnet":
        m = MWNet(hidden=5, meta_grad=meta_grad, replay_optimizer=True)
    m.setup(model=model, device=torch.device("cpu"))
    x, y, xv, yv = batches()
    with pytest.raises(ValueError, match=message):
        m.step(StepInputs(model, x, y, xv, yv, 0.1, F.cross_entropy, opt))


def test_refusals_of_missing_weights_and_optimizer():
    model = mlp()
    opt = torch.optim.Adam(model[0].parameters())
    with pytest.raises(ValueError, match=r"weight '2\.weight' is trainable but in none of Adam's"):
        OptimizerReplay(opt, model)
    x, y, xv, yv = batches()
    with pytest.raises(ValueError, match=r"replay_optimizer=true needs the real optimizer"):
        L2RW(replay_optimizer=True).step(StepInputs(model, x, y, xv, yv, 0.1, F.cross_entropy))


# ---------------------------------------------------------------------------------------------
# Config: method.replay_optimizer for both methods, optimizer=adamw


@pytest.fixture
def hydra_cfg():
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    def compose_(*overrides: str):
        GlobalHydra.instance().clear()
        with initialize_config_module("reweight.conf", version_base="1.3"):
            return compose("config", overrides=list(overrides))

    yield compose_
    GlobalHydra.instance().clear()


@pytest.mark.parametrize("method", ["l2rw", "mwnet"])
def test_config_replays_adamw(hydra_cfg, method: str):
    from reweight import build_method, cli
    from reweight.cli.job import _partial

    cfg = hydra_cfg("optimizer=adamw", f"method={method}", "method.replay_optimizer=true")
    checked = cli.validate(cfg)  # the schema, then every constructor the run would call
    assert checked.method.replay_optimizer is True
    built = build_method(**dict(checked.method))
    assert built.metastep.replay_optimizer is True
    optimizer = _partial(checked.optimizer, "optimizer")(mlp().parameters())
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["weight_decay"] == 0.01
    assert hydra_cfg(f"method={method}").method.replay_optimizer is False  # the default
    with pytest.raises(ValueError, match=r"method\.replay_optimizer must be true or false"):
        cli.validate(hydra_cfg(f"method={method}", "method.replay_optimizer=2"))
    with pytest.raises(ValueError, match=r"optimizer\.betas must be a pair of numbers in \[0, 1\)"):
        cli.validate(hydra_cfg("optimizer=adamw", "optimizer.betas=[0.9,1.5]"))


def test_training_run_replays_adamw(hydra_cfg, tmp_path, data_root):
    """``train(cfg)`` (what the CLI runs) with L2RW replaying AdamW, a few steps on MNIST."""
    from reweight import cli

    cfg = hydra_cfg(
        "model=mlp",
        "method=l2rw",
        "method.replay_optimizer=true",
        "optimizer=adamw",
        "optimizer.lr=1e-3",
        "dataset.n_train=2000",
        "trainer.max_steps=4",
        "trainer.log_every=2",
        "trainer.eval_every=2",
    )
    cli.train(cfg, run_dir=tmp_path)
    resolved = (tmp_path / "config.yaml").read_text()
    assert "replay_optimizer: true" in resolved and "torch.optim.AdamW" in resolved
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["method"], summary["steps"]) == ("l2rw", 4)
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    header, last = rows[0].split(","), rows[-1].split(",")
    assert math.isfinite(float(last[header.index("meta_loss")]))


@pytest.mark.slow
def test_cli_replays_adamw_in_a_subprocess(tmp_path, data_root):
    """``python -m reweight ... optimizer=adamw method=l2rw method.replay_optimizer=true``."""
    args = ["optimizer=adamw", "method=l2rw", "method.replay_optimizer=true", "model=mlp"]
    args += ["dataset.n_train=2000", "trainer.max_steps=2", "trainer.eval_every=2"]
    run_cli(args, tmp_path)
    (summary,) = tmp_path.rglob("summary.json")
    assert json.loads(summary.read_text())["steps"] == 2
    assert "replay_optimizer: true" in (summary.parent / "config.yaml").read_text()


# ---------------------------------------------------------------------------------------------
# A fresh Adam/AdamW: its first step has no second moment, so at ε = 0 its derivative is 1/eps
# for every weight, and L2RW's replayed weights are plain SGD's at θ′₀


@pytest.mark.parametrize("opt", ["adam", "adamw"])
def test_a_fresh_adam_replay_gives_plain_sgds_weights_at_its_start(opt: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,))
    xv, yv = torch.randn(12, 6, dtype=torch.float64), torch.randint(0, 3, (12,))
    cls = torch.optim.Adam if opt == "adam" else torch.optim.AdamW
    optimizer = cls(model.parameters(), lr=1e-3, weight_decay=0.0 if opt == "adam" else 0.05)
    replayed = l2rw_weights(model, x, y, xv, yv, None, optimizer=optimizer)
    start = copy.deepcopy(model)  # θ′₀: where the fresh optimizer's zero-gradient step goes
    with torch.no_grad():
        for p in start.parameters():
            p.mul_(1 - 1e-3 * optimizer.defaults["weight_decay"])
    plain = l2rw_weights_at(model, start, x, y, xv, yv)
    assert 0 < int((replayed > 0).sum()) < len(y)  # meaningful: some examples kept, some not
    torch.testing.assert_close(replayed, plain, rtol=1e-9, atol=1e-12)


def l2rw_weights_at(model, start, x, y, xv, yv):
    """max(−g, 0)/Σ with g = −⟨∇θℓᵢ(θ), ∇θL_meta(θ′₀)⟩ (any positive step size)."""
    params = list(model.parameters())
    meta = torch.autograd.grad(F.cross_entropy(start(xv), yv), list(start.parameters()))
    g = []
    for i in range(len(y)):
        gi = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params)
        g.append(-sum((a * b).sum() for a, b in zip(gi, meta, strict=True)))
    w = torch.clamp(-torch.stack(g), min=0)
    return w / w.sum()


def test_an_all_zero_batch_says_why(caplog: pytest.LogCaptureFixture):
    """One class in the batch, the other in the meta batch: up-weighting any example raises
    the meta loss, every weight is 0, and the helper says so."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2).double()
    x, xv = torch.randn(10, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    y, yv = torch.zeros(10, dtype=torch.long), torch.ones(6, dtype=torch.long)
    with caplog.at_level(logging.WARNING, logger="reweight.functional"):
        w = l2rw_weights(model, x, y, xv, yv, 0.1)
    assert float(w.sum()) == 0.0
    assert "every weight of this batch is 0" in caplog.text and "10 examples" in caplog.text
