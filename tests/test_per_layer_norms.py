"""The per-layer path over embeddings and affine normalisations (LayerNorm, GroupNorm,
RMSNorm), against per-example gradients from ``torch.func`` in float64, and the planner's
verdict on models built of them (taken per layer, and equal to the exact engines).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reweight import L2RW, l2rw_eps_grad
from reweight.jvp import layers
from reweight.jvp import per_layer as ghost
from reweight.meta import trainable
from reweight.metastep import StepInputs

from .test_fast import assert_equal
from .test_ghost import DT, per_example_grads, records


class Tokens(nn.Module):
    """Embedding (padding_idx 0) → LayerNorm → mean over tokens → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.norm = nn.LayerNorm(6, eps=0.3)  # eps large enough to count
        self.head = nn.Linear(6, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.norm(self.emb(tokens))).mean(1))


class Grouped(nn.Module):
    """Conv → GroupNorm → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4, eps=0.2)
        self.head = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.conv(x))).flatten(1))


class RMS(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.norm = nn.RMSNorm(6, eps=0.25)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.norm(self.fc(x))))


def batch(name: str, n: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    if name == "tokens":
        tokens = torch.randint(1, 11, (n, 5), generator=g)
        tokens[:, 3:] = 0  # padding
        tokens[0, 1] = 0
        return tokens, torch.randint(0, 3, (n,), generator=g)
    shape = (2, 5, 5) if name == "grouped" else (5,)
    return torch.randn(n, *shape, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


MODELS = {"tokens": Tokens, "grouped": Grouped, "rms": RMS}


def model_of(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = MODELS[name]().to(DT)
    with torch.no_grad():  # affine weights away from their initial ones and zeros
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)):
                m.weight.uniform_(0.5, 1.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.uniform_(-0.5, 0.5)
    return model


@pytest.mark.parametrize("slices", [1, 3])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_jvp_and_weighted_gradients_equal_per_example_gradients(name: str, slices: int):
    model = model_of(name)
    x, y = batch(name)
    _, weights = trainable(model)
    per = per_example_grads(model, x, y)
    recs = records(model, x, y, slices)
    g = torch.Generator().manual_seed(2)
    u = [torch.randn(w.shape, generator=g, dtype=DT) for w in weights]
    if name == "tokens":  # a direction made by a backward: nothing on the padding row
        u[0][0] = 0
    want = sum(p.flatten(1) @ d.flatten() for p, d in zip(per, u, strict=True))
    assert float(want.abs().max()) > 1e-3
    assert_equal(ghost.jvp_of(recs, u), want)
    losses = ghost.losses_of(recs)
    seeds = torch.rand(len(y), generator=g, dtype=DT)
    got = torch.autograd.grad((seeds * losses).sum(), weights)
    for a, p in zip(got, per, strict=True):
        assert_equal(a, torch.einsum("b,b...->...", seeds, p))
    if name == "tokens":  # the padding row gets nothing, as in torch's own backward
        assert float(got[0][0].abs().max()) == 0


@pytest.mark.parametrize("name", sorted(MODELS))
def test_such_models_take_the_per_layer_path_and_get_the_exact_answer(name: str):
    model = model_of(name)
    x, y = batch(name)
    xv, yv = batch(name, n=5, seed=2)
    want = l2rw_eps_grad(model, x, y, xv, yv, 0.5, meta_grad="unrolled")
    method = L2RW()
    out = method.metastep(StepInputs(model, x, y, xv, yv, 0.5, F.cross_entropy))
    assert method.metastep.planner.last_engine == "per_layer"
    assert_equal(out.c, want)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: nn.Sequential(nn.Embedding(5, 3, max_norm=1.0), nn.Flatten()), "max_norm"),
        (lambda: nn.Sequential(nn.Embedding(5, 3, scale_grad_by_freq=True)), "scale_grad"),
        (lambda: nn.Sequential(nn.Embedding(5, 3, sparse=True)), "sparse"),
    ],
)
def test_embeddings_the_path_cannot_read_are_refused(make, match: str):
    model = make()
    with pytest.raises(ghost.Ineligible, match=match):
        ghost.ghost_layers(model, trainable(model)[1])


@pytest.mark.parametrize("name", ["tokens", "grouped"])
def test_norms_take_x_hat_from_their_forwards_own_statistics(name: str):
    model = model_of(name)
    x, _ = batch(name)
    _, weights = trainable(model)
    with ghost.recording(model, ghost.ghost_layers(model, weights), len(x)) as watch:
        model(x)
    (call,) = [c for c in watch.calls if c.kind == "norm"]
    assert call.stats is not None  # read from the forward, not recomputed
    m = call.module
    if isinstance(m, nn.GroupNorm):
        want = F.group_norm(call.x, m.num_groups, None, None, m.eps)
    else:
        want = F.layer_norm(call.x, m.normalized_shape, None, None, m.eps)
    assert_equal(call.normalized(), want)
    call.stats = None  # the recomputation, the other way to the same x̂
    assert_equal(call.normalized(), want)


def test_statistics_are_read_only_from_torchs_kernel_on_the_layers_own_input():
    x = torch.randn(3, 4, 6, dtype=DT, requires_grad=True)
    norm, rms = nn.LayerNorm(6).to(DT), nn.RMSNorm(6).to(DT)
    mean, rstd = layers.norm_stats(norm, x, norm(x))
    assert_equal(((x - mean) * rstd).detach(), F.layer_norm(x, (6,), None, None, norm.eps).detach())
    assert layers.norm_stats(norm, x, norm(x.clone())) is None  # the kernel saw a copy
    assert layers.norm_stats(norm, x, norm(x.view(12, 6))) is None  # a view of another shape
    assert layers.norm_stats(norm, x, norm(x) * 1.0) is None  # not the kernel's output
    assert layers.norm_stats(rms, x, rms(x)) is None
    sub = type("Sub", (nn.LayerNorm,), {})(6).to(DT)  # a subclass may have its own forward
    assert layers.norm_stats(sub, x, sub(x)) is None
