"""``nn.LSTM`` on the per-layer path (``reweight.jvp.recurrent``), in float64, against
per-example gradients taken one example at a time and against the unrolled meta step: every
layout (batch first or not, one or two directions, one or two layers, with and without biases),
a model reading the final states (h_n, c_n) as well as the output, frozen parts; refusals, each
with its reason, and the step exact after each; and mutation checks: the comparisons fail when
one per-example term is dropped.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from reweight.jvp import per_layer as ghost
from reweight.jvp import recurrent
from reweight.meta import trainable
from reweight.models import build_model

from .test_fast import assert_equal, mwnet_pair
from .test_per_layer_shared import (
    _differs,
    assert_l2rw_equals_unrolled,
    direction,
    per_example_grads,
    records,
)

DT = torch.float64
CLASSES = 3


class Net(nn.Module):
    """A sequence (B, T, 4) → LSTM (hidden 5) → a head on two steps' outputs and, with
    ``finals``, on the final hidden and cell states too."""

    def __init__(self, batch_first=True, bidirectional=False, layers=1, bias=True, finals=False):
        super().__init__()
        self.batch_first, self.finals = batch_first, finals
        self.lstm = nn.LSTM(
            4, 5, layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional
        )
        width = 5 * (2 if bidirectional else 1)
        self.head = nn.Linear(width, CLASSES)
        self.state = nn.Linear(10, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, (h, c) = self.lstm(x if self.batch_first else x.transpose(0, 1))
        if not self.batch_first:
            out = out.transpose(0, 1)
        y = self.head(out[:, -1]) + self.head(out[:, 1])
        if self.finals:  # the top layer's last direction, and the first layer's cell state
            y = y + self.state(torch.cat([h[-1], c[0]], 1))
        return y


def batch(n: int, seed: int, steps: int = 6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, steps, 4, generator=g, dtype=DT)
    return x, torch.randint(0, CLASSES, (n,), generator=g)


def net(**options) -> nn.Module:
    torch.manual_seed(0)
    return Net(**options).to(DT)


def compare(model: nn.Module, x, y) -> tuple[torch.Tensor, torch.Tensor, list, list]:
    """(the path's JVP, the per-example one, the path's weighted gradients, the per-example
    ones) in a random direction and for random seeds."""
    _, weights = trainable(model)
    per = per_example_grads(model, x, y)
    recs = records(model, x, y)
    u = direction(weights)
    want = sum(p.flatten(1) @ d.flatten() for p, d in zip(per, u, strict=True))
    seeds = torch.rand(len(y), generator=torch.Generator().manual_seed(3), dtype=DT)
    got = torch.autograd.grad((seeds * ghost.losses_of(recs)).sum(), weights, allow_unused=True)
    got = [torch.zeros_like(w) if g is None else g for g, w in zip(got, weights, strict=True)]
    wanted = [torch.einsum("b,b...->...", seeds, p) for p in per]
    return ghost.jvp_of(recs, u), want, got, wanted


LAYOUTS = list(itertools.product([True, False], [False, True], [1, 2], [True, False]))


@pytest.mark.parametrize(("batch_first", "bidirectional", "layers", "bias"), LAYOUTS)
@pytest.mark.parametrize("finals", [False, True], ids=["output", "finals"])
def test_jvp_and_weighted_gradients_equal_per_example_gradients(
    batch_first: bool, bidirectional: bool, layers: int, bias: bool, finals: bool
):
    model = net(
        batch_first=batch_first, bidirectional=bidirectional, layers=layers, bias=bias,
        finals=finals,
    )  # fmt: skip
    x, y = batch(5, 1)
    jvp, want, got, wanted = compare(model, x, y)
    assert float(want.abs().max()) > 1e-3
    assert_equal(jvp, want)
    for a, b in zip(got, wanted, strict=True):
        assert_equal(a, b)


@pytest.mark.parametrize(
    "frozen",
    [
        ("lstm.weight_hh_l0",),
        ("lstm.weight_ih_l1_reverse", "lstm.bias_hh_l1_reverse"),
        ("lstm.bias_ih_l0", "lstm.bias_ih_l0_reverse"),  # one bias of a pair: the other moves
        tuple(
            f"lstm.{n}_l0{s}"
            for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
            for s in ("", "_reverse")
        ),  # the whole first layer
        tuple(
            f"lstm.weight_{n}_l{k}{s}"
            for n in ("ih", "hh")
            for k in (0, 1)
            for s in ("", "_reverse")
        ),  # every LSTM weight: its biases alone move
    ],
    ids=["w_hh", "reverse_w_ih_b_hh", "b_ih", "layer0", "biases_only"],
)
def test_frozen_parts(frozen: tuple[str, ...]):
    model = net(bidirectional=True, layers=2, finals=True)
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    x, y = batch(5, 1)
    jvp, want, got, wanted = compare(model, x, y)
    assert_equal(jvp, want)
    for a, b in zip(got, wanted, strict=True):
        assert_equal(a, b)


@pytest.mark.parametrize("layers", [1, 2])
def test_l2rw_and_mwnet_take_the_path_and_equal_unrolled(layers: int):
    """The RowLSTM of ``model=lstm``, bidirectional: the planner checks the path on the first
    step and keeps it; L2RW's ε-gradient and MW-Net's net gradients (its optimizer replayed)
    equal the unrolled step's."""
    torch.manual_seed(0)
    model = build_model("lstm", 4, 1, (1, 6, 5), hidden=6, num_layers=layers, bidirectional=True)
    model = model.to(DT).train()
    g = torch.Generator().manual_seed(1)
    x, xv = (torch.randn(n, 1, 6, 5, generator=g, dtype=DT) for n in (7, 5))
    y, yv = (torch.randint(0, 4, (n,), generator=g) for n in (7, 5))
    assert_l2rw_equals_unrolled(model, x, y, xv, yv, engine="per_layer")
    got, unrolled, method = mwnet_pair(
        model, x, y, xv, yv, normalize="sum", replay={"momentum": 0.9}, warm=True
    )
    assert method.metastep.planner.per_layer_verdict(model) == "ok"
    assert method.metastep.planner.last_engine == "per_layer"
    for a, b in zip(got, unrolled, strict=True):
        assert b.abs().max() > 0
        assert_equal(a, b)


