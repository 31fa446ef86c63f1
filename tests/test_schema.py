"""The config schema (reweight/schema.py): every shipped config passes, every conf key is typed,
a bad value is refused with one line naming the key."""

from __future__ import annotations

import dataclasses
import doctest
import inspect
import typing
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_method
from omegaconf import OmegaConf

import reweight.schema
from reweight.schema import (
    OPTIMIZER_SCHEMAS,
    SCHEDULER_SCHEMAS,
    RunConfig,
    TargetConfig,
    schema_classes,
    validate_config,
)
from reweight.trainer import TrainerConfig, resolve_device

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
GROUPS = ("dataset", "model", "method", "optimizer", "scheduler")
# options that cannot be composed on their own: the extra override they need
NEEDS = {("scheduler", "multistep"): ["scheduler.milestones=[10,20]"]}


@pytest.fixture(autouse=True)
def _fresh_hydra():
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


def cfg_of(*overrides: str):
    with initialize_config_module("reweight.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def group_schema(group: str, node: dict) -> tuple[type, bool]:
    """The schema dataclass the config node of ``group`` is checked against, and whether the
    group is open (takes keys the schema does not type)."""
    root, open_groups = schema_classes({group: node})
    return typing.get_type_hints(root)[group], group in open_groups


def keys_of(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


OPTIONS = [pytest.param(g, o, id=f"{g}={o}") for g in GROUPS for o in options(g)]


# -- no false refusals -------------------------------------------------------------------------


@pytest.mark.parametrize(("group", "option"), OPTIONS)
def test_every_group_option_passes(group, option):
    cfg = cfg_of(f"{group}={option}", *NEEDS.get((group, option), []))
    checked = validate_config(cfg)
    # same keys, same values: the schema adds no key and drops none (_target_ included)
    assert OmegaConf.to_container(checked) == OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_preset_passes(experiment):
    cfg = cfg_of(f"experiment={experiment}")
    checked = validate_config(cfg)
    assert OmegaConf.to_container(checked) == OmegaConf.to_container(cfg, resolve=True)


def test_validated_config_is_typed_and_resolved():
    cfg = cfg_of("optimizer.lr=1", "scheduler=cosine", "trainer.max_steps=30")
    checked = validate_config(cfg)
    assert isinstance(checked.optimizer.lr, float) and checked.optimizer.lr == 1.0
    assert checked.scheduler.T_max == 30  # ${trainer.max_steps}, resolved
    assert checked.method.meta_grad == "unrolled"  # ${meta_grad}
    assert checked.model._target_ == "reweight.models.build_model"
    assert OmegaConf.is_struct(checked) and "${" not in OmegaConf.to_yaml(checked)


# -- every conf key has a type -----------------------------------------------------------------


@pytest.mark.parametrize(("group", "option"), OPTIONS)
def test_every_key_of_every_option_is_typed(group, option):
    """A new key in conf/<group>/<option>.yaml fails here until the schema types it: declared
    by the constructor it feeds (methods, datasets, models, TrainerConfig) or, for a torch
    target, in reweight/schema.py."""
    node = yaml.safe_load((CONF / group / f"{option}.yaml").read_text()) or {}
    cls, _ = group_schema(group, node)
    assert cls is not TargetConfig, f"{group}={option}: no schema for {node.get('_target_')}"
    assert set(node) <= keys_of(cls), f"untyped: {sorted(set(node) - keys_of(cls))}"


def test_every_key_of_the_root_config_is_typed():
    text = yaml.safe_load((CONF / "config.yaml").read_text())
    app = {k: v for k, v in text.items() if k not in ("defaults", "hydra")}
    root, _ = schema_classes(cfg_of())
    assert set(app) <= keys_of(root), sorted(set(app) - keys_of(root))
    assert set(app) - set(GROUPS) - {"trainer"} == keys_of(RunConfig)
    trainer = typing.get_type_hints(root)["trainer"]
    assert set(app["trainer"]) == keys_of(trainer)
    # derived from TrainerConfig, not repeated: its fields less seed (a root key)
    assert keys_of(trainer) == {f.name for f in dataclasses.fields(TrainerConfig)} - {"seed"}


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_key_of_every_experiment_preset_is_typed(experiment):
    preset = yaml.safe_load((CONF / "experiment" / f"{experiment}.yaml").read_text())
    cfg = cfg_of(f"experiment={experiment}")
    root, _ = schema_classes(OmegaConf.to_container(cfg, resolve=True))
    hints = typing.get_type_hints(root)
    for group, node in preset.items():
        if group == "defaults":
            continue
        assert group in hints, f"{group} is not a key of the root config"
        if isinstance(node, dict):
            assert hints[group] is not TargetConfig
            assert set(node) <= keys_of(hints[group]), (group, set(node) - keys_of(hints[group]))


@pytest.mark.parametrize("schema", [*OPTIMIZER_SCHEMAS.items(), *SCHEDULER_SCHEMAS.items()])
def test_torch_schemas_name_arguments_of_their_target(schema):
    """The hand-written schemas: each key is an argument of the target in the installed torch."""
    target, cls = schema
    params = inspect.signature(get_method(target)).parameters
    assert keys_of(cls) - {"_target_", "_partial_"} <= set(params), target


def test_docstring_examples():
    result = doctest.testmod(reweight.schema)
    assert result.attempted > 0 and result.failed == 0


# -- refusals, in-process ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["resume=yes"], "resume must be true or false, got 'yes'"),
        (["trainer.progress=2"], "trainer.progress must be true or false or null, got 2"),
        (["optimizer.nesterov=1"], "optimizer.nesterov must be true or false, got 1"),
        (["trainer.grad_clip=inf"], "trainer.grad_clip must be a finite number, got inf"),
        (["model=mlp", "model.hidden=[1,x]"],
         "model.hidden must be a list of integers, got [1, 'x']"),
        (["model=mlp", "model.dropout=nan"], "model.dropout must be a finite number, got nan"),
        (["scheduler=multistep", "scheduler.milestones=[]"],
         "scheduler.milestones must list at least one optimizer step, got []"),
        (["scheduler=multistep", "scheduler.milestones=[0,5]"],
         "scheduler.milestones must be increasing positive optimizer steps"),
        (["scheduler=cosine", "scheduler.T_max=abc"],
         "scheduler.T_max must be an integer, got 'abc'"),
        (["optimizer=adam", "optimizer.betas=[0.9]"],
         "optimizer.betas must be a pair of numbers in [0, 1)"),
        (["+optimizer.foo=1"],
         "optimizer.foo is not a key of optimizer (torch.optim.SGD); allowed: "
         "_target_, _partial_, lr, momentum, dampening"),
        (["+trainer.seed=1"], "trainer.seed is not a key of trainer (TrainerConfig)"),
        (["model=lenet", "+model.depth=3"],
         "model.depth is not a key of model (lenet); allowed: "
         "_target_, name, input_shape, input_size"),
        (["dataset.name=imagenet"], "dataset.name must be one of mnist_imbalanced, mnist_noisy"),
        (["meta_grad=fsat"], "meta_grad must be one of ['unrolled', 'fast'], got 'fsat'"),
        (["threads=0"], "threads must be an integer >= 1, got 0"),
        (["trainer.device=cuda:x"], "trainer.device must be cpu, cuda, cuda:<index> or auto"),
    ],
)  # fmt: skip
def test_bad_values_are_refused_with_the_key(overrides, message):
    with pytest.raises(ValueError) as info:
        validate_config(cfg_of(*overrides))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_batch_must_split_over_the_processes():
    cfg = cfg_of("trainer.batch_size=15")
    assert validate_config(cfg, world_size=1).trainer.batch_size == 15
    with pytest.raises(ValueError, match=r"trainer.batch_size \(15\) must be divisible by the "):
        validate_config(cfg, world_size=2)


def test_cuda_without_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match=r"trainer\.device='cuda' but CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match=r"trainer\.device='cuda' but CUDA is not available"):
        validate_config(cfg_of("trainer.device=cuda"))
    assert resolve_device("auto") == torch.device("cpu")


def test_cuda_index_past_the_last_gpu_is_refused():
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match=r"trainer.device='cuda:99' but "):
        resolve_device("cuda:99")
    if count:  # on a GPU machine: the message says which indices exist
        with pytest.raises(ValueError, match=f"cuda:0 to cuda:{count - 1}"):
            resolve_device("cuda:99")
