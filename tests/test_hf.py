"""HuggingFace transformers (the ``nlp`` extra): a tiny BERT and DistilBERT built from a config
with random weights (nothing downloaded), batches given as dicts of tensors.

The meta-gradients of both methods in both modes equal an independent reference (autograd
through ``torch.func.functional_call`` with the math attention kernel) to 1e-8 in float64, and
the Trainer trains the wrapped model from a dataset of ``(dict, label)`` pairs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import (
    BertForSequenceClassification,
    DistilBertForSequenceClassification,
)

from reweight import L2RW, MWNet, Trainer, TrainerConfig, l2rw_eps_grad, l2rw_weights
from reweight.methods import StepInputs
from reweight.models.hf import SequenceClassifier

from .helpers import TINY, tiny_bert_config, tiny_distilbert_config
from .test_sequence import LR, assert_close, reference_eps_grad, reference_phi_grads

VOCAB, CLASSES = TINY["vocab"], TINY["labels"]


def tiny(kind: str, dropout: float = 0.0) -> SequenceClassifier:
    torch.manual_seed(0)
    if kind == "bert":
        model = BertForSequenceClassification(tiny_bert_config(dropout))
    else:
        model = DistilBertForSequenceClassification(tiny_distilbert_config(dropout))
    return SequenceClassifier(model)


def batch(n: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """n right-padded token sequences (lengths 3..8) with their attention masks, and labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, 8), generator=g)
    lengths = torch.randint(3, 9, (n,), generator=g)
    mask = (torch.arange(8) < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}, torch.randint(
        0, CLASSES, (n,), generator=g
    )


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_l2rw_eps_grad_equals_the_reference(kind: str):
    model = tiny(kind).double().train()
    (x, y), (xv, yv) = batch(6, 1), batch(4, 2)
    want = reference_eps_grad(model, x, y, xv, yv)
    assert want.abs().max() > 1e-5
    for mode in ("fast", "unrolled"):
        assert_close(l2rw_eps_grad(model, x, y, xv, yv, LR, meta_grad=mode), want)
    for engine in ("tape", "dual", "dual_twin"):
        method = L2RW(engine=engine)
        out = method.step(StepInputs(model, x, y, xv, yv, LR, F.cross_entropy))
        assert method.metastep.planner.last_engine == engine
        w = torch.clamp(-want, min=0)
        assert_close(out.weights, w / w.sum())


@pytest.mark.parametrize("mode", ["fast", "unrolled"])
def test_mwnet_net_gradients_equal_the_reference(mode: str):
    model = tiny("bert").double().train()
    (x, y), (xv, yv) = batch(6, 1), batch(4, 2)
    method = MWNet(hidden=6, meta_grad=mode)
    method.setup(model=model, device=torch.device("cpu"))
    torch.manual_seed(3)
    for p in method.vnet.parameters():
        p.data = torch.randn_like(p)
    got, losses, _ = method.meta_grads(StepInputs(model, x, y, xv, yv, LR, F.cross_entropy))
    want = reference_phi_grads(model, method.vnet, x, y, xv, yv)
    assert max(float(w.abs().max()) for w in want) > 1e-7
    for g, w in zip(got, want, strict=True):
        assert_close(g, w)
    assert losses.shape == (6,) and losses.requires_grad


class Tokens(Dataset):
    """(dict of tensors, label) pairs, as a tokenized text dataset gives them."""

    def __init__(self, n: int, seed: int) -> None:
        self.x, self.y = batch(n, seed)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return {k: v[i] for k, v in self.x.items()}, int(self.y[i])


@pytest.mark.parametrize("method", ["l2rw", "mwnet"])
@pytest.mark.parametrize("meta_grad", ["fast", "unrolled"])
def test_trainer_trains_a_wrapped_bert_from_dict_batches(method: str, meta_grad: str):
    model = tiny("bert", dropout=0.1)
    meth = L2RW(meta_grad=meta_grad) if method == "l2rw" else MWNet(hidden=8, meta_grad=meta_grad)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(
        model,
        Tokens(24, 1),
        meta_data=Tokens(8, 2),
        test_data=Tokens(8, 3),
        method=meth,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
        config=TrainerConfig(
            max_steps=3, batch_size=8, meta_batch_size=4, eval_every=3, log_every=1, seed=0
        ),
    )
    result = trainer.fit()
    assert result.history[-1]["step"] == 3
    assert 0.0 <= result.metrics["test_accuracy"] <= 1.0
    moved = [
        not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters(), strict=True)
    ]
    assert sum(moved) > len(moved) // 2  # the real updates reached the model
    w = trainer.example_weights()
    assert w.shape == (24,) and torch.isfinite(w).all()


def test_wrapper_says_what_it_takes():
    with pytest.raises(TypeError, match="takes a dict of tensors"):
        tiny("bert")(torch.zeros(2, 8, dtype=torch.long))


def test_a_trainer_step_on_dict_batches_is_the_weighted_sgd_step():
    """One Trainer.train_step of a wrapped BERT on dict batches moves θ to θ − lr·∇θ Σ wᵢℓᵢ,
    with w the L2RW weights ``l2rw_weights`` gives the same batch (computed apart, before)."""
    model = tiny("bert").double().train()
    (x, y), (xv, yv) = batch(6, 1), batch(4, 2)
    theta = [p.detach().clone() for p in model.parameters()]
    w = l2rw_weights(model, x, y, xv, yv, 0.1)
    assert w.max() > 0
    losses = F.cross_entropy(model(x), y, reduction="none")
    grads = torch.autograd.grad((w * losses).sum(), list(model.parameters()))
    trainer = Trainer(
        model,
        Tokens(6, 1),
        meta_data=Tokens(4, 2),
        method=L2RW(),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        config=TrainerConfig(max_steps=1, batch_size=6, meta_batch_size=4),
    )
    out = trainer.train_step(x, y, xv, yv)
    assert_close(out.method.weights, w)
    for p, t, g in zip(model.parameters(), theta, grads, strict=True):
        assert_close(p.detach(), t - 0.1 * g)
