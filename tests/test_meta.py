"""Buffer-backed meta modules, checked against closed forms and torch.func references."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.func import functional_call

from reweight.meta import (
    MetaModule,
    TwinCache,
    sgd_direction,
    sgd_step,
    sgd_values,
    to_meta,
    trainable,
)
from reweight.meta.modules import MetaLinear, MetaSequential
from reweight.meta.twins import modules_of, signature

# ---------------------------------------------------------------------------------------------
# Small models used throughout: a LeNet-sized CNN, an MLP and a ResNet with BatchNorm.


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(16 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.features(x).flatten(1)))


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.short(x))


class SmallResNet(nn.Module):
    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
        self.layer1 = nn.Sequential(Block(4, 4, 1), Block(4, 8, 2))
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(F.relu(self.stem(x)))
        return self.head(x.mean((2, 3)))


def mlp(num_classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, num_classes))


MODELS = {
    "mlp": (mlp, (12,)),
    "cnn": (SmallCNN, (1, 28, 28)),
    "resnet": (SmallResNet, (3, 8, 8)),
}


def _randomise_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Give BatchNorm non-trivial affine weights and running statistics."""
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            with torch.no_grad():
                mod.weight.uniform_(0.5, 1.5, generator=gen)
                mod.bias.normal_(0, 0.1, generator=gen)
                mod.running_mean.normal_(0, 0.2, generator=gen)
                mod.running_var.uniform_(0.5, 2.0, generator=gen)


def make(name: str, dtype: torch.dtype = torch.float64, n: int = 6):
    torch.manual_seed(0)
    factory, shape = MODELS[name]
    model = factory().to(dtype)
    gen = torch.Generator().manual_seed(1)
    _randomise_bn(model, gen)
    x = torch.randn(n, *shape, generator=gen, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=gen)
    xv = torch.randn(n + 1, *shape, generator=gen, dtype=dtype)
    yv = torch.randint(0, 3, (n + 1,), generator=gen)
    return model, x, y, xv, yv


# ---------------------------------------------------------------------------------------------
# The two-step worked example: f(x; w) = (w·x)², loss |f − 2|, x = 1, w₀ = 1, lr 0.1.


