"""The config schema (reweight/cli/schema.py): every shipped config passes, every conf key is typed,
and a bad value is refused before any work: one line naming the key, exit 2, nothing written."""

from __future__ import annotations

import dataclasses
import inspect
import sys
import typing
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_method
from omegaconf import OmegaConf

from reweight import cli
from reweight.cli.keys import OPTIMIZER_SCHEMAS, SCHEDULER_SCHEMAS, RunConfig, TargetConfig
from reweight.cli.schema import schema_classes, validate_config
from reweight.core.device import resolve_device
from reweight.train.trainer import TrainerConfig

from .helpers import REWEIGHT, cli_env, run_command, torchrun

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
GROUPS = ("dataset", "model", "method", "optimizer", "scheduler", "logger")
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
    checked = cli.validate(cfg)  # the schema and the constructors the CLI runs before any work
    # same keys, same values: the schema adds no key and drops none (_target_ included)
    assert OmegaConf.to_container(checked) == OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_preset_passes(experiment):
    cfg = cfg_of(f"experiment={experiment}")
    checked = cli.validate(cfg)
    assert OmegaConf.to_container(checked) == OmegaConf.to_container(cfg, resolve=True)


def test_validated_config_is_typed_and_resolved():
    cfg = cfg_of("optimizer.lr=1", "scheduler=cosine", "trainer.max_steps=30")
    checked = validate_config(cfg)
    assert isinstance(checked.optimizer.lr, float) and checked.optimizer.lr == 1.0
    assert checked.scheduler.T_max == 30  # ${trainer.max_steps}, resolved
    assert checked.method.meta_grad == "fast"  # ${meta_grad}, the default
    assert checked.model._target_ == "reweight.models.build_model"
    assert OmegaConf.is_struct(checked) and "${" not in OmegaConf.to_yaml(checked)


def test_open_options_take_extra_keys():
    """A torchvision model passes extra keywords on; an optimizer the schema does not know
    keeps its keys (the CLI checks them against the target's signature)."""
    cfg = cfg_of("model=torchvision", "+model.aux_logits=false")
    assert validate_config(cfg).model.aux_logits is False
    # (NAdam: an optimizer with no schema here; AdamW has one since conf/optimizer/adamw.yaml)
    cfg = cfg_of(
        "optimizer=adam", "optimizer._target_=torch.optim.NAdam", "+optimizer.momentum_decay=0.01"
    )
    assert cli.validate(cfg).optimizer.momentum_decay == 0.01
    cfg = cfg_of(
        "optimizer=adam", "optimizer._target_=torch.optim.NAdam", "+optimizer.momentum_dcay=0.01"
    )
    with pytest.raises(ValueError, match=r"optimizer\.momentum_dcay is not an argument of NAdam"):
        cli.validate(cfg)


# -- every conf key has a type -----------------------------------------------------------------


@pytest.mark.parametrize(("group", "option"), OPTIONS)
def test_every_key_of_every_option_is_typed(group, option):
    """A new key in conf/<group>/<option>.yaml fails here until the schema types it: declared
    by the constructor it feeds (methods, datasets, models, TrainerConfig) or, for a torch
    target, in reweight/cli/schema.py."""
    node = yaml.safe_load((CONF / group / f"{option}.yaml").read_text()) or {}
    for base in [d for d in node.pop("defaults", []) if d != "_self_"]:  # a variant of `base`
        node = (yaml.safe_load((CONF / group / f"{base}.yaml").read_text()) or {}) | node
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
        (["meta_grad=fsat"], "meta_grad must be one of ['fast', 'unrolled'], got 'fsat'"),
        (["threads=0"], "threads must be an integer >= 1, got 0"),
        (["malloc=jemalloc"], "malloc must be one of tuned, system"),
        (["trainer.device=cuda:x"], "trainer.device must be cpu, cuda, cuda:<index> or auto"),
    ],
)  # fmt: skip
def test_bad_values_are_refused_with_the_key(overrides, message):
    with pytest.raises(ValueError) as info:
        validate_config(cfg_of(*overrides))
    assert message in str(info.value) and "\n" not in str(info.value)


# Keys whose type the schema leaves to their constructor (a union such as ``str | list[str]``
# or ``int | tuple``), which refuses a wrong value later, still before anything is written:
# method.meta_params when the method is set up (first step), model.input_size when the model
# is built (tests/test_models.py).
CHECKED_LATER = {"method.meta_params", "model.input_size"}


