"""Synthetic label noise as an explicit transition matrix ``T``.

``T[i, j]`` is the probability that an example of true class ``i`` is observed with label ``j``;
rows sum to 1.

Conventions (``K`` classes, noise rate ``r``):

``uniform``
    ``T = r/K * 1 + (1 - r) * I``: with probability ``r`` the label is redrawn uniformly from
    *all* K classes, so it can come back unchanged and the expected fraction of changed labels is
    ``r * (K - 1) / K``. This is Meta-Weight-Net's "uniform" noise (Shu et al., NeurIPS 2019; its
    code's ``uniform_mix_C``, taken from the GLC code of Hendrycks et al., NeurIPS 2018).
``symmetric``
    ``r`` spread evenly over the ``K - 1`` *other* classes: ``T[i, i] = 1 - r``,
    ``T[i, j] = r / (K - 1)``. Every changed label is wrong and the expected fraction changed is
    ``r``. This is the "symmetric" noise of Co-teaching (Han et al., NeurIPS 2018) and L2RW's
    "uniform flip" (Ren et al., ICML 2018).
``flip``
    all of ``r`` goes to one other class drawn at random for each class (the draws come from the
    dataset generator, so the matrix is fixed by the dataset seed). Meta-Weight-Net's "flip" noise
    (its code's ``flip_labels_C``, from the GLC code).
``flip2``
    ``r / 2`` to each of two distinct other classes drawn at random per class (Meta-Weight-Net
    code's ``flip_labels_C_two``). Needs K >= 3.
``pair``
    class ``i`` goes to ``(i + 1) mod K`` with probability ``r``: the "pair flipping" of
    Co-teaching (Han et al., NeurIPS 2018).

Example::

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> T = noise_matrix("pair", 3, 0.2, g)
    >>> T.tolist()
    [[0.8, 0.2, 0.0], [0.0, 0.8, 0.2], [0.2, 0.0, 0.8]]
    >>> noisy = corrupt_labels(torch.zeros(10_000, dtype=torch.int64), T, g)
    >>> round(noise_rate(noisy, torch.zeros(10_000, dtype=torch.int64)), 1)
    0.2
"""

from __future__ import annotations

import torch
from torch import Tensor

from reweight.data._validate import check_choice, check_int, check_label_tensor, check_rate

__all__ = [
    "NOISE_TYPES",
    "corrupt_labels",
    "empirical_transition",
    "expected_noise_rate",
    "noise_matrix",
    "noise_rate",
]

NOISE_TYPES = ("uniform", "symmetric", "flip", "flip2", "pair")
"""Allowed values of the ``noise_type`` key; see the module docstring for each convention."""


def _other_class(i: int, draw: Tensor) -> Tensor:
    """Map draws in ``[0, K - 1)`` onto the classes other than ``i``."""
    return draw + (draw >= i).to(draw.dtype)


def noise_matrix(
    noise_type: str, num_classes: int, rate: float, generator: torch.Generator
) -> Tensor:
    """The ``(K, K)`` float64 transition matrix of a noise convention; rows sum to 1.

    ``generator`` is consumed only by the random conventions (``flip``, ``flip2``), one draw per
    class in class order, so a dataset seed fixes the matrix. See the module docstring for the
    conventions and their sources.
    """
    check_choice("noise_type", noise_type, NOISE_TYPES)
    k = check_int("num_classes", num_classes, minimum=3 if noise_type == "flip2" else 2)
    r = check_rate("noise_rate", rate)
    eye = torch.eye(k, dtype=torch.float64)
    if noise_type == "uniform":
        return torch.full((k, k), r / k, dtype=torch.float64) + (1.0 - r) * eye
    if noise_type == "symmetric":
        return r / (k - 1) * (1.0 - eye) + (1.0 - r) * eye
    T = (1.0 - r) * eye
    if noise_type == "pair":
        T[torch.arange(k), (torch.arange(k) + 1) % k] += r
    elif noise_type == "flip":
        for i in range(k):
            j = _other_class(i, torch.randint(k - 1, (1,), generator=generator))
            T[i, j] += r
    else:  # flip2
        for i in range(k):
            js = _other_class(i, torch.randperm(k - 1, generator=generator)[:2])
            T[i, js] += r / 2
    return T


