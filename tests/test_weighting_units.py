"""The shared machinery of weighting-net methods (reweight.methods.weighting) beyond what the
method-level references of test_metastep.py and test_cmwnet.py reach: the defaults and
refusals, the weights' scaling over a data-parallel batch (two ranks holding the same batch,
``test_metastep_units.Mirror``, against one process on the doubled batch), the net learning
through the losses (``detach_loss=False``) against torch.func, a net parameter the weights do
not use, the zero-sum flag on both kinds of step, what a step hands on, and the state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

from reweight.metastep import StepInputs
from reweight.methods.weighting import WeightingNetMethod

from .test_metastep import LR, _params, setup
from .test_metastep_units import Mirror

DT = torch.float64
CPU = torch.device("cpu")


def vnet(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1), nn.Sigmoid())


def method(net=None, **kw) -> WeightingNetMethod:
    m = WeightingNetMethod(net if net is not None else vnet(), lr=1e-2, **kw)
    return m


def close(a, b, tol=1e-10):
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_defaults_and_refusals():
    m = WeightingNetMethod(vnet())
    group = m.optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (1e-3, 1e-4)
    assert (m.normalize, m.detach_loss, m.meta_every) == ("none", True, 1)
    step = m.metastep
    assert (step.meta_grad, step.planner.engine, step.planner.policy) == ("fast", "auto", "auto")
    assert (step.chunks, step.params, step.replay_optimizer) == ("auto", "all", False)
    assert step.twins is m.twins  # the method's one twin cache
    assert repr(m) == (
        "WeightingNetMethod(normalize='none', detach_loss=True, MetaStep(meta_grad='fast', "
        "engine='auto', engine_policy='auto', params='all', replay_optimizer=False, "
        "chunks='auto', at_zero=False))"
    )
    for every in (0, True, "2", 1.0):
        with pytest.raises(ValueError) as info:
            WeightingNetMethod(vnet(), meta_every=every)
        assert str(info.value) == f"method.meta_every must be an integer >= 1, got {every!r}"
    with pytest.raises(ValueError) as info:
        WeightingNetMethod(vnet(), normalize="mean")
    assert str(info.value) == "method.normalize must be one of ['none', 'sum'], got 'mean'"
    for lr in (0, 0.0, -1e-3):
        with pytest.raises(ValueError) as info:
            WeightingNetMethod(vnet(), lr=lr)
        assert str(info.value) == f"method.lr must be > 0, got {lr}"


def test_setup_moves_the_net_to_the_models_device_and_precision():
    m = method()
    m.setup(model=nn.Linear(2, 3).double(), device=CPU)
    assert all(p.dtype == DT for p in m.vnet.parameters())
    m = method()
    m.setup(model=nn.Linear(2, 3).double(), device=torch.device("meta"))
    assert all(p.device.type == "meta" and p.dtype == DT for p in m.vnet.parameters())


@pytest.mark.parametrize("normalize", ["none", "sum"])
def test_the_weights_are_scaled_over_the_global_batch(normalize):
    m = method(normalize=normalize)
    m.setup(model=nn.Linear(2, 3).double(), device=CPU)
    model, x, y, xv, yv = setup("mlp")
    losses = torch.linspace(0.1, 2.0, len(y), dtype=DT)
    v = m.vnet(losses[:, None]).reshape(-1).detach()
    alone = StepInputs(model, x, y, xv, yv, LR, F.cross_entropy)
    close(m.weights(losses, alone).detach(), v / (len(v) if normalize == "none" else v.sum()))
    mirror = Mirror()
    rank = StepInputs(model, x, y, xv, yv, LR, F.cross_entropy, dist=mirror, global_batch_size=30)
    want = v / 30 if normalize == "none" else v / (2 * v.sum())
    close(m.weights(losses, rank).detach(), want)
    assert mirror.calls == ([] if normalize == "none" else [False])
    assert m.weights(losses, rank, differentiable=True).requires_grad
    assert mirror.calls == ([] if normalize == "none" else [False, True])


@pytest.mark.parametrize("meta_grad", ["fast", "unrolled"])
@pytest.mark.parametrize("normalize", ["none", "sum"])
def test_two_ranks_with_one_batch_learn_as_one_process_with_it_twice(normalize, meta_grad):
    model, x, y, xv, yv = setup("mlp")
    both = method(normalize=normalize, meta_grad=meta_grad)
    both.setup(model=model, device=CPU)
    want, _, _ = both.meta_grads(
        StepInputs(model, torch.cat([x, x]), torch.cat([y, y]), xv, yv, LR, F.cross_entropy)
    )
    rank = method(normalize=normalize, meta_grad=meta_grad)
    rank.setup(model=model, device=CPU)
    mirror = Mirror()
    batch = StepInputs(
        model, x, y, xv, yv, LR, F.cross_entropy, dist=mirror, global_batch_size=2 * len(y)
    )
    got, _, _ = rank.meta_grads(batch)
    assert min(float(g.abs().max()) for g in want) > 1e-8
    for a, b in zip(got, want, strict=True):
        close(a, b)


@pytest.mark.parametrize("meta_grad", ["fast", "unrolled"])
def test_a_net_learning_through_the_losses_equals_torch_func(meta_grad):
    """detach_loss=False: the virtual step θ′ = θ − lr·∇θ Σ w(ℓ(θ))·ℓ(θ) differentiates the
    weights too (the net's input is the loss with its graph)."""
    model, x, y, xv, yv = setup("mlp")
    m = method(detach_loss=False, meta_grad=meta_grad)
    m.setup(model=model, device=CPU)
    theta, phi = _params(model), _params(m.vnet)

    def meta(p):
        def weighted(th):
            losses = F.cross_entropy(functional_call(model, th, (x,)), y, reduction="none")
            w = functional_call(m.vnet, p, (losses[:, None],)).reshape(-1) / len(y)
            return (w * losses).sum()

        g = grad(weighted)(theta)
        new = {k: theta[k] - LR * g[k] for k in theta}
        return F.cross_entropy(functional_call(model, new, (xv,)), yv)

    want = grad(meta)(phi)
    got, _, _ = m.meta_grads(StepInputs(model, x, y, xv, yv, LR, F.cross_entropy))
    for g, k in zip(got, phi, strict=True):
        close(g, want[k], 1e-8)
    detached = method(meta_grad=meta_grad)
    detached.setup(model=model, device=CPU)
    other, _, _ = detached.meta_grads(StepInputs(model, x, y, xv, yv, LR, F.cross_entropy))
    assert max(float((a - b).abs().max()) for a, b in zip(got, other, strict=True)) > 1e-6


class Unused(nn.Module):
    """A weighting net with a parameter its output never reads."""

    def __init__(self) -> None:
        super().__init__()
        self.net = vnet()
        self.spare = nn.Parameter(torch.ones(2))

    def forward(self, losses):
        return self.net(losses)


def test_a_net_parameter_the_weights_do_not_use_gets_a_zero_gradient():
    model, x, y, xv, yv = setup("mlp")
    m = method(Unused())
    m.setup(model=model, device=CPU)
    grads, _, _ = m.meta_grads(StepInputs(model, x, y, xv, yv, LR, F.cross_entropy))
    by_name = dict(zip([n for n, _ in m.vnet.named_parameters()], grads, strict=True))
    assert torch.equal(by_name["spare"], torch.zeros(2, dtype=DT))
    assert by_name["net.0.weight"].abs().max() > 0


def zero_net() -> nn.Module:
    net = nn.Sequential(nn.Linear(1, 1), nn.ReLU())
    with torch.no_grad():
        net[0].weight.fill_(0.0)
        net[0].bias.fill_(-1.0)
    return net


@pytest.mark.parametrize("step", [0, 1])  # meta_every=2: a meta step, then a plain one
def test_a_step_hands_on_its_losses_meta_loss_and_zero_sum(step):
    model, x, y, xv, yv = setup("mlp")
    batch = StepInputs(model, x, y, xv, yv, LR, F.cross_entropy, step=step)
    m = method(meta_every=2)
    m.setup(model=model, device=CPU)
    out = m.step(batch)
    close(out.losses.detach(), F.cross_entropy(model(x), y, reduction="none").detach())
    assert out.losses.grad_fn is not None
    assert out.zero_sum is False and 0 < float(out.weights.sum()) < 1  # v/B, v < 1
    if step == 0:
        assert isinstance(out.meta_loss, float) and out.meta_loss > 0
    else:
        assert out.meta_loss is None
    zero = method(zero_net(), meta_every=2)
    zero.setup(model=model, device=CPU)
    out = zero.step(batch)
    assert out.zero_sum is True and torch.equal(out.weights, torch.zeros(len(y), dtype=DT))


def test_a_checkpoint_restores_the_nets_precision_before_setup():
    saved = method()
    saved.setup(model=nn.Linear(2, 3).double(), device=CPU)
    state = saved.state_dict()
    fresh = method(vnet(seed=7))  # float32 until its setup
    fresh.load_state_dict(state)
    for a, b in zip(fresh.vnet.parameters(), saved.vnet.parameters(), strict=True):
        assert a.dtype == DT and torch.equal(a, b)