def wrong_values(value) -> list:
    """Values of the wrong kind for a key whose default is ``value`` (as the command line's
    parser would give them: ``x=abc`` is a string, ``x=[1,2]`` a list)."""
    if isinstance(value, bool):
        return [2, "maybe"]
    if isinstance(value, int):
        return ["abc"]  # (not 1.5: some keys with an integer default take any number)
    if isinstance(value, float):
        return ["abc", float("nan")]
    if isinstance(value, list):
        return ["abc"]
    if isinstance(value, str):
        return [[1, 2]]
    return [[1, {"a": 1}]]  # None: whatever the key takes, not a list holding a mapping


def leaves(node: dict, prefix: str = ""):
    for name, value in node.items():
        if isinstance(value, dict):  # logger.csv: {} (no key)
            yield from leaves(value, f"{prefix}{name}.")
        elif not name.startswith("_"):  # _target_, _partial_: not a user's value
            yield f"{prefix}{name}", value


@pytest.mark.parametrize(("group", "option"), [("root", "default"), *[p.values for p in OPTIONS]])
def test_every_key_with_a_wrong_value_is_one_line_naming_it(group, option):
    """Every key of every option of conf/ (and the root config's), set to each value of the
    wrong kind: refused before any work with one config error line naming the key (what
    ``python -m reweight`` prints as ``error: ...``, exit status 2)."""
    from reweight.cli.errors import is_config_error, one_line

    base = [] if group == "root" else [f"{group}={option}", *NEEDS.get((group, option), [])]
    cfg = cfg_of(*base)
    values = OmegaConf.to_container(cfg, resolve=True)
    node = (
        {k: v for k, v in values.items() if k not in GROUPS}
        if group == "root"
        else {group: values[group] or {}}
    )
    for key, value in leaves(node):
        if key in CHECKED_LATER:
            continue
        for wrong in wrong_values(value):
            bad = cfg.copy()
            OmegaConf.update(bad, key, wrong, merge=False)
            with pytest.raises(Exception) as info:  # any: which one is the finding
                cli.validate(bad)
            assert is_config_error(info.value, task=cli.train), (key, wrong, info.value)
            line = one_line(info.value, task=cli.train)
            assert "\n" not in line and key.split(".")[-1] in line, (key, wrong, line)


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


# -- refusals, from the command line -------------------------------------------------------------

CASES = [
    (["optimizer.lr=nan"], "optimizer.lr must be a finite number, got nan"),
    (["optimizer.lr=inf"], "optimizer.lr must be a finite number, got inf"),
    (["optimizer.lr=-inf"], "optimizer.lr must be a finite number, got -inf"),
    (["method=mwnet", "method.lr=nan"], "method.lr must be a finite number, got nan"),
    (["optimizer.weight_decay=nan"], "optimizer.weight_decay must be a finite number, got nan"),
    (["optimizer.lr=abc"], "optimizer.lr must be a number, got 'abc'"),
    (["trainer.max_steps=ten"], "trainer.max_steps must be an integer, got 'ten'"),
    (["trainer.device=tpu"], "trainer.device must be cpu, cuda, cuda:<index> or auto, got 'tpu'"),
    (["trainer.device=cuda:99"], "trainer.device='cuda:99' but "),
    (["scheduler=multistep", "scheduler.milestones=abc"],
     "scheduler.milestones must be a list of integers, got 'abc'"),
    (["scheduler=multistep", "scheduler.milestones=[6000,4000]"],
     "scheduler.milestones must be increasing positive optimizer steps (e.g. [4000,6000]), "
     "got [6000, 4000]"),
    (["optimizer=adam", "optimizer.betas=abc"],
     "optimizer.betas must be a pair of numbers, got 'abc'"),
    (["optimizer=adam", "optimizer.betas=[0.9,1.5]"],
     "optimizer.betas must be a pair of numbers in [0, 1), e.g. [0.9,0.999], got [0.9, 1.5]"),
    (["trainer.max_steps=0"], "trainer.max_steps must be >= 1, got 0"),  # TrainerConfig's own
    (["optimizer.lr=-1"], "optimizer (SGD): Invalid learning rate: -1.0"),  # torch's own
    (["method.name=[l2rw,erm]"], "method.name must be one of"),  # was a TypeError traceback
    (["model.name=[mlp]"], "model name ['mlp'] is unknown; allowed: "),
]  # fmt: skip
BATCH_15 = (
    "error: trainer.batch_size (15) must be divisible by the number of processes (2): "
    "each takes an equal shard of every batch"
)


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every path under ``root`` with its mode, mtime and (for files) contents."""
    out = {}
    for path in sorted(root.rglob("*")):
        stat = path.lstat()
        data = path.read_bytes() if path.is_file() else b""
        out[str(path.relative_to(root))] = (stat.st_mode, stat.st_mtime_ns, data)
    return out


class Unchanged:
    """Asserts that the tree under ``tmp_path`` (one file in it beforehand) does not change,
    and that neither the run directory nor ``outputs/`` appears."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path
        (tmp_path / "existing.txt").write_text("a file that must stay as it is\n")
        self.before = snapshot(tmp_path)

    def check(self) -> None:
        assert snapshot(self.root) == self.before, "the refused run changed the tree"
        assert not (self.root / "run").exists() and not (self.root / "outputs").exists()