# -- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: nn.LSTM(4, 5, proj_size=3, batch_first=True), "0: LSTM with proj_size"),
        (
            lambda: nn.LSTM(4, 5, 2, dropout=0.5, batch_first=True),
            "0: LSTM with dropout between layers in training mode",
        ),
        (
            lambda: nn.GRU(4, 5, batch_first=True),
            "0 (GRU) has trainable weights, and only nn.Linear, nn.Conv, nn.Embedding, "
            "nn.MultiheadAttention, nn.LSTM and affine normalisation layers' are read per layer",
        ),
    ],
    ids=["proj_size", "dropout", "gru"],
)
def test_a_structure_the_path_does_not_read_is_refused_by_structure(make, reason: str):
    model = nn.Sequential(make()).to(DT)
    with pytest.raises(ghost.Ineligible) as info:
        ghost.ghost_layers(model, list(model.parameters()))
    assert str(info.value) == reason


def test_dropout_between_layers_in_evaluation_mode_or_of_one_layer_is_read():
    """Dropout acts between layers only: in evaluation mode, or with one layer (torch warns
    that it does nothing there), the LSTM is read."""
    model = nn.Sequential(nn.LSTM(4, 5, 2, dropout=0.5, batch_first=True)).to(DT).eval()
    assert "0" in ghost.ghost_layers(model, list(model.parameters())).modules
    with pytest.warns(UserWarning, match="dropout"):
        one = nn.Sequential(nn.LSTM(4, 5, 1, dropout=0.5, batch_first=True)).to(DT).train()
    assert "0" in ghost.ghost_layers(one, list(one.parameters())).modules


