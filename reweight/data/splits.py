"""Meta/train splits, long-tail subsampling and corruption as pure functions on label tensors.

Nothing here touches files: every dataset protocol is a ``plan_*`` function that takes the
labels of a source split and a ``torch.Generator`` seeded with the dataset seed, and returns a
:class:`SplitPlan` (which source indices go to the meta and training sets, with which labels).
The torchvision-facing loaders only apply a plan to the images, so the protocols are tested on
synthetic label arrays without the CIFAR files.

Example::

    >>> import torch
    >>> labels = torch.arange(10).repeat(500)  # 500 per class
    >>> plan = plan_long_tail(labels, 10, meta_per_class=10, imbalance_factor=100,
    ...                       generator=torch.Generator().manual_seed(0))
    >>> plan.info["long_tail_counts"][0], plan.info["long_tail_counts"][-1]
    (490, 4)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from reweight.data._validate import (
    check_at_least,
    check_bool,
    check_int,
    check_label_tensor,
    check_open_unit,
)
from reweight.data.noise import (
    corrupt_labels,
    empirical_transition,
    expected_noise_rate,
    noise_matrix,
)
from reweight.data.noise import noise_rate as measured_noise_rate

__all__ = [
    "SplitPlan",
    "binary_imbalance_counts",
    "class_counts",
    "long_tail_counts",
    "noise_info",
    "plan_binary_imbalance",
    "plan_human_noise",
    "plan_long_tail",
    "plan_noisy",
    "split_meta",
    "subsample_per_class",
]


@dataclass
class SplitPlan:
    """Which examples of a source dataset form the meta and training sets, and their labels.

    Indices are int64 positions in the source training split, sorted ascending. Labels are in the
    task's label space (e.g. 0/1 for the binary MNIST task). ``test_indices``/``test_labels`` are
    ``None`` when the whole test split is used with its own labels.
    """

    num_classes: int
    train_indices: Tensor  # (N,) int64
    train_labels: Tensor  # (N,) int64, observed (possibly corrupted)
    true_labels: Tensor  # (N,) int64, original
    meta_indices: Tensor  # (M,) int64
    meta_labels: Tensor  # (M,) int64, clean
    info: dict[str, Any] = field(default_factory=dict)
    test_indices: Tensor | None = None
    test_labels: Tensor | None = None
    val_indices: Tensor | None = None  # (V,) int64, a clean validation set of the training split
    val_labels: Tensor | None = None

    @property
    def corrupted(self) -> Tensor:
        """(N,) bool: the observed label differs from the original."""
        return self.train_labels != self.true_labels


def class_counts(labels: Tensor, num_classes: int) -> list[int]:
    """Number of examples of each class, as a list of length ``num_classes``."""
    check_label_tensor("labels", labels, num_classes)
    return torch.bincount(labels.to(torch.int64), minlength=num_classes).tolist()


def _class_groups(labels: Tensor, num_classes: int) -> list[Tensor]:
    """For each class, the ascending indices of its examples (one stable sort, not K scans)."""
    labels = labels.to(torch.int64)
    order = torch.argsort(labels, stable=True)
    return list(torch.split(order, torch.bincount(labels, minlength=num_classes).tolist()))


def _shuffle(indices: Tensor, generator: torch.Generator) -> Tensor:
    return indices[torch.randperm(indices.numel(), generator=generator)]


def split_meta(
    labels: Tensor, num_classes: int, meta_per_class: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Hold out ``meta_per_class`` random examples of every class.

    Returns ``(meta_indices, rest_indices)``, both sorted, partitioning ``range(len(labels))``.
    At least one example of each class must remain outside the meta set.
    """
    k = check_int("meta_per_class", meta_per_class, minimum=1)
    counts = class_counts(labels, num_classes)
    smallest = min(counts)
    if k >= smallest:
        c = counts.index(smallest)
        if smallest < 2:  # no meta_per_class works: say so rather than give an empty range
            raise ValueError(
                f"meta_per_class={k} is larger than what is available: class {c} has "
                f"{smallest} example{'' if smallest == 1 else 's'}, and a meta set needs at least "
                f"2 of every class (one for the meta set, one left for training)"
            )
        raise ValueError(
            f"meta_per_class={k} is larger than what is available: class {c} has {smallest} "
            f"examples and at least one must stay in the training set (allowed: 1 <= "
            f"meta_per_class <= {smallest - 1})"
        )
    meta = [_shuffle(group, generator)[:k] for group in _class_groups(labels, num_classes)]
    meta = torch.cat(meta).sort().values
    keep = torch.ones(labels.shape[0], dtype=torch.bool)
    keep[meta] = False
    return meta, keep.nonzero().squeeze(1)


