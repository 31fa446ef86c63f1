"""The per-layer engine's parts (reweight.jvp.per_layer) on small float64 models: which models
its structure check rules out and why, what a recorded call that cannot be used says, the JVP
and the weighted gradients against torch.func references (in one slice and in several, with a
frozen weight, a layer kept per example), the losses' backward, and the agreement check's
tolerance. Small and fast, for a mutation run of per_layer.py; test_ghost.py covers the
engine through the planner on real architectures."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from reweight.jvp import per_layer as ghost
from reweight.jvp.base import Forward

DT = torch.float64


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def ineligible(model, match):
    with pytest.raises(ghost.Ineligible) as info:
        ghost.ghost_layers(model.to(DT), trainable(model))
    assert str(info.value) == match


# -- the structure check -----------------------------------------------------------------------


def test_batch_norm_in_training_after_a_layer_is_ruled_out_before_one_is_not():
    ineligible(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)),
               "BatchNorm in training mode (1)")  # fmt: skip
    ineligible(nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.BatchNorm1d(4))),
               "BatchNorm in training mode (1.0)")  # fmt: skip
    before = nn.Sequential(nn.BatchNorm1d(3, affine=False), nn.Linear(3, 2)).to(DT)
    assert list(ghost.ghost_layers(before, trainable(before)).modules) == ["1"]
    evaluated = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, affine=False), nn.Linear(4, 2))
    evaluated[1].eval()
    assert list(ghost.ghost_layers(evaluated, trainable(evaluated)).modules) == ["0", "2"]


def test_layers_whose_weights_are_not_read_per_layer_are_named():
    only = (
        "nn.Linear, nn.Conv, nn.Embedding, nn.MultiheadAttention, nn.LSTM and affine "
        "normalisation layers' are read per layer"
    )
    bilinear = nn.Sequential(nn.Linear(3, 4), nn.Bilinear(4, 4, 2))
    ineligible(bilinear, f"1 (Bilinear) has trainable weights, and only {only}")
    ineligible(nn.PReLU(), f"the model (PReLU) has trainable weights, and only {only}")
    ineligible(nn.Sequential(nn.Embedding(5, 3, max_norm=1.0)),
               "0: Embedding with max_norm or scale_grad_by_freq")  # fmt: skip
    ineligible(nn.Sequential(nn.Embedding(5, 3, scale_grad_by_freq=True)),
               "0: Embedding with max_norm or scale_grad_by_freq")  # fmt: skip
    ineligible(nn.Sequential(nn.Embedding(5, 3, sparse=True)), "0: a sparse Embedding")
    ineligible(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect")),
               "0: padding_mode='reflect'")  # fmt: skip
    hooked = nn.Sequential(nn.Linear(3, 2))
    hooked[0].register_forward_hook(lambda m, a, o: None)
    ineligible(hooked, "0: hooks or parametrizations")
    pre = nn.Sequential(nn.Linear(3, 2))
    pre[0].register_forward_pre_hook(lambda m, a: None)
    ineligible(pre, "0: hooks or parametrizations")
    param = nn.Sequential(nn.Linear(3, 2))  # torch swaps the class: caught as another type
    nn.utils.parametrize.register_parametrization(param[0], "weight", nn.Identity())
    ineligible(param, f"0 (ParametrizedLinear) has trainable weights, and only {only}")


def test_symmetric_same_padding_is_read_and_a_weight_outside_any_layer_is_not():
    conv = nn.Sequential(nn.Conv2d(1, 2, 3, padding="same", dilation=2))
    assert list(ghost.ghost_layers(conv, trainable(conv)).modules) == ["0"]
    model = nn.Linear(3, 2)
    stray = nn.Parameter(torch.ones(2))
    with pytest.raises(ghost.Ineligible) as info:
        ghost.ghost_layers(model, [*model.parameters(), stray])
    assert str(info.value) == "a trainable tensor is not a weight or bias of a linear/conv layer"


def test_frozen_weights_are_none_and_layers_without_moving_weights_are_left_out():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2, bias=False))
    model[0].weight.requires_grad_(False)
    model[1].requires_grad_(False)
    layers = ghost.ghost_layers(model, trainable(model))
    assert layers.modules == {"0": (None, model[0].bias), "2": (model[2].weight, None)}
    norm = nn.Sequential(nn.LayerNorm(3), nn.Embedding(4, 3))
    layers = ghost.ghost_layers(norm, trainable(norm))
    assert layers.modules == {"0": (norm[0].weight, norm[0].bias), "1": (norm[1].weight, None)}


# -- recording and finishing -------------------------------------------------------------------


def record(model, x, fn=None, weights=None, keep_graph=False):
    weights = trainable(model) if weights is None else weights
    layers = ghost.ghost_layers(model, weights)
    n = len(x) if isinstance(x, torch.Tensor) else len(next(iter(x.values())))
    with ghost.recording(model, layers, n) as watch:
        out = (fn or model)(x)
        losses = out.pow(2).sum(tuple(range(1, out.dim()))) if out.dim() > 1 else out
    return ghost.finish(weights, watch, losses, keep_graph)


def test_a_call_that_cannot_be_used_says_why():
    model = nn.Sequential(nn.Linear(3, 2)).to(DT)
    with pytest.raises(ghost.Ineligible) as info:
        record(model, rand(4, 3), lambda x: torch.no_grad()(model)(x))
    assert str(info.value) == "Linear: not called on one tensor with a graph"
    with pytest.raises(ghost.Ineligible, match=r"^Linear: input not batched like the losses$"):
        record(model, rand(3), lambda x: model(x).sum()[None].expand(4))  # 1-D input
    with pytest.raises(ghost.Ineligible, match=r"^Linear: input not batched like the losses$"):
        record(model, rand(4, 3), lambda x: model(x.t()[:, :3].t()[:2]).sum(1).repeat(2))
    with pytest.raises(ghost.Ineligible, match=r"^Linear: input not batched like the losses$"):
        record(model, rand(4, 3), lambda x: model(x).t().sum(0).repeat(2))
    inplace = nn.Sequential(nn.Linear(3, 2), nn.ReLU(inplace=True)).to(DT)
    with pytest.raises(ghost.Ineligible) as info:
        record(inplace, rand(4, 3))
    assert str(info.value) == "Linear: its input or output was modified in place"


def test_the_hook_notes_only_the_named_layers_and_leaves_after_the_block():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    model[0].requires_grad_(False)
    layers = ghost.ghost_layers(model, trainable(model))
    with ghost.recording(model, layers, 5) as watch:
        model(rand(5, 3))
    calls = watch.calls
    assert [c.module for c in calls] == [model[2]]
    assert calls[0].x.shape == (5, 4) and not calls[0].x.requires_grad
    assert calls[0].versions == (calls[0].x._version, calls[0].z._version)
    model(rand(5, 3))  # outside: not noted
    assert len(calls) == 1


def per_example(model, x, loss):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters()}

    def one(ws, xi):
        return loss(functional_call(model, params | ws, (xi[None],)))[0]

    return vmap(grad(one), in_dims=(None, 0))({n: params[n] for n in names}, x), names


def square(out):
    return out.pow(2).flatten(1).sum(1)


class Projections(nn.Module):
    """An attention block's shape: three projections of one input, then a fourth layer on
    another tensor of the same shape, and a norm that reads the shared input in between."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(4, 4) for _ in range(4))
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(x)
        a = self.q(h) * self.norm(h) + self.k(h) * self.v(h)
        return self.head(self.o(torch.tanh(a))).mean(1)