class WithState(nn.Module):
    """An LSTM started from a learned initial state, passed positionally or by keyword, fed a
    packed sequence, its input by keyword, or one unbatched sequence at a time."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.lstm = nn.LSTM(4, 5, batch_first=True)
        self.h0 = nn.Linear(4, 5)
        self.head = nn.Linear(5, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "packed":
            lengths = torch.full((len(x),), x.shape[1])
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths, True)
            _, (h, _) = self.lstm(packed)
            return self.head(h[-1])
        if self.how == "input_by_keyword":
            return self.head(self.lstm(input=x)[0][:, -1])
        if self.how == "unbatched":
            return torch.stack([self.head(self.lstm(seq)[0][-1]) for seq in x])
        h0 = torch.tanh(self.h0(x[:, 0])).unsqueeze(0)
        if self.how == "keyword_small":  # its effect on c_n: ~5e-7 of c_n's largest entry
            h0 = 1e-5 * h0
        state = (h0, torch.zeros_like(h0))
        out = self.lstm(x, state)[0] if self.how == "positional" else self.lstm(x, hx=state)[0]
        return self.head(out[:, -1])


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("packed", "LSTM: a packed sequence"),
        ("positional", "LSTM: called with an initial state"),
        # a keyword argument is not shown to forward hooks: the recomputation finds it out
        ("keyword", "LSTM: its recomputed cell state differs from the module's"),
        ("keyword_small", "LSTM: its recomputed cell state differs from the module's"),
        ("input_by_keyword", "LSTM: not called on one batched tensor"),
        ("unbatched", "LSTM: not called on one batched tensor"),
    ],
)
def test_a_call_the_path_does_not_read_is_refused_and_the_step_stays_exact(how, reason):
    torch.manual_seed(0)
    model = WithState(how).to(DT)
    x, y = batch(6, 1)
    xv, yv = batch(5, 2)
    with pytest.raises(ghost.Ineligible) as info:
        records(model, x, y)
    assert str(info.value) == reason
    method = assert_l2rw_equals_unrolled(model, x, y, xv, yv, engine="dual_twin")
    assert method.metastep.planner.per_layer_verdict(model) == "no"


# -- mutation checks: each term the reading adds carries weight ----------------------------------


def _mutant(kind: str):
    """``recurrent._deltas`` with one term dropped from what it returns or is given."""
    original = recurrent._deltas

    def deltas(xt, ht, gt, g_last, w):
        if kind == "finals":  # the gradients at h_n and c_n ignored
            g_last = tuple(torch.zeros_like(t) for t in g_last)
        xh, delta, last = original(xt, ht, gt, g_last, w)
        if kind == "previous_state":  # W_hh read on zeros: its per-example terms dropped
            xh = xh.clone()
            xh[..., xt.shape[-1] :] = 0
        if kind == "first_step":  # the first step's gate gradients dropped
            delta = delta.clone()
            delta[0] = 0
        return xh, delta, last

    return deltas


@pytest.mark.parametrize("kind", ["finals", "previous_state", "first_step"])
def test_mutation_a_dropped_term_fails_the_comparison(monkeypatch, kind: str):
    model = net(bidirectional=True, layers=2, finals=True)
    x, y = batch(5, 1)
    jvp, want, got, wanted = compare(model, x, y)
    assert_equal(jvp, want)
    monkeypatch.setattr(recurrent, "_deltas", _mutant(kind))
    jvp, want, got, wanted = compare(model, x, y)
    assert _differs(jvp, want)
    assert any(_differs(a, b) for a, b in zip(got, wanted, strict=True))


def test_directions_and_seeds_of_another_dtype_are_cast_like_the_record():
    """A float64 record given float32 directions and seeds: the same JVP and weighted
    gradients as in float64, to float32's precision (nothing mixes the two dtypes)."""
    model = net(bidirectional=True, finals=True)
    for name, p in model.named_parameters():  # one JVP through the bias-only branch too
        p.requires_grad_(not name.startswith("lstm.weight_ih_l0_reverse"))
    x, y = batch(5, 1)
    _, weights = trainable(model)
    rec = records(model, x, y)[0]
    u = direction(weights)
    seeds = torch.rand(len(y), generator=torch.Generator().manual_seed(3), dtype=DT)
    gates = [c for c in rec.calls if c.kind == "gates"]
    assert len(gates) == 2
    for call in gates:
        us = [
            None if t is None else u[next(i for i, w in enumerate(weights) if w is t)]
            for t in call.tensors
        ]
        for part in ([us[0], us[1], None, None], [None, None, us[2], us[3]], us):
            want = call.inner_of(part)
            got = call.inner_of([None if d is None else d.float() for d in part])
            assert got.dtype == DT
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
        for a, b in zip(call.grads_of(seeds.float()), call.grads_of(seeds), strict=True):
            assert (a is None) == (b is None)
            if b is not None:
                assert a.dtype == DT
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


