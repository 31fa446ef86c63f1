"""The per-layer path on transformers (vit_tiny, a tiny BERT, a tiny HuggingFace ViT): weights
shared by every example of a batch (a ViT's class token and position embedding, a BERT's
position embeddings looked up once for the batch) and ``nn.MultiheadAttention``'s functional
projections, in float64, against per-example gradients taken one example at a time and against
the unrolled meta step; and mutation checks: the same comparisons fail when one per-example
term is dropped from the record.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reweight import L2RW, l2rw_eps_grad
from reweight.jvp import per_layer as ghost
from reweight.jvp.base import Forward
from reweight.meta import TwinCache, trainable
from reweight.meta.kernels import differentiable_kernels
from reweight.metastep import StepInputs
from reweight.models import build_model

from .test_fast import assert_equal, mwnet_pair

DT = torch.float64


def vit():
    torch.manual_seed(0)
    model = build_model("vit_tiny", 10, 1, (1, 28, 28)).to(DT).train()
    with torch.no_grad():  # away from their zero initialisation, so that every term counts
        model.class_token.normal_()
        model.heads.head.weight.normal_(std=0.1)

    def batch(n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 1, 28, 28, generator=g, dtype=DT)
        return x, torch.randint(0, 10, (n,), generator=g)

    return model, batch


def bert():
    pytest.importorskip("transformers")
    from transformers import BertForSequenceClassification

    from reweight.models.hf import SequenceClassifier

    from .helpers import tiny_bert_config

    torch.manual_seed(0)
    model = SequenceClassifier(BertForSequenceClassification(tiny_bert_config()))
    model = model.to(DT).train()

    def batch(n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(1, 40, (n, 7), generator=g)
        mask = torch.ones(n, 7, dtype=torch.long)
        mask[0, 5:] = 0  # one padded example
        return {"input_ids": ids, "attention_mask": mask}, torch.randint(0, 3, (n,), generator=g)

    return model, batch


class PixelLogits(nn.Module):
    """A HuggingFace image classifier as a model of pixels to logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def hf_vit():
    pytest.importorskip("transformers")
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
    )
    model = PixelLogits(ViTForImageClassification(config)).to(DT).train()
    with torch.no_grad():  # HF starts the class token at zero
        model.model.vit.embeddings.cls_token.normal_()

    def batch(n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 1, 8, 8, generator=g, dtype=DT)
        return x, torch.randint(0, 3, (n,), generator=g)

    return model, batch


