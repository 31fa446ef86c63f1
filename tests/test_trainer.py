"""The Trainer: methods end to end, BatchNorm policy, NaN stops, checkpoints, baselines."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from reweight import L2RW, MWNet, Trainer, TrainerConfig, build_method
from reweight.methods.baselines import effective_number_weights
from reweight.train.batches import BatchStream
from reweight.train.metrics import auc

from .helpers import quiet

SGD = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)


def two_blobs(seed: int, n: int, flip: float = 0.45):
    """Two Gaussian blobs at x₀ = ±1 (σ 0.5), two thirds of class 0. A fraction ``flip`` of
    class 0 is relabelled 1 (0.45: 30 % of all labels), which shifts ERM's boundary into
    class 0; flipped examples stay a minority in class 0's region."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) > 2 / 3).long()
    x = torch.randn(n, 2, generator=g) * 0.5 + torch.stack([y * 2.0 - 1, torch.zeros(n)], 1)
    flipped = (y == 0) & (torch.rand(n, generator=g) < flip)
    return x, torch.where(flipped, 1 - y, y), flipped


def fit_blobs(method, steps: int = 400, seed: int = 0):
    """Train on the noisy blobs of draw ``seed`` (training seed = data seed = ``seed``)."""
    x, noisy, flipped = two_blobs(3 * seed, 2000)
    xm, ym, _ = two_blobs(3 * seed + 1, 100, 0.0)
    xt, yt, _ = two_blobs(3 * seed + 2, 4000, 0.0)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 2))
    trainer = Trainer(
        model,
        TensorDataset(x, noisy),
        TensorDataset(xm, ym),
        TensorDataset(xt, yt),
        method=method,
        optimizer=SGD,
        train_labels=noisy,
        corrupted=flipped,
        config=TrainerConfig(
            max_steps=steps,
            batch_size=100,
            log_every=100,
            eval_every=200,
            progress=False,
            seed=seed,
        ),
    )
    return trainer.fit()


BLOB_SEEDS = (0, 1, 2)
BLOB_METHODS = {"erm": lambda: "erm", "l2rw": lambda: "l2rw", "mwnet": lambda: MWNet(lr=1e-2)}


@pytest.fixture(scope="module")
def blob_results():
    """{method: [FitResult per seed]} over three draws of data, model and batch order."""
    return {
        name: [fit_blobs(make(), seed=s) for s in BLOB_SEEDS] for name, make in BLOB_METHODS.items()
    }


def test_flipped_labels_are_found_and_test_accuracy_beats_erm(blob_results):
    """A learning outcome, asserted over three seeds with margin: one seed's AUC moves with the
    torch build and the processor (L2RW's final-weight AUC spans 0.76-0.98 over seeds; MW-Net
    inverted on one seed of six measured), so medians and means over seeds carry the claim, not
    one draw. Measured on torch 2.14.1, seeds 0-2: ERM accuracy 0.81-0.95 (mean 0.89); l2rw and
    mwnet 0.96-0.98; median final-weight AUC l2rw 0.90, mwnet 0.995; median mean-weight-over-
    training AUC l2rw 0.89, mwnet 0.99; median clean/corrupted weight ratio l2rw 81, mwnet 25.
    The same torch build on another 2-core machine gave l2rw final-weight AUCs 0.76, 0.77, 0.81
    and mean-weight AUCs 0.86, 0.88, 0.87: L2RW's final weights, scored once the model has
    fitted much of the noise, separate less than its weights over training, so the bound on
    the final-weight AUC is 0.7 (chance is 0.5) and the one over training stays 0.8."""

    def values(name, key):
        return torch.tensor([r.metrics[key] for r in blob_results[name]], dtype=torch.float64)

    erm_acc = values("erm", "test_accuracy")
    assert float(erm_acc.median()) < 0.95  # ERM is hurt by the noise (clean optimum ≈ 0.98)
    assert bool((values("erm", "weight_auc") == 0.5).all())  # uniform weights separate nothing
    for name in ("l2rw", "mwnet"):
        assert float(values(name, "weight_auc").median()) >= 0.7, name
        assert float(values(name, "train_weight_auc").median()) >= 0.8, name
        ratio = values(name, "weight_mean_clean") / values(name, "weight_mean_corrupted")
        # clean examples weigh more than flipped ones; how much (l2rw's median ratio 81 on one
        # build, 2.2 after a change of rounding in the per-layer sums, values inf/2.2/1.5) moves
        # with the rounding, as L2RW's clamp zeroes or keeps the flipped examples' tiny weights
        assert float(ratio.median()) > 1.25, name
        assert float(values(name, "test_accuracy").mean()) > float(erm_acc.mean()) + 0.03, name


