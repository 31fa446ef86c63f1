"""The Hydra configs, composed with Hydra's compose API: every preset, every group option."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_method
from omegaconf import OmegaConf

from reweight.cli.job import _partial, _trainer_config
from reweight.data.build import COMMON_KEYS, DATASETS, dataset_defaults
from reweight.methods import METHODS, build_method
from reweight.models import MODEL_NAMES
from reweight.train.trainer import TrainerConfig

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
GROUPS = ("dataset", "model", "method", "optimizer", "scheduler", "experiment")
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
# the CIFAR-10 training-set sizes the presets convert epochs with (see their comments)
STEPS_PER_EPOCH = {"mwnet_cifar10_noisy": 49_000 // 100, "mwnet_cifar10_lt": 12_380 // 100}


@pytest.fixture(autouse=True)
def _fresh_hydra():
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


def cfg_of(*overrides: str, hydra: bool = False):
    with initialize_config_module("reweight.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_configs_ship_inside_the_package():
    """conf/ is the package reweight.conf (pyproject's package-dir), so pkg:// finds it."""
    spec = importlib.util.find_spec("reweight.conf")
    assert spec is not None and spec.submodule_search_locations is not None
    assert Path(next(iter(spec.submodule_search_locations))).resolve() == CONF.resolve()


def test_pyproject_lists_every_subpackage():
    text = (REPO / "pyproject.toml").read_text()  # (tomllib is Python >= 3.11 only)
    block = re.search(r"\[tool\.setuptools\]\n(.*?)\n\[", text, flags=re.S)
    assert block is not None, "pyproject.toml has no [tool.setuptools] table"
    listed = set(re.findall(r'"(reweight[\w.]*)"', block.group(1).split("package-dir")[0]))
    found = {
        ".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "reweight").rglob("__init__.py")
    }
    assert found | {"reweight.conf"} <= listed, f"add {sorted(found - listed)} to pyproject.toml"
    assert 'package-dir = { "reweight.conf" = "conf" }' in block.group(1)


def test_defaults_are_the_l2rw_mnist_paper_settings():
    cfg = cfg_of("dataset=mnist_imbalanced")
    assert (cfg.dataset.name, cfg.model.name, cfg.method.name) == (
        "mnist_imbalanced",
        "lenet",
        "l2rw",
    )
    assert OmegaConf.to_container(cfg.optimizer) == {
        "_target_": "torch.optim.SGD",
        "_partial_": True,
        "lr": 1e-3,
        "momentum": 0.9,
        "nesterov": False,
        "weight_decay": 0.0,
    }
    assert (cfg.trainer.max_steps, cfg.trainer.batch_size) == (8000, 100)
    assert cfg.dataset.meta_per_class * 2 == 10  # 10 clean images
    assert OmegaConf.to_container(cfg.scheduler) == {} and cfg.seed == 0 and cfg.resume is True
    # the paper preset pins the same settings
    preset = cfg_of("experiment=l2rw_mnist_imbalance")
    for key in ("dataset", "model", "method", "optimizer", "scheduler"):
        assert preset[key] == cfg[key], key
    assert preset.trainer.max_steps == 8000 and preset.trainer.meta_batch_size == 10


def test_trainer_block_mirrors_trainer_config():
    cfg = cfg_of()
    fields = {f.name: f.default for f in dataclasses.fields(TrainerConfig)} | {"seed": cfg.seed}
    assert set(cfg.trainer) == set(fields) - {"seed"}
    built = _trainer_config(cfg.trainer, cfg.seed)
    assert built == TrainerConfig(**OmegaConf.to_container(cfg.trainer), seed=0)


def test_root_config_has_a_comment_on_every_key():
    """Style: one comment per key, saying what it is and how to override it."""
    text = (CONF / "config.yaml").read_text()
    app = text.split("\nhydra:")[0]  # the app's keys; Hydra's own settings follow
    keys = [line for line in app.splitlines() if re.match(r"^(  )?[a-z_]+:", line)]
    assert len(keys) >= 17
    for line in keys:
        if line != "defaults:":
            assert "  # " in line, f"no comment on: {line!r}"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_preset(experiment):
    text = (CONF / "experiment" / f"{experiment}.yaml").read_text()
    assert text.startswith("# @package _global_"), "presets override the root config"
    cfg = cfg_of(f"experiment={experiment}")
    assert not OmegaConf.missing_keys(cfg)
    method, dataset = experiment.split("_", 1)[0], experiment.split("_", 1)[1]
    assert cfg.method.name == method
    assert cfg.dataset.name.startswith(dataset.split("_")[0].replace("mnist", "mnist_"))
    # everything a run builds before reading data
    build_method(**OmegaConf.to_container(cfg.method, resolve=True))
    _trainer_config(cfg.trainer, cfg.seed)
    optimizer = _partial(cfg.optimizer, "optimizer")
    if "_target_" in cfg.scheduler:
        _partial(cfg.scheduler, "scheduler")
        assert all(0 < m < cfg.trainer.max_steps for m in cfg.scheduler.milestones)
    lrs = {"l2rw_mnist_imbalance": 1e-3, "mwnet_mnist_noisy": 0.05}
    # the real-noise recipes (conf/experiment/*_{clothing1m,food101n,animal10n,mini_webvision})
    real = {"clothing1m": (0.01, 32), "food101n": (0.01, 32), "animal10n": (0.1, 128)}
    lr, batch = real.get(dataset, (0.02, 32) if dataset == "mini_webvision" else (0.1, 100))
    assert optimizer.keywords["lr"] == lrs.get(experiment, lr)
    assert cfg.trainer.batch_size == batch
    if experiment in STEPS_PER_EPOCH:  # epochs converted to optimizer steps
        per_epoch = STEPS_PER_EPOCH[experiment]
        epochs = {"mwnet_cifar10_noisy": (40, [36, 38]), "mwnet_cifar10_lt": (200, [160, 180])}
        total, milestones = epochs[experiment]
        assert cfg.trainer.max_steps == total * per_epoch
        assert list(cfg.scheduler.milestones) == [e * per_epoch for e in milestones]


def test_paper_numbers_of_the_cifar_presets():
    noisy = cfg_of("experiment=mwnet_cifar10_noisy")
    assert (noisy.model.name, noisy.model.depth, noisy.model.widen_factor) == ("wrn", 28, 10)
    assert (noisy.dataset.noise_type, noisy.dataset.noise_rate) == ("uniform", 0.4)
    assert noisy.optimizer.weight_decay == 5e-4 and noisy.dataset.meta_per_class == 100
    lt = cfg_of("experiment=mwnet_cifar10_lt")
    assert (lt.model.name, lt.model.depth, lt.dataset.imbalance_factor) == ("cifar_resnet", 32, 100)
    assert lt.optimizer.weight_decay == 5e-4 and lt.method.normalize == "sum"
    l2rw = cfg_of("experiment=l2rw_cifar10_noisy")
    assert l2rw.model.name == "wrn" and l2rw.model.dropout == 0.3
    assert list(l2rw.scheduler.milestones) == [40_000, 50_000] and l2rw.trainer.max_steps == 60_000


@pytest.mark.parametrize("option", options("dataset"))
def test_dataset_option(option):
    cfg = cfg_of(f"dataset={option}")
    assert cfg.dataset.name == option and option in DATASETS
    assert set(cfg.dataset) == set(COMMON_KEYS) | set(dataset_defaults(option))


# method options that are another method with some keys changed (a sweep can list them beside
# the others, where a key set once would reach every method): option -> (method, its changes)
VARIANTS = {"mwnet_sum": ("mwnet", {"normalize": "sum"})}


@pytest.mark.parametrize("option", options("method"))
def test_method_option(option):
    cfg = cfg_of(f"method={option}")
    name, changes = VARIANTS.get(option, (option, {}))
    assert cfg.method.name == name and name in METHODS
    base = OmegaConf.to_container(cfg_of(f"method={name}").method)
    assert OmegaConf.to_container(cfg.method) == base | changes
    assert all(base[k] != v for k, v in changes.items())  # a variant changes something
    method = build_method(**OmegaConf.to_container(cfg.method, resolve=True))
    assert method.name == name
    assert set(options("method")) == set(METHODS) | set(VARIANTS)  # one config per method


def test_noisy_mnist_sweep_composes():
    """The documented sweep lists method=erm,...,mwnet_sum beside the preset: each composes,
    and only the MW-Net variant gets the preset's weighting."""
    for option in ("erm", "class_balanced", "l2rw", "mwnet_sum"):
        cfg = cfg_of("experiment=mwnet_mnist_noisy", f"method={option}", "dataset.noise_type=flip")
        build_method(**OmegaConf.to_container(cfg.method, resolve=True))
        assert (cfg.model.name, cfg.dataset.train_per_class, cfg.trainer.grad_clip) == (
            "mlp",
            500,
            1.0,
        )
        assert ("normalize" in cfg.method) == (option == "mwnet_sum")


@pytest.mark.parametrize("option", options("model"))
def test_model_option(option):
    cfg = cfg_of(f"model={option}")
    assert get_method(cfg.model._target_) is not None and cfg.model.name in MODEL_NAMES
    small = {"wrn28_10": ["model.depth=10", "model.widen_factor=1"]}.get(option, [])
    cfg = cfg_of(f"model={option}", *small)
    from hydra.utils import instantiate

    grey = ("lenet", "mlp", "lstm", "vit_tiny")
    in_channels, shape = (1, [1, 28, 28]) if option in grey else (3, [3, 32, 32])
    model = instantiate(
        cfg.model, num_classes=3, in_channels=in_channels, input_shape=shape, _convert_="all"
    )
    model.eval()
    assert model(torch.zeros(2, *shape)).shape == (2, 3)


@pytest.mark.parametrize("option", options("optimizer"))
def test_optimizer_option(option):
    factory = _partial(cfg_of(f"optimizer={option}").optimizer, "optimizer")
    optimizer = factory([torch.zeros(2, requires_grad=True)])
    assert type(optimizer).__name__.lower() == option


@pytest.mark.parametrize("option", options("scheduler"))
def test_scheduler_option(option):
    extra = ["scheduler.milestones=[10,20]"] if option == "multistep" else []
    cfg = cfg_of(f"scheduler={option}", "trainer.max_steps=30", *extra)
    if option == "none":
        assert OmegaConf.to_container(cfg.scheduler) == {}
        return
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = _partial(cfg.scheduler, "scheduler")(optimizer)
    for _ in range(30):
        optimizer.step()
        scheduler.step()
    final = optimizer.param_groups[0]["lr"]
    assert final == pytest.approx(0.01 if option == "multistep" else 0.0, abs=1e-12)


def test_multistep_needs_its_milestones():
    cfg = cfg_of("scheduler=multistep")
    assert OmegaConf.missing_keys(cfg) == {"scheduler.milestones"}


def test_run_and_sweep_directories():
    """The run directory follows from the command line (so the same command resumes)."""
    cfg = cfg_of("trainer.max_steps=20", "seed=1", "resume=false", "threads=1", hydra=True)
    assert cfg.hydra.run.dir == "outputs/mnist_imbalanced/l2rw/trainer.max_steps=20/seed1"
    assert Path(cfg_of(hydra=True).hydra.run.dir) == Path("outputs/mnist_imbalanced/l2rw/seed0")
    assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == "${hydra.job.num}"
    assert cfg.hydra.callbacks.aggregate._target_ == "reweight.cli.AggregateSweep"
    assert cfg.hydra.job.chdir is False and cfg.hydra.job.name == "train"


@pytest.mark.parametrize(
    ("option", "plugin", "target"),
    [
        ("parallel", "hydra_plugins.hydra_joblib_launcher", "JoblibLauncher"),
        ("slurm", "hydra_plugins.hydra_submitit_launcher", "SlurmLauncher"),
    ],
)
def test_launcher_config(option, plugin, target):
    pytest.importorskip(plugin, reason=f"optional launcher plugin {plugin} is not installed")
    cfg = cfg_of(f"hydra/launcher={option}", hydra=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    if option == "parallel":
        assert cfg.hydra.launcher.n_jobs == 2 and cfg.hydra.launcher.prefer == "processes"
    else:
        assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.timeout_min == 1440