def gpt2():
    """A tiny GPT-2: its projections are HuggingFace's ``Conv1D``, ``torch.addmm`` on the
    batch's tokens flattened to rows; causal attention with padding; the class read at each
    sequence's last real token."""
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from reweight.models.hf import SequenceClassifier

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=16, num_labels=3,
        pad_token_id=0, bos_token_id=1, eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0,
    )  # fmt: skip
    model = SequenceClassifier(GPT2ForSequenceClassification(config)).to(DT).train()

    def batch(n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(2, 40, (n, 7), generator=g)
        mask = torch.ones(n, 7, dtype=torch.long)
        mask[: n // 2, -2:] = 0  # half the batch padded at the end
        return {"input_ids": ids * mask, "attention_mask": mask}, torch.randint(
            0, 3, (n,), generator=g
        )

    return model, batch


def _text(config_of, dropout: float = 0.0):
    """A tiny HuggingFace sequence classifier of the family ``config_of`` names (random
    weights) and its batches: token ids with the second half of the batch padded at the end."""
    pytest.importorskip("transformers")
    import transformers

    from reweight.models.hf import SequenceClassifier

    config_cls, model_cls, options = config_of(dropout)
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**options)
    model = SequenceClassifier(getattr(transformers, model_cls)(config)).to(DT).train()

    def batch(n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(2, 40, (n, 7), generator=g)
        mask = torch.ones(n, 7, dtype=torch.long)
        mask[n // 2 :, -2:] = 0
        return {"input_ids": ids * mask, "attention_mask": mask}, torch.randint(
            0, 3, (n,), generator=g
        )

    return model, batch


def roberta_config(dropout: float):
    return "RobertaConfig", "RobertaForSequenceClassification", {
        "vocab_size": 40, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 32, "max_position_embeddings": 16, "num_labels": 3,
        "pad_token_id": 0, "hidden_dropout_prob": dropout,
        "attention_probs_dropout_prob": dropout,
    }  # fmt: skip


def distilbert_config(dropout: float):
    return "DistilBertConfig", "DistilBertForSequenceClassification", {
        "vocab_size": 40, "dim": 16, "n_layers": 2, "n_heads": 2, "hidden_dim": 32,
        "max_position_embeddings": 16, "num_labels": 3, "pad_token_id": 0, "dropout": dropout,
        "attention_dropout": dropout, "seq_classif_dropout": dropout,
    }  # fmt: skip


def gpt2_config(dropout: float):
    return "GPT2Config", "GPT2ForSequenceClassification", {
        "vocab_size": 40, "n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 16,
        "num_labels": 3, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1,
        "resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": dropout,
    }  # fmt: skip


def bert_config(dropout: float):
    from .helpers import tiny_bert_config

    return "BertConfig", "BertForSequenceClassification", tiny_bert_config(dropout).to_dict()


class Encoder(nn.Module):
    """Token ids through torch's own ``nn.TransformerEncoder``, sequence first (its default
    ``batch_first=False``) or batch first, with a final norm; the class from the mean token."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(40, 8, padding_idx=0)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first)
        self.enc = nn.TransformerEncoder(layer, 2, nn.LayerNorm(8), enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        if self.batch_first:
            return self.head(self.enc(h).mean(1))
        return self.head(self.enc(h.transpose(0, 1)).mean(0))


def encoder(batch_first: bool = False):
    """T = 5 steps: the batches of 5 have as many examples as steps."""
    torch.manual_seed(0)
    model = Encoder(batch_first).to(DT).train()

    def batch(n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        return torch.randint(1, 40, (n, 5), generator=g), torch.randint(0, 3, (n,), generator=g)

    return model, batch


MODELS = {
    "seq_first": encoder,
    "batch_first": lambda: encoder(batch_first=True),
    "vit_tiny": vit,
    "bert": bert,
    "hf_vit": hf_vit,
    "gpt2": gpt2,
    "roberta": lambda: _text(roberta_config),
    "distilbert": lambda: _text(distilbert_config),
}


def per_example_grads(model: nn.Module, x, y) -> list[torch.Tensor]:
    """(B, *weight.shape) per trainable weight, one example's backward at a time."""
    _, weights = trainable(model)
    rows = []
    for i in range(len(y)):
        xi = {k: v[i : i + 1] for k, v in x.items()} if isinstance(x, dict) else x[i : i + 1]
        loss = F.cross_entropy(model(xi), y[i : i + 1])
        grads = torch.autograd.grad(loss, weights, allow_unused=True)
        zero = [
            torch.zeros_like(w) if g is None else g for w, g in zip(weights, grads, strict=True)
        ]
        rows.append(zero)
    return [torch.stack(col) for col in zip(*rows, strict=True)]


def records(model: nn.Module, x, y) -> list[ghost.GhostRecord]:
    _, weights = trainable(model)
    layers = ghost.ghost_layers(model, weights)
    with ghost.recording(model, layers, len(y)) as watch:
        losses = F.cross_entropy(model(x), y, reduction="none")
    return [ghost.finish(weights, watch, losses)]


def direction(weights, seed: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(w.shape, generator=g, dtype=DT) for w in weights]


def assert_per_example(model: nn.Module, x, y, padding_row: bool = False):
    """The record's JVP in a random direction and its losses' backward under random seeds
    equal those of per-example gradients taken one example at a time. Returns the records."""
    _, weights = trainable(model)
    per = per_example_grads(model, x, y)
    recs = records(model, x, y)
    u = direction(weights)
    if padding_row:  # a direction made by a backward: nothing on the padding row
        u[0][0] = 0
    want = sum(p.flatten(1) @ d.flatten() for p, d in zip(per, u, strict=True))
    assert_equal(ghost.jvp_of(recs, u), want)
    seeds = torch.rand(len(y), generator=torch.Generator().manual_seed(3), dtype=DT)
    got = torch.autograd.grad((seeds * ghost.losses_of(recs)).sum(), weights)
    for a, p in zip(got, per, strict=True):
        assert_equal(a, torch.einsum("b,b...->...", seeds, p))
    return recs


@pytest.mark.parametrize("name", sorted(MODELS))
def test_jvp_and_weighted_gradients_equal_per_example_gradients(name: str):
    model, batch = MODELS[name]()
    x, y = batch(5, 1)
    assert_per_example(model, x, y, padding_row=name == "bert")


def assert_l2rw_equals_unrolled(model, x, y, xv, yv, engine: str) -> L2RW:
    """L2RW's fast ε-gradient, by the planner's choice, equals the unrolled one (float64,
    1e-8; not between zeros), and ``engine`` computed it. Returns the method."""
    want = l2rw_eps_grad(model, x, y, xv, yv, 0.5, meta_grad="unrolled")
    method = L2RW()
    out = method.metastep(StepInputs(model, x, y, xv, yv, 0.5, F.cross_entropy))
    assert method.metastep.planner.last_engine == engine
    assert float(want.abs().max()) > 1e-3
    assert_equal(out.c, want)
    return method


@pytest.mark.parametrize("name", sorted(MODELS))
def test_l2rw_and_mwnet_take_the_path_and_equal_unrolled(name: str):
    assert_fast_takes_the_path_and_equals_unrolled(*MODELS[name]())


def assert_fast_takes_the_path_and_equals_unrolled(model: nn.Module, batch) -> None:
    """L2RW's and MW-Net's fast steps, by the per-layer engine, equal the unrolled ones."""
    (x, y), (xv, yv) = batch(6, 1), batch(5, 2)
    assert_l2rw_equals_unrolled(model, x, y, xv, yv, engine="per_layer")
    # the helper's reference differentiates the real model's forward twice: attention's math
    # kernel (the L2RW step above ran the default one)
    with differentiable_kernels(model):
        got, unrolled, method = mwnet_pair(
            model, x, y, xv, yv, normalize="sum", replay=None, warm=False
        )
    assert method.metastep.planner.per_layer_verdict(model) == "ok"
    assert method.metastep.planner.last_engine == "per_layer"
    for a, b in zip(got, unrolled, strict=True):
        assert b.abs().max() > 0
        assert_equal(a, b)


def assert_each_dropped_call_fails(model: nn.Module, x, y, calls_of) -> None:
    """For each call ``calls_of(records)`` picks, the record without it gives a JVP and a
    weighted gradient of the call's weight that differ from the per-example ones."""
    _, weights = trainable(model)
    per = per_example_grads(model, x, y)
    u = direction(weights)
    want = sum(p.flatten(1) @ d.flatten() for p, d in zip(per, u, strict=True))
    for k in range(len(calls_of(records(model, x, y)))):
        recs = records(model, x, y)
        dropped = calls_of(recs)[k]
        recs[0].calls = [c for c in recs[0].calls if c is not dropped]
        assert _differs(ghost.jvp_of(recs, u), want)
        target = dropped.weight if dropped.weight is not None else dropped.bias
        i = next(j for j, w in enumerate(weights) if w is target)
        seeds = torch.rand(len(y), generator=torch.Generator().manual_seed(3), dtype=DT)
        (got,) = torch.autograd.grad(
            (seeds * ghost.losses_of(recs)).sum(), [target], allow_unused=True
        )
        assert got is None or _differs(got, torch.einsum("b,b...->...", seeds, per[i]))


def _dropped(recs: list[ghost.GhostRecord], keep) -> list[ghost.GhostRecord]:
    for r in recs:
        r.calls = [c for c in r.calls if keep(c)]
    return recs


def _differs(got: torch.Tensor, want: torch.Tensor) -> bool:
    try:
        assert_equal(got, want)
    except AssertionError:
        return True
    return False


@pytest.mark.parametrize(
    ("name", "term"),
    [
        ("vit_tiny", "class_token"),
        ("vit_tiny", "encoder.pos_embedding"),
        ("vit_tiny", "encoder.layers.encoder_layer_0.self_attention.in_proj_weight"),
        ("vit_tiny", "encoder.layers.encoder_layer_1.self_attention.out_proj.bias"),
        ("bert", "model.bert.embeddings.position_embeddings.weight"),
        ("hf_vit", "model.vit.embeddings.cls_token"),
        ("hf_vit", "model.vit.embeddings.position_embeddings"),
        ("gpt2", "model.transformer.h.0.attn.c_attn.weight"),
        ("gpt2", "model.transformer.h.1.mlp.c_proj.bias"),
        ("gpt2", "model.transformer.wpe.weight"),
        ("seq_first", "enc.layers.0.linear1.weight"),
        ("seq_first", "enc.layers.1.norm2.bias"),
        ("seq_first", "enc.norm.weight"),
    ],
)
def test_mutation_a_dropped_per_example_term_fails_the_comparison(name: str, term: str):
    """Each term the shared-weight reading adds carries weight: without it, the JVP and the
    weighted gradients the tests above compare are off (so those tests would fail)."""
    model, batch = MODELS[name]()
    x, y = batch(5, 1)
    names, weights = trainable(model)
    target = weights[names.index(term)]
    per = per_example_grads(model, x, y)
    u = direction(weights)
    want = sum(p.flatten(1) @ d.flatten() for p, d in zip(per, u, strict=True))
    intact = records(model, x, y)
    assert any(target is c.weight or target is c.bias for c in intact[0].calls)
    assert_equal(ghost.jvp_of(intact, u), want)
    recs = _dropped(records(model, x, y), lambda c: target is not c.weight and target is not c.bias)
    assert _differs(ghost.jvp_of(recs, u), want)
    seeds = torch.rand(len(y), generator=torch.Generator().manual_seed(3), dtype=DT)
    (got,) = torch.autograd.grad((seeds * ghost.losses_of(recs)).sum(), [target], allow_unused=True)
    k = names.index(term)
    assert got is None or _differs(got, torch.einsum("b,b...->...", seeds, per[k]))


def test_sequence_first_layers_are_known_by_torchs_transformer_classes_only():
    """The layers read as (T, B, ...): those of torch's own sequence-first layers and their
    stack's final norm; none of a batch-first stack, nor of a subclass whose forward may lay
    its tensors out otherwise (it is checked as any model: here, refused by the batch size)."""
    model, batch = encoder()
    layers = ghost.ghost_layers(model, trainable(model)[1])
    parts = ("linear1", "linear2", "norm1", "norm2")
    assert layers.seq_first == {f"enc.layers.{i}.{p}" for i in (0, 1) for p in parts} | {"enc.norm"}
    model, _ = encoder(batch_first=True)
    assert ghost.ghost_layers(model, trainable(model)[1]).seq_first == frozenset()
    # a layer as the model itself, a stack of one layer, a decoder layer (its third norm)
    layer = nn.TransformerEncoderLayer(8, 2, 16)
    assert ghost.ghost_layers(layer, trainable(layer)[1]).seq_first == {
        "linear1", "linear2", "norm1", "norm2"
    }  # fmt: skip
    stack = nn.TransformerEncoder(layer, 1, nn.LayerNorm(8), enable_nested_tensor=False)
    assert "norm" in ghost.ghost_layers(stack, trainable(stack)[1]).seq_first
    decoder = nn.TransformerDecoderLayer(8, 2, 16)
    assert "norm3" in ghost.ghost_layers(decoder, trainable(decoder)[1]).seq_first

    class Own(nn.TransformerEncoderLayer):
        pass

    torch.manual_seed(0)
    model = Encoder(batch_first=False).to(DT)
    model.enc.layers = nn.ModuleList(
        Own(8, 2, 16, dropout=0.0).to(DT) for _ in range(2)
    )  # fmt: skip
    model.enc.norm = None
    assert ghost.ghost_layers(model, trainable(model)[1]).seq_first == frozenset()
    x, y = batch(6, 1)
    with pytest.raises(ghost.Ineligible, match="LayerNorm: input not batched like the losses"):
        records(model, x, y)


def test_sequence_first_layers_on_long_sequences_keep_per_example_gradients():
    """T = 24 steps of width 8: the feed-forward layers' per-example gradients are smaller than
    their output gradients, so finish keeps those, made from the (T, B, ·) tensors."""
    model, _ = encoder()
    g = torch.Generator().manual_seed(4)
    x, y = torch.randint(1, 40, (5, 24), generator=g), torch.randint(0, 3, (5,), generator=g)
    (rec,) = assert_per_example(model, x, y, padding_row=True)
    kept = {c.module for c in rec.calls if c.seq_first and c.per_example is not None}
    assert {model.enc.layers[0].linear1, model.enc.layers[1].linear2} <= kept


class Decoded(nn.Module):
    """A sequence-first ``nn.TransformerDecoderLayer`` over each example's own tokens (its
    memory the same embeddings), its two attentions frozen: cross-attention is torch's own
    function, whose trainable projections the path would not see."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 8)
        self.dec = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0)
        for p in (*self.dec.self_attn.parameters(), *self.dec.multihead_attn.parameters()):
            p.requires_grad_(False)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids).transpose(0, 1)
        return self.head(self.dec(h, h).mean(0))


def test_a_sequence_first_decoder_layer_is_read_per_example():
    torch.manual_seed(0)
    model = Decoded().to(DT)
    x = torch.randint(1, 40, (5, 4), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (5,), generator=torch.Generator().manual_seed(2))
    recs = assert_per_example(model, x, y)
    assert {c.name for c in recs[0].calls if c.seq_first} == {"Linear", "LayerNorm"}


class Misfed(nn.Module):
    """A sequence-first layer (norm first) handed batch-first tensors: its attention runs
    across the batch. Or a sequence-first stack whose head's output is written in place."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.embed = nn.Embedding(40, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, norm_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        if self.how == "batch first":
            return self.head(self.layer(h).mean(1))
        return self.head(self.layer(h.transpose(0, 1)).mean(0)).mul_(2.0)


@pytest.mark.parametrize(
    ("how", "match"),
    [
        ("batch first", "LayerNorm: input not batched like the losses"),
        ("in place", "Linear: its input or output was modified in place"),
    ],
)
def test_sequence_first_layers_misfed_or_followed_by_a_refusal_are_refused(how, match):
    torch.manual_seed(0)
    model = Misfed(how).to(DT)
    x = torch.randint(1, 40, (6, 4), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (6,))
    with pytest.raises(ghost.Ineligible, match=match):
        records(model, x, y)


def test_a_sequence_first_encoder_read_through_its_twin():
    """Without the real update the forward runs through the twin, whose modules are of other
    (meta) classes: the sequence-first layers are found by name there, and the step is exact."""
    from reweight.metastep import MetaStep

    model, batch = encoder()
    (x, y), (xv, yv) = batch(6, 1), batch(5, 2)
    want = l2rw_eps_grad(model, x, y, xv, yv, 0.5, meta_grad="unrolled")
    step = MetaStep(at_zero=True)
    out = step(StepInputs(model, x, y, xv, yv, 0.5, F.cross_entropy), update=False)
    assert step.planner.last_engine == "per_layer" and out.losses is None
    assert_equal(out.c, want)


def test_a_sequence_first_encoder_with_dropout_keeps_the_path():
    """torch's default encoder layer (sequence first, dropout 0.1): both methods' first step
    checks the path against an exact JVP drawing the same masks, and keeps it."""
    from reweight import MWNet

    model, batch = encoder()
    for layer in model.enc.layers:
        for drop in (layer.dropout, layer.dropout1, layer.dropout2):
            drop.p = 0.1
    (x, y), (xv, yv) = batch(6, 1), batch(5, 2)
    method = L2RW()
    method.metastep(StepInputs(model, x, y, xv, yv, 0.5, F.cross_entropy))
    assert method.metastep.planner.last_engine == "per_layer"
    for chunks in ("auto", 2):
        mwnet = MWNet(hidden=5, meta_chunks=chunks)
        mwnet.setup(model=model, device=torch.device("cpu"))
        mwnet.meta_grads(StepInputs(model, x, y, xv, yv, 0.5, F.cross_entropy))
        assert mwnet.metastep.planner.per_layer_verdict(model) == "ok"
        assert mwnet.metastep.planner.last_engine == "per_layer"


class UsedTwice(nn.Module):
    """A shared offset added, then multiplied in: the product is no broadcast the path reads."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.randn(5))
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((x + self.offset) * self.offset)


def test_a_shared_weight_used_otherwise_is_refused_and_the_step_stays_exact():
    torch.manual_seed(0)
    model = UsedTwice().to(DT)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 5, generator=g, dtype=DT), torch.randint(0, 3, (6,), generator=g)
    xv, yv = torch.randn(7, 5, generator=g, dtype=DT), torch.randint(0, 3, (7,), generator=g)
    assert_refused_and_exact_on_tape(model, x, y, xv, yv, "shared by the batch is used by mul")


def assert_refused_and_exact_on_tape(model, x, y, xv, yv, match: str) -> None:
    """The recording refuses the model with ``match`` as its reason; MW-Net's fast step then
    runs on the tape and equals the unrolled one."""
    with pytest.raises(ghost.Ineligible, match=match):
        records(model, x, y)
    got, want, method = mwnet_pair(model, x, y, xv, yv, normalize="sum", replay=None, warm=False)
    assert method.metastep.planner.per_layer_verdict(model) == "no"
    assert method.metastep.planner.last_engine == "tape"
    for a, b in zip(got, want, strict=True):
        assert_equal(a, b)


@pytest.mark.parametrize("attention_dropout", [0.0, 0.1])
def test_dropout_after_attention_draws_the_models_own_masks(attention_dropout: float):
    """The recording runs ``nn.MultiheadAttention`` by its own projections. It returned the
    output batch-major in memory, where torch's is sequence-major, and a dropout's mask follows
    the memory layout: a dropout after attention drew other masks than the model's own forward,
    so the per-layer JVP was not the model's. The first step's check caught it and kept every
    ViT with dropout off the path. Checked here against central differences of the model's own
    forward from the same random state, and by both methods keeping the path."""

    from torchvision.models import VisionTransformer

    from reweight import MWNet

    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=14, patch_size=7, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
        dropout=0.1, attention_dropout=attention_dropout, num_classes=3,
    ).to(DT).train()  # fmt: skip
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, 14, 14, generator=g, dtype=DT), torch.randint(0, 3, (6,), generator=g)
    xv, yv = (
        torch.randn(5, 3, 14, 14, generator=g, dtype=DT),
        torch.randint(0, 3, (5,), generator=g),
    )
    _, weights = trainable(model)
    direction = [torch.randn(w.shape, generator=g, dtype=DT) for w in weights]
    state = torch.get_rng_state()
    fwd = Forward(model, weights, x, y, F.cross_entropy, lambda: TwinCache().bound(model), False)
    got = ghost.PerLayerRecording(fwd, ghost.ghost_layers(model, weights)).jvp(direction)

    def losses(step: float) -> torch.Tensor:  # the model's own forward, from the same state
        torch.set_rng_state(state)
        with torch.no_grad():
            for w, d in zip(weights, direction, strict=True):
                w.add_(step * d)
            out = F.cross_entropy(model(x), y, reduction="none")
            for w, d in zip(weights, direction, strict=True):
                w.sub_(step * d)
        return out

    h = 1e-5  # central differences: error ~h² relative
    want = (losses(h) - losses(-h)) / (2 * h)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * float(want.abs().max()))
    method = L2RW()
    method.metastep(StepInputs(model, x, y, xv, yv, 0.5, F.cross_entropy))
    assert method.metastep.planner.per_layer_verdict(model) == "ok"
    mwnet = MWNet(hidden=5, meta_chunks=2)
    mwnet.setup(model=model, device=torch.device("cpu"))
    for _ in range(2):  # two slices: the check compares them slice by slice
        mwnet.meta_grads(StepInputs(model, x, y, xv, yv, 0.5, F.cross_entropy))
    assert mwnet.metastep.planner.jvps == {"per_layer": 2}


class Rows(nn.Module):
    """``torch.addmm`` on a weight of its own, as HuggingFace's ``Conv1D`` calls it, in ways the
    path does not read: a scaled bias, rows that are not each example's own; or read, but
    followed by a layer whose output is changed in place."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.weight = nn.Parameter(torch.randn(5, 3))
        self.bias = nn.Parameter(torch.randn(3))
        self.head = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.repeat(1, 2).view(-1, 5)  # two rows per example
        if self.how == "beta":
            return torch.addmm(self.bias, rows, self.weight, beta=0.5).view(len(x), 2, 3).sum(1)
        if self.how == "in place after":
            h = torch.addmm(self.bias, rows, self.weight).view(len(x), 2, 3).sum(1)
            return self.head(h).relu_()
        return torch.addmm(self.bias, rows[1:], self.weight)[-len(x) :]  # 2B - 1 rows


@pytest.mark.parametrize(
    ("how", "match"),
    [
        ("beta", "shared by the batch is used by addmm"),
        ("shifted", "addmm: rows not batched"),
        ("in place after", "Linear: its input or output was modified in place"),
    ],
)
def test_addmm_the_path_cannot_read_is_refused(how: str, match: str):
    torch.manual_seed(0)
    model = Rows(how).to(DT)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 5, generator=g, dtype=DT), torch.randint(0, 3, (6,), generator=g)
    with pytest.raises(ghost.Ineligible, match=match):
        records(model, x, y)


class BorrowedBias(nn.Module):
    """A weight of its own with the bias of a layer: ``F.linear(x, W, layer.bias)``."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 5))
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x) + F.linear(x, self.weight, self.head.bias)


def test_a_layers_bias_in_a_call_outside_the_layer_is_refused():
    """The call's bias term belongs to no record the path keeps: refused by structure, not
    left to the first step's numerical check."""
    torch.manual_seed(0)
    model = BorrowedBias().to(DT)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 5, generator=g, dtype=DT), torch.randint(0, 3, (6,), generator=g)
    with pytest.raises(ghost.Ineligible, match=r"F\.linear: a trainable weight of a layer used"):
        records(model, x, y)


@pytest.mark.parametrize(
    "config_of",
    [bert_config, roberta_config, distilbert_config, gpt2_config],
    ids=lambda f: f.__name__,
)
def test_hf_text_models_with_dropout_keep_the_path(config_of):
    """With their dropout on (0.1 everywhere, as their defaults), both methods' first step
    checks the path against an exact JVP drawing the same masks, and keeps it."""
    from reweight import MWNet

    model, batch = _text(config_of, dropout=0.1)
    (x, y), (xv, yv) = batch(6, 1), batch(5, 2)
    method = L2RW()
    method.metastep(StepInputs(model, x, y, xv, yv, 0.5, F.cross_entropy))
    assert method.metastep.planner.last_engine == "per_layer"
    for chunks in ("auto", 2):  # one piece (the cpu policy's default) and two slices
        mwnet = MWNet(hidden=5, meta_chunks=chunks)
        mwnet.setup(model=model, device=torch.device("cpu"))
        mwnet.meta_grads(StepInputs(model, x, y, xv, yv, 0.5, F.cross_entropy))
        assert mwnet.metastep.planner.per_layer_verdict(model) == "ok"
        assert mwnet.metastep.planner.last_engine == "per_layer"


def test_gpt2_with_more_positions_than_width_keeps_per_example_gradients():
    """Sequences longer than the width: ``Conv1D`` calls with fewer weights than output
    gradients per example are kept as per-example gradients (B, in·out), in their weight's
    (in, out) order, and read the same."""
    model, _ = _text(gpt2_config)
    model = model.model.__class__(model.model.config.__class__(**{
        **model.model.config.to_dict(), "n_embd": 8, "n_positions": 16,
    }))  # fmt: skip
    from reweight.models.hf import SequenceClassifier

    torch.manual_seed(0)
    model = SequenceClassifier(model).to(DT).train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 40, (5, 12), generator=g)
    x, y = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.randint(0, 3, (5,))
    recs = records(model, x, y)
    kept = [c for c in recs[0].calls if c.name == "addmm"]
    # (32 → 8 stays as its input and output gradient: both readings in one model)
    assert {c.per_example is not None for c in kept} == {True, False}
    _, weights = trainable(model)
    per = per_example_grads(model, x, y)
    u = direction(weights)
    want = sum(p.flatten(1) @ d.flatten() for p, d in zip(per, u, strict=True))
    assert_equal(ghost.jvp_of(recs, u), want)
    seeds = torch.rand(len(y), generator=g, dtype=DT)
    got = torch.autograd.grad((seeds * ghost.losses_of(recs)).sum(), weights)
    for a, p in zip(got, per, strict=True):
        assert_equal(a, torch.einsum("b,b...->...", seeds, p))
