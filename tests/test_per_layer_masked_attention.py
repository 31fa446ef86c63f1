"""The per-layer path on ``nn.MultiheadAttention`` called with masks or asking for its weights:
torch's own ``F.multi_head_attention_forward`` runs under the watch, which reads its packed
input projection on the sequence-first query and its output projection on step-major rows. In
float64: the recorded forward is the model's own bit for bit; per-example gradients taken one
example at a time and the unrolled meta step agree, the engine checked to be the per-layer one;
a mutation check (the projections' calls dropped, the comparison fails); and a torch whose
function cannot be run so is refused, the step then exact on the tape.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reweight.jvp import per_layer as ghost
from reweight.jvp import shared
from reweight.meta import trainable
from reweight.meta.kernels import differentiable_kernels

from .test_per_layer_shared import (
    assert_each_dropped_call_fails,
    assert_fast_takes_the_path_and_equals_unrolled,
    assert_per_example,
    assert_refused_and_exact_on_tape,
)

DT = torch.float64


def _padding(x: torch.Tensor) -> torch.Tensor:
    """(B, T) True where a step is padding (its first feature above 1; never the first step)."""
    pad = x[..., 0] > 1.0
    pad[:, 0] = False
    return pad


class Masked(nn.Module):
    """Self-attention with a causal mask and a key padding mask, batch or sequence first, with
    or without the attention weights returned."""

    def __init__(self, batch_first: bool, need_weights: bool) -> None:
        super().__init__()
        self.batch_first, self.need_weights = batch_first, need_weights
        self.attn = nn.MultiheadAttention(4, 2, batch_first=batch_first)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool).triu(1)
        h = x if self.batch_first else x.transpose(0, 1)
        o, _ = self.attn(
            h, h, h, attn_mask=causal, key_padding_mask=_padding(x),
            need_weights=self.need_weights,
        )  # fmt: skip
        o = o if self.batch_first else o.transpose(0, 1)
        return self.head(o.mean(1))


class Encoder(nn.Module):
    """torch's ``nn.TransformerEncoder`` (2 layers, batch or sequence first) on padded
    sequences, the padding given as ``src_key_padding_mask``."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=batch_first)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.batch_first else x.transpose(0, 1)
        h = self.enc(h, src_key_padding_mask=_padding(x))
        return self.head(h[:, 0] if self.batch_first else h[0])


MODELS = {
    "batch_first": lambda: Masked(True, False),
    "batch_first_weights": lambda: Masked(True, True),
    "seq_first": lambda: Masked(False, False),
    "encoder": lambda: Encoder(True),
    "encoder_seq_first": lambda: Encoder(False),
}


def _model(name: str):
    torch.manual_seed(0)
    model = MODELS[name]().to(DT).train()

    def batch(n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 5, 4, generator=g, dtype=DT)
        return x, torch.randint(0, 3, (n,), generator=g)

    return model, batch


def _attention_calls(recs: list[ghost.GhostRecord]) -> list:
    return [c for c in recs[0].calls if c.module is None]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_masked_attention_gives_per_example_gradients(name: str):
    """Each attention's two projections are read (the output one on step-major rows), the
    forward under the watch is the model's own bit for bit, and the record's JVP and weighted
    gradients equal those of one-example-at-a-time gradients."""
    model, batch = _model(name)
    x, y = batch(6, 1)
    assert _padding(x).any()  # some keys are masked
    with torch.no_grad():
        want = model(x)
    _, weights = trainable(model)
    with ghost.recording(model, ghost.ghost_layers(model, weights), len(y)):
        got = model(x)
    assert torch.equal(got, want)
    recs = assert_per_example(model, x, y)
    calls = _attention_calls(recs)
    layers = 2 if name.startswith("encoder") else 1
    assert len(calls) == 2 * layers
    assert [c.steps for c in calls] == [0, 5] * layers


@pytest.mark.parametrize("name", sorted(MODELS))
def test_l2rw_and_mwnet_take_the_path_and_equal_unrolled(name: str):
    assert_fast_takes_the_path_and_equals_unrolled(*_model(name))


@pytest.mark.parametrize("name", ["batch_first_weights", "seq_first"])
def test_mutation_a_dropped_projection_fails_the_comparison(name: str):
    """Without either projection's call in the record, the JVP and the weighted gradient of
    that projection's weight are off: the comparisons above would fail."""
    model, batch = _model(name)
    x, y = batch(6, 1)
    assert_each_dropped_call_fails(model, x, y, _attention_calls)


def test_a_torch_whose_attention_cannot_be_run_so_is_refused(monkeypatch):
    """Where torch's function cannot be run less its torch-function check, masked attention is
    refused with the reason (never read from calls the watch did not see)."""
    monkeypatch.setattr(shared, "_MHA_BODY", None)
    model, batch = _model("batch_first")
    (x, y), (xv, yv) = batch(6, 1), batch(5, 2)
    with differentiable_kernels(model):  # the reference's double backward, as above
        assert_refused_and_exact_on_tape(model, x, y, xv, yv, "not readable in this torch")
