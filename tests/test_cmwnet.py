"""CMW-Net (``method=cmwnet``) and ``meta_every``, against references written here.

- The class grouping is an exact 1-D k-means: its within-group sum of squares equals the least
  one over every partition of the classes, enumerated by brute force.
- The weighting net's hypergradient equals a ``torch.func`` reference (the virtual SGD step and
  the meta loss by ``functional_call``, the net fed the loss and the group of each example's
  observed label) to 1e-8 in float64, in both modes and with every engine that can run the model.
- ``meta_every=k``: exactly the steps whose count is a multiple of k run a meta step; between
  them the net is unchanged and the weights are the current net's on the step's losses.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import TensorDataset

from reweight import CMWNet, MWNet, Trainer, build_method
from reweight.metastep import StepInputs
from reweight.methods.cmwnet import size_groups

from .helpers import quiet
from .test_metastep import (
    CLASSES,
    ENGINES,
    LR,
    _params,
    assert_close,
    reference_phi_grads,
    setup,
)


def sse(counts: list[int], labels: list[int]) -> float:
    total = 0.0
    for g in set(labels):
        xs = [c for c, lab in zip(counts, labels, strict=True) if lab == g]
        mean = sum(xs) / len(xs)
        total += sum((x - mean) ** 2 for x in xs)
    return total


@pytest.mark.parametrize("seed", range(6))
def test_the_class_groups_are_the_least_squares_clustering(seed: int):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 5000, (7,), generator=gen).tolist()
    got = size_groups(counts, 3)
    best = min(
        sse(counts, list(labels))
        for labels in itertools.product(range(3), repeat=7)
        if len(set(labels)) == 3
    )
    assert len(set(got)) == 3
    assert sse(counts, got) == pytest.approx(best, rel=1e-12, abs=1e-9)
    # numbered by size: every class of group g is smaller than every class of group g + 1
    for a, b in itertools.combinations(range(7), 2):
        if got[a] < got[b]:
            assert counts[a] <= counts[b]


def test_fewer_classes_than_groups_and_ties():
    assert size_groups([10, 20], 3) == [0, 1]
    assert size_groups([7, 7, 7, 7], 3) in ([0, 0, 0, 0], [0, 1, 2, 2], [0, 0, 1, 2])
    assert size_groups([20, 4970], 3) == [0, 1]  # MNIST 4 vs 9: two groups of one class


def cmwnet(mode: str, engine: str, labels: torch.Tensor, **kw) -> CMWNet:
    torch.manual_seed(1)
    method = CMWNet(hidden=6, meta_grad=mode, engine=engine, **kw)
    return method


def runs():
    return [("fast", e) for e in ENGINES["mlp"] if e != "dual"] + [("unrolled", "auto")]


@pytest.mark.parametrize(("mode", "engine"), runs())
def test_cmwnet_gradient_equals_the_reference(mode: str, engine: str):
    model, x, y, xv, yv = setup("mlp")
    # class sizes 900, 100, 10: three groups, one class each
    labels = torch.cat([torch.zeros(900), torch.ones(100), torch.full((10,), 2)]).long()
    method = cmwnet(mode, engine, labels)
    method.setup(model=model, device=torch.device("cpu"), train_labels=labels, num_classes=CLASSES)
    assert method.class_groups.tolist() == [2, 1, 0]
    assert method.describe()["class_groups"] == [2, 1, 0]
    groups = method.class_groups
    phi = _params(method.vnet)

    def net_fn(p, losses, targets):
        out = functional_call(method.vnet, p, (losses.reshape(-1, 1), groups[targets]))
        return out.reshape(-1)

    want = reference_phi_grads(model, net_fn, phi, x, y, xv, yv, set(_params(model)))
    got, _, _ = method.meta_grads(StepInputs(model, x, y, xv, yv, LR, F.cross_entropy))
    for g, k in zip(got, phi, strict=True):
        assert float(want[k].abs().max()) > 1e-7
        assert_close(g, want[k])
    # each head learns from its own group's examples only
    heads = dict(zip(phi, got, strict=True))["heads.weight"]
    assert all(float(heads[g].abs().max()) > 0 for g in set(groups[y].tolist()))


def test_cmwnet_needs_the_training_labels():
    with pytest.raises(ValueError, match="method=cmwnet needs the training labels"):
        CMWNet().setup(model=nn.Linear(2, 2), device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"method\.groups must be an integer >= 1, got 0"):
        build_method("cmwnet", groups=0)
    with pytest.raises(ValueError, match=r"method\.meta_every must be an integer >= 1, got 0"):
        MWNet(meta_every=0)


@pytest.mark.parametrize("method", ["mwnet", "cmwnet"])
def test_meta_every_k_runs_the_meta_step_on_every_kth_batch(method: str):
    """Steps 0, 3, 6 of 8 run a meta step (the net moves); the others weight the batch with the
    current net on that step's losses (a plain step: one forward, the net unchanged)."""
    model, *_ = setup("mlp")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (64,), generator=gen)
    torch.manual_seed(1)
    kw = {"hidden": 6, "meta_every": 3, "lr": 1e-2}
    meth = MWNet(**kw) if method == "mwnet" else CMWNet(**kw)
    data = TensorDataset(x, y)
    trainer = Trainer(
        model,
        data,
        meta_data=data,
        method=meth,
        train_labels=y,
        num_classes=CLASSES,
        optimizer=lambda p: torch.optim.SGD(p, lr=LR),
        config=quiet(batch_size=8, meta_batch_size=8),
    )
    moved, forwards = [], []
    model.register_forward_hook(lambda *_: forwards.append(1))
    for step in range(8):
        before = _params(meth.vnet)
        xb, yb = x[8 * step : 8 * step + 8], y[8 * step : 8 * step + 8]
        state = _params(model)
        forwards.clear()
        out = trainer.train_step(xb, yb, x[:8], y[:8])
        n_forwards = len(forwards)
        after = _params(meth.vnet)
        moved.append(any(not torch.equal(after[k], before[k]) for k in before))
        if not moved[-1]:  # the current net's weights on this step's losses, one forward
            with torch.no_grad():
                losses = F.cross_entropy(functional_call(model, state, (xb,)), yb, reduction="none")
                batch = StepInputs(model, xb, yb, None, None, LR, F.cross_entropy)
                want = meth.weights(losses, batch)
            assert_close(out.method.weights, want)
            assert n_forwards == 1 and out.method.meta_loss is None
    assert moved == [True, False, False, True, False, False, True, False]


