"""Datasets with corrupted or imbalanced training labels and a clean meta set.

Every dataset config yields a :class:`DataBundle`: a training set (possibly corrupted), a clean
meta set disjoint from it, a test set, and for each training example its original label and
whether it is corrupted. One entry point, :func:`build_dataset`::

    from reweight.data import build_dataset, save_labels
    bundle = build_dataset("mnist_imbalanced", proportion=0.995, seed=0)
    save_labels(bundle, run_dir)  # run_dir/labels.pt and run_dir/dataset.json

Modules: :mod:`~reweight.data.noise` (transition matrices, corruption), :mod:`~reweight.data.splits`
(meta split, long tail; pure functions on label tensors), :mod:`~reweight.data.mnist`,
:mod:`~reweight.data.cifar` (thin torchvision layers), :mod:`~reweight.data.realnoise`
(Clothing1M, Food-101N, ANIMAL-10N, mini-WebVision from their own layouts, read from disk),
:mod:`~reweight.data.core` (containers, data root, atomic files), :mod:`~reweight.data.checksums`
(MD5 checks of raw files, recorded in ``$REWEIGHT_CACHE_DIR``) and :mod:`~reweight.data.build`
(the registry).
"""

from reweight.data.build import DATASETS, build_dataset
from reweight.data.core import DataBundle, TensorData, resolve_data_root, save_labels
from reweight.data.noise import corrupt_labels, noise_matrix
from reweight.data.splits import long_tail_counts

__all__ = [
    "DATASETS",
    "DataBundle",
    "TensorData",
    "build_dataset",
    "corrupt_labels",
    "long_tail_counts",
    "noise_matrix",
    "resolve_data_root",
    "save_labels",
]