def _check_matrix(T: Tensor) -> None:
    if T.dim() != 2 or T.shape[0] != T.shape[1]:
        raise ValueError(f"T must be a square (K, K) matrix; got shape {tuple(T.shape)}")
    if (T < 0).any():
        raise ValueError("T must have non-negative entries")
    sums = T.sum(dim=1, dtype=torch.float64)
    if not torch.allclose(sums, torch.ones_like(sums), rtol=0.0, atol=1e-9):
        raise ValueError(f"every row of T must sum to 1; got row sums {sums.tolist()}")


def corrupt_labels(labels: Tensor, T: Tensor, generator: torch.Generator) -> Tensor:
    """Draw each new label from row ``T[labels[n]]``; returns int64 labels of the same shape.

    One uniform number per example is drawn from ``generator`` (in example order) and mapped
    through the row's cumulative distribution, so the result depends only on the generator state,
    ``labels`` and ``T``. Classes with probability 0 are never drawn.
    """
    _check_matrix(T)
    k = T.shape[0]
    check_label_tensor("labels", labels, k)
    labels = labels.to(torch.int64)
    u = torch.rand(labels.shape[0], generator=generator, dtype=torch.float64)  # (N,)
    cdf = T.to(torch.float64).cumsum(dim=1)
    cdf = cdf / cdf[:, -1:]  # last entry exactly 1.0, so u < 1 always lands in a class
    # Group the examples by class (stable, so each class keeps its draws in example order) and
    # look each group up in its own row: K small searches instead of an (N, K) table.
    order = torch.argsort(labels, stable=True)
    groups = torch.split(u[order], torch.bincount(labels, minlength=k).tolist())
    # index of the first cdf entry > u, i.e. cdf[j - 1] <= u < cdf[j]
    drawn = [torch.searchsorted(cdf[c], g, right=True) for c, g in enumerate(groups)]
    out = torch.empty_like(labels)
    out[order] = torch.cat(drawn)
    return out


def noise_rate(noisy: Tensor, true: Tensor) -> float:
    """Measured noise rate: the fraction of labels that differ from the original (0.0 if empty)."""
    if noisy.shape != true.shape:
        raise ValueError(
            f"noisy and true must have the same shape; got {tuple(noisy.shape)} "
            f"and {tuple(true.shape)}"
        )
    if noisy.numel() == 0:
        return 0.0
    return float((noisy != true).to(torch.float64).mean())


def expected_noise_rate(T: Tensor, true: Tensor) -> float:
    """Expected fraction of changed labels when ``true`` is corrupted with ``T``:
    ``sum_c freq(c) * (1 - T[c, c])``."""
    _check_matrix(T)
    check_label_tensor("true", true, T.shape[0])
    if true.numel() == 0:
        return 0.0
    freq = torch.bincount(true, minlength=T.shape[0]).to(torch.float64) / true.numel()
    return float((freq * (1.0 - T.to(torch.float64).diagonal())).sum())


def empirical_transition(true: Tensor, noisy: Tensor, num_classes: int) -> Tensor:
    """Row-normalised ``(K, K)`` float64 counts of (true, observed) pairs; a class absent from
    ``true`` gets a row of zeros."""
    check_label_tensor("true", true, num_classes)
    check_label_tensor("noisy", noisy, num_classes)
    if true.shape != noisy.shape:
        raise ValueError(
            f"true and noisy must have the same shape; got {tuple(true.shape)} "
            f"and {tuple(noisy.shape)}"
        )
    pairs = true.to(torch.int64) * num_classes + noisy.to(torch.int64)
    counts = torch.bincount(pairs, minlength=num_classes * num_classes)
    counts = counts.reshape(num_classes, num_classes).to(torch.float64)
    return counts / counts.sum(dim=1, keepdim=True).clamp_min(1.0)
