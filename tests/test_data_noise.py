"""Noise matrices, label corruption, meta splits and long tails: pure functions on label arrays.

These are the CIFAR protocols without the CIFAR files; the torchvision layer is tested in
test_data_cifar.py and the real-MNIST datasets in test_data.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from reweight.data import corrupt_labels, long_tail_counts, noise_matrix
from reweight.data.core import tensor_hash
from reweight.data.noise import (
    NOISE_TYPES,
    empirical_transition,
    expected_noise_rate,
    noise_rate,
)
from reweight.data.splits import (
    binary_imbalance_counts,
    class_counts,
    plan_binary_imbalance,
    plan_human_noise,
    plan_long_tail,
    plan_noisy,
    split_meta,
    subsample_per_class,
)

# Binomial tolerance: an empirical frequency from n draws of probability q has standard deviation
# sqrt(q (1 - q) / n). Five of them: a two-sided false alarm has probability 5.7e-7 per entry,
# about 1% over the ~21,000 non-zero entries checked below (structural zeros are checked exactly).
# The seeds are fixed, so the outcome is reproducible, never flaky.
N_SIGMA = 5.0


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def balanced_labels(num_classes: int, per_class: int) -> torch.Tensor:
    return torch.arange(num_classes).repeat(per_class)  # (K * per_class,), interleaved


def binomial_tolerance(q: torch.Tensor, n: int | torch.Tensor) -> torch.Tensor:
    return N_SIGMA * torch.sqrt(q * (1 - q) / n)


# --- the matrices themselves ---------------------------------------------------------------


@pytest.mark.parametrize("noise_type", NOISE_TYPES)
@pytest.mark.parametrize("k", [3, 10, 100])
@pytest.mark.parametrize("rate", [0.0, 0.2, 0.45])
def test_noise_matrix_is_stochastic(noise_type: str, k: int, rate: float) -> None:
    T = noise_matrix(noise_type, k, rate, gen())
    assert T.dtype == torch.float64 and T.shape == (k, k)
    assert (T >= 0).all()
    torch.testing.assert_close(T.sum(1), torch.ones(k, dtype=torch.float64), rtol=0, atol=1e-12)


def test_noise_matrix_conventions() -> None:
    k, r = 10, 0.4
    eye = torch.eye(k, dtype=torch.float64)
    uniform = noise_matrix("uniform", k, r, gen())
    ones = torch.ones(k, k, dtype=torch.float64)
    torch.testing.assert_close(uniform, r / k * ones + (1 - r) * eye)
    assert uniform[0, 0].item() == pytest.approx(1 - r + r / k)  # the true label can be redrawn

    symmetric = noise_matrix("symmetric", k, r, gen())
    torch.testing.assert_close(symmetric.diagonal(), torch.full((k,), 1 - r, dtype=torch.float64))
    torch.testing.assert_close(
        symmetric[~eye.bool()], torch.full((k * k - k,), r / (k - 1), dtype=torch.float64)
    )

    pair = noise_matrix("pair", k, r, gen())
    for i in range(k):
        assert pair[i, i] == pytest.approx(1 - r)
        assert pair[i, (i + 1) % k] == pytest.approx(r)
    assert (pair > 0).sum() == 2 * k

    flip = noise_matrix("flip", k, r, gen())
    flip2 = noise_matrix("flip2", k, r, gen())
    for i in range(k):
        off = torch.cat([flip[i, :i], flip[i, i + 1 :]])
        assert flip[i, i] == pytest.approx(1 - r)
        assert sorted(off[off > 0].tolist()) == pytest.approx([r])  # all of r to one other class
        off2 = torch.cat([flip2[i, :i], flip2[i, i + 1 :]])
        assert flip2[i, i] == pytest.approx(1 - r)
        assert sorted(off2[off2 > 0].tolist()) == pytest.approx([r / 2, r / 2])


@pytest.mark.parametrize("noise_type", ["flip", "flip2"])
def test_random_matrices_are_fixed_by_the_seed(noise_type: str) -> None:
    a = noise_matrix(noise_type, 10, 0.4, gen(0))
    assert torch.equal(a, noise_matrix(noise_type, 10, 0.4, gen(0)))
    assert not torch.equal(a, noise_matrix(noise_type, 10, 0.4, gen(1)))
    # the random destinations really vary across classes (not a fixed shift)
    dest = (a - torch.diag(a.diagonal())).argmax(1) - torch.arange(10)
    assert len(set((dest % 10).tolist())) > 1


def test_rate_zero_gives_identity() -> None:
    eye = torch.eye(10, dtype=torch.float64)
    for noise_type in NOISE_TYPES:
        assert torch.equal(noise_matrix(noise_type, 10, 0.0, gen()), eye)


# --- corruption against its matrix ---------------------------------------------------------


@pytest.mark.parametrize("noise_type", NOISE_TYPES)
@pytest.mark.parametrize(("k", "per_class"), [(10, 20_000), (100, 2_000)])
def test_empirical_transition_matches_T(noise_type: str, k: int, per_class: int) -> None:
    g = gen(123)
    T = noise_matrix(noise_type, k, 0.4, g)
    true = balanced_labels(k, per_class)
    noisy = corrupt_labels(true, T, g)
    E = empirical_transition(true, noisy, k)
    tol = binomial_tolerance(T, per_class)
    assert ((E - T).abs() <= tol + 1e-12).all(), (E - T).abs().max()
    assert (E[T == 0] == 0).all()  # impossible transitions never happen

    # the fraction of changed labels matches the rate T implies, within its own binomial band
    q = expected_noise_rate(T, true)
    assert abs(noise_rate(noisy, true) - q) <= N_SIGMA * math.sqrt(q * (1 - q) / true.numel())


def test_tolerance_is_tight_enough_to_tell_conventions_apart() -> None:
    # Negative control: labels corrupted with "uniform" do not pass as "symmetric" (the diagonals
    # differ by r / K = 0.04, about 11 tolerances at this sample size).
    k, per_class = 10, 20_000
    g = gen(5)
    true = balanced_labels(k, per_class)
    noisy = corrupt_labels(true, noise_matrix("uniform", k, 0.4, g), g)
    symmetric = noise_matrix("symmetric", k, 0.4, g)
    E = empirical_transition(true, noisy, k)
    assert not ((E - symmetric).abs() <= binomial_tolerance(symmetric, per_class)).all()


def test_corrupt_labels_is_deterministic_and_leaves_global_rng_alone() -> None:
    true = balanced_labels(10, 1000)
    T = noise_matrix("symmetric", 10, 0.3, gen())
    state = torch.get_rng_state()
    a = corrupt_labels(true, T, gen(7))
    assert torch.equal(torch.get_rng_state(), state)
    assert tensor_hash(a) == tensor_hash(corrupt_labels(true, T, gen(7)))
    assert tensor_hash(a) != tensor_hash(corrupt_labels(true, T, gen(8)))
    assert a.dtype == torch.int64 and a.shape == true.shape


def test_corrupt_labels_rejects_bad_inputs() -> None:
    T = noise_matrix("pair", 3, 0.2, gen())
    with pytest.raises(ValueError, match=r"every row of T must sum to 1"):
        corrupt_labels(torch.tensor([0, 1]), T * 0.5, gen())
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\); got values in \[0, 5\]"):
        corrupt_labels(torch.tensor([0, 5]), T, gen())
    with pytest.raises(ValueError, match=r"labels must be a 1-D integer tensor"):
        corrupt_labels(torch.tensor([0.0, 1.0]), T, gen())


# --- bad parameters --------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, float("nan"), True, "0.4"])
def test_noise_rate_outside_unit_interval(rate: object) -> None:
    with pytest.raises(ValueError, match=r"noise_rate must be a number in \[0, 1\); got"):
        noise_matrix("uniform", 10, rate, gen())  # type: ignore[arg-type]


def test_unknown_noise_type() -> None:
    with pytest.raises(
        ValueError,
        match=r"noise_type must be one of uniform, symmetric, flip, flip2, pair; got 'gaussian'",
    ):
        noise_matrix("gaussian", 10, 0.2, gen())


def test_flip2_needs_three_classes() -> None:
    with pytest.raises(ValueError, match=r"num_classes must be an integer >= 3; got 2"):
        noise_matrix("flip2", 2, 0.2, gen())


@pytest.mark.parametrize("rho", [0.5, 0, -3])
def test_imbalance_factor_below_one(rho: float) -> None:
    with pytest.raises(ValueError, match=r"imbalance_factor must be a number >= 1; got"):
        long_tail_counts(100, 10, rho)
    with pytest.raises(ValueError, match=r"imbalance_factor must be a number >= 1; got"):
        plan_long_tail(
            balanced_labels(10, 50), 10, meta_per_class=5, imbalance_factor=rho, generator=gen()
        )


def test_meta_set_larger_than_available() -> None:
    labels = balanced_labels(10, 5000)
    with pytest.raises(
        ValueError,
        match=r"meta_per_class=5000 is larger than what is available: class 0 has 5000 .*"
        r"allowed: 1 <= meta_per_class <= 4999",
    ):
        plan_noisy(
            labels, 10, meta_per_class=5000, noise_type="uniform", noise_rate=0.4, generator=gen()
        )
    with pytest.raises(ValueError, match=r"meta_per_class must be an integer >= 1; got 0"):
        split_meta(labels, 10, 0, gen())


# --- meta split and long tail ------------------------------------------------------------------


def test_split_meta_is_balanced_and_disjoint() -> None:
    labels = balanced_labels(10, 5000)[torch.randperm(50_000, generator=gen(3))]
    meta, rest = split_meta(labels, 10, 100, gen())
    assert class_counts(labels[meta], 10) == [100] * 10
    assert meta.numel() + rest.numel() == labels.numel()
    assert torch.equal(torch.cat([meta, rest]).sort().values, torch.arange(50_000))
    assert torch.equal(meta, meta.sort().values) and torch.equal(rest, rest.sort().values)


@pytest.mark.parametrize("noise_type", NOISE_TYPES)
def test_plan_noisy_records_the_measured_rate(noise_type: str) -> None:
    labels = balanced_labels(10, 5000)  # CIFAR-10's training split
    plan = plan_noisy(
        labels, 10, meta_per_class=100, noise_type=noise_type, noise_rate=0.4, generator=gen()
    )
    measured = (plan.train_labels != plan.true_labels).to(torch.float64).mean().item()
    assert plan.info["noise_rate_measured"] == measured
    assert torch.equal(plan.corrupted, plan.train_labels != plan.true_labels)
    q = plan.info["noise_rate_expected"]
    assert abs(measured - q) <= N_SIGMA * math.sqrt(q * (1 - q) / plan.train_labels.numel())
    assert plan.info["noise_matrix"] == noise_matrix(noise_type, 10, 0.4, gen()).tolist()
    # meta set: 1000 clean, class-balanced, disjoint from training
    assert class_counts(plan.meta_labels, 10) == [100] * 10
    assert torch.equal(plan.meta_labels, labels[plan.meta_indices])
    assert torch.equal(plan.true_labels, labels[plan.train_indices])
    assert not set(plan.meta_indices.tolist()) & set(plan.train_indices.tolist())
    assert plan.train_indices.numel() == 49_000


def test_plan_noisy_same_seed_same_labels() -> None:
    labels = balanced_labels(10, 5000)

    def labels_hash(seed: int) -> str:
        plan = plan_noisy(
            labels, 10, meta_per_class=100, noise_type="flip", noise_rate=0.4, generator=gen(seed)
        )
        return tensor_hash(plan.train_indices, plan.meta_indices, plan.train_labels)

    assert labels_hash(0) == labels_hash(0)
    assert labels_hash(0) != labels_hash(1)


@pytest.mark.parametrize("rho", [100, 10])
def test_cifar10_lt_counts_follow_the_formula(rho: int) -> None:
    labels = balanced_labels(10, 5000)[torch.randperm(50_000, generator=gen(1))]  # CIFAR-10 train
    plan = plan_long_tail(labels, 10, meta_per_class=10, imbalance_factor=rho, generator=gen())
    n = 5000 - 10  # the per-class count left once the meta set is removed
    expected = [int(n * rho ** (-i / 9)) for i in range(10)]
    assert class_counts(plan.train_labels, 10) == expected
    assert plan.info["long_tail_counts"] == expected and plan.info["n_per_class"] == n
    if rho == 100:
        assert expected[0] == 4990 and expected[9] == 49
    assert class_counts(plan.meta_labels, 10) == [10] * 10
    assert not set(plan.meta_indices.tolist()) & set(plan.train_indices.tolist())
    assert not plan.corrupted.any()
    assert torch.equal(plan.true_labels, labels[plan.train_indices])


def test_cifar100_lt_counts() -> None:
    labels = balanced_labels(100, 500)
    plan = plan_long_tail(labels, 100, meta_per_class=10, imbalance_factor=100, generator=gen())
    counts = class_counts(plan.train_labels, 100)
    assert counts == [int(490 * 100 ** (-i / 99)) for i in range(100)]
    assert counts[0] == 490 and counts[-1] == 4


def test_long_tail_counts_edge_cases() -> None:
    assert long_tail_counts(4990, 10, 1) == [4990] * 10
    assert long_tail_counts(4990, 10, 200)[-1] == int(4990 / 200)
    with pytest.raises(ValueError, match=r"num_classes must be an integer >= 2; got 1"):
        long_tail_counts(10, 1, 10)


def test_subsample_per_class_refuses_more_than_available() -> None:
    with pytest.raises(ValueError, match=r"cannot keep 6 examples of class 1: 5 are available"):
        subsample_per_class(balanced_labels(2, 5), [5, 6], gen())


# --- human noise and the binary task on synthetic labels ---------------------------------------


def test_plan_human_noise() -> None:
    clean = balanced_labels(10, 300)
    noisy = clean.clone()
    noisy[::4] = (noisy[::4] + 3) % 10  # a quarter of the labels wrong, as a human might
    plan = plan_human_noise(clean, noisy, 10, meta_per_class=20, generator=gen())
    assert torch.equal(plan.meta_labels, clean[plan.meta_indices])  # meta labels are clean
    assert torch.equal(plan.train_labels, noisy[plan.train_indices])
    assert torch.equal(plan.corrupted, noisy[plan.train_indices] != clean[plan.train_indices])
    assert plan.info["noise_rate_measured"] == plan.corrupted.to(torch.float64).mean().item()
    E = torch.tensor(plan.info["noise_matrix_empirical"], dtype=torch.float64)
    torch.testing.assert_close(E.sum(1), torch.ones(10, dtype=torch.float64))


def plan_4_vs_9(train_labels, test_labels, *, test_balanced: bool = True, **task):
    """The paper's binary task, 4 (the minority) against 9, planned on these labels; ``task``:
    n_train, proportion, meta_per_class."""
    return plan_binary_imbalance(
        train_labels,
        test_labels,
        minority=4,
        majority=9,
        test_balanced=test_balanced,
        generator=gen(),
        **task,
    )


def test_plan_binary_imbalance_on_synthetic_labels() -> None:
    train = balanced_labels(10, 6000)
    test = balanced_labels(10, 1000)
    test = torch.cat([test, torch.full((50,), 9)])  # more 9s than 4s in the test split
    task = {"n_train": 5000, "proportion": 0.995, "meta_per_class": 5}
    plans = {b: plan_4_vs_9(train, test, test_balanced=b, **task) for b in (True, False)}
    plan = plans[True]
    assert class_counts(plan.train_labels, 2) == [20, 4970]
    assert class_counts(plan.meta_labels, 2) == [5, 5]
    assert class_counts(plan.test_labels, 2) == [1000, 1000]
    assert class_counts(plans[False].test_labels, 2) == [1000, 1050]


@pytest.mark.parametrize("p", [0, 1, 1.2, -0.5])
def test_proportion_outside_open_interval(p: float) -> None:
    labels = balanced_labels(10, 10)
    with pytest.raises(ValueError, match=r"proportion must be a number in \(0, 1\); got"):
        plan_4_vs_9(labels, labels, n_train=50, proportion=p, meta_per_class=1)


def test_binary_task_needs_enough_images() -> None:
    train, test = balanced_labels(10, 100), balanced_labels(10, 10)
    with pytest.raises(ValueError, match=r"n_train=5000 with proportion=0.5 needs 2500 minority"):
        plan_4_vs_9(train, test, n_train=5000, proportion=0.5, meta_per_class=5)


@pytest.mark.parametrize("n", [14, 15, 50, 999, 5000, 12345, 60_000])
@pytest.mark.parametrize("k", [1, 5, 6])
def test_suggested_proportions_work(n: int, k: int) -> None:
    """The bounds a refusal suggests are themselves accepted."""
    with pytest.raises(ValueError, match=r"draws 0 images of a .*use proportion <= ") as high:
        binary_imbalance_counts(n, 1 - 1e-9, k, minority="a", majority="b")
    with pytest.raises(ValueError, match=r"draws 0 images of b .*use proportion >= ") as low:
        binary_imbalance_counts(n, 1e-9, k, minority="a", majority="b")
    hi = float(high.value.args[0].split("proportion <= ")[1].split()[0])
    lo = float(low.value.args[0].split("proportion >= ")[1].split()[0])
    assert 0 < lo <= hi < 1
    for p in (lo, hi):
        n_minor, n_major = binary_imbalance_counts(n, p, k, minority="a", majority="b")
        assert n_minor > k and n_major > k and n_minor + n_major == n
    assert "or meta_per_class" not in high.value.args[0]  # 0 drawn: no meta_per_class helps


def test_binary_task_too_small_for_any_proportion() -> None:
    with pytest.raises(
        ValueError,
        match=r"^n_train=11 is too small for meta_per_class=5: each of the two classes needs 5 "
        r"meta images and at least one training image; use n_train >= 12$",
    ):
        binary_imbalance_counts(11, 0.5, 5, minority="a", majority="b")


@pytest.mark.parametrize("available", [0, 1])
def test_meta_split_of_a_class_too_small_for_any_meta_set(available: int) -> None:
    """No range like '1 <= meta_per_class <= -1' when no meta_per_class can work."""
    labels = torch.cat([balanced_labels(3, 10), torch.full((available,), 3)])
    with pytest.raises(ValueError) as info:
        split_meta(labels, 4, 1, gen())
    assert str(info.value) == (
        f"meta_per_class=1 is larger than what is available: class 3 has {available} "
        f"example{'' if available == 1 else 's'}, and a meta set needs at least 2 of every "
        f"class (one for the meta set, one left for training)"
    )


def test_long_tail_that_empties_the_tail_class() -> None:
    labels = balanced_labels(10, 30)  # 25 per class once 5 go to the meta set
    with pytest.raises(ValueError) as info:
        plan_long_tail(labels, 10, meta_per_class=5, imbalance_factor=100, generator=gen())
    assert str(info.value) == (
        "imbalance_factor=100 leaves 0 training examples of class 9: the head class has 25 "
        "after meta_per_class=5 went to the meta set, and the tail class keeps "
        "int(25 / imbalance_factor); use imbalance_factor <= 25"
    )
    plan = plan_long_tail(labels, 10, meta_per_class=5, imbalance_factor=25, generator=gen())
    assert class_counts(plan.train_labels, 10)[-1] == 1  # the suggested bound works
