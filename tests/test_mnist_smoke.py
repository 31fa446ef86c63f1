"""MNIST 4-vs-9 at proportion 0.995 on the real data: L2RW recovers the minority class."""

from __future__ import annotations

import functools

import pytest
import torch

from reweight import L2RW, Trainer, TrainerConfig
from reweight.data import build_dataset
from reweight.models import build_model

STEPS = 300


@pytest.fixture(scope="module")
def bundle(data_root):
    return build_dataset("mnist_imbalanced", root=data_root, proportion=0.995)


def run(bundle, method):
    torch.manual_seed(0)
    model = build_model("lenet", num_classes=2, in_channels=1)
    trainer = Trainer.from_bundle(
        model,
        bundle,
        method=method,
        optimizer=functools.partial(torch.optim.SGD, lr=1e-3, momentum=0.9),  # the paper's
        config=TrainerConfig(
            max_steps=STEPS,
            batch_size=100,
            meta_batch_size=10,
            eval_every=0,
            log_every=50,
            progress=False,
            final_weights=0,
        ),
    )
    return trainer.fit().metrics


@pytest.fixture(scope="module")
def results(bundle):
    return {"erm": run(bundle, "erm"), "l2rw": run(bundle, L2RW(meta_grad="unrolled"))}


@pytest.mark.slow
def test_l2rw_recovers_the_minority_class(results):
    erm, l2rw = results["erm"], results["l2rw"]
    # ERM all but ignores the 20 fours among 4970 nines ...
    assert erm["per_class_accuracy"][0] < 0.3
    # ... L2RW, with 10 clean images, recognises them: balanced accuracy clearly above ERM's.
    assert l2rw["test_balanced_accuracy"] > 0.85
    assert l2rw["test_balanced_accuracy"] > erm["test_balanced_accuracy"] + 0.2
    assert l2rw["zero_sum_batches"] > 0  # counted: batches whose weights were all zero