def test_history_rows_and_summary_keys(blob_results):
    res = blob_results["l2rw"][0]
    assert [r["step"] for r in res.history] == [100, 200, 300, 400]
    assert "test_accuracy" in res.history[1] and "test_accuracy" not in res.history[0]
    row = res.history[-1]
    for key in (
        "train_loss",
        "meta_loss",
        "weight_mean",
        "weight_auc",
        "weight_mean_clean",
        "weight_mean_corrupted",
        "weight_mean_class0",
        "zero_sum_batches",
        "lr",
    ):
        assert key in row, key
    m = res.metrics
    assert m["steps"] == 400 and m["method"] == "l2rw"
    assert m["test_error"] == pytest.approx(1 - m["test_accuracy"])
    assert m["best_test_accuracy"] >= m["test_accuracy"]
    assert len(m["per_class_accuracy"]) == 2 and len(m["weight_mean_per_class"]) == 2
    # relative weights average 1 unless a batch was all zero
    assert row["weight_mean"] == pytest.approx(1.0, abs=1e-5)


def test_auc_against_pairwise_definition():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (60,), generator=g).double()  # many ties
    pos = torch.rand(60, generator=g) < 0.4
    p, n = scores[pos], scores[~pos]
    want = ((p[:, None] > n[None]).double() + 0.5 * (p[:, None] == n[None]).double()).mean()
    assert auc(scores, pos) == pytest.approx(float(want), abs=1e-12)


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 8)
        self.bn = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


@pytest.mark.parametrize("meta_grad", ["fast", "unrolled"])
@pytest.mark.parametrize("name", ["l2rw", "mwnet"])
def test_batchnorm_statistics_move_only_through_the_real_step(name: str, meta_grad: str):
    """Once per step, in the real update's forward: never in a meta step's passes."""
    method = build_method(name, meta_grad=meta_grad)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, generator=g), torch.randint(0, 2, (64,), generator=g)
    torch.manual_seed(0)
    model = BNNet()
    reference = copy.deepcopy(model).train()
    cfg = quiet(max_steps=3, batch_size=16, meta_batch_size=8, log_every=1)
    # lr = 0 keeps θ fixed, so the expected statistics are exactly those of one train-mode
    # forward per step on that step's batch; a twin writing them would add more updates.
    Trainer(
        model,
        TensorDataset(x, y),
        TensorDataset(x[:8], y[:8]),
        method=method,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.0),
        config=cfg,
    ).fit()
    stream = BatchStream(TensorDataset(x, y), 16, cfg.seed, 0, True, 0, False).iterate(0)
    for _ in range(3):
        _, xb, _ = next(stream)
        reference(xb)
    torch.testing.assert_close(model.bn.running_mean, reference.bn.running_mean)
    torch.testing.assert_close(model.bn.running_var, reference.bn.running_var)
    assert int(model.bn.num_batches_tracked) == 3
    assert int(model.bn.num_batches_tracked) == 3


def test_nan_in_the_loss_stops_with_the_step():
    x, y = torch.randn(40, 2), torch.randint(0, 2, (40,))
    x[5:] = float("nan")
    trainer = Trainer(
        nn.Linear(2, 2),
        TensorDataset(x, y),
        method="erm",
        optimizer=SGD,
        config=TrainerConfig(max_steps=5, batch_size=10, progress=False),
    )
    with pytest.raises(FloatingPointError, match=r"training loss is nan at step 1 \(method erm\)"):
        trainer.fit()


class Interrupt(Exception):
    pass


def _kill_at(step: int):
    def callback(row):
        if row["step"] >= step:
            raise Interrupt

    return callback


