"""model.pretrained=true offline: the weights come from torch's cache file, and a missing file
with no network is one line naming the file, its URL and the folder torch looks in."""

from __future__ import annotations

import pytest
import torch
import torchvision

from reweight.models.torchvision_models import torchvision_model

FILE = "resnet18-f37072fd.pth"  # torchvision's ResNet18_Weights.IMAGENET1K_V1 (the DEFAULT)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty torch cache, and every HTTP(S) request sent to a closed local port."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_missing_weights_offline_is_one_line(offline):
    with pytest.raises(FileNotFoundError) as err:
        torchvision_model("resnet18", num_classes=14, pretrained=True)
    message = str(err.value)
    assert "\n" not in message
    assert str(offline / FILE) in message and f"download.pytorch.org/models/{FILE}" in message
    assert not (offline / FILE).exists()


def test_cached_weights_are_used_offline(offline):
    offline.mkdir(parents=True)
    reference = torchvision.models.resnet18()  # stands in for the ImageNet weights
    torch.save(reference.state_dict(), offline / FILE)
    model = torchvision_model("resnet18", num_classes=14, pretrained=True)
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert model.fc.out_features == 14  # the head replaced for the dataset


def test_unknown_weight_set_names_the_allowed_ones():
    with pytest.raises(ValueError, match="DEFAULT, IMAGENET1K_V1"):
        torchvision_model("resnet18", num_classes=14, weights="IMAGENET21K")