def subsample_per_class(labels: Tensor, counts: list[int], generator: torch.Generator) -> Tensor:
    """Sorted indices of ``counts[c]`` random examples of each class ``c``."""
    available = class_counts(labels, len(counts))
    for c, (want, have) in enumerate(zip(counts, available, strict=True)):
        if not 0 <= want <= have:
            raise ValueError(f"cannot keep {want} examples of class {c}: {have} are available")
    groups = _class_groups(labels, len(counts))
    kept = [_shuffle(group, generator)[:n] for group, n in zip(groups, counts, strict=True)]
    return torch.cat(kept).sort().values


def long_tail_counts(n_per_class: int, num_classes: int, imbalance_factor: float) -> list[int]:
    """Per-class sizes of a long-tailed set: class ``i`` keeps ``int(n * rho ** (-i / (K - 1)))``.

    Class 0 is the head (``n`` examples), class ``K - 1`` the tail (``int(n / rho)``). This is the
    exponential profile of Cui et al. (CVPR 2019), used by LDAM-DRW and Meta-Weight-Net for
    CIFAR-LT, with ``rho`` = ``imbalance_factor`` in {200, 100, 50, 20, 10, 1} in those papers.

    >>> long_tail_counts(4990, 10, 100)
    [4990, 2991, 1793, 1075, 644, 386, 231, 138, 83, 49]
    """
    n = check_int("n_per_class", n_per_class, minimum=1)
    k = check_int("num_classes", num_classes, minimum=2)
    rho = check_at_least("imbalance_factor", imbalance_factor, 1.0)
    return [int(n * rho ** (-i / (k - 1))) for i in range(k)]


def noise_info(true: Tensor, noisy: Tensor, T: Tensor) -> dict[str, Any]:
    """What ``dataset.json`` records of a corruption: the matrix ``T``, the measured rate (the
    fraction of labels changed) and the rate expected from ``T``."""
    return {
        "noise_matrix": T.tolist(),
        "noise_rate_measured": measured_noise_rate(noisy, true),
        "noise_rate_expected": expected_noise_rate(T, true),
    }


def plan_noisy(
    labels: Tensor,
    num_classes: int,
    *,
    meta_per_class: int,
    noise_type: str,
    noise_rate: float,
    generator: torch.Generator,
    train_per_class: int | None = None,
) -> SplitPlan:
    """Clean class-balanced meta set, then synthetic noise on the rest (MW-Net's protocol).

    ``train_per_class`` keeps that many random training examples of each class (before the
    noise; None keeps all): a small training set is memorised in few steps, which is what a
    noisy-label experiment at CPU scale needs to show.

    Generator order: noise matrix (``flip``/``flip2`` only), meta split, the training subset
    (only when ``train_per_class`` is given), corruption. ``info`` records the matrix ``T``, the
    requested rate, the measured rate (fraction of training labels changed) and the rate
    expected from ``T``.
    """
    T = noise_matrix(noise_type, num_classes, noise_rate, generator)
    meta, rest = split_meta(labels, num_classes, meta_per_class, generator)
    if train_per_class is not None:
        have = min(class_counts(labels[rest], num_classes))
        if not 1 <= train_per_class <= have:
            raise ValueError(
                f"train_per_class={train_per_class} is not in [1, {have}]: the smallest class "
                f"has {have} training examples once the meta set is out; use train_per_class "
                f"<= {have}, or null for all"
            )
        rest = rest[subsample_per_class(labels[rest], [train_per_class] * num_classes, generator)]
    true = labels[rest].to(torch.int64)
    noisy = corrupt_labels(true, T, generator)
    info = {
        "noise_type": noise_type,
        "noise_rate": float(noise_rate),
        **noise_info(true, noisy, T),
    }
    return SplitPlan(num_classes, rest, noisy, true, meta, labels[meta].to(torch.int64), info)