class TwoLstms(nn.Module):
    """A position embedding broadcast over the batch, then two LSTM modules in a row; the
    head reads the second's output and both modules' final states."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(0.5 * torch.randn(1, 6, 4))
        self.first = nn.LSTM(4, 5, batch_first=True)
        self.second = nn.LSTM(5, 5, batch_first=True, bidirectional=True)
        self.head = nn.Linear(10, CLASSES)
        self.state = nn.Linear(10, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, (h1, _) = self.first(x + self.pos)
        out, (_, c2) = self.second(out)
        return self.head(out[:, -1]) + self.state(torch.cat([h1[-1], c2[1]], 1))


def test_two_lstm_modules_and_a_broadcast_weight_each_get_their_final_state_gradients():
    """Each LSTM's (h_n, c_n) gradients are found among the backward's results after the
    layer outputs and the broadcasts, two per LSTM in their order."""
    torch.manual_seed(0)
    model = TwoLstms().to(DT)
    x, y = batch(5, 1)
    jvp, want, got, wanted = compare(model, x, y)
    assert_equal(jvp, want)
    for a, b in zip(got, wanted, strict=True):
        assert_equal(a, b)


class Odd(nn.Module):
    """An LSTM whose output is written in place, whose input was written in place before the
    call, run on the batch twice over, or with a forward hook."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.lstm = nn.LSTM(4, 5, batch_first=True)
        self.head = nn.Linear(5, CLASSES)
        if how == "hooked":
            self.lstm.register_forward_hook(lambda m, a, o: None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "input_written_before":
            x = x * 1.0
            x.mul_(2.0)
        if self.how == "twice_over":
            out = self.lstm(torch.cat([x, x]))[0]
            return self.head(out[: len(x), -1] + out[len(x) :, -1])
        out = self.lstm(x)[0]
        if self.how == "output_written":
            out.mul_(2.0)
        return self.head(out[:, -1])


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("output_written", "LSTM: its input or output was modified in place"),
        ("twice_over", "LSTM: input not batched like the losses"),
        ("hooked", "lstm: hooks"),
        ("input_written_before", None),  # read: the write came before the call
    ],
)
def test_what_the_lstm_call_check_refuses_and_reads(how: str, reason: str | None):
    torch.manual_seed(0)
    model = Odd(how).to(DT)
    x, y = batch(5, 1)
    if reason is None:
        jvp, want, got, wanted = compare(model, x, y)
        assert_equal(jvp, want)
        for a, b in zip(got, wanted, strict=True):
            assert_equal(a, b)
        return
    with pytest.raises(ghost.Ineligible) as info:
        records(model, x, y)
    assert str(info.value) == reason