def _run(tmp_path, method, steps, resume=False, seed=0, ckpt_every=0, callbacks=()):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 4, generator=g), torch.randint(0, 3, (300,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.2), nn.ReLU(), nn.Linear(16, 3))
    if callable(method):  # built here, after the seed: MWNet() draws its WeightNet's init
        method = method()
    trainer = Trainer(
        model,
        TensorDataset(x, y),
        TensorDataset(x[:30], y[:30]),
        TensorDataset(x, y),
        method=method,
        optimizer=SGD,
        scheduler=functools.partial(torch.optim.lr_scheduler.MultiStepLR, milestones=[7]),
        train_labels=y,
        checkpoint_path=tmp_path / "ckpt.pt",
        callbacks=callbacks,
        config=quiet(
            max_steps=steps,
            batch_size=32,
            meta_batch_size=16,
            log_every=2,
            eval_every=4,
            checkpoint_every=ckpt_every,
            seed=seed,
        ),
    )
    return trainer, trainer.fit(resume=resume)


RESUMED = {
    "random": lambda: "random",
    "l2rw": lambda: "l2rw",  # meta_grad=fast: per layer, its first step (after resume too) checked
    "mwnet": lambda: "mwnet",
    "l2rw-unrolled": lambda: L2RW(meta_grad="unrolled"),
    "mwnet-unrolled": lambda: MWNet(meta_grad="unrolled"),
}


