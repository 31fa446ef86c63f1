"""Tests for reweight.models: shapes, published sizes, init, meta twins, second order, configs."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

import hydra.utils
import pytest
import torch
import torch.nn.functional as F
from hydra.errors import InstantiationException
from omegaconf import OmegaConf
from torch import nn

import reweight.models as models
from reweight.meta import to_meta
from reweight.models import (
    MLP,
    MODEL_NAMES,
    CifarResNet,
    LeNet,
    WideResNet,
    adapt_input_channels,
    build_model,
    replace_head,
    resnet32,
    torchvision_model,
    wrn28_10,
)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def wrn28_10_model() -> nn.Module:
    torch.manual_seed(0)
    return wrn28_10(num_classes=10)


# --------------------------------------------------------------------------- public surface


def test_public_names_import() -> None:
    for name in models.__all__:
        assert hasattr(models, name), name
    assert set(MODEL_NAMES) == {
        "lenet",
        "mlp",
        "resnet32",
        "cifar_resnet",
        "wrn28_10",
        "wrn",
        "torchvision",
        "lstm",
        "vit_tiny",
    }


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    ("name", "kwargs", "shape"),
    [
        ("lenet", {}, (1, 28, 28)),
        ("lenet", {"input_shape": (1, 32, 32)}, (1, 32, 32)),
        ("lenet", {"input_size": [20, 24]}, (1, 20, 24)),
        ("mlp", {"input_shape": (1, 28, 28)}, (1, 28, 28)),
        ("mlp", {"in_features": 12, "hidden": []}, (3, 2, 2)),
        ("resnet32", {}, (3, 32, 32)),
        ("resnet32", {"shortcut": "B"}, (3, 32, 32)),
        ("cifar_resnet", {"depth": 8}, (3, 32, 32)),
        ("wrn", {"depth": 10, "widen_factor": 2, "dropout": 0.3}, (3, 32, 32)),
        ("torchvision", {"arch": "resnet18"}, (3, 32, 32)),
        ("torchvision", {"arch": "resnet18"}, (3, 64, 64)),
        ("torchvision", {"arch": "resnet18"}, (1, 32, 32)),
        ("torchvision", {"arch": "mobilenet_v3_small"}, (3, 32, 32)),
    ],
)
def test_build_model_output_shape(name: str, kwargs: dict, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=3, in_channels=shape[0], **kwargs)
    assert isinstance(model, nn.Module)
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, 3)


def test_wrn28_10_output_shape(wrn28_10_model: nn.Module) -> None:
    with torch.no_grad():
        assert wrn28_10_model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_build_model_registry_matches_direct_constructors() -> None:
    torch.manual_seed(0)
    built = build_model("wrn", num_classes=5, in_channels=3, depth=10, widen_factor=2)
    torch.manual_seed(0)
    direct = WideResNet(10, 2, 5)
    assert built.state_dict().keys() == direct.state_dict().keys()
    pairs = zip(built.parameters(), direct.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert isinstance(build_model("resnet32", num_classes=2), CifarResNet)
    assert isinstance(build_model("lenet", num_classes=2, in_channels=1), LeNet)


# --------------------------------------------------------------------------- published sizes


def test_resnet32_parameter_count() -> None:
    # He et al. 2016, "Deep Residual Learning for Image Recognition", Table 6: ResNet-32 on
    # CIFAR-10 has 0.46M parameters (option-A shortcuts, which add none).
    count = n_params(resnet32(num_classes=10))
    assert count == 464_154
    assert round(count / 1e6, 2) == 0.46
    # Option B adds 1x1 projections + BatchNorm at the two stage transitions.
    assert n_params(resnet32(num_classes=10, shortcut="B")) == count + (16 * 32 + 64) + (
        32 * 64 + 128
    )


def test_wrn28_10_parameter_count(wrn28_10_model: nn.Module) -> None:
    # Zagoruyko & Komodakis 2016, "Wide Residual Networks", Table 1: WRN-28-10 has 36.5M
    # parameters on CIFAR-10.
    count = n_params(wrn28_10_model)
    assert count == 36_479_194
    assert round(count / 1e6, 1) == 36.5


def test_lenet_matches_official_l2rw_shapes() -> None:
    # Official L2RW code (mnist/reweight.py): convs 5x5 with 16/32/64 filters, 'SAME' max-pools
    # 28 -> 14 -> 7 -> 4, then linear 1024 -> 100 -> output.
    model = LeNet(num_classes=2)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (1, 16, (5, 5)),
        (16, 32, (5, 5)),
        (32, 64, (5, 5)),
    ]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(1024, 100), (100, 2)]
    x = torch.randn(1, 1, 28, 28)
    sizes = []
    for layer in model.features:
        x = layer(x)
        if isinstance(layer, nn.MaxPool2d):
            sizes.append(tuple(x.shape[1:]))
    assert sizes == [(16, 14, 14), (32, 7, 7), (64, 4, 4)]
    # Any input size: the flattened width follows ceil(s / 2) three times.
    for side in (9, 16, 28, 31, 32, 33):
        pooled = math.ceil(math.ceil(math.ceil(side / 2) / 2) / 2)
        assert LeNet(input_size=side).classifier[1].in_features == 64 * pooled * pooled


def test_mlp_layers() -> None:
    model = MLP(in_features=784, num_classes=10, hidden=(100, 50), dropout=0.1)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [
        (784, 100),
        (100, 50),
        (50, 10),
    ]
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == 2
    assert len([m for m in MLP(5, 2, hidden=()).modules() if isinstance(m, nn.Linear)]) == 1


def test_option_a_shortcut_pads_channels_with_zeros() -> None:
    model = resnet32(num_classes=10)
    block = model.layer2[0]
    assert not list(block.shortcut.parameters())  # option A: no weights
    x = torch.randn(2, 16, 32, 32)
    out = block.shortcut(x)
    assert out.shape == (2, 32, 16, 16)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()


# --------------------------------------------------------------------------- initialisation


def test_lenet_init_is_truncated_normal_0_1() -> None:
    torch.manual_seed(0)
    model = LeNet()
    w = model.classifier[1].weight  # 1024 x 100 weights
    assert w.abs().max() <= 0.2
    # Normal(0, 0.1) truncated at ±2σ has std 0.1 * 0.8796.
    assert w.std().item() == pytest.approx(0.1 * 0.8796, rel=0.02)
    assert all(not m.bias.any() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def test_resnet_and_wrn_use_kaiming_init() -> None:
    torch.manual_seed(0)
    conv = resnet32().layer3[1].conv1  # 64 x 64 x 3 x 3, fan_in = fan_out = 576
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 576), rel=0.03)
    wrn = WideResNet(depth=10, widen_factor=2)
    conv = wrn.block1[0].conv1  # 32 x 16 x 3 x 3: fan_out = 288 (MSRinit), fan_in = 144
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 288), rel=0.05)
    for model in (resnet32(), wrn):
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert torch.equal(m.weight, torch.ones_like(m.weight))
                assert not m.bias.any()
    assert not wrn.fc.bias.any()


# --------------------------------------------------------------------------- meta twins


def _lenet() -> nn.Module:
    return LeNet(num_classes=2, in_channels=1)


def _mlp() -> nn.Module:
    return MLP(in_features=28 * 28, num_classes=2)


def _resnet32() -> nn.Module:
    return resnet32(num_classes=3)


def _small_wrn() -> nn.Module:
    return WideResNet(depth=10, widen_factor=1, num_classes=3)


def _resnet18() -> nn.Module:
    return torchvision_model("resnet18", num_classes=3)


# Published input sizes for LeNet / MLP; the CIFAR and ImageNet networks pool adaptively, so
# small images keep these float64 double-backward tests fast without changing what they test.
TWIN_CASES: list[tuple[Callable[[], nn.Module], tuple[int, ...], int]] = [
    (_lenet, (1, 28, 28), 2),
    (_mlp, (1, 28, 28), 2),
    (_resnet32, (3, 8, 8), 3),
    (_small_wrn, (3, 8, 8), 3),
    (_resnet18, (3, 16, 16), 3),
]
TWIN_IDS = ["lenet", "mlp", "resnet32", "wrn-10-1", "tv-resnet18"]


@pytest.mark.parametrize(("factory", "shape", "num_classes"), TWIN_CASES, ids=TWIN_IDS)
def test_meta_twin_matches_model_in_train_and_eval(
    factory: Callable[[], nn.Module], shape: tuple[int, ...], num_classes: int
) -> None:
    torch.manual_seed(0)
    model = factory().double()
    x = torch.randn(2, *shape, dtype=torch.float64)
    with torch.no_grad():  # give BatchNorm running statistics that are not (0, 1)
        for _ in range(2):
            model(torch.randn(2, *shape, dtype=torch.float64) * 2 + 1)
    twin = to_meta(model)

    # Train mode: batch statistics; the twin must not write the running statistics.
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out_twin = twin(x)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(out_twin, model(x))

    # Eval mode: running statistics.
    model.eval()
    twin.bind(model)
    assert not twin.training
    assert torch.equal(twin(x), model(x))
    assert twin(x).shape == (2, num_classes)


@pytest.mark.parametrize(("factory", "shape", "num_classes"), TWIN_CASES, ids=TWIN_IDS)
def test_second_order_gradients_flow(
    factory: Callable[[], nn.Module], shape: tuple[int, ...], num_classes: int
) -> None:
    torch.manual_seed(0)
    model = factory().double()
    x = torch.randn(2, *shape, dtype=torch.float64)
    y = torch.arange(2) % num_classes
    params = list(model.parameters())

    # Hessian-vector product through the plain model: grad(create_graph) then grad again.
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    vec = [torch.randn_like(p) for p in params]
    dot = sum((g * v).sum() for g, v in zip(grads, vec, strict=True))
    hvp = torch.autograd.grad(dot, params, allow_unused=True)
    hvp = [h for h in hvp if h is not None]
    assert hvp and all(torch.isfinite(h).all() for h in hvp)
    assert any(h.abs().sum() > 0 for h in hvp)

    # The L2RW meta-gradient through the twin: d L_meta(θ − lr ∇θ Σ εᵢℓᵢ) / dε.
    twin = to_meta(model)
    eps = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    losses = F.cross_entropy(twin(x), y, reduction="none")
    twin.virtual_step((eps * losses).sum(), lr=0.1)
    x_meta = torch.randn(2, *shape, dtype=torch.float64)
    meta_loss = F.cross_entropy(twin(x_meta), y)
    (eps_grad,) = torch.autograd.grad(meta_loss, eps)
    assert torch.isfinite(eps_grad).all() and eps_grad.abs().sum() > 0
    assert all(p.grad is None for p in params)


# --------------------------------------------------------------------------- torchvision


def test_adapt_input_channels_keeps_response_to_grey_images() -> None:
    torch.manual_seed(0)
    rgb = torchvision_model("resnet18", num_classes=4).eval()
    grey = adapt_input_channels(copy.deepcopy(rgb), 1)
    assert grey.conv1.in_channels == 1 and grey.conv1.kernel_size == (7, 7)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(grey(x), rgb(x.expand(-1, 3, -1, -1)), atol=1e-5)
    assert adapt_input_channels(rgb, 3) is rgb  # already right: unchanged


def test_replace_head() -> None:
    torch.manual_seed(0)
    model = torchvision_model("mobilenet_v3_small", num_classes=1000)
    stem = model.features[0][0].weight.clone()
    replace_head(model, 5)
    assert model.classifier[3].out_features == 5
    assert torch.equal(model.features[0][0].weight, stem)
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    with pytest.raises(ValueError, match=r"no nn\.Linear classifier"):
        replace_head(torchvision_model("squeezenet1_1", num_classes=10), 5)


def test_adapt_input_channels_errors() -> None:
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match=r"is grouped \(groups=2\)"):
        adapt_input_channels(grouped, 1)
    with pytest.raises(ValueError, match=r"has no nn\.Conv2d"):
        adapt_input_channels(nn.Linear(3, 3), 1)

    class WithTransform(nn.Sequential):
        transform_input = True

    with pytest.raises(ValueError, match="transform_input=True"):
        adapt_input_channels(WithTransform(nn.Conv2d(3, 4, 3)), 1)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: build_model("lenet5", 2), ValueError, r"'lenet5' is unknown; allowed: \['lenet'"),
        (lambda: build_model("torchvision", 2), ValueError, r"needs arch=.*model.arch=resnet18"),
        (
            lambda: build_model("torchvision", 2, arch="resnet19"),
            ValueError,
            r"'resnet19' is not a torchvision.*close matches: \['resnet18'.*list_models",
        ),
        (lambda: torchvision_model("zzz", 2), ValueError, r"for example \['alexnet'"),
        (
            lambda: build_model("resnet32", 2, depth=20),
            ValueError,
            r"'resnet32' got unknown key\(s\) \['depth'\]; allowed: \['shortcut'\]",
        ),
        (lambda: build_model("mlp", 2), ValueError, r"'mlp' needs the input size"),
        (
            lambda: build_model("mlp", 2, 1, in_features=10, input_shape=(1, 2, 2)),
            ValueError,
            r"in_features=10 disagrees with input_shape=\(1, 2, 2\)",
        ),
        (
            lambda: build_model("lenet", 2, in_channels=3, input_shape=(1, 28, 28)),
            ValueError,
            r"has 1 channels but in_channels=3",
        ),
        (
            lambda: build_model("lenet", 2, in_channels=1, input_shape=(1, 32, 32), input_size=28),
            ValueError,
            r"input_size=28 disagrees",
        ),
        (lambda: build_model("lenet", 2, input_shape=(784,)), ValueError, r"must be \(C, H, W\)"),
        (lambda: build_model("mlp", 2, input_shape=(0, 2)), ValueError, "positive sizes"),
        (lambda: build_model("mlp", 0, in_features=3), ValueError, r"num_classes must be .*got 0"),
        (lambda: build_model("mlp", 2.0, in_features=3), ValueError, r"num_classes.*got 2\.0"),
        (lambda: build_model("lenet", 2, in_channels=0), ValueError, r"in_channels .*got 0"),
        (
            lambda: build_model("lenet", 2, input_size=[1, 2, 3]),
            ValueError,
            r"model\.input_size must be an integer or a pair \[H,W\] of integers, got \[1, 2, 3\]",
        ),
        # from the command line (model.input_size=abc / =[1,{a:1}]): were "invalid literal for
        # int()" (no key) and a TypeError traceback
        (lambda: build_model("lenet", 2, input_size="abc"), ValueError, r"input_size .*'abc'"),
        (lambda: build_model("lenet", 2, input_size=[1, {"a": 1}]), ValueError, "input_size"),
        (lambda: CifarResNet(depth=33), ValueError, r"depth must be 6n \+ 2.*got 33"),
        (lambda: resnet32(shortcut="C"), ValueError, r"shortcut must be one of \('A', 'B'\)"),
        (lambda: WideResNet(depth=27), ValueError, r"depth must be 6n \+ 4.*got 27"),
        (lambda: WideResNet(depth=10, widen_factor=0), ValueError, "widen_factor must be >= 1"),
        (lambda: WideResNet(depth=10, dropout=1.0), ValueError, r"dropout must be in \[0, 1\)"),
        (lambda: MLP(4, 2, hidden=(3, 0)), ValueError, r"hidden width must be >= 1, got \[3, 0\]"),
        (lambda: MLP(4, 2, dropout=-0.1), ValueError, r"dropout must be in \[0, 1\)"),
        (lambda: LeNet(num_classes=0), ValueError, "num_classes must be >= 1"),
    ],
)
def test_errors_name_the_key_and_allowed_values(
    call: Callable[[], object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        call()


def test_models_package_is_a_leaf() -> None:
    # models/ imports torch and torchvision only: never Hydra or other reweight subpackages.
    for path in Path(models.__file__).parent.glob("*.py"):
        source = path.read_text()
        for forbidden in ("hydra", "omegaconf", "reweight.meta", "reweight.data", "reweight.cli"):
            assert f"import {forbidden}" not in source, (path.name, forbidden)
            assert f"from {forbidden}" not in source, (path.name, forbidden)


# --------------------------------------------------------------------------- configs

# Input shape per config file, chosen to match the architecture's published input.
CONFIG_INPUTS = {
    "lenet": (1, 28, 28),
    "mlp": (1, 28, 28),
    "resnet32": (3, 32, 32),
    "wrn28_10": (3, 32, 32),
    "torchvision": (3, 32, 32),
    "lstm": (1, 28, 28),
    "vit_tiny": (1, 28, 28),
}


def test_every_model_config_is_covered() -> None:
    assert sorted(p.stem for p in CONF_DIR.glob("*.yaml")) == sorted(CONFIG_INPUTS)


@pytest.mark.parametrize("config", sorted(CONFIG_INPUTS))
def test_model_config_instantiates(config: str) -> None:
    cfg = OmegaConf.load(CONF_DIR / f"{config}.yaml")
    assert cfg._target_ == "reweight.models.build_model"
    assert cfg.name in MODEL_NAMES
    assert "num_classes" not in cfg and "in_channels" not in cfg  # the CLI passes them
    shape = CONFIG_INPUTS[config]
    torch.manual_seed(0)
    model = hydra.utils.instantiate(cfg, num_classes=3, in_channels=shape[0])
    assert isinstance(model, nn.Module)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, *shape)).shape == (1, 3)


def test_model_config_overrides() -> None:
    cfg = OmegaConf.load(CONF_DIR / "mlp.yaml")
    cfg.merge_with_dotlist(["input_shape=[3,8,8]", "hidden=[7]"])
    model = hydra.utils.instantiate(cfg, num_classes=4, in_channels=3)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 4)
    assert [m.out_features for m in model.modules() if isinstance(m, nn.Linear)] == [7, 4]
    cfg = OmegaConf.load(CONF_DIR / "torchvision.yaml")
    cfg.merge_with_dotlist(["arch=resnet19"])
    with pytest.raises(InstantiationException, match=r"resnet19.*close matches: .*resnet18"):
        hydra.utils.instantiate(cfg, num_classes=3, in_channels=3)


def test_sequence_models_read_images_as_sequences() -> None:
    """model=lstm reads the 28 rows as 28 steps; model=vit_tiny cuts 7x7 patches of a grey
    image; both refuse a shape they cannot read with one line naming the key."""
    lstm = build_model("lstm", 10, 1, (1, 28, 28), hidden=16, bidirectional=True)
    assert lstm.lstm.input_size == 28 and lstm.head.in_features == 32
    x = torch.randn(3, 1, 28, 28)
    rows = x[:, 0]  # (B, 28 steps, 28 features)
    assert torch.equal(lstm(x), lstm.head(lstm.lstm(rows)[0][:, -1]))
    vit = build_model("vit_tiny", 10, 1, (1, 28, 28))
    assert vit.conv_proj.in_channels == 1 and vit.seq_length == 17
    with pytest.raises(ValueError, match="multiple of patch_size=5"):
        build_model("vit_tiny", 10, 1, (1, 28, 28), patch_size=5)
    with pytest.raises(ValueError, match=r"model 'lstm' needs one image's shape \(C, H, W\)"):
        build_model("lstm", 10, 1, None)