def plan_long_tail(
    labels: Tensor,
    num_classes: int,
    *,
    meta_per_class: int,
    imbalance_factor: float,
    generator: torch.Generator,
) -> SplitPlan:
    """Clean meta set of ``meta_per_class`` per class removed first, then class ``i`` keeps
    ``int(n * rho ** (-i / (K - 1)))`` random examples, ``n`` the per-class count left (the
    smallest class count if the source is not balanced). Labels are not corrupted."""
    check_at_least("imbalance_factor", imbalance_factor, 1.0)
    meta, rest = split_meta(labels, num_classes, meta_per_class, generator)
    rest_labels = labels[rest].to(torch.int64)
    n = min(class_counts(rest_labels, num_classes))
    counts = long_tail_counts(n, num_classes, imbalance_factor)
    if counts[-1] == 0:
        # the tail keeps int(n / rho): rho = n keeps one, unless float rounding says otherwise
        most = n if long_tail_counts(n, num_classes, n)[-1] >= 1 else n - 1
        raise ValueError(
            f"imbalance_factor={imbalance_factor:g} leaves 0 training examples of class "
            f"{num_classes - 1}: the head class has {n} after meta_per_class={meta_per_class} "
            f"went to the meta set, and the tail class keeps int({n} / imbalance_factor); use "
            f"imbalance_factor <= {most}"
        )
    train = rest[subsample_per_class(rest_labels, counts, generator)]
    true = labels[train].to(torch.int64)
    info = {
        "imbalance_factor": float(imbalance_factor),
        "n_per_class": n,
        "long_tail_counts": counts,
    }
    meta_labels = labels[meta].to(torch.int64)
    return SplitPlan(num_classes, train, true.clone(), true, meta, meta_labels, info)


def plan_human_noise(
    clean: Tensor,
    noisy: Tensor,
    num_classes: int,
    *,
    meta_per_class: int,
    generator: torch.Generator,
) -> SplitPlan:
    """Real noisy labels (CIFAR-N): a clean class-balanced meta set chosen by the clean labels,
    the rest trained with the given noisy labels. ``info`` records the measured noise rate and the
    empirical transition matrix."""
    if clean.shape != noisy.shape:
        raise ValueError(
            f"clean and noisy labels must have the same shape; got "
            f"{tuple(clean.shape)} and {tuple(noisy.shape)}"
        )
    check_label_tensor("noisy", noisy, num_classes)
    meta, rest = split_meta(clean, num_classes, meta_per_class, generator)
    true = clean[rest].to(torch.int64)
    observed = noisy[rest].to(torch.int64)
    T = empirical_transition(true, observed, num_classes)
    info = {
        "noise_type": "human",
        "noise_matrix_empirical": T.tolist(),
        "noise_rate_measured": measured_noise_rate(observed, true),
    }
    return SplitPlan(num_classes, rest, observed, true, meta, clean[meta].to(torch.int64), info)


