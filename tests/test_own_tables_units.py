"""``reweight.data.own_tables`` beyond test_own_data_errors.py: labels that only a stripped
minus sign would make numbers, and the reason given for a tensor file that torch's safe loader
refuses, by either of its two marks alone (the error's type, or the word ``weights_only``);
a CSV file read as UTF-8 whatever the locale's encoding; a ``.pt`` file saved on a GPU read on
the CPU."""

from __future__ import annotations

import csv
import locale
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from reweight.data import build_dataset


def tensors(path: str, **params):
    params.setdefault("val_per_class", 0)
    return build_dataset("tensors", path=path, **params)


def test_labels_with_a_letter_are_sorted_as_strings(tmp_path: Path):
    """``X10`` and ``X9`` are not integers (only a leading minus sign is stripped before the
    digit check): string order, ``X10`` first, not a failed integer sort."""
    p = tmp_path / "t.csv"
    with p.open("w", newline="") as f:
        csv.writer(f).writerows([["a", "label"], *[[i, ["X9", "X10"][i % 2]] for i in range(8)]])
    bundle = tensors(str(p), meta_rows=[0, 1])
    assert bundle.class_names == ["X10", "X9"]


def test_a_csv_file_is_read_as_utf8_under_an_ascii_locale(tmp_path: Path):
    """Labels and a header with accents, under the C locale (ASCII): the same classes as
    written, not an undecodable file (without UTF-8 mode, ``open`` would use the locale's
    encoding)."""
    p = tmp_path / "t.csv"
    with p.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["größe", "label"], *[[i, ["é", "ü"][i % 2]] for i in range(8)]])
    old = locale.setlocale(locale.LC_CTYPE)
    try:
        locale.setlocale(locale.LC_CTYPE, "C")
        bundle = tensors(str(p), meta_rows=[0, 1])
    finally:
        locale.setlocale(locale.LC_CTYPE, old)
    assert bundle.class_names == ["é", "ü"]
    assert bundle.train.inputs.shape[1] == 1  # the one feature column


PYTHON_OBJECTS = "it holds Python objects other than arrays and plain containers"


@pytest.mark.parametrize(
    ("error", "why"),
    [
        # the unpickler's type alone: torch's safe loader names it, whatever its message says
        (pickle.UnpicklingError("unsupported global: os.system"), PYTHON_OBJECTS),
        # the word alone, in another error type
        (RuntimeError("load with weights_only=False to run it"), PYTHON_OBJECTS),
        # neither: the error's type and first line
        (RuntimeError("truncated archive\nsecond line"), "RuntimeError: truncated archive"),
    ],
)
def test_a_refused_pt_file_is_explained_by_either_mark(tmp_path: Path, monkeypatch, error, why):
    p = tmp_path / "a.pt"
    p.write_bytes(b"stand-in")

    def load(*args, **kwargs):
        raise error

    monkeypatch.setattr(torch, "load", load)
    with pytest.raises(ValueError) as info:
        tensors(str(p), meta_rows=[0])
    assert str(info.value) == f"cannot read {p} ({why}): fix or replace it"


def test_a_pt_file_saved_on_a_gpu_is_read_on_the_cpu(tmp_path: Path):
    """A file whose tensors were saved from ``cuda:0`` (made here by rewriting the storage
    location in a CPU-saved file's pickle: no GPU needed): read onto the CPU with the values
    written, not refused for want of CUDA."""
    x, y = torch.arange(24.0).reshape(12, 2), torch.arange(12) % 2
    torch.save({"x": x, "y": y}, tmp_path / "cpu.pt")
    p = tmp_path / "gpu.pt"
    with zipfile.ZipFile(tmp_path / "cpu.pt") as src, zipfile.ZipFile(p, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name.endswith("/data.pkl"):  # the location string, pickled once (memoised)
                assert data.count(b"X\x03\x00\x00\x00cpu") == 1
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            dst.writestr(name, data)
    bundle = tensors(str(p), meta_rows=[0, 1], test_fraction=0.25, standardize=False)
    kept = bundle.train.source_indices
    assert bundle.train.inputs.device.type == "cpu"
    torch.testing.assert_close(bundle.train.inputs, x[kept], rtol=0, atol=0)
    torch.testing.assert_close(bundle.meta.inputs, x[:2], rtol=0, atol=0)
