"""Sequence models and attention in every meta step: recurrent layers, embeddings, norms,
tied weights, attention and transformers, against an independent reference.

The reference is written here with ``torch.func``: the model's weights as a dict, the virtual
SGD step θ′(ε) = θ − lr·∇θ Σ εᵢℓᵢ by ``torch.func.grad`` over ``functional_call``, the meta loss
at θ′ and its gradient with respect to ε (L2RW) or to the weighting net's parameters φ (MW-Net),
with the math kernel of scaled-dot-product attention. Float64; the package must agree to 1e-8
in both modes and by every engine it can be forced to, and each forced engine must be the one
that ran.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils.rnn import pack_padded_sequence

from reweight import L2RW, MWNet, l2rw_eps_grad
from reweight.methods import StepInputs

LR = 0.5
ATOL = 1e-8
VOCAB, CLASSES = 11, 4


class Recurrent(nn.Module):
    """Embedding (padding_idx 0) → recurrent layer → LayerNorm → linear head on the last step
    (or on the packed sequence's final states)."""

    def __init__(self, cell: type[nn.RNNBase], packed: bool = False, batch_first: bool = True):
        super().__init__()
        self.packed, self.batch_first = packed, batch_first
        self.emb = nn.Embedding(VOCAB, 6, padding_idx=0)
        self.rnn = cell(6, 5, num_layers=2, bidirectional=True, batch_first=batch_first)
        self.norm = nn.LayerNorm(10)
        self.head = nn.Linear(10, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)  # (B, T, 6)
        if self.packed:
            lengths = (tokens != 0).sum(1).cpu()
            out, _ = self.rnn(pack_padded_sequence(h, lengths, True, enforce_sorted=False))
            out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
            last = out[torch.arange(len(tokens)), lengths - 1]
        elif self.batch_first:
            last = self.rnn(h)[0][:, -1]
        else:
            last = self.rnn(h.transpose(0, 1))[0][-1]
        return self.head(self.norm(last))


class Encoder(nn.Module):
    """Embedding → TransformerEncoder (2 layers) → mean → head; optionally a decoder too."""

    def __init__(self, decoder: bool = False):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.dec = None
        if decoder:
            dlayer = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
            self.dec = nn.TransformerDecoder(dlayer, 1)
        self.head = nn.Linear(8, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.enc(self.emb(tokens))
        if self.dec is not None:
            h = self.dec(self.emb(tokens), h)
        return self.head(h.mean(1))


class Attention(nn.Module):
    """A direct F.scaled_dot_product_attention call, GroupNorm over a Conv1d and a head tied to
    the embedding (the logits are the scores against the first CLASSES token embeddings)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.qkv = nn.Linear(8, 24)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)
        q, k, v = self.qkv(h).chunk(3, -1)
        h = h + F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = self.norm(self.conv(h.transpose(1, 2))).mean(2)
        return h @ self.emb.weight[:CLASSES].T


MODELS = {
    "lstm": lambda: Recurrent(nn.LSTM),
    "lstm_time_first": lambda: Recurrent(nn.LSTM, batch_first=False),
    "lstm_packed": lambda: Recurrent(nn.LSTM, packed=True),
    "gru_time_first": lambda: Recurrent(nn.GRU, batch_first=False),
    "rnn": lambda: Recurrent(nn.RNN),
    "transformer_encoder": lambda: Encoder(),
    "transformer_decoder": lambda: Encoder(decoder=True),
    "sdpa_groupnorm_tied": lambda: Attention(),
}


def tokens(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n sequences of 7 tokens, right-padded with 0 to lengths 3..7, and labels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, VOCAB, (n, 7), generator=g)
    lengths = torch.randint(3, 8, (n,), generator=g)
    lengths[0] = 7
    x[torch.arange(7) >= lengths[:, None]] = 0
    return x, torch.randint(0, CLASSES, (n,), generator=g)


def setup(name: str, dtype=torch.float64):
    torch.manual_seed(0)
    model = MODELS[name]().to(dtype).train()
    x, y = tokens(8, 1)
    xv, yv = tokens(5, 2)
    return model, x, y, xv, yv


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def _virtual(model, theta, x, y, seeds):
    """θ′ = θ − lr·∇θ Σ sᵢℓᵢ(θ), with the graph to the seeds (``create_graph``)."""
    losses = F.cross_entropy(functional_call(model, theta, (x,)), y, reduction="none")
    grads = torch.autograd.grad((seeds * losses).sum(), list(theta.values()), create_graph=True)
    return {n: t - LR * g for (n, t), g in zip(theta.items(), grads, strict=True)}


def _leaves(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().requires_grad_() for n, p in module.named_parameters()}


def reference_eps_grad(model, x, y, xv, yv) -> torch.Tensor:
    """∂L_meta(θ′(ε))/∂ε at ε = 0 by autograd through ``functional_call`` (torch.func's
    transforms cannot run a packed LSTM, so plain autograd with ``create_graph``)."""
    theta = _leaves(model)
    eps = torch.zeros(len(y), dtype=torch.float64, requires_grad=True)
    with sdpa_kernel(SDPBackend.MATH):  # float64: no oneDNN RNN kernel to avoid
        new = _virtual(model, theta, x, y, eps)
        meta = F.cross_entropy(functional_call(model, new, (xv,)), yv)
        return torch.autograd.grad(meta, eps)[0]


def reference_phi_grads(model, vnet, x, y, xv, yv) -> list[torch.Tensor]:
    """∂L_meta(θ′(φ))/∂φ for w = vnet(ℓ; φ)/B, by autograd through ``functional_call``."""
    theta, phi = _leaves(model), _leaves(vnet)
    with sdpa_kernel(SDPBackend.MATH):  # float64: no oneDNN RNN kernel to avoid
        losses = F.cross_entropy(functional_call(model, theta, (x,)), y, reduction="none")
        w = functional_call(vnet, phi, (losses.detach().reshape(-1, 1),)).reshape(-1) / len(y)
        new = _virtual(model, theta, x, y, w)
        meta = F.cross_entropy(functional_call(model, new, (xv,)), yv)
        return list(torch.autograd.grad(meta, list(phi.values())))


def assert_close(got: torch.Tensor, want: torch.Tensor, atol: float = ATOL) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    err = float((got - want).abs().max())
    assert err <= atol, f"max |error| {err:.3g}"


def l2rw_step(model, x, y, xv, yv, **kwargs):
    method = L2RW(**kwargs)
    out = method.step(StepInputs(model, x, y, xv, yv, LR, F.cross_entropy))
    return method, out


# the engines a forced run must use for these models (per-layer: only Linear/Conv weights)
L2RW_ENGINES = ["auto", "tape", "dual", "dual_twin"]
MWNET_ENGINES = ["auto", "tape", "dual_twin"]
MODES = ("fast", "unrolled")
RECURRENT = {"lstm", "lstm_time_first", "lstm_packed", "gru_time_first", "rnn"}
# the recurrent models the per-layer path reads (nn.LSTM on padded batches); the others, and
# a packed sequence, take dual numbers through the twin
PER_LAYER_RECURRENT = {"lstm", "lstm_time_first"}


def refused_tape(name: str, engine: str) -> bool:
    """Recurrent cells write their gates in place, which the tangent tape cannot replay: a
    forced tape is refused with one line naming the op (auto takes dual numbers)."""
    return engine == "tape" and name in RECURRENT


@pytest.mark.parametrize("name", list(MODELS))
def test_l2rw_eps_grad_equals_the_reference(name: str):
    model, x, y, xv, yv = setup(name)
    want = reference_eps_grad(model, x, y, xv, yv)
    assert want.abs().max() > 1e-4  # the comparison is not between zeros
    for mode in ("unrolled", "fast"):
        assert_close(l2rw_eps_grad(model, x, y, xv, yv, LR, meta_grad=mode), want)


def engine_cases(engines: list[str]) -> list[tuple[str, str]]:
    """(model, engine) for an every-engine test: all but the refused ones (a forced tape on a
    recurrent model: test_a_forced_tape_is_refused_on_a_recurrent_model), and the per-layer
    path forced on the LSTMs it reads."""
    cases = [(name, e) for name in MODELS for e in engines if not refused_tape(name, e)]
    return cases + [(name, "per_layer") for name in sorted(PER_LAYER_RECURRENT)]


def step_by_engine(step, name: str, engine: str):
    """``step`` (``l2rw_step`` or ``mwnet_grads``) on the model ``name`` with ``engine`` forced
    (``auto``: the planner's choice); a forced engine is the one that ran. Returns
    ((model, x, y, xv, yv), the method, the step's output)."""
    model, x, y, xv, yv = setup(name)
    method, out = step(model, x, y, xv, yv, engine=engine)
    if engine != "auto":
        assert method.metastep.planner.last_engine == engine
    return (model, x, y, xv, yv), method, out


@pytest.mark.parametrize(("name", "engine"), engine_cases(L2RW_ENGINES))
def test_l2rw_step_by_every_engine_equals_the_reference(name: str, engine: str):
    (model, x, y, xv, yv), method, out = step_by_engine(l2rw_step, name, engine)
    want = reference_eps_grad(model, x, y, xv, yv)
    if engine == "auto" and name in RECURRENT:
        auto = "per_layer" if name in PER_LAYER_RECURRENT else "dual_twin"
        assert method.metastep.planner.last_engine == auto
    expected_w = torch.clamp(-want, min=0)
    assert_close(out.weights, expected_w / expected_w.sum())
    # the losses the real update backpropagates are the model's, at θ
    with torch.no_grad():
        assert_close(out.losses.detach(), F.cross_entropy(model(x), y, reduction="none"))
    _, unrolled = l2rw_step(model, x, y, xv, yv, meta_grad="unrolled")
    assert_close(unrolled.weights, out.weights)


def mwnet_grads(model, x, y, xv, yv, **kwargs):
    method = MWNet(hidden=6, **kwargs)
    method.setup(model=model, device=torch.device("cpu"))
    torch.manual_seed(3)
    for p in method.vnet.parameters():  # a net whose output varies with the loss
        p.data = torch.randn_like(p)
    grads, _, _ = method.meta_grads(StepInputs(model, x, y, xv, yv, LR, F.cross_entropy))
    return method, grads


@pytest.mark.parametrize("step", [l2rw_step, mwnet_grads], ids=["l2rw", "mwnet"])
@pytest.mark.parametrize("name", sorted(RECURRENT))
def test_a_forced_tape_is_refused_on_a_recurrent_model(name: str, step):
    assert refused_tape(name, "tape")
    model, x, y, xv, yv = setup(name)
    with pytest.raises(ValueError, match=r"engine=tape cannot run Recurrent.*in-place"):
        step(model, x, y, xv, yv, engine="tape")


@pytest.mark.parametrize(("name", "engine"), engine_cases(MWNET_ENGINES))
def test_mwnet_net_gradients_equal_the_reference(name: str, engine: str):
    (model, x, y, xv, yv), method, fast = step_by_engine(mwnet_grads, name, engine)
    want = reference_phi_grads(model, method.vnet, x, y, xv, yv)
    assert max(float(w.abs().max()) for w in want) > 1e-6
    _, unrolled = mwnet_grads(model, x, y, xv, yv, meta_grad="unrolled")
    for got_f, got_u, w in zip(fast, unrolled, want, strict=True):
        assert_close(got_f, w)
        assert_close(got_u, w)


@pytest.mark.parametrize("name", ["lstm", "gru_time_first", "transformer_encoder"])
def test_float32_fast_equals_unrolled(name: str):
    """In float32 the CPU runs oneDNN's LSTM and the flash attention kernel, which have no
    forward-mode rule or double backward: the meta step must switch kernels, and the real
    model must still compute what it computes outside a meta step."""
    model, x, y, xv, yv = setup(name, torch.float32)
    fast = l2rw_eps_grad(model, x, y, xv, yv, LR)
    unrolled = l2rw_eps_grad(model, x, y, xv, yv, LR, meta_grad="unrolled")
    scale = float(unrolled.abs().max())
    assert scale > 1e-4
    assert float((fast - unrolled).abs().max()) <= 1e-4 * scale
    with torch.no_grad():  # outside a meta step: the fast kernels
        plain = F.cross_entropy(model(x), y, reduction="none")
    steps = {mode: l2rw_step(model, x, y, xv, yv, meta_grad=mode)[1] for mode in MODES}
    assert float((steps["fast"].weights - steps["unrolled"].weights).abs().max()) <= 1e-4
    for out in steps.values():  # the losses the real update backpropagates are the model's
        assert float((out.losses.detach() - plain).abs().max()) <= 1e-5
    phi = {mode: mwnet_grads(model, x, y, xv, yv, meta_grad=mode)[1] for mode in MODES}
    for f, u in zip(phi["fast"], phi["unrolled"], strict=True):
        assert float((f - u).abs().max()) <= 1e-3 * float(u.abs().max()) + 1e-7


def test_dropout_in_a_recurrent_model_is_replayed():
    """LSTM dropout between layers draws the same masks in every forward of a fast step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(VOCAB, 6), nn.LSTM(6, 5, 2, dropout=0.5, batch_first=True))

    class Head(nn.Module):
        def __init__(self, body):
            super().__init__()
            self.body, self.head = body, nn.Linear(5, CLASSES)

        def forward(self, t):
            return self.head(self.body(t)[0][:, -1])

    net = Head(model).double().train()
    x, y = tokens(8, 1)
    xv, yv = tokens(5, 2)
    results = []
    for engine in ("auto", "dual_twin", "dual"):
        torch.manual_seed(7)
        _, out = l2rw_step(net, x, y, xv, yv, engine=engine)
        results.append(out.weights)
    assert_close(results[1], results[0])
    assert_close(results[2], results[0])


def test_the_benchmark_runs_the_sequence_models(monkeypatch: pytest.MonkeyPatch):
    """benchmarks/meta_step.py --models lstm,vit_tiny: its rows, on small batches, with the
    engines the planner picks for them on CPU."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "meta_step.py"
    spec = importlib.util.spec_from_file_location("meta_step", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "meta_step", bench)  # dataclasses look their module up
    spec.loader.exec_module(bench)
    assert {"lstm", "vit_tiny"} <= set(bench.CASES)
    engines = {}
    for name in ("lstm", "vit_tiny"):
        case = bench.Case(name, 8, 8, (1, 28, 28), 10)
        rows = bench.run_case(
            case,
            torch.device("cpu"),
            threads=None,
            bf16=False,
            warmup=0,
            rounds=1,
            memory=False,
            variants=("plain", "l2rw/fast", "mwnet/fast"),
        )
        assert [r["variant"] for r in rows] == ["plain", "l2rw/fast", "mwnet/fast"]
        assert all(r["ratio"] > 0 for r in rows)
        engines[name] = {r["variant"]: r["engine"] for r in rows}
    assert engines["lstm"]["l2rw/fast"] == engines["lstm"]["mwnet/fast"] == "per_layer"
    assert engines["vit_tiny"]["l2rw/fast"] == engines["vit_tiny"]["mwnet/fast"] == "per_layer"
    # --clock cpu: each step timed by the process's CPU time, not the time that passed
    ticks = iter(range(100))
    monkeypatch.setitem(bench.CLOCKS, "cpu", lambda: float(next(ticks)))
    rows = bench.run_case(
        bench.Case("lenet", 2, 2, (1, 28, 28), 2), torch.device("cpu"), threads=None,
        bf16=False, warmup=0, rounds=2, memory=False, variants=("plain", "floor"), clock="cpu",
    )  # fmt: skip
    assert [(r["variant"], r["clock"], r["median_ms"]) for r in rows] == [
        ("plain", "cpu", 1000.0),
        ("floor", "cpu", 1000.0),
    ]  # every step one tick of the stand-in clock
    assert [r["floor_paired"] for r in rows] == [1.0, 1.0]
    # paired: each round's step over the same round's floor, the median over rounds
    assert bench._paired([2.0, 9.0, 3.0], [1.0, 3.0, 3.0], False) == 2.0
    assert bench._paired([2.0, 4.0], [1.0, 3.0], True) == 1.5  # every k-th batch: mean / mean
    assert "| 1.00 | 1.00 |" in bench.format_table(rows)