def _decimal(numerator: int, denominator: int, digits: int, *, up: bool) -> str:
    """``numerator / denominator`` rounded up or down to ``digits`` decimals, exactly (integer
    arithmetic: a bound printed for the user must itself satisfy the bound)."""
    scaled = numerator * 10**digits
    q = -(-scaled // denominator) if up else scaled // denominator
    text = str(q).rjust(digits + 1, "0")
    return f"{text[:-digits]}.{text[-digits:]}".rstrip("0").rstrip(".")


def _proportion_range(n: int, k: int) -> tuple[str, str]:
    """Printable bounds ``lo <= proportion <= hi`` that leave at least ``k + 1`` examples of
    each class among ``n`` (for ``n >= 2 * (k + 1)``), with as few decimals as keep lo <= hi."""
    for digits in range(4, 16):
        lo = _decimal(k + 1, n, digits, up=True)
        hi = _decimal(n - k - 1, n, digits, up=False)
        if float(lo) <= float(hi):
            break
    return lo, hi


def binary_imbalance_counts(
    n_train: int, proportion: float, meta_per_class: int, *, minority: str, majority: str
) -> tuple[int, int]:
    """``(n_minority, n_majority)`` drawn for the binary imbalance task: ``n_train -
    round(n_train * proportion)`` and ``round(n_train * proportion)``.

    Raises ``ValueError`` in the user's terms if either class would have no example left for
    training once ``meta_per_class`` of it go to the meta set, with the proportions (or
    ``meta_per_class``) that work; ``minority``/``majority`` name the classes (e.g. ``"digit
    4"``). Pure arithmetic, so the dataset builder calls it before reading any file.

    >>> binary_imbalance_counts(5000, 0.995, 5, minority="digit 4", majority="digit 9")
    (25, 4975)
    """
    n, p, k = n_train, proportion, meta_per_class
    n_major = round(n * p)
    n_minor = n - n_major
    if n < 2 * (k + 1):
        raise ValueError(
            f"n_train={n} is too small for meta_per_class={k}: each of the two classes needs "
            f"{k} meta images and at least one training image; use n_train >= {2 * (k + 1)}"
        )
    lo, hi = _proportion_range(n, k)
    for want, name, role, bound in (
        (n_minor, minority, "minority", f"proportion <= {hi}"),
        (n_major, majority, "majority", f"proportion >= {lo}"),
    ):
        if want <= k:
            other = f" or meta_per_class <= {want - 1}" if want >= 2 else ""
            raise ValueError(
                f"proportion={p} with n_train={n} draws {want} images of {name} (the {role} "
                f"class), but the meta set takes meta_per_class={k} of them and at least one "
                f"must stay for training; use {bound}{other}"
            )
    return n_minor, n_major


def _largest_n_train(p: float, minor_available: int, major_available: int) -> int:
    """The largest ``n_train`` whose draws at proportion ``p`` fit in the available images."""
    n = int(min(minor_available / (1 - p), major_available / p)) + 2
    while n > 2 and (n - round(n * p) > minor_available or round(n * p) > major_available):
        n -= 1
    return n


def _binary_test(
    groups: list[Tensor], minority: int, majority: int, balanced: bool, generator: torch.Generator
) -> Tensor:
    """The test indices: every minority test example and, if ``balanced``, as many random
    majority ones (else all of them)."""
    test_minor = groups[minority]
    test_major = _shuffle(groups[majority], generator)
    if balanced:
        if test_major.numel() < test_minor.numel():
            raise ValueError(
                f"test_balanced=true needs {test_minor.numel()} majority test images but only "
                f"{test_major.numel()} exist; set test_balanced=false"
            )
        test_major = test_major[: test_minor.numel()]
    return torch.cat([test_minor, test_major]).sort().values


def _binary_draws(
    groups: list[Tensor],
    wanted: dict[str, tuple[int, int]],
    meta_per_class: int,
    val_per_class: int,
    n_train: int,
    p: float,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor, Tensor]:
    """The meta, training and validation indices (each sorted): for each role (minority, then
    majority: the generator's order) with its ``(digit, count)`` in ``wanted``, ``count`` random
    training indices of the digit, the first ``meta_per_class`` of them for the meta set, and
    ``val_per_class`` more for the validation set."""
    draws = {}
    for role, (cls, want) in wanted.items():
        pool = _shuffle(groups[cls], generator)
        if want > pool.numel():
            most = _largest_n_train(
                p, groups[wanted["minority"][0]].numel(), groups[wanted["majority"][0]].numel()
            )
            raise ValueError(
                f"n_train={n_train} with proportion={p} needs {want} {role} images (digit {cls}) "
                f"but the training split has {pool.numel()}; use n_train <= {most}"
            )
        if want + val_per_class > pool.numel():
            raise ValueError(
                f"val_per_class={val_per_class} needs {val_per_class} {role} images (digit "
                f"{cls}) beyond the {want} drawn, but the training split has {pool.numel()}"
            )
        draws[role] = pool[:want]
        draws[f"{role}_val"] = pool[want : want + val_per_class]
    k = meta_per_class
    meta = torch.cat([draws["minority"][:k], draws["majority"][:k]]).sort().values
    train = torch.cat([draws["minority"][k:], draws["majority"][k:]]).sort().values
    val = torch.cat([draws["minority_val"], draws["majority_val"]]).sort().values
    return meta, train, val


def _is_majority(targets: Tensor, idx: Tensor, majority: int) -> Tensor:
    """The binary labels of ``targets[idx]``: 1 for the majority digit, 0 for the minority."""
    return (targets[idx] == majority).to(torch.int64)


def plan_binary_imbalance(
    train_targets: Tensor,
    test_targets: Tensor,
    *,
    minority: int,
    majority: int,
    n_train: int,
    proportion: float,
    meta_per_class: int,
    test_balanced: bool,
    generator: torch.Generator,
    val_per_class: int = 0,
) -> SplitPlan:
    """L2RW's imbalanced binary task (Ren et al., ICML 2018, Sec. 5.1, with 4 vs 9 on MNIST).

    ``round(n_train * proportion)`` majority and ``n_train - round(n_train * proportion)``
    minority examples are drawn from the training split; ``meta_per_class`` of each are held out
    (``val_per_class`` more of each, the clean validation set, come from the training split's
    examples left undrawn, so the training and meta sets are the same with or without it)
    as the balanced clean meta set. Labels: 0 = minority, 1 = majority. The test set has every
    minority test example and, if ``test_balanced``, as many random majority ones (else all).
    With n_train = 5000: 20 / 4970 training examples at p = 0.995 and 495 / 4495 at p = 0.9.
    """
    p = check_open_unit("proportion", proportion)
    n = check_int("n_train", n_train, minimum=2)
    k = check_int("meta_per_class", meta_per_class, minimum=1)
    check_bool("test_balanced", test_balanced)
    n_minor, n_major = binary_imbalance_counts(
        n, p, k, minority=f"digit {minority}", majority=f"digit {majority}"
    )
    num_digits = max(minority, majority) + 1
    wanted = {"minority": (minority, n_minor), "majority": (majority, n_major)}
    groups = _class_groups(train_targets, num_digits)
    meta, train, val = _binary_draws(groups, wanted, k, val_per_class, n, p, generator)
    test = _binary_test(
        _class_groups(test_targets, num_digits), minority, majority, test_balanced, generator
    )
    true = _is_majority(train_targets, train, majority)
    info = {
        "minority_class": minority,
        "majority_class": majority,
        "n_minority_drawn": n_minor,
        "n_majority_drawn": n_major,
    }
    return SplitPlan(
        2,
        train,
        true.clone(),
        true,
        meta,
        _is_majority(train_targets, meta, majority),
        info,
        test_indices=test,
        test_labels=_is_majority(test_targets, test, majority),
        val_indices=val if val_per_class else None,
        val_labels=_is_majority(train_targets, val, majority) if val_per_class else None,
    )
