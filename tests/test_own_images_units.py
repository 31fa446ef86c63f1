"""``reweight.data.own_images`` beyond test_own_data_errors.py: an image the decoder refuses
without a word is named with the error's type alone (torchvision's own decoders always say
something, so a stand-in decoder raises the silent error)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torchvision.io

from reweight.data import build_dataset


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (RuntimeError(), "RuntimeError"),
        (OSError(""), "OSError"),
        (ValueError("bad header\nmore detail"), "bad header"),  # the first line only
    ],
)
def test_a_decoder_error_without_a_message_is_named_by_its_type(
    tmp_path: Path, monkeypatch, error, reason
):
    path = tmp_path / "train" / "a" / "0.png"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"stand-in")

    def decode_image(*args, **kwargs):
        raise error

    monkeypatch.setattr(torchvision.io, "decode_image", decode_image)
    with pytest.raises(ValueError) as info:
        build_dataset(
            "image_folder", train_dir=str(tmp_path / "train"), meta_files=["a/0.png"],
            val_per_class=0,
        )  # fmt: skip
    assert str(info.value) == f"cannot read the image {path} ({reason}): replace or delete the file"
