"""LoRA adapters (``peft``): the virtual step moves only the trainable parameters.

A peft-wrapped tiny BERT (LoRA on the attention's query and value, the classifier head trained
too, as peft's sequence-classification task does): L2RW's ε-gradient and MW-Net's net
gradient equal a ``torch.func`` reference whose virtual step moves only those parameters, to
1e-8 in float64, in both modes and with every engine that can run the model. The frozen base
weights are never copied: the twin holds the model's own tensors, step after step.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import BertForSequenceClassification

from reweight import L2RW, MWNet, l2rw_eps_grad
from reweight.metastep import StepInputs
from reweight.models.hf import SequenceClassifier

from .helpers import tiny_bert_config
from .test_metastep import LR, _params, assert_close, reference_eps_grad, reference_phi_grads


def lora_bert() -> SequenceClassifier:
    torch.manual_seed(0)
    config = tiny_bert_config()
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.0, task_type="SEQ_CLS"
    )
    model = SequenceClassifier(get_peft_model(BertForSequenceClassification(config), lora))
    model = model.double()
    with torch.no_grad():  # LoRA's B starts at zero: move it, so every adapter has a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def batch(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (n, 8), generator=g)
    mask = (torch.arange(8) < torch.randint(3, 9, (n,), generator=g)[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}, torch.randint(0, 3, (n,), generator=g)


def trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


RUNS = [("fast", "auto"), ("fast", "tape"), ("fast", "dual_twin"), ("unrolled", "auto")]


@pytest.mark.parametrize(("mode", "engine"), [*RUNS, ("fast", "dual")])
def test_l2rw_moves_only_the_adapters(mode: str, engine: str):
    model = lora_bert()
    (x, y), (xv, yv) = batch(6, 1), batch(5, 2)
    moved = trainable_names(model)
    assert any("lora_A" in n for n in moved) and len(moved) < len(_params(model)) // 4
    with sdpa_kernel(SDPBackend.MATH):  # the reference differentiates attention twice
        want = reference_eps_grad(model, x, y, xv, yv, moved)
    assert float(want.abs().max()) > 1e-4
    got = l2rw_eps_grad(model, x, y, xv, yv, LR, meta_grad=mode, engine=engine)
    assert_close(got, want)


@pytest.mark.parametrize(("mode", "engine"), RUNS)
def test_mwnet_moves_only_the_adapters(mode: str, engine: str):
    model = lora_bert()
    (x, y), (xv, yv) = batch(6, 1), batch(5, 2)
    torch.manual_seed(1)
    method = MWNet(hidden=5, meta_grad=mode, engine=engine)
    method.setup(model=model, device=torch.device("cpu"))
    phi = _params(method.vnet)

    def net_fn(p, losses, _y):
        return functional_call(method.vnet, p, (losses.reshape(-1, 1),)).reshape(-1)

    with sdpa_kernel(SDPBackend.MATH):  # the reference differentiates attention twice
        want = reference_phi_grads(model, net_fn, phi, x, y, xv, yv, trainable_names(model))
    got, _, _ = method.meta_grads(StepInputs(model, x, y, xv, yv, LR, F.cross_entropy))
    for g, k in zip(got, phi, strict=True):
        assert float(want[k].abs().max()) > 1e-8
        assert_close(g, want[k])


def test_the_frozen_base_is_never_copied():
    """The twin holds the model's own frozen tensors (shared storage), built once and re-bound
    for every step."""
    model = lora_bert()
    method = L2RW()
    method.setup(model=model, device=torch.device("cpu"))
    (x, y), (xv, yv) = batch(6, 1), batch(5, 2)
    for _ in range(2):
        method.step(StepInputs(model, x, y, xv, yv, LR, F.cross_entropy))
        twin = method.twins.bound(model)
        ours = dict(model.named_parameters())
        for name, tensor in twin.named_buffers():
            if name in ours and not ours[name].requires_grad:
                assert tensor.data_ptr() == ours[name].data_ptr(), name
    assert len(method.twins._twins) == 1  # one twin, built once
