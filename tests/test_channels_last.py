"""trainer.channels_last=auto (the default): NHWC where it was measured faster and changes only
the rounding (CPU convnets without BatchNorm), NCHW elsewhere, the choice and its reason logged
(reweight.core.device.channels_last_choice; the measurement: benchmarks/channels_last.py)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils.data import TensorDataset

from reweight import Trainer, TrainerConfig
from reweight.core.device import channels_last_choice
from reweight.models import build_model

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("name", "device", "on", "why"),
    [
        ("lenet", CPU, True, "auto: on, a CPU model with 2-D convolutions and no BatchNorm"),
        ("resnet32", CPU, False, "auto: off, BatchNorm"),
        ("mlp", CPU, False, "auto: off, no 2-D convolution"),
        ("lenet", torch.device("cuda"), False, "auto: off on cuda (NHWC not measured there"),
    ],
)
def test_auto_chooses_by_device_and_layers(name, device, on, why):
    model = build_model(name, num_classes=10, in_channels=1, input_shape=(1, 28, 28))
    choice, reason = channels_last_choice("auto", model, device)
    assert choice is on and reason.startswith(why)


def test_an_explicit_setting_is_kept_and_a_bad_one_refused():
    lenet = build_model("lenet", num_classes=10, in_channels=1)
    assert channels_last_choice(False, lenet, CPU) == (
        False,
        "trainer.channels_last=false as given",
    )
    assert channels_last_choice(True, torch.nn.Linear(2, 2), CPU)[0] is True
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match=r"trainer.channels_last must be true, false or auto"):
            TrainerConfig(channels_last=bad)


def _trainer(channels_last):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 1, 28, 28, generator=g), torch.randint(0, 10, (40,), generator=g)
    torch.manual_seed(0)
    model = build_model("lenet", num_classes=10, in_channels=1)
    config = TrainerConfig(batch_size=20, meta_batch_size=20, channels_last=channels_last,
                           progress=False)  # fmt: skip
    data = TensorDataset(x, y)
    return Trainer(model, data, data, method="l2rw", config=config), (
        x[:20],
        y[:20],
        x[20:],
        y[20:],
    )


def test_auto_trains_lenet_in_nhwc_and_changes_only_the_rounding(caplog):
    with caplog.at_level(logging.INFO, logger="reweight.core.device"):
        auto, batch = _trainer("auto")
    assert auto.channels_last
    assert auto.model.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert "memory format: NHWC (auto: on, a CPU model with 2-D convolutions" in caplog.text
    nchw, _ = _trainer(False)
    assert not nchw.channels_last
    auto.train_step(*batch)
    nchw.train_step(*batch)
    for a, b in zip(auto.model.parameters(), nchw.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # float32 rounding, one step
    assert any(
        not torch.equal(a, b)
        for a, b in zip(auto.model.parameters(), nchw.model.parameters(), strict=True)
    )  # NHWC did run: another summation order


def test_the_cli_default_is_auto_and_a_bad_value_is_one_config_error():
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from reweight.cli import validate

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("reweight.conf", version_base="1.3"):
            assert compose("config").trainer.channels_last == "auto"
            assert validate(compose("config")).trainer.channels_last == "auto"
            bad = compose("config", overrides=["trainer.channels_last=yes"])
            with pytest.raises(ValueError, match=r"^trainer.channels_last must be true, false or"):
                validate(bad)
    finally:
        GlobalHydra.instance().clear()
