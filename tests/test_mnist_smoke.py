"""MNIST 4-vs-9 at proportion 0.995 on the real data: L2RW recovers the minority class, and
``meta_grad="fast"`` (the default) trains like ``"unrolled"`` (L2RW and MW-Net, both on the
per-layer path the planner picks for LeNet)."""

from __future__ import annotations

import functools

import pytest
import torch

from reweight import L2RW, MWNet, Trainer
from reweight.data import build_dataset
from reweight.models import build_model

from .helpers import quiet

STEPS = 300


@pytest.fixture(scope="module")
def bundle(data_root):
    return build_dataset("mnist_imbalanced", root=data_root, proportion=0.995)


class Float64(torch.utils.data.Dataset):
    """A dataset's images in float64."""

    def __init__(self, data) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        return x.double(), y


def run(bundle, method, steps=STEPS, dtype=torch.float32):
    torch.manual_seed(0)
    model = build_model("lenet", num_classes=2, in_channels=1).to(dtype)
    data = (bundle.train, bundle.meta, bundle.test)
    if dtype == torch.float64:
        data = tuple(Float64(d) for d in data)
    trainer = Trainer(
        model,
        *data,
        train_labels=bundle.train_labels,
        num_classes=bundle.num_classes,
        method=method,
        optimizer=functools.partial(torch.optim.SGD, lr=1e-3, momentum=0.9),  # the paper's
        config=quiet(
            max_steps=steps, batch_size=100, meta_batch_size=10, eval_every=0, log_every=50
        ),
    )
    metrics = trainer.fit().metrics
    return metrics, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def results(bundle):
    return {"erm": run(bundle, "erm")[0], "l2rw": run(bundle, L2RW())[0]}


@pytest.mark.slow
def test_l2rw_recovers_the_minority_class(results):
    """L2RW as it runs by default (``meta_grad="fast"``, the per-layer path the planner picks
    for LeNet). The unrolled step trains the same model: the float64 test below, step for
    step (in float32 the two runs part after some dozens of steps, when rounding moves a batch
    across L2RW's zero-sum threshold: measured 0.02–0.07 apart in balanced accuracy)."""
    erm, l2rw = results["erm"], results["l2rw"]
    assert l2rw["meta_engine"]["jvps"] == {"per_layer": STEPS}
    # ERM all but ignores the 20 fours among 4970 nines ...
    assert erm["per_class_accuracy"][0] < 0.3
    # ... L2RW, with 10 clean images, recognises them: balanced accuracy clearly above ERM's.
    assert l2rw["test_balanced_accuracy"] > 0.85
    assert l2rw["test_balanced_accuracy"] > erm["test_balanced_accuracy"] + 0.2
    assert l2rw["zero_sum_batches"] > 0  # counted: batches whose weights were all zero


@pytest.mark.slow
def test_fast_and_unrolled_train_the_same_model_in_float64(bundle):
    """In float64 the two meta-gradients differ only by rounding (~1e-16), too little to move
    any batch across the zero-sum threshold: after the same steps the models are the same and
    so are their test predictions."""
    # 30 steps: both classes are predicted by then (balanced accuracy ~0.77), and a dozen
    # batches have had all-zero weights
    unrolled, w_unrolled = run(bundle, L2RW(meta_grad="unrolled"), steps=30, dtype=torch.float64)
    fast, w_fast = run(bundle, L2RW(meta_grad="fast"), steps=30, dtype=torch.float64)
    assert fast["meta_engine"]["jvps"] == {"per_layer": 30}  # the first step checked, all per layer
    for key, value in w_unrolled.items():
        torch.testing.assert_close(w_fast[key], value, rtol=1e-8, atol=1e-10, msg=key)
    assert fast["zero_sum_batches"] == unrolled["zero_sum_batches"] > 0
    assert fast["test_accuracy"] == unrolled["test_accuracy"]
    assert fast["test_balanced_accuracy"] == unrolled["test_balanced_accuracy"]


@pytest.mark.slow
def test_mwnet_fast_per_layer_trains_the_same_model_in_float64(bundle):
    """MW-Net's fast step on the per-layer path (two slices a step, the first step checked)
    against the unrolled double backward: the same model after 20 steps, the same accuracy."""

    def mwnet(mode: str) -> MWNet:
        torch.manual_seed(1)  # the weighting net's initial weights
        return MWNet(meta_grad=mode)

    unrolled, w_unrolled = run(bundle, mwnet("unrolled"), steps=20, dtype=torch.float64)
    fast, w_fast = run(bundle, mwnet("fast"), steps=20, dtype=torch.float64)
    assert fast["meta_engine"]["jvps"] == {"per_layer": 20}
    for key, value in w_unrolled.items():
        torch.testing.assert_close(w_fast[key], value, rtol=1e-8, atol=1e-10, msg=key)
    assert fast["test_balanced_accuracy"] == unrolled["test_balanced_accuracy"]