MODELS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)), (6, 3)),
    "projections": (Projections, (6, 3, 4)),
    "conv": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Conv2d(3, 4, 3, padding="same"), nn.Flatten(),
            nn.Linear(4 * 5 * 5, 2),
        ),
        (6, 1, 7, 7),
    ),
    # padding "valid" by name: no padding
    "conv-valid": (
        lambda: nn.Sequential(nn.Conv2d(1, 3, 3, padding="valid"), nn.Tanh(), nn.Flatten(),
                              nn.Linear(3 * 5 * 5, 2)),
        (6, 1, 7, 7),
    ),
    # a frozen weight and a trainable bias: the JVP through the bias alone
    "mlp-frozen-weight": (
        lambda: nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)), (6, 3)
    ),
    "conv1d-frozen": (
        lambda: nn.Sequential(nn.Conv1d(2, 3, 2, stride=2), nn.Tanh(), nn.Flatten(),
                              nn.Linear(12, 2)),
        (5, 2, 8),
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("slices", [1, 3])
def test_jvp_and_weighted_grads_equal_per_example_gradients(name, slices):
    torch.manual_seed(0)
    make, shape = MODELS[name]
    model = make().to(DT)
    if name.endswith("frozen"):
        model[0].bias.requires_grad_(False)
    if name.endswith("frozen-weight"):
        model[0].weight.requires_grad_(False)
    x = rand(*shape, seed=1)
    weights = trainable(model)
    per, names = per_example(model, x, square)
    recs = [record(model, xs) for xs in x.tensor_split(slices)]
    u = [rand(*w.shape, seed=2 + i) for i, w in enumerate(weights)]
    want = sum(per[n].flatten(1) @ d.flatten() for n, d in zip(names, u, strict=True))
    torch.testing.assert_close(ghost.jvp_of(recs, u), want, rtol=1e-10, atol=1e-12)
    assert want.abs().max() > 1e-3
    # a direction that moves only the last weight: the other layers are skipped
    only = [None] * (len(u) - 1) + [u[-1]]
    torch.testing.assert_close(
        ghost.jvp_of(recs, [torch.zeros_like(w) if d is None else d for w, d in
                            zip(weights, only, strict=True)]),
        per[names[-1]].flatten(1) @ u[-1].flatten(), rtol=1e-10, atol=1e-12,
    )  # fmt: skip
    s = rand(len(x), seed=9)
    got = ghost.weighted_grads_of(recs, s)
    for n, g in zip(names, got, strict=True):
        torch.testing.assert_close(g, torch.einsum("b,b...->...", s, per[n]), rtol=1e-10,
                                   atol=1e-12)  # fmt: skip
    # the losses' backward: the same weighted gradients through autograd
    losses = ghost.losses_of(recs)
    torch.testing.assert_close(losses.detach(), square(model(x)).detach(), rtol=1e-12, atol=0)
    back = torch.autograd.grad((s * losses).sum(), weights)
    for a, b in zip(back, got, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_one_scaled_input_serves_every_projection_of_it():
    """The weighted gradients scale a linear call's input by the seeds once per input: the
    query, key and value projections of one tensor share it; another tensor of the same shape
    (the output projection's input) is scaled on its own (its values are checked above)."""
    torch.manual_seed(0)
    model = Projections().to(DT)
    rec = record(model, rand(6, 3, 4, seed=1))
    shapes = []

    class Products(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("mul", "__mul__"):
                shapes.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    seeds = rand(6, seed=2)
    with Products():
        grads = rec.weighted_grads(seeds)
    assert shapes.count((6, 3, 4)) == 2  # h once for q, k and v; tanh(a) once for o
    # a call asked alone scales its own input
    torch.testing.assert_close(rec.calls[0].weighted_grads(seeds)[0], grads[0], rtol=0, atol=0)


def test_a_weight_no_layer_reached_has_no_gradient():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).to(DT)
    weights = trainable(model)
    rec = record(model, rand(4, 3), fn=lambda x: model[0](x))  # the second layer never runs
    grads = rec.weighted_grads(torch.ones(4, dtype=DT))
    assert grads[0] is not None and grads[1] is not None and grads[2] is None and grads[3] is None
    u = [torch.ones_like(w) for w in weights]
    torch.testing.assert_close(rec.jvp(u), ghost.jvp_of([rec], u))


def test_a_layer_called_twice_adds_both_calls():
    lin = nn.Linear(3, 3).to(DT)
    model = nn.Sequential(lin)
    x = rand(4, 3, seed=3)

    def twice(x):
        return lin(torch.tanh(lin(x)))

    rec = record(model, x, fn=twice)
    assert len(rec.calls) == 2
    s = rand(4, seed=4)
    want = torch.autograd.grad((s * square(twice(x))).sum(), trainable(model))
    for a, b in zip(rec.weighted_grads(s), want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_keep_graph_keeps_the_forward_for_the_real_update():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    head = [model[2].weight, model[2].bias]
    rec = record(model, rand(4, 3), weights=head, keep_graph=True)
    assert rec.graph is not None and rec.graph.requires_grad
    rec.graph.sum().backward()  # the whole model, through the forward kept
    assert model[0].weight.grad is not None
    assert record(model, rand(4, 3), weights=head).graph is None


def test_a_small_first_convolution_keeps_per_example_gradients():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 2)).to(DT)
    rec = record(model, rand(3, 1, 8, 8))
    first, head = rec.calls
    assert first.per_example is not None and first.x is None  # 20 params * 3 <= 2 * 36 * 3
    assert head.per_example is None and head.x is not None


# -- the agreement check -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_agree_is_within_root_eps_of_the_largest_entry(dtype):
    a = torch.tensor([1.0, -4.0, 2.0], dtype=dtype)
    tol = math.sqrt(torch.finfo(dtype).eps) * 4.0
    assert ghost.agree(a, a)
    assert ghost.agree(a, a + torch.tensor([0.0, 0.0, 0.9 * tol], dtype=dtype))
    assert not ghost.agree(a, a + torch.tensor([0.0, 0.0, 1.5 * tol], dtype=dtype))
    big = torch.tensor([1.0, -4.0, 8.0], dtype=dtype)  # b's largest entry counts too
    assert ghost.agree(a, big) is False
    assert ghost.agree(torch.zeros(2, dtype=dtype), torch.zeros(2, dtype=dtype))
    assert ghost.agree(a * 0 + 1e3, a * 0 + 1e3 + 2 * tol) is True  # tolerance grows with them


# -- the recording the engines use -------------------------------------------------------------


@pytest.mark.parametrize("chunks", [1, 2, 4, 9])
def test_a_recording_in_chunks_equals_one_in_one(chunks):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    weights = trainable(model)
    x, y = rand(6, 3, seed=5), torch.tensor([0, 1, 2, 0, 1, 2])
    fwd = Forward(model, weights, x, y, F.cross_entropy, twin=lambda: None)
    rec = ghost.PerLayerRecording(fwd, ghost.ghost_layers(model, weights), chunks=chunks)
    assert len(rec.records) == min(chunks, 6)
    torch.testing.assert_close(rec.values, F.cross_entropy(model(x), y, reduction="none"))
    assert rec.engine == "per_layer"
    one = ghost.PerLayerRecording(fwd, ghost.ghost_layers(model, weights), chunks=1)
    u = [rand(*w.shape, seed=7 + i) for i, w in enumerate(weights)]
    torch.testing.assert_close(rec.jvp(u), one.jvp(u), rtol=1e-12, atol=1e-14)
    s = rand(6, seed=8)
    want = torch.autograd.grad((s * F.cross_entropy(model(x), y, reduction="none")).sum(), weights)
    for a, b in zip(rec.weighted_grads(s), want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_recording_of_part_of_the_model_keeps_its_graph_for_the_update():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    head = [model[2].weight, model[2].bias]
    x, y = rand(6, 3, seed=5), torch.tensor([0, 1, 2, 0, 1, 2])
    fwd = Forward(model, head, x, y, F.cross_entropy, twin=lambda: None)
    rec = ghost.PerLayerRecording(fwd, ghost.ghost_layers(model, head), chunks=2)
    losses = rec.update_losses()
    assert losses is rec.update_losses()
    losses.sum().backward()
    assert model[0].weight.grad is not None  # through the forward: the whole model
    whole = ghost.PerLayerRecording(
        Forward(model, trainable(model), x, y, F.cross_entropy, twin=lambda: None),
        ghost.ghost_layers(model, trainable(model)),
        chunks=3,
    )
    model.zero_grad()
    s = rand(6, seed=8)
    (s * whole.update_losses()).sum().backward()  # through the records: their gradients
    for p, g in zip(trainable(model), whole.weighted_grads(s), strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=0)


# -- weights shared by the batch ----------------------------------------------------------------


class Tokens(nn.Module):
    """A class token of its own (outside torch.nn: read where used) and position embeddings
    called once for the whole batch (a (1, T) input, broadcast over it), as in a ViT or BERT."""

    def __init__(self):
        super().__init__()
        self.cls = nn.Parameter(rand(1, 1, 4, seed=11))
        self.pos = nn.Embedding(3, 4)
        self.proj = nn.Linear(2, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):  # (B, 2, 2)
        h = torch.cat([self.cls.expand(len(x), -1, -1), self.proj(x)], 1)  # (B, 3, 4)
        h = h + self.pos(torch.arange(3)[None])  # (1, 3, 4), broadcast
        return self.head(torch.tanh(h)).sum(1)  # (B, 2)


@pytest.mark.parametrize("slices", [1, 2])
def test_weights_shared_by_the_batch_equal_per_example_gradients(slices):
    torch.manual_seed(0)
    model = Tokens().to(DT)
    x = rand(5, 2, 2, seed=12)
    weights = trainable(model)
    layers = ghost.ghost_layers(model, weights)
    assert set(layers.modules) == {"pos", "proj", "head"} and layers.loose == (model.cls,)
    per, names = per_example(model, x, square)
    recs = [record(model, xs) for xs in x.tensor_split(slices)]
    u = [rand(*w.shape, seed=20 + i) for i, w in enumerate(weights)]
    want = sum(per[n].flatten(1) @ d.flatten() for n, d in zip(names, u, strict=True))
    torch.testing.assert_close(ghost.jvp_of(recs, u), want, rtol=1e-10, atol=1e-12)
    for n, d in zip(names, u, strict=True):  # each weight alone
        alone = [d if m == n else torch.zeros_like(w) for m, w in zip(names, weights, strict=True)]
        torch.testing.assert_close(
            ghost.jvp_of(recs, alone), per[n].flatten(1) @ d.flatten(), rtol=1e-10, atol=1e-12
        )
    s = rand(len(x), seed=29)
    for n, g in zip(names, ghost.weighted_grads_of(recs, s), strict=True):
        torch.testing.assert_close(
            g, torch.einsum("b,b...->...", s, per[n]), rtol=1e-10, atol=1e-12
        )


def test_a_shared_weight_not_broadcast_like_the_losses_is_refused():
    model = Tokens().to(DT)
    with pytest.raises(ghost.Ineligible) as info:  # the class token summed: not per example
        record(model, rand(4, 2, 2), fn=lambda x: model(x) + model.cls.sum())
    assert str(info.value) == "a weight shared by the batch is used by sum"
    with pytest.raises(ghost.Ineligible) as info:  # broadcast over 2, not the losses' 4
        record(
            model, rand(4, 2, 2), fn=lambda x: model(x) + model.cls.expand(2, 2, 4).sum((0, 1))[:2]
        )
    assert str(info.value) == "a weight shared by the batch is not broadcast like the losses"


def test_attention_weights_are_read_where_used_and_its_variants_refused():
    model = nn.Module()
    model.att = nn.MultiheadAttention(4, 2, batch_first=True)
    model.head = nn.Linear(4, 2)
    att = model.att
    layers = ghost.ghost_layers(model, trainable(model))
    assert layers.modules == {"head": (model.head.weight, model.head.bias)}
    assert layers.loose == (att.in_proj_weight, att.in_proj_bias, att.out_proj.weight,
                            att.out_proj.bias)  # fmt: skip
    for kwargs in ({"add_bias_kv": True}, {"kdim": 3, "vdim": 3}):
        other = nn.Module()
        other.att = nn.MultiheadAttention(4, 2, **kwargs)
        ineligible(other, "att: MultiheadAttention with add_bias_kv or kdim/vdim")


def test_a_normalisation_layer_and_an_unused_call_equal_per_example_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).to(DT)
    x = rand(5, 3, seed=13)

    def with_unused(x):
        model[2](model[1](model[0](x)))  # a call whose output the losses never see
        return model(x)

    weights = trainable(model)
    per, names = per_example(model, x, square)
    rec = record(model, x, fn=with_unused)
    assert len(rec.calls) == 6 and rec.calls[1].kind == "norm"
    u = [rand(*w.shape, seed=30 + i) for i, w in enumerate(weights)]
    want = sum(per[n].flatten(1) @ d.flatten() for n, d in zip(names, u, strict=True))
    torch.testing.assert_close(rec.jvp(u), want, rtol=1e-10, atol=1e-12)
    s = rand(len(x), seed=39)
    for n, g in zip(names, rec.weighted_grads(s), strict=True):
        torch.testing.assert_close(g, torch.einsum("b,b...->...", s, per[n]), rtol=1e-10,
                                   atol=1e-12)  # fmt: skip


def test_finish_frees_the_graph_unless_asked_and_two_slices_give_every_loss():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    weights = trainable(model)
    layers = ghost.ghost_layers(model, weights)
    with ghost.recording(model, layers, 4) as watch:
        losses = square(model(rand(4, 3)))
    assert ghost.finish(weights, watch, losses).graph is None  # the default: freed
    x = rand(6, 3, seed=14)
    recs = [record(model, xs) for xs in x.tensor_split(2)]
    torch.testing.assert_close(ghost.losses_of(recs).detach(), square(model(x)).detach())


def test_a_recording_keeps_the_forward_only_for_part_of_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    x, y = rand(6, 3, seed=5), torch.tensor([0, 1, 2, 0, 1, 2])
    want = F.cross_entropy(model(x), y, reduction="none").detach()
    whole = ghost.PerLayerRecording(
        Forward(model, trainable(model), x, y, F.cross_entropy, twin=lambda: None),
        ghost.ghost_layers(model, trainable(model)),
    )
    assert len(whole.records) == 1 and whole._update is None  # one slice by default, no graph
    head = [model[2].weight, model[2].bias]
    for chunks in (1, 2, 3):
        part = ghost.PerLayerRecording(
            Forward(model, head, x, y, F.cross_entropy, twin=lambda: None),
            ghost.ghost_layers(model, head),
            chunks=chunks,
        )
        assert part._update is not None and part._update.requires_grad
        torch.testing.assert_close(part.update_losses().detach(), want)


def test_an_embedding_of_one_index_per_example_is_read_per_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(6, 3), nn.Tanh(), nn.Linear(3, 2)).to(DT)
    x = torch.tensor([0, 2, 5, 2])  # (B,): one index each
    weights = trainable(model)
    per, names = per_example(model, x, square)
    rec = record(model, x)
    u = [rand(*w.shape, seed=40 + i) for i, w in enumerate(weights)]
    want = sum(per[n].flatten(1) @ d.flatten() for n, d in zip(names, u, strict=True))
    torch.testing.assert_close(rec.jvp(u), want, rtol=1e-10, atol=1e-12)