def main_in_process(monkeypatch, capsys, tmp_path: Path, args: list[str], **env: str):
    """``cli.main()`` in this process (Hydra, the callback, the one-line report), as
    ``python -m reweight`` runs it; returns (exit status, stderr lines)."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "HYDRA_FULL_ERROR"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    argv = ["reweight", *args, "hydra/hydra_logging=none", f"hydra.run.dir={tmp_path / 'run'}"]
    monkeypatch.setattr(sys, "argv", argv)
    tree = Unchanged(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    tree.check()
    return exit_info.value.code, capsys.readouterr().err.splitlines()


def in_subprocess(tmp_path: Path, args: list[str], command: list[str] | None = None, **env: str):
    """The real command line (``python -m reweight`` or ``command``) with ``args`` into
    ``<tmp>/run``; returns (exit status, stderr lines, the process)."""
    tree = Unchanged(tmp_path)
    proc = run_command(
        [*(command or REWEIGHT), *args, f"hydra.run.dir={tmp_path / 'run'}"],
        tmp_path,
        timeout=300,
        env=cli_env(**env),
    )
    tree.check()
    return proc.returncode, proc.stderr.splitlines(), proc


@pytest.mark.parametrize(("args", "message"), [pytest.param(*c, id=" ".join(c[0])) for c in CASES])
def test_cli_refuses_before_any_work(monkeypatch, capsys, tmp_path, args, message):
    code, lines = main_in_process(monkeypatch, capsys, tmp_path, args)
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), lines


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(*c, id=" ".join(c[0]), marks=[pytest.mark.slow] if i else [])
        for i, c in enumerate(CASES)
    ],
)
def test_cli_refuses_before_any_work_in_a_subprocess(tmp_path, args, message):
    """What a user sees (each case takes a fresh interpreter, ~10 s on 2 cores: the first
    runs by default, the others with the slow tests)."""
    code, lines, proc = in_subprocess(tmp_path, args)
    assert code == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), lines
    assert proc.stdout == ""


def test_cli_other_ranks_refuse_silently(monkeypatch, capsys, tmp_path):
    """Under torchrun every rank refuses alike, before joining the process group (none is
    joined here: no MASTER_ADDR); rank 0 alone prints the line, the others exit 2 silently."""
    args = ["trainer.batch_size=15"]
    world = {"WORLD_SIZE": "2"}
    code, lines = main_in_process(monkeypatch, capsys, tmp_path, args, RANK="1", **world)
    assert (code, lines) == (2, [])
    code, lines = main_in_process(monkeypatch, capsys, tmp_path, args, RANK="0", **world)
    assert (code, lines) == (2, [BATCH_15])


@pytest.mark.slow
def test_cli_other_ranks_refuse_silently_in_a_subprocess(tmp_path):
    args = ["trainer.batch_size=15"]
    code, lines, _ = in_subprocess(tmp_path, args, RANK="1", LOCAL_RANK="1", WORLD_SIZE="2")
    assert (code, lines) == (2, [])
    code, lines, _ = in_subprocess(tmp_path, args, RANK="0", LOCAL_RANK="0", WORLD_SIZE="2")
    assert (code, lines) == (2, [BATCH_15])


@pytest.mark.slow
def test_torchrun_prints_the_error_once(tmp_path):
    """The real torchrun: one `error:` line (rank 0's), no run directory. torchrun itself then
    reports its workers' failure (exit status 1, a ChildFailedError traceback and summary that
    names rank 0's exit status 2): to its agent every non-zero worker status is a failure."""
    code, lines, proc = in_subprocess(tmp_path, ["trainer.batch_size=15"], command=torchrun())
    assert [line for line in lines if line.startswith("error: ")] == [BATCH_15], proc.stderr
    assert code == 1 and "ChildFailedError" in proc.stderr
    assert "exitcode  : 2" in proc.stderr  # the worker's own status, in torchrun's summary
