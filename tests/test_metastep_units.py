"""The meta step's parts that test_metastep.py's method-level comparisons do not reach
(reweight.metastep), on the small float64 MLP there: each refusal word for word, the virtual
step with a gradient reduction and a replayed optimizer against closed forms, what ``update``
leaves behind, a data-parallel step with two ranks that hold the same batch (a stand-in for
the process group: Σ over ranks is 2x) against the one-process step on the doubled batch, a
replayed optimizer in both routes against torch.func and against each other, and what the
meta step reports and keeps. Seconds a run: in the mutation selection of metastep.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad

from reweight.meta import TwinCache
from reweight.metastep import MetaStep, StepInputs, check_meta_grad, select_params, virtual_step

from .test_metastep import LR, ConvBN, mlp, setup

DT = torch.float64


def batch_of(model, x, y, xv, yv, **kw) -> StepInputs:
    return StepInputs(model, x, y, xv, yv, LR, F.cross_entropy, **kw)


def close(a: Tensor, b: Tensor, tol: float = 1e-10) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# -- refusals ----------------------------------------------------------------------------------


def test_each_option_is_refused_with_its_message():
    with pytest.raises(ValueError) as info:
        check_meta_grad("slow")
    assert str(info.value) == "meta_grad must be one of ['fast', 'unrolled'], got 'slow'"
    with pytest.raises(ValueError) as info:
        MetaStep(meta_grad="unrolled", engine_policy="cpu")
    assert str(info.value) == (
        "method.engine=auto / method.engine_policy=cpu choose how meta_grad=fast computes its "
        "JVPs; with meta_grad=unrolled leave them 'auto'"
    )
    for chunks in (0, -1, True, "two", 1.5):
        with pytest.raises(ValueError) as info:
            MetaStep(chunks=chunks)
        assert (
            str(info.value)
            == f"method.meta_chunks must be 'auto' or an integer >= 1, got {chunks!r}"
        )
    with pytest.raises(ValueError) as info:
        MetaStep(meta_grad="unrolled", chunks=2)
    assert str(info.value) == (
        "method.meta_chunks=2 needs meta_grad=fast (the unrolled meta gradient differentiates "
        "through the whole virtual step); use meta_chunks=1"
    )
    MetaStep(meta_grad="unrolled", chunks=1)  # one slice is the whole batch: allowed
    with pytest.raises(ValueError, match=r"^method\.engine=dual cannot run meta step: dual "):
        MetaStep(engine="dual")  # the default label names the step in the message
    with pytest.raises(ValueError) as info:
        virtual_step({"w": torch.ones(2, requires_grad=True)}, torch.tensor(1.0), None, None)
    assert str(info.value) == "lr is needed for a plain SGD virtual step (no optimizer to replay)"


def test_a_step_is_refused_what_it_needs():
    model, x, y, xv, yv = setup("mlp")
    for meta_grad in ("fast", "unrolled"):
        step = MetaStep(at_zero=True, meta_grad=meta_grad, replay_optimizer=True)
        with pytest.raises(ValueError) as info:
            step(batch_of(model, x, y, xv, yv))
        assert str(info.value) == (
            "method.replay_optimizer=true needs the real optimizer (StepInputs.optimizer), got None"
        )
        with pytest.raises(AssertionError):  # a meta batch without its labels
            MetaStep(at_zero=True, meta_grad=meta_grad)(batch_of(model, x, y, xv, None))
        with pytest.raises(ValueError) as info:
            MetaStep(meta_grad=meta_grad)(batch_of(model, x, y, xv, yv))
        assert str(info.value) == "MetaStep: give a seed function unless at_zero (then none)"


def batch_norms(n: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(5, 4), *[m for _ in range(n) for m in (nn.BatchNorm1d(4), nn.Tanh())],
        nn.Linear(4, 3),
    ).double()  # fmt: skip


def test_setup_refuses_slices_of_a_batch_that_batchnorm_couples():
    cpu = torch.device("cpu")
    with pytest.raises(ValueError) as info:
        MetaStep(chunks=2).setup(batch_norms(4), cpu)
    assert str(info.value) == (
        "method.meta_chunks=2 would change the meta gradient of this model: its BatchNorm "
        "layers (1, 3, 5) couple the examples of a batch through the batch statistics; use "
        "meta_chunks=1"
    )
    evaluated = batch_norms(1).eval()  # the trainer sets train mode: refused at setup too
    with pytest.raises(ValueError, match=r"its BatchNorm layers \(1\) couple"):
        MetaStep(chunks=2).setup(evaluated, cpu)
    MetaStep(chunks=2).setup(mlp().double(), cpu)  # no BatchNorm: slices allowed
    MetaStep(chunks=1).setup(batch_norms(2), cpu)
    MetaStep(chunks="auto").setup(batch_norms(2), cpu)  # auto takes one slice with BatchNorm
    with pytest.raises(ValueError) as info:  # a forced engine the model rules out
        MetaStep(engine="per_layer").setup(ConvBN().double().train(), cpu)
    assert str(info.value) == (
        "method.engine=per_layer cannot run ConvBN: BatchNorm in training mode (bn); "
        "use method.engine=auto"
    )
    MetaStep(meta_grad="unrolled").setup(ConvBN().double().train(), cpu)


# -- select_params -----------------------------------------------------------------------------


def test_select_params_reads_nested_module_names():
    model = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.Tanh(), nn.Linear(3, 3)),
                          nn.Sequential(nn.Sequential(nn.Linear(3, 2))))  # fmt: skip
    names = [n for n, _ in model.named_parameters()]
    assert select_params(model) == names  # "all" by default
    assert select_params(model, "head") == ["2.0.0.weight", "2.0.0.bias"]
    assert select_params(model, ["1.1"]) == ["1.1.weight", "1.1.bias"]  # a nested module
    assert select_params(model, ["2.0.*"]) == ["2.0.0.weight", "2.0.0.bias"]
    with pytest.raises(ValueError) as info:
        select_params(nn.Sequential(nn.Tanh()), "head")
    assert str(info.value) == "method.meta_params=head: Sequential has no trainable layer"
    with pytest.raises(ValueError) as info:
        select_params(model, ["fc"])
    assert str(info.value) == (
        "method.meta_params=['fc'] matches no trainable parameter of Sequential (its "
        "parameters: 0.weight, 0.bias, 1.1.weight, 1.1.bias, 2.0.0.weight, 2.0.0.bias)"
    )
    seven = nn.Sequential(*[nn.Linear(2, 2) for _ in range(3)], nn.Linear(2, 2, bias=False))
    with pytest.raises(ValueError) as info:
        select_params(seven, ["fc"])
    assert str(info.value).endswith(
        "(its parameters: 0.weight, 0.bias, 1.weight, 1.bias, 2.weight, 2.bias, ...)"
    )


# -- virtual_step ------------------------------------------------------------------------------


def test_virtual_step_reduces_the_gradient_and_replays_the_optimizer():
    torch.manual_seed(0)
    w = torch.randn(3, dtype=DT, requires_grad=True)
    x = torch.randn(3, dtype=DT)

    def loss():
        return (w * x).sum() ** 2

    g = 2 * (w * x).sum().detach() * x  # ∂loss/∂w
    double = lambda gs: [2 * t for t in gs]  # noqa: E731
    new = virtual_step({"w": w}, loss(), 0.5, None, reduce_grads=double)
    close(new["w"].detach(), w.detach() - 0.5 * 2 * g)
    assert new["w"].requires_grad  # differentiable through the gradient
    opt = torch.optim.SGD([w], lr=0.3, weight_decay=0.1)
    new = virtual_step({"w": w}, loss(), 99.0, opt, reduce_grads=double)  # lr not read
    close(new["w"].detach(), w.detach() - 0.3 * (2 * g + 0.1 * w.detach()))
    new = virtual_step({"w": w}, loss(), None, opt)
    close(new["w"].detach(), w.detach() - 0.3 * (g + 0.1 * w.detach()))


# -- update ------------------------------------------------------------------------------------


def bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).double()


@pytest.mark.parametrize("meta_grad", ["fast", "unrolled"])
def test_update_takes_the_real_forward_and_keeps_its_graph(meta_grad):
    _, x, y, xv, yv = setup("mlp")
    model = bn_model()
    want = F.cross_entropy(copy.deepcopy(model)(x), y, reduction="none").detach()
    stats = model[1].running_mean.clone()
    step = MetaStep(at_zero=True, meta_grad=meta_grad)
    out = step(batch_of(model, x, y, xv, yv), update=False)
    assert out.losses is None
    assert torch.equal(model[1].running_mean, stats)  # the twin's forward: no statistics
    out = step(batch_of(model, x, y, xv, yv))  # update=True by default
    assert not torch.equal(model[1].running_mean, stats)  # the model's one forward moved them
    close(out.losses.detach(), want)
    out.losses.sum().backward()  # the real update's graph is whole
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in model.parameters())


# -- data-parallel -----------------------------------------------------------------------------


class Mirror:
    """Two ranks holding the same batch: Σ over ranks is twice this rank's tensor; with
    ``differentiable`` the backward sums both ranks' (equal) incoming gradients, as torch's
    differentiable all-reduce does."""

    world_size, rank = 2, 0

    def __init__(self) -> None:
        self.calls: list[bool] = []

    def all_reduce_sum(self, tensor: Tensor, differentiable: bool = False) -> Tensor:
        self.calls.append(differentiable)
        return 2 * tensor if differentiable else 2 * tensor.detach()


def seeds_fn(n: int):
    """s = sigmoid(a·ℓ + b) / n with graph to (a, b)."""
    ab = torch.tensor([0.7, -0.3], dtype=DT, requires_grad=True)
    return ab, lambda losses: torch.sigmoid(ab[0] * losses + ab[1]) / n


@pytest.mark.parametrize("meta_grad", ["fast", "unrolled"])
def test_two_ranks_with_one_batch_equal_one_process_with_it_twice(meta_grad):
    model, x, y, xv, yv = setup("mlp")
    n = 2 * len(y)
    _, seeds = seeds_fn(n)
    both = MetaStep(meta_grad=meta_grad)(
        batch_of(model, torch.cat([x, x]), torch.cat([y, y]), xv, yv), seeds
    )
    mirror = Mirror()
    rank = batch_of(model, x, y, xv, yv, dist=mirror, global_batch_size=n)
    out = MetaStep(meta_grad=meta_grad)(rank, seeds)
    close(out.c, both.c[: len(y)])
    assert both.c.abs().max() > 1e-4
    close(both.c[: len(y)], both.c[len(y) :])  # the two copies alike (to rounding)
    assert mirror.calls and all(mirror.calls) == (meta_grad == "unrolled")
    # at w = 0 the unrolled step is this rank's own: no collective
    at_zero = MetaStep(at_zero=True, meta_grad="unrolled")
    mirror = Mirror()
    local = at_zero(batch_of(model, x, y, xv, yv))
    close(at_zero(batch_of(model, x, y, xv, yv, dist=mirror, global_batch_size=n)).c, local.c)
    assert mirror.calls == []


def test_global_sums_of_step_inputs():
    model, x, y, xv, yv = setup("mlp")
    alone = batch_of(model, x, y, xv, yv)
    t = torch.arange(6.0, dtype=DT).reshape(2, 3)
    assert alone.global_sum(t) is t and alone.global_sum_all([t]) == [t]
    assert alone.n_global == len(y)
    mirror = Mirror()
    rank = batch_of(model, x, y, xv, yv, dist=mirror, global_batch_size=30)
    assert rank.n_global == 30
    a = torch.ones(3, dtype=DT, requires_grad=True)
    summed = rank.global_sum(a, differentiable=True)
    assert summed.requires_grad and mirror.calls == [True]
    assert not rank.global_sum(a).requires_grad and mirror.calls == [True, False]
    parts = rank.global_sum_all([t, torch.tensor([7.0], dtype=DT)])
    assert [p.shape for p in parts] == [(2, 3), (1,)]
    close(parts[0], 2 * t)
    close(parts[1], torch.tensor([14.0], dtype=DT))
    assert len(mirror.calls) == 3  # one all-reduce for both
    assert rank.global_sum_all([]) == []


# -- a replayed optimizer ----------------------------------------------------------------------

WD, OPT_LR = 0.1, 0.3


def reference_c(model, x, y, xv, yv, s: Tensor) -> Tensor:
    """∂L_meta(θ′)/∂σ at σ = s for θ′ = θ − lr·(Σ σᵢ∇ℓᵢ + wd·θ): SGD with weight decay."""
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}

    def meta(sigma):
        def weighted(th):
            losses = F.cross_entropy(functional_call(model, th, (x,)), y, reduction="none")
            return (sigma * losses).sum()

        g = grad(weighted)(theta)
        new = {k: theta[k] - OPT_LR * (g[k] + WD * theta[k]) for k in theta}
        return F.cross_entropy(functional_call(model, new, (xv,)), yv)

    return grad(meta)(s)


@pytest.mark.parametrize("meta_grad", ["fast", "unrolled"])
def test_a_replayed_sgd_with_weight_decay_equals_torch_func(meta_grad):
    model, x, y, xv, yv = setup("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=OPT_LR, weight_decay=WD)
    b = batch_of(model, x, y, xv, yv, optimizer=opt)  # its lr (0.5) is not the optimizer's
    zero = MetaStep(at_zero=True, meta_grad=meta_grad, replay_optimizer=True)(b)
    close(zero.c, reference_c(model, x, y, xv, yv, torch.zeros(len(y), dtype=DT)))
    _, seeds = seeds_fn(len(y))
    out = MetaStep(meta_grad=meta_grad, replay_optimizer=True)(b, seeds)
    close(out.c, reference_c(model, x, y, xv, yv, out.seeds.detach()))
    plain = MetaStep(meta_grad=meta_grad)(batch_of(model, x, y, xv, yv), seeds)
    assert (plain.c - out.c).abs().max() > 1e-4  # the replay changed the answer


def adam_after_one_step(model, x, y) -> torch.optim.Optimizer:
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


def test_a_replayed_adam_takes_the_same_step_by_both_routes():
    """Adam's update is not linear in the gradient (D ≠ 1, θ′₀ ≠ θ after its first step): the
    fast route's first-order identity against the unrolled route's double backward."""
    model, x, y, xv, yv = setup("mlp")
    opt = adam_after_one_step(model, x, y)
    b = batch_of(model, x, y, xv, yv, optimizer=opt)
    _, seeds = seeds_fn(len(y))
    for at_zero in (True, False):
        fn = None if at_zero else seeds
        got = MetaStep(at_zero=at_zero, replay_optimizer=True)(b, fn)
        want = MetaStep(at_zero=at_zero, meta_grad="unrolled", replay_optimizer=True)(b, fn)
        close(got.c, want.c, 1e-8)
        sgd = MetaStep(at_zero=at_zero, meta_grad="unrolled")(batch_of(model, x, y, xv, yv), fn)
        assert (sgd.c - want.c).abs().max() > 1e-4


def test_unrolled_seeds_of_another_precision_give_c_in_the_losses():
    model, x, y, xv, yv = setup("mlp")
    _, seeds = seeds_fn(len(y))
    single = MetaStep(meta_grad="unrolled")(
        batch_of(model, x, y, xv, yv), lambda losses: seeds(losses).float()
    )
    want = MetaStep(meta_grad="unrolled")(
        batch_of(model, x, y, xv, yv), lambda losses: seeds(losses).float().double()
    )
    close(single.c, want.c, 1e-12)


# -- what it reports and keeps -----------------------------------------------------------------


def test_describe_repr_and_state():
    step = MetaStep(meta_grad="unrolled", params=("fc*", "head"))
    assert step.describe() == {
        "engine": "unrolled",
        "reason": "meta_grad=unrolled: double backward",
        "params": ["fc*", "head"],
    }
    assert MetaStep(meta_grad="unrolled").describe() == {
        "engine": "unrolled",
        "reason": "meta_grad=unrolled: double backward",
    }
    assert repr(MetaStep(engine="tape", engine_policy="cpu", params="head", chunks="auto")) == (
        "MetaStep(meta_grad='fast', engine='tape', engine_policy='cpu', params='head', "
        "replay_optimizer=False, chunks='auto', at_zero=False)"
    )
    twins = TwinCache()
    shared = MetaStep(twins=twins)
    assert shared.twins is twins and shared.planner.twins is twins  # the method's one cache
    own = MetaStep()
    assert own.planner.twins is own.twins
    model, x, y, xv, yv = setup("mlp")
    step = MetaStep(at_zero=True)
    step(batch_of(model, x, y, xv, yv))
    state = step.state_dict()
    assert sum(state["jvps"].values()) == 1
    fresh = MetaStep(at_zero=True)
    fresh.load_state_dict(state)
    assert fresh.planner.jvps == state["jvps"] and fresh.state_dict() == state
    fresh.load_state_dict({"jvps": {"tape": 3.0}})
    assert fresh.planner.jvps == {"tape": 3}
    fresh.load_state_dict({"other": 1})  # a checkpoint without counts: none
    assert fresh.planner.jvps == {}
    fresh.load_state_dict({"jvps": {"tape": 2}})
    fresh.load_state_dict(None)  # from before the meta step kept its counts: left as is
    assert fresh.planner.jvps == {"tape": 2}
