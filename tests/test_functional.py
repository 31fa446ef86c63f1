"""The per-batch maths of L2RW and MW-Net against independent torch.func references."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, replace_all_batch_norm_modules_

from reweight import (
    MWNet,
    WeightNet,
    l2rw_eps_grad,
    l2rw_weights,
    mwnet_weights,
    normalize_l2rw,
)
from reweight.methods import StepInputs

from .test_meta import make


def func_meta_loss_fn(model: nn.Module, x, y, xv, yv, lr, loss_fn=F.cross_entropy):
    """Build ε ↦ L_meta(θ′(ε)) with torch.func only (no twin, no buffers as weights).

    BatchNorm in training mode uses batch statistics and keeps no running statistics, the
    twin's policy, via torch.func's replace_all_batch_norm_modules_ on a copy.
    """
    ref = copy.deepcopy(model)
    if ref.training:
        replace_all_batch_norm_modules_(ref)
    params = {n: p.detach() for n, p in ref.named_parameters()}
    buffers = {n: b for n, b in ref.named_buffers()}

    def inner(p, eps):
        out = functional_call(ref, {**p, **buffers}, (x,))
        return (eps * loss_fn(out, y, reduction="none")).sum()

    def meta_loss(eps):
        g = torch.func.grad(inner)(params, eps)
        new = {n: params[n] - lr * g[n] for n in params}
        return loss_fn(functional_call(ref, {**new, **buffers}, (xv,)), yv)

    return meta_loss


def func_l2rw_weights(model, x, y, xv, yv, lr):
    eps0 = torch.zeros(len(x), dtype=x.dtype)
    g = torch.func.grad(func_meta_loss_fn(model, x, y, xv, yv, lr))(eps0)
    w = torch.clamp(-g, min=0)
    return w / w.sum() if w.sum() > 0 else w


@pytest.mark.parametrize("meta_grad", ["unrolled", "fast"])
@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet"])
def test_l2rw_weights_match_torch_func(name: str, meta_grad: str):
    model, x, y, xv, yv = make(name, n=8)
    model.train(name != "cnn")  # the CNN has dropout: compare it in eval mode
    state = copy.deepcopy(model.state_dict())
    got = l2rw_weights(model, x, y, xv, yv, lr=0.5, meta_grad=meta_grad)
    want = func_l2rw_weights(model, x, y, xv, yv, lr=0.5)
    assert (want > 0).sum() >= 2  # non-trivial: several positive weights
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    # the model is left exactly as it was: parameters, BatchNorm statistics, no .grad
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("meta_grad", ["unrolled", "fast"])
def test_l2rw_eps_grad_is_the_raw_gradient(meta_grad: str):
    model, x, y, xv, yv = make("resnet", n=8)
    g = l2rw_eps_grad(model, x, y, xv, yv, lr=0.5, meta_grad=meta_grad)
    want = torch.func.grad(func_meta_loss_fn(model, x, y, xv, yv, 0.5))(torch.zeros(8).double())
    torch.testing.assert_close(g, want, rtol=0, atol=1e-10)
    assert (g > 0).any() and (g < 0).any()


@pytest.mark.parametrize(
    ("meta_grad", "order"), [("unrolled", ["none", "mean"]), ("fast", ["mean", "none"])]
)
def test_l2rw_custom_loss_fn_is_called_with_both_reductions(meta_grad: str, order: list):
    """Once each: fast takes the meta gradient first (its activations are freed before the
    training forward's exist; the tape records that forward), unrolled after the virtual step."""
    calls = []

    def loss_fn(out, target, reduction="mean"):
        calls.append(reduction)
        return F.cross_entropy(out, target, reduction=reduction)

    model, x, y, xv, yv = make("mlp")
    engine = "tape" if meta_grad == "fast" else "auto"
    l2rw_weights(model, x, y, xv, yv, 0.1, loss_fn, meta_grad=meta_grad, engine=engine)
    assert calls == order


def test_normalize_l2rw_rules():
    g = torch.tensor([-1.0, 2.0, -3.0, 0.0])
    assert normalize_l2rw(g).tolist() == [0.25, 0.0, 0.75, 0.0]
    assert normalize_l2rw(torch.tensor([1.0, 0.0, 2.0])).tolist() == [0.0, 0.0, 0.0]


def test_mwnet_weights_normalisations():
    vnet = WeightNet().double()
    losses = torch.rand(7, dtype=torch.float64)
    v = vnet(losses[:, None])[:, 0]
    torch.testing.assert_close(mwnet_weights(vnet, losses, "none"), v / 7)
    torch.testing.assert_close(mwnet_weights(vnet, losses, "sum"), v / v.sum())
    with pytest.raises(ValueError, match=r"normalize must be one of \['none', 'sum'\], got 'max'"):
        mwnet_weights(vnet, losses, "max")


@pytest.mark.parametrize("meta_grad", ["unrolled", "fast"])
@pytest.mark.parametrize("detach_loss", [True, False], ids=["detached", "through-losses"])
@pytest.mark.parametrize("normalize", ["none", "sum"])
@pytest.mark.parametrize("name", ["mlp", "resnet"])
def test_mwnet_hypergradient_matches_torch_func(
    name: str, normalize: str, detach_loss: bool, meta_grad: str
):
    model, x, y, xv, yv = make(name, n=8)
    model.train()
    torch.manual_seed(1)
    method = MWNet(hidden=5, normalize=normalize, detach_loss=detach_loss, meta_grad=meta_grad)
    method.setup(model=model, device=torch.device("cpu"))
    vnet = method.vnet
    state = copy.deepcopy(model.state_dict())
    got, _, _ = method.meta_grads(StepInputs(model, x, y, xv, yv, 0.5, F.cross_entropy))
    model.load_state_dict(state)  # the step's forward moved the BatchNorm statistics

    ref = copy.deepcopy(model)
    replace_all_batch_norm_modules_(ref)
    params = {n: p.detach() for n, p in ref.named_parameters()}
    phi = {n: p.detach() for n, p in vnet.named_parameters()}

    def meta_loss(phi_):
        def inner(p):
            ell = F.cross_entropy(functional_call(ref, p, (x,)), y, reduction="none")
            net_input = ell.detach() if detach_loss else ell
            v = functional_call(vnet, phi_, (net_input[:, None],))[:, 0]
            w = v / len(v) if normalize == "none" else v / v.sum()
            return (w * ell).sum()

        g = torch.func.grad(inner)(params)
        new = {n: params[n] - 0.5 * g[n] for n in params}
        return F.cross_entropy(functional_call(ref, new, (xv,)), yv)

    want = torch.func.grad(meta_loss)(phi)
    for (n, _), g in zip(vnet.named_parameters(), got, strict=True):
        assert g.abs().max() > 0
        torch.testing.assert_close(g, want[n], rtol=0, atol=1e-10)


@pytest.mark.parametrize("meta_grad", ["unrolled", "fast"])
def test_mwnet_step_updates_the_net_and_returns_weights_from_the_updated_net(meta_grad: str):
    model, x, y, xv, yv = make("mlp", n=8)
    method = MWNet(hidden=5, lr=0.1, meta_grad=meta_grad)
    method.setup(model=model, device=torch.device("cpu"))
    before = [p.detach().clone() for p in method.vnet.parameters()]
    out = method.step(StepInputs(model, x, y, xv, yv, 0.5, F.cross_entropy))
    assert any(not torch.equal(a, b) for a, b in zip(before, method.vnet.parameters(), strict=True))
    with torch.no_grad():
        want = mwnet_weights(method.vnet, F.cross_entropy(model(x), y, reduction="none"))
    torch.testing.assert_close(out.weights, want, rtol=0, atol=1e-12)
    assert out.losses is not None and out.losses.grad_fn is not None


@pytest.mark.parametrize("meta_grad", ["unrolled", "fast"])
def test_mwnet_replay_refuses_an_optimizer_it_cannot_replay(meta_grad: str):
    model, x, y, xv, yv = make("mlp")
    method = MWNet(replay_optimizer=True, meta_grad=meta_grad)
    method.setup(model=model, device=torch.device("cpu"))
    opt = torch.optim.RMSprop(model.parameters())
    with pytest.raises(
        ValueError,
        match=r"replay_optimizer cannot replay RMSprop in the virtual step; supported: "
        r"torch\.optim\.SGD, torch\.optim\.Adam and torch\.optim\.AdamW$",
    ):
        method.step(StepInputs(model, x, y, xv, yv, 0.5, F.cross_entropy, opt))


def test_method_argument_errors():
    from reweight import build_method

    with pytest.raises(ValueError, match=r"method.name must be one of \[.*'l2rw'.*\], got 'l2w'"):
        build_method("l2w")
    with pytest.raises(ValueError, match="meta_grad must be one of"):
        build_method("l2rw", meta_grad="both")
    with pytest.raises(ValueError, match=r"method 'erm' has no option lr; allowed: none"):
        build_method("erm", lr=0.1)
    with pytest.raises(
        ValueError,
        match=r"method 'l2rw' has no option hidden; allowed: \['meta_grad', 'engine', 'engine_p",
    ):
        build_method("l2rw", hidden=3)
    with pytest.raises(ValueError, match=r"method.beta must be in \[0, 1\), got 1.5"):
        build_method("class_balanced", beta=1.5)
    with pytest.raises(ValueError, match=r"method.normalize must be one of"):
        build_method("mwnet", normalize="softmax")