@pytest.mark.parametrize(
    ("method", "overrides", "want"),
    [
        ("cmwnet", ["method.meta_every=2"], {"meta_every": 2, "groups": 3}),
        ("l2rw", ["method.meta_params=head"], {"meta_params": "head"}),
        ("mwnet", ["method.meta_params=[conv*,fc2]"], {"meta_params": ["conv*", "fc2"]}),
    ],
)
def test_the_config_builds_the_new_options(method, overrides, want):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from reweight import cli

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("reweight.conf", version_base="1.3"):
            cfg = compose("config", overrides=[f"method={method}", *overrides])
    finally:
        GlobalHydra.instance().clear()
    checked = cli.validate(cfg)  # the schema, then every constructor the run would call
    built = build_method(**dict(checked.method))
    for key, value in want.items():
        got = getattr(built, key, None)
        if key == "meta_params":
            got = built.metastep.params
        assert got == value, key


@pytest.mark.slow
def test_cmwnet_runs_from_the_command_line(tmp_path, data_root):
    """``python -m reweight method=cmwnet`` on the real noisy MNIST: the class groups are in
    summary.json."""
    import json

    from .test_cli import QUIET, run_cli

    args = [
        "dataset=mnist_noisy",
        "dataset.train_per_class=100",  # suspects.csv scores every training image: 1000, not 60000
        "method=cmwnet",
        "method.meta_every=2",
        "trainer.max_steps=4",
        "trainer.batch_size=32",
        "trainer.meta_batch_size=16",
        "trainer.eval_every=0",
        "trainer.final_weights=0",
        *QUIET,
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    run_cli(args, tmp_path)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    groups = summary["class_groups"]
    assert len(groups) == 10 and set(groups) <= {0, 1, 2}
    assert summary["steps"] == 4 and summary["meta_engine"]["jvps"]