class Square(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(1, 1, bias=False)
        nn.init.ones_(self.lin.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) ** 2


def test_two_step_unrolled_example_through_the_twin():
    x = torch.ones(1, 1, dtype=torch.float64, requires_grad=True)
    twin = to_meta(Square().double())
    for step in range(2):
        loss = F.l1_loss(twin(x), torch.full((1, 1), 2.0, dtype=torch.float64))
        if step == 1:
            (dx,) = torch.autograd.grad(loss, x, retain_graph=True)
        twin.virtual_step(loss, lr=0.1)
    assert dx.item() == pytest.approx(-3.84, abs=1e-12)
    w2 = dict(twin.named_params())["lin.weight"]
    assert w2.item() == pytest.approx(1.44, abs=1e-12)
    # w₂ keeps its history back to x: dw₂/dx = d(1 + 0.2x²)²/dx = 2·1.2·0.4 at x = 1.
    (dw2,) = torch.autograd.grad(w2.sum(), x)
    assert dw2.item() == pytest.approx(0.96, abs=1e-12)


def test_two_step_example_with_plain_module_loses_the_history():
    """A plain nn.Module updated in place treats w₁ as a constant: dL/dx = −2.88."""
    x = torch.ones(1, 1, dtype=torch.float64, requires_grad=True)
    model = Square().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        loss = F.l1_loss(model(x), torch.full((1, 1), 2.0, dtype=torch.float64))
        if step == 1:
            (dx,) = torch.autograd.grad(loss, x, retain_graph=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert dx.item() == pytest.approx(-2.88, abs=1e-12)
    assert model.lin.weight.item() == pytest.approx(1.44, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# to_meta computes the same function.


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("train", [True, False])
def test_to_meta_same_outputs(name: str, train: bool):
    model, x, *_ = make(name)
    model.train(train)
    twin = to_meta(model)
    if name == "cnn" and train:  # dropout: same mask from the same RNG state
        torch.manual_seed(3)
        a = twin(x)
        torch.manual_seed(3)
        b = model(x)
    else:
        a, b = twin(x), model(x)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert isinstance(twin, MetaModule) and isinstance(twin, type(model))
    assert [n for n, _ in twin.named_params()] == [n for n, _ in model.named_parameters()]
    assert not list(twin.parameters())


@pytest.mark.parametrize("train", [True, False])
def test_to_meta_torchvision_resnet18(train: bool):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).train(train)
    _randomise_bn(model, torch.Generator().manual_seed(0))
    x = torch.randn(3, 3, 32, 32)
    twin = to_meta(model)
    torch.testing.assert_close(twin(x), model(x), rtol=1e-5, atol=1e-5)
    names = dict(twin.named_params())
    assert "layer1.0.conv1.weight" in names and len(names) == len(list(model.parameters()))


def test_twin_shares_storage_and_gradients_reach_the_model():
    model, x, y, *_ = make("resnet")
    twin = to_meta(model)
    for (_, p), (_, q) in zip(model.named_parameters(), twin.named_params(), strict=True):
        assert p is q
    F.cross_entropy(twin(x), y).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_explicit_meta_layers_and_containers():
    net = MetaSequential(MetaLinear(4, 3), nn.ReLU(), MetaLinear(3, 2))
    assert not list(net.parameters())
    assert [n for n, _ in net.named_params()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert set(net.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    new_w = torch.zeros(2, 3, requires_grad=True)
    net.set_params({"2.weight": new_w * 2})
    assert net(torch.randn(5, 4)).grad_fn is not None
    assert torch.equal(net[2].weight, torch.zeros(2, 3))


def test_set_params_rejects_unknown_names_and_shapes_without_partial_writes():
    twin = to_meta(mlp())
    before = dict(twin.named_params())
    with pytest.raises(KeyError, match=r"'1.nope' is not a meta weight"):
        twin.set_params({"1.weight": torch.zeros(16, 12), "1.nope": torch.zeros(1)})
    with pytest.raises(KeyError, match="no submodule '9'"):
        twin.set_params({"9.weight": torch.zeros(1)})
    with pytest.raises(
        ValueError, match=r"3.weight: new weight has shape \(2, 2\), expected \(3, 16\)"
    ):
        twin.set_params({"3.weight": torch.zeros(2, 2)})
    after = dict(twin.named_params())
    assert all(after[k] is before[k] for k in before)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
def test_recurrent_twin_reads_new_weights(cls):
    """A recurrent layer caches its weights in a flat list; its twin must run on θ′, not on
    those copies, and be re-bound to the model's own weights afterwards."""
    torch.manual_seed(0)
    model = cls(3, 4, num_layers=2, bidirectional=True, batch_first=True).double()
    twin = to_meta(model)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    assert torch.equal(twin(x)[0], model(x)[0])
    new = {n: p + 0.1 * torch.randn_like(p) for n, p in model.named_parameters()}
    twin.set_params(new)
    expected = torch.func.functional_call(model, new, (x,))[0]
    assert torch.equal(twin(x)[0], expected)
    assert not torch.equal(expected, model(x)[0])
    twin.bind(model)
    assert torch.equal(twin(x)[0], model(x)[0])


def test_tied_weights_are_rebound_in_every_slot():
    """bind() re-points both slots of a tied weight; a virtual step moves both."""
    emb = nn.Embedding(6, 4)
    head = nn.Linear(4, 6, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, head).double()
    twin = to_meta(model)
    x = torch.tensor([[1, 2], [3, 4]])
    twin.virtual_step(twin(x).pow(2).mean(), lr=0.5)
    assert twin[0].weight is twin[1].weight or torch.equal(twin[0].weight, twin[1].weight)
    assert not torch.equal(twin[1].weight, model[1].weight)
    twin.bind(model)
    assert twin[0].weight is model[0].weight and twin[1].weight is model[0].weight
    assert torch.equal(twin(x), model(x))


def test_generic_layer_without_counterpart():
    """A user layer reading weights through attributes is converted without a rewrite."""

    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.tensor([2.0, 3.0]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.gain

    model = nn.Sequential(Scale(), nn.LayerNorm(2), nn.Embedding(4, 2))
    twin = to_meta(model[:2])
    x = torch.randn(3, 2)
    torch.testing.assert_close(twin(x), model[:2](x))
    twin.set_params({"0.gain": torch.tensor([0.0, 0.0])})
    assert torch.equal(twin[0](x), torch.zeros(3, 2))
    assert model[0].gain.tolist() == [2.0, 3.0]


def test_bind_follows_the_model_after_updates_and_mode_changes():
    model, x, *_ = make("resnet")
    twin = to_meta(model)
    twin.set_params({n: p.detach() + 1 for n, p in twin.named_params()})
    model.eval()
    model.layer1[0].bn1.running_mean = torch.ones_like(model.layer1[0].bn1.running_mean)
    twin.bind(model)
    assert not twin.training and not twin.layer1[0].bn1.training
    torch.testing.assert_close(twin(x), model(x), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Gradient of a validation loss after a virtual step with respect to ε, at ε = 0.


def eps_grad_twin(model, x, y, xv, yv, lr):
    twin = to_meta(model)
    eps = torch.zeros(len(x), dtype=x.dtype, requires_grad=True)
    losses = F.cross_entropy(twin(x), y, reduction="none")
    twin.virtual_step((eps * losses).sum(), lr)
    return torch.autograd.grad(F.cross_entropy(twin(xv), yv), eps)[0]


def eps_grad_func(model, x, y, xv, yv, lr):
    """Independent reference: torch.func.functional_call on the plain model, no twin."""
    params = {n: p.detach().requires_grad_() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}  # never write the real ones
    eps = torch.zeros(len(x), dtype=x.dtype, requires_grad=True)

    def call(p, inp):
        return functional_call(model, {**p, **buffers}, (inp,))

    losses = F.cross_entropy(call(params, x), y, reduction="none")
    grads = torch.autograd.grad((eps * losses).sum(), list(params.values()), create_graph=True)
    new = {n: p - lr * g for (n, p), g in zip(params.items(), grads, strict=True)}
    return torch.autograd.grad(F.cross_entropy(call(new, xv), yv), eps)[0]


def eps_grad_closed_form(model, x, y, xv, yv, lr):
    """−lr·⟨∇θℓᵢ(θ), ∇θL_val(θ)⟩, one per-example gradient at a time."""
    params = list(model.parameters())
    g_val = torch.autograd.grad(F.cross_entropy(model(xv), yv), params)
    out = []
    for i in range(len(x)):
        g_i = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params)
        out.append(-lr * sum((a * b).sum() for a, b in zip(g_i, g_val, strict=True)))
    return torch.stack(out)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_eps_grad_matches_functional_call_reference(name: str):
    model, x, y, xv, yv = make(name)
    model.train()
    if name == "cnn":
        model.eval()  # dropout would draw different masks in the two implementations
    got = eps_grad_twin(model, x, y, xv, yv, lr=0.3)
    want = eps_grad_func(model, x, y, xv, yv, lr=0.3)
    assert got.abs().max() > 1e-6  # a non-trivial gradient
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_eps_grad_matches_closed_form_without_batchnorm(name: str):
    model, x, y, xv, yv = make(name)
    model.eval()
    got = eps_grad_twin(model, x, y, xv, yv, lr=0.3)
    torch.testing.assert_close(
        got, eps_grad_closed_form(model, x, y, xv, yv, lr=0.3), rtol=0, atol=1e-10
    )


def test_batchnorm_couples_examples_in_the_eps_grad():
    """With batch statistics the closed form (per-example, no coupling) must NOT hold."""
    model, x, y, xv, yv = make("resnet")
    model.train()
    got = eps_grad_twin(model, x, y, xv, yv, lr=0.3)
    model.eval()
    naive = eps_grad_closed_form(model, x, y, xv, yv, lr=0.3)
    assert (got - naive).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["mlp", "resnet"])
def test_gradcheck_through_virtual_step(name: str):
    model, x, y, xv, yv = make(name, n=3)
    model.train()
    twin = to_meta(model)

    def meta_loss(eps: torch.Tensor) -> torch.Tensor:
        twin.bind(model)
        losses = F.cross_entropy(twin(x), y, reduction="none")
        twin.virtual_step((eps * losses).sum(), lr=0.5)
        return F.cross_entropy(twin(xv), yv)

    eps = torch.full((len(x),), 0.1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(meta_loss, (eps,))
    assert torch.autograd.gradgradcheck(meta_loss, (eps,))


def test_first_order_step_drops_the_hessian_term():
    """Quadratic L(θ) = ½θᵀAθ: full d L(θ′)/dθ = (I − lr·A)ᵀ A θ′, first order = A θ′."""
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    a = m @ m.T + torch.eye(4, dtype=torch.float64)
    theta = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    lr = 0.05

    def loss(t: torch.Tensor) -> torch.Tensor:
        return 0.5 * t @ a @ t

    for first_order, expected in [
        (False, lambda tp: (torch.eye(4) - lr * a).T @ a @ tp),
        (True, lambda tp: a @ tp),
    ]:
        new = sgd_step({"t": theta}, loss(theta), lr, first_order=first_order)["t"]
        (g,) = torch.autograd.grad(loss(new), theta)
        torch.testing.assert_close(g, expected(new.detach()), rtol=0, atol=1e-12)


@pytest.mark.parametrize("steps", [1, 3])
def test_running_stats_never_change_through_virtual_steps(steps: int):
    model, x, y, xv, yv = make("resnet")
    model.train()
    before = {n: b.clone() for n, b in model.named_buffers()}
    twin = to_meta(model)
    for _ in range(2):  # two meta steps, each chaining `steps` virtual steps
        twin.bind(model)
        for _ in range(steps):
            losses = F.cross_entropy(twin(x), y, reduction="none")
            twin.virtual_step(losses.mean(), lr=0.1)
        F.cross_entropy(twin(xv), yv).backward()
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n]), n
    # ... while a real forward in train mode does move them: the check above can fail.
    model(x)
    assert not torch.equal(model.stem[1].running_mean, before["stem.1.running_mean"])


def test_buffers_of_other_layers_are_copies_even_after_bind():
    """A layer that writes a buffer in forward must not write the model's through the twin."""

    class Counter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return self.lin(x)

    model = Counter()
    twin = to_meta(model)
    for _ in range(2):
        twin(torch.randn(3, 2))
        twin.bind(model)
    assert model.calls.item() == 0 and twin.calls.item() == 2


# ---------------------------------------------------------------------------------------------
# The one SGD replay: values (differentiable and not) and κ = ∂d/∂g, against torch.optim.SGD.

# case: (SGD arguments, real steps before the replayed one, κ)
SGD_CASES = {
    "plain": ({}, 0, 1.0),
    "weight-decay": ({"weight_decay": 5e-3}, 1, 1.0),
    "momentum-first-step": ({"momentum": 0.9}, 0, 1.0),  # no buffer yet: buf′ = d₀
    "momentum-dampening": ({"momentum": 0.9, "dampening": 0.3, "weight_decay": 1e-3}, 2, 0.7),
    # SGD's first step copies d₀ into the buffer without dampening it
    "momentum-dampening-first-step": ({"momentum": 0.9, "dampening": 0.3}, 0, 1.0),
    "nesterov-first-step": ({"momentum": 0.9, "nesterov": True}, 0, 1.9),
    "nesterov": ({"momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}, 2, 1.9),
}


@pytest.mark.parametrize("case", sorted(SGD_CASES))
def test_sgd_replay_lands_where_torch_sgd_steps(case: str):
    """sgd_step (with graph) and sgd_values (values, κ) put θ′ where torch.optim.SGD's next
    real step puts θ; and d is affine in g with slope κ (the fast MW-Net step's factor)."""
    kwargs, warm, want_kappa = SGD_CASES[case]
    model, x, y, *_ = make("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, **kwargs)
    for _ in range(warm):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    names, weights = trainable(model)
    buffers = {
        n: opt.state.get(p, {}).get("momentum_buffer") for n, p in zip(names, weights, strict=True)
    }
    assert all(b is None for b in buffers.values()) == (warm == 0 or "momentum" not in kwargs)
    twin = to_meta(model)
    with_graph = sgd_step(
        dict(twin.named_params()),
        F.cross_entropy(twin(x), y),
        0.1,
        momentum_buffers=buffers,
        **kwargs,
    )
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), weights)
    values, kappa = sgd_values(weights, grads, names, 0.1, momentum_buffers=buffers, **kwargs)
    assert kappa == [want_kappa] * len(weights)
    gen = torch.Generator().manual_seed(0)
    for theta, g, name, k in zip(weights, grads, names, kappa, strict=True):
        delta = torch.randn(g.shape, generator=gen, dtype=g.dtype)
        d0, _ = sgd_direction(g, theta, buffers[name], **kwargs)
        d1, _ = sgd_direction(g + delta, theta, buffers[name], **kwargs)
        torch.testing.assert_close(d1 - d0, k * delta, rtol=0, atol=1e-12)
    expected = {n: t.detach().clone() for n, t in with_graph.items()}  # before SGD mutates
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()  # the real step (it updates the buffers in place: replayed above, before it)
    for name, p, v in zip(names, model.parameters(), values, strict=True):
        torch.testing.assert_close(expected[name], p.detach(), rtol=0, atol=1e-12)
        torch.testing.assert_close(v, p.detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("foreach", [False, True])
def test_sgd_values_are_torch_sgds_step_bit_for_bit(foreach: bool):
    """Plain SGD's virtual step in float32 is the real step's arithmetic, not just close to it:
    θ − lr·g as one op with lr as its alpha, as ``torch.optim.SGD`` writes it (either
    implementation), not with lr·g rounded first; on sizes with a vectorised body and a tail."""
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(n, generator=gen) for n in (1, 7, 1000, 4099)]
    grads = [torch.randn(w.shape, generator=gen) for w in weights]
    names = [str(i) for i in range(len(weights))]
    values, _ = sgd_values(weights, grads, names, 0.037)
    params = [nn.Parameter(w.clone()) for w in weights]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    torch.optim.SGD(params, lr=0.037, foreach=foreach).step()
    for v, p in zip(values, params, strict=True):
        assert torch.equal(v, p.detach())


def test_sgd_values_skips_weights_without_gradient():
    theta = torch.ones(3, dtype=torch.float64)
    new, kappa = sgd_values([theta, theta * 2], [None, torch.ones(3)], ["a", "b"], 0.5)
    assert kappa == [0.0, 1.0] and torch.equal(new[0], theta)
    assert torch.equal(new[1], torch.full((3,), 1.5, dtype=torch.float64))


def test_twin_cache_rebuilds_only_when_the_model_changes():
    model, x, *_ = make("resnet")
    twins = TwinCache()
    twin = twins.bound(model)
    assert twins.bound(model) is twin  # same structure: the same twin, re-bound
    with torch.no_grad():
        model.head.weight.add_(1.0)  # a weight changes in place: still the same twin
    assert twins.bound(model) is twin
    torch.testing.assert_close(twin(x), model(x), rtol=0, atol=1e-12)
    model.head = nn.Linear(8, 3).double()  # a module replaced: a new twin
    rebuilt = twins.bound(model)
    assert rebuilt is not twin
    torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=1e-12)
    assert TwinCache().bound(model) is not rebuilt  # one cache per owner


def test_modules_of_is_modules_and_signature_sees_what_a_twin_copies():
    """``modules_of`` (the per-step walk) lists what ``model.modules()`` lists, in its order:
    a module registered twice once, an empty slot skipped. ``signature`` changes when a module
    or a parameter object is replaced or a copied buffer is written, not when a weight's
    values or BatchNorm statistics change."""
    shared = nn.Linear(3, 3)
    model = nn.Sequential(
        nn.Sequential(shared, nn.ReLU(), shared),
        nn.BatchNorm1d(3),
        nn.ModuleDict({"a": nn.Linear(3, 3), "b": nn.Sequential(shared, nn.Identity())}),
    )
    model.register_module("empty", None)
    model.register_buffer("scale", torch.ones(3))
    assert [id(m) for m in modules_of(model)] == [id(m) for m in model.modules()]
    net = torchvision.models.resnet18()
    assert [id(m) for m in modules_of(net)] == [id(m) for m in net.modules()]

    before = signature(model)
    assert signature(model) == before
    with torch.no_grad():
        shared.weight.add_(1.0)
    model[1](torch.randn(4, 3))  # BatchNorm statistics move: the twin shares them
    assert signature(model) == before
    model.scale.mul_(2.0)  # a buffer the twin copies
    assert signature(model) != before
    before = signature(model)
    shared.weight = nn.Parameter(torch.zeros(3, 3))
    assert signature(model) != before
    before = signature(model)
    model[2]["a"] = nn.Linear(3, 3)
    assert signature(model) != before


def test_twin_cache_rebinds_a_reused_twin_to_the_models_current_state():
    """A reused twin's binding (its names resolved once) reads the model's parameters, modes
    and BatchNorm statistics as they are at each ``bound``, and does not keep the model alive."""
    model, x, *_ = make("resnet")
    twins = TwinCache()
    twin = twins.bound(model)
    twin.set_params({n: p.detach() + 1 for n, p in twin.named_params()})  # a virtual step's θ′
    model.eval()
    bn = model.layer1[0].bn1
    bn.running_mean = torch.ones_like(bn.running_mean)  # a new tensor object in the slot
    assert twins.bound(model) is twin
    assert not twin.training and not twin.layer1[0].bn1.training
    assert twin.layer1[0].bn1.running_mean is bn.running_mean
    assert all(a is b for a, b in zip(twin.params(), model.parameters(), strict=True))
    torch.testing.assert_close(twin(x), model(x), rtol=0, atol=1e-12)
    alive = weakref.ref(model)
    del model, bn
    gc.collect()
    assert alive() is None  # the cache holds its models weakly, binding included