@pytest.mark.parametrize("method", sorted(RESUMED))
def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path, method: str):
    # the factory, not an instance: a method object made before _run's seed (MWNet's WeightNet
    # draws its init from the global generator) would start the two runs from different
    # weighting nets, by whatever ran before in this process (flaky under xdist, #30)
    make = RESUMED[method]
    full, full_res = _run(tmp_path / "a", make, 12)
    with pytest.raises(Interrupt):  # checkpoints at 5 and 10, dies at the log row of step 8
        _run(tmp_path / "b", make, 12, ckpt_every=5, callbacks=[_kill_at(8)])
    state = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert state["step"] == 5  # mid log window: steps 5 and 6 share a row
    resumed, res = _run(tmp_path / "b", make, 12, resume=True, ckpt_every=5)
    for (n, p), q in zip(
        full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(p, q), n
    for r, f in zip(res.history, full_res.history, strict=True):
        assert {k: v for k, v in r.items() if k != "time_s"} == pytest.approx(
            {k: v for k, v in f.items() if k != "time_s"}, nan_ok=True
        )
    assert res.metrics["test_accuracy"] == full_res.metrics["test_accuracy"]


def test_same_seed_same_result_other_seed_differs(tmp_path):
    a, _ = _run(tmp_path / "a", "l2rw", 6, seed=1)
    b, _ = _run(tmp_path / "b", "l2rw", 6, seed=1)
    c, _ = _run(tmp_path / "c", "l2rw", 6, seed=2)
    wa, wb, wc = (t.model[0].weight for t in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_class_balanced_weights_follow_effective_numbers():
    counts = torch.tensor([20, 4970])
    w = effective_number_weights(counts, 0.9999)
    e = (1 - 0.9999 ** counts.double()) / (1 - 0.9999)  # Cui et al., Eq. 3
    torch.testing.assert_close(w[0] / w[1], e[1] / e[0])
    assert float(w.sum()) == pytest.approx(2.0)
    torch.testing.assert_close(
        effective_number_weights(torch.tensor([7, 7, 7]), 0.99), torch.ones(3, dtype=torch.float64)
    )


@pytest.mark.parametrize("method", ["random", "class_balanced"])
def test_cheap_baselines_train(method: str):
    x, y = torch.randn(100, 2), torch.cat([torch.zeros(90), torch.ones(10)]).long()
    res = Trainer(
        nn.Linear(2, 2),
        TensorDataset(x, y),
        test_data=TensorDataset(x, y),
        method=method,
        optimizer=SGD,
        train_labels=y,
        config=TrainerConfig(max_steps=4, batch_size=50, log_every=2, progress=False),
    ).fit()
    per_class = res.metrics["weight_mean_per_class"]
    if method == "class_balanced":  # the minority class weighs more
        assert per_class[1] > 5 * per_class[0]
    assert res.metrics["steps"] == 4


def test_bad_settings_are_named():
    data = TensorDataset(torch.randn(4, 2), torch.zeros(4).long())
    with pytest.raises(ValueError, match=r"trainer.max_steps must be >= 1, got 0"):
        TrainerConfig(max_steps=0)
    with pytest.raises(ValueError, match=r"trainer.grad_clip must be > 0 or null, got -1"):
        TrainerConfig(grad_clip=-1)
    with pytest.raises(ValueError, match="method 'l2rw' needs a clean meta set"):
        Trainer(nn.Linear(2, 2), data, method="l2rw")
    with pytest.raises(ValueError, match=r"trainer.bf16=true needs a CUDA device"):
        Trainer(nn.Linear(2, 2), data, config=TrainerConfig(bf16=True))
    with pytest.raises(ValueError, match="corrupted has 3 entries, train_data 4"):
        Trainer(nn.Linear(2, 2), data, corrupted=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="class_balanced needs the training labels"):
        Trainer(
            nn.Linear(2, 2), data, method="class_balanced", config=TrainerConfig(progress=False)
        ).fit()


def test_example_weights_change_nothing():
    x, y = torch.randn(64, 3), torch.randint(0, 2, (64,))
    torch.manual_seed(0)
    trainer = Trainer(
        BNNet(),
        TensorDataset(x, y),
        TensorDataset(x[:8], y[:8]),
        method="mwnet",
        config=TrainerConfig(max_steps=1, batch_size=16, progress=False),
    )
    trainer.fit()
    state = copy.deepcopy(trainer.model.state_dict())
    vnet = copy.deepcopy(trainer.method.vnet.state_dict())
    w = trainer.example_weights()
    assert w.shape == (64,) and (w > 0).all()
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, state[k]), k
    for k, v in trainer.method.vnet.state_dict().items():
        assert torch.equal(v, vnet[k]), k


@pytest.mark.parametrize(
    "method", ["erm", "l2rw-unrolled", "l2rw-fast", "mwnet-unrolled", "mwnet-fast"]
)
def test_channels_last_is_the_same_training_in_another_memory_format(method: str):
    """trainer.channels_last=true feeds NHWC batches to an NHWC model and changes no number
    (float64, where the two layouts' convolutions agree to rounding)."""
    from reweight.models import LeNet

    g = torch.Generator().manual_seed(0)
    x, xm = torch.randn(64, 1, 28, 28, generator=g), torch.randn(16, 1, 28, 28, generator=g)
    y, ym = torch.randint(0, 2, (64,), generator=g), torch.randint(0, 2, (16,), generator=g)
    seen: list[bool] = []

    def fit(channels_last: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = LeNet(num_classes=2).double()
        model.features[3].register_forward_pre_hook(  # conv2: 16 channels, so the layout shows
            lambda _, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
        )
        name, _, mode = method.partition("-")
        chosen = build_method(name, meta_grad=mode) if mode else name
        trainer = Trainer(
            model,
            TensorDataset(x.double(), y),
            TensorDataset(xm.double(), ym),
            TensorDataset(x[:32].double(), y[:32]),
            method=chosen,
            optimizer=SGD,
            config=quiet(
                max_steps=4,
                batch_size=32,
                meta_batch_size=16,
                eval_every=0,
                channels_last=channels_last,
            ),
        )
        trainer.fit()
        weight = model.features[3].weight
        assert weight.is_contiguous(memory_format=torch.channels_last) == channels_last
        return {k: v.clone() for k, v in model.state_dict().items()}

    reference = fit(False)
    assert not any(seen)
    seen.clear()
    nhwc = fit(True)
    assert seen and all(seen)
    for key, value in reference.items():
        torch.testing.assert_close(nhwc[key], value, rtol=1e-10, atol=1e-12, msg=key)


def test_the_summary_says_which_meta_engine_ran_and_the_log_says_why(caplog):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, generator=g), torch.randint(0, 2, (64,), generator=g)

    def fit(method):
        torch.manual_seed(0)
        return Trainer(
            BNNet(),
            TensorDataset(x, y),
            TensorDataset(x[:8], y[:8]),
            method=method,
            config=quiet(max_steps=3, batch_size=16),
        ).fit()

    with caplog.at_level("INFO", logger="reweight.jvp.planner"):
        metrics = fit("l2rw").metrics
    engine = metrics["meta_engine"]
    assert engine["engine"] == "tape" and engine["jvps"] == {"tape": 3}
    assert "BatchNorm in training mode" in engine["reason"]
    assert caplog.text.count("l2rw meta-gradient engine: tape (cpu policy") == 1
    assert fit(L2RW(engine="dual_twin")).metrics["meta_engine"]["jvps"] == {"dual_twin": 3}
    assert fit(MWNet(meta_grad="unrolled")).metrics["meta_engine"]["engine"] == "unrolled"
    assert "meta_engine" not in fit("erm").metrics