def test_calls_not_batched_like_the_losses_are_refused():
    model = nn.Sequential(nn.Linear(4, 4)).to(DT)
    with pytest.raises(ghost.Ineligible) as info:  # a 1-D input as long as the batch
        record(model, rand(4, 3), fn=lambda x: model(x[:, 0].repeat(4)[:4]))
    assert str(info.value) == "Linear: input not batched like the losses"
    with pytest.raises(ghost.Ineligible) as info:  # a batch of 1 whose output is not broadcast
        record(model, rand(4, 4), fn=lambda x: (model(x[:1]), model(x))[1])
    assert str(info.value) == "Linear: input not batched like the losses"


def test_products_are_written_into_the_fresh_operand_only_where_its_dtype_holds_them():
    from reweight.jvp.layers import _times

    a, b = torch.ones(2, 3, dtype=torch.float32), torch.full((2, 3), 2.0, dtype=torch.float64)
    out = _times(a, b)  # float32 * float64 is float64: a new tensor, a left as it was
    assert out.dtype == torch.float64 and torch.equal(a, torch.ones(2, 3))
    assert torch.equal(out, torch.full((2, 3), 2.0, dtype=torch.float64))
    c = torch.ones(2, 3, dtype=torch.float64)
    assert _times(c, a) is c and torch.equal(c, torch.ones(2, 3, dtype=DT))
    d = torch.full((2, 3), 3.0, dtype=torch.bfloat16)
    assert _times(d, torch.full((2, 1), 2.0, dtype=torch.bfloat16)) is d and float(d[1, 2]) == 6
