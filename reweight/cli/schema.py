"""The schema of a run's config: the type of every key, checked before any work.

``conf/*.yaml`` owns the defaults; this module owns the types, and reads each from where the
key is consumed, so that a new argument is typed where it is written:

- the root keys ``seed``, ``resume``, ``meta_grad``, ``threads``, ``malloc``, ``objective``,
  ``objective_allow_test``: :class:`RunConfig`;
- ``logger``: :class:`LoggerConfig`, one dataclass per option of ``conf/logger/``;
- ``trainer``: the fields of :class:`reweight.train.TrainerConfig` (less ``seed``, a root key);
- ``method``: the constructor of the class that ``method.name`` names (``reweight.methods``);
- ``dataset``: :func:`reweight.data.build_dataset`'s ``name``, ``root``, ``seed``, ``download``
  and the keyword arguments of the builder that ``dataset.name`` names;
- ``model``: ``_target_``, ``name``, ``input_shape`` and the keyword-only arguments of the
  builder that ``model.name`` names (``reweight.models.build_model``);
- ``optimizer`` and ``scheduler``: one dataclass per torch target the configs use
  (``reweight.cli.keys``, with the root keys, the loggers and the rules of single keys).
  Another ``_target_`` gets only ``_target_`` and ``_partial_`` typed.

:func:`validate_config` merges a composed config onto the schema of the options it selects
(OmegaConf structured configs: a value of the wrong type is refused, ``"10"`` becomes ``10``),
then applies what OmegaConf does not: booleans must be booleans (OmegaConf would read ``2`` or
``"yes"`` as true), every float must be finite, and the few rules of single keys
(``trainer.device`` exists here, milestones increase, betas lie in [0, 1), the batch splits
over the processes). Each refusal is a ``ValueError`` whose message is one line naming the full
key, the value and what is expected. Ranges that a constructor checks (``TrainerConfig``,
the method classes, torch's optimizers) stay there; the CLI runs those constructors right after
this, still before Hydra creates the run directory (``reweight.cli.job.validate``).

Why a merge in code and not Hydra ConfigStore schemas: the keys of a group differ between its
options (``model=lenet`` and ``model=mlp`` share two), so each option would need its own
registered schema named in a ``defaults`` list of every YAML file, and the schemas would only
exist once something imported and registered them. Chosen here by ``name`` / ``_target_``, the
YAML files stay as they are, the library needs only OmegaConf, and the messages are ours.

Example (a complete config comes from Hydra's compose API)::

    from hydra import compose, initialize_config_module
    with initialize_config_module("reweight.conf", version_base="1.3"):
        cfg = compose("config", overrides=["scheduler=multistep", "scheduler.milestones=abc"])
    validate_config(cfg)
    # ValueError: scheduler.milestones must be a list of integers, got 'abc'
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import math
import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import field
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from reweight.cli.keys import (
    OBJECTIVES,
    OPTIMIZER_SCHEMAS,
    SCHEDULER_SCHEMAS,
    LoggerConfig,
    NoSchedulerConfig,
    Rule,
    RunConfig,
    TargetConfig,
    at_least,
    device_rule,
    key,
    meta_source_rule,
)
from reweight.core.distributed import check_batch_split
from reweight.data._validate import check_choice
from reweight.data.build import (
    COMMON_KEYS,
    DATASETS,
    build_dataset,
    dataset_builder,
)
from reweight.data.build import dataset_defaults as _dataset_defaults
from reweight.methods import method_class
from reweight.models.factory import build_model, model_builder
from reweight.train.trainer import TrainerConfig

__all__ = ["OBJECTIVES", "config_type", "schema_classes", "validate_config"]

MODEL_TARGET = "reweight.models.build_model"


# -- schemas derived from signatures -------------------------------------------------------------


def config_type(annotation: Any) -> Any:
    """The OmegaConf type for a Python annotation: ``int``, ``float``, ``bool``, ``str``,
    ``list[X]`` for a sequence of one of those, a fixed ``tuple[...]`` as is, ``X | None``;
    ``str`` for ``str | os.PathLike``; ``Any`` where OmegaConf has no type (a union of two
    kinds such as ``int | str``: the constructor checks those itself).

    >>> config_type(int | None), config_type(collections.abc.Sequence[int])
    (int | None, list[int])
    >>> config_type(str | os.PathLike | None), config_type(int | str)
    (str | None, typing.Any)
    """
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        if str in members:  # a path given as a string
            members = [m for m in members if not _is_pathlike(m)]
        if len(members) != 1:
            return Any
        inner = config_type(members[0])
        return inner | None if inner is not Any and len(members) < len(args) else inner
    if annotation in (int, float, bool, str):
        return annotation
    if origin is tuple and args and args[-1] is not Ellipsis:
        if all(a in (int, float, bool, str) for a in args):
            return annotation
        return Any
    if origin in (list, tuple, collections.abc.Sequence, collections.abc.Iterable):
        element = config_type(args[0]) if args else Any
        return list[element] if element in (int, float, bool, str) else Any
    return Any


def _is_pathlike(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, os.PathLike)


def _derived(
    name: str,
    hints: Mapping[str, Any],
    keys: list[str],
    rules: Mapping[str, Rule] | None = None,
    base: type | None = None,
) -> type:
    """A schema dataclass ``name`` of ``keys``, each typed by ``config_type(hints[key])``."""
    rules = rules or {}
    fields = [(k, config_type(hints.get(k, Any)), key(rules.get(k))) for k in keys]
    return dataclasses.make_dataclass(name, fields, bases=(base,) if base else ())


def _hints(func: Callable[..., Any]) -> dict[str, Any]:
    target = func.__init__ if inspect.isclass(func) else func  # type: ignore[misc]
    return typing.get_type_hints(target)


def _trainer_schema() -> type:
    """``TrainerConfig``'s fields, less ``seed`` (the root key ``seed`` fills it)."""
    keys = [f.name for f in dataclasses.fields(TrainerConfig) if f.name != "seed"]
    return _derived(
        "TrainerConfig", typing.get_type_hints(TrainerConfig), keys, {"device": device_rule}
    )


def _method_schema(name: str) -> type:
    cls = method_class(name)
    params = inspect.signature(cls).parameters.values()
    keys = [
        "name",
        *(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)),
    ]
    return _derived(name, {"name": str, **_hints(cls)}, keys)


def _dataset_schema(name: str) -> type:
    check_choice("dataset.name", name, DATASETS)
    hints = {**_hints(dataset_builder(name)), **_hints(build_dataset)}
    keys = [*COMMON_KEYS, *_dataset_defaults(name)]
    rules = {
        "meta_source": meta_source_rule,
        "meta_warmup": at_least(0),
        "meta_refresh": at_least(0),
    }
    return _derived(name, hints, keys, rules)


def _model_schema(target: str | None, name: Any) -> tuple[type, bool]:
    """The schema of a ``model`` block and whether it is open (takes keys it does not type)."""
    if target != MODEL_TARGET:
        return TargetConfig, True
    builder = model_builder(name)
    params = inspect.signature(builder).parameters.values()
    own = [p.name for p in params if p.kind is p.KEYWORD_ONLY]
    open_ = any(p.kind is p.VAR_KEYWORD for p in params)
    hints = {"_target_": str, "name": str, **_hints(builder), **_hints(build_model)}
    return _derived(name, hints, ["_target_", "name", "input_shape", *own]), open_


def schema_classes(values: Mapping[str, Any]) -> tuple[type, frozenset[str]]:
    """The schema dataclass of the config ``values`` (the root keys and one schema per group,
    chosen by ``dataset.name``, ``method.name``, ``model._target_`` / ``model.name`` and the
    ``_target_`` of ``optimizer`` and ``scheduler``), and the groups left open to keys it does
    not type (a ``_target_`` without a schema here, a torchvision model's extra keywords).

    An unknown dataset, method or model name raises ``ValueError`` with the allowed names.
    """
    groups: dict[str, type] = {"trainer": _trainer_schema()}
    if isinstance(values.get("logger"), Mapping):
        groups["logger"] = LoggerConfig
    open_groups = set()
    method, dataset = values.get("method"), values.get("dataset")
    if isinstance(method, Mapping):
        groups["method"] = _method_schema(method.get("name"))
    if isinstance(dataset, Mapping):
        groups["dataset"] = _dataset_schema(dataset.get("name"))
    model = values.get("model")
    if isinstance(model, Mapping):
        groups["model"], is_open = _model_schema(model.get("_target_"), model.get("name"))
        if is_open:
            open_groups.add("model")
    for group, known in (("optimizer", OPTIMIZER_SCHEMAS), ("scheduler", SCHEDULER_SCHEMAS)):
        node = values.get(group)
        if not isinstance(node, Mapping):
            continue
        if not node and group == "scheduler":
            groups[group] = NoSchedulerConfig
        elif node.get("_target_") in known:
            groups[group] = known[node["_target_"]]
        else:
            groups[group] = TargetConfig
            open_groups.add(group)
    fields = [(g, cls, field(default=MISSING)) for g, cls in groups.items()]
    root = dataclasses.make_dataclass("ConfigSchema", fields, bases=(RunConfig,))
    return root, frozenset(open_groups)


# -- validation ----------------------------------------------------------------------------------


def validate_config(cfg: DictConfig | Mapping[str, Any], world_size: int = 1) -> DictConfig:
    """``cfg`` checked against its schema: a new config of the same keys, values typed and
    interpolations resolved (what was checked is what runs), or ``ValueError`` naming the
    first bad key, its value and what it must be.

    ``world_size`` is the number of processes that will share each batch (``WORLD_SIZE``
    under torchrun), so an uneven split is refused before any process group is joined.
    """
    source = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    missing = sorted(OmegaConf.missing_keys(source))
    if missing:
        raise ValueError(f"{missing[0]} has no value (???): set it, e.g. {missing[0]}=<value>")
    values = OmegaConf.to_container(source, resolve=True)
    assert isinstance(values, dict)
    root, open_groups = schema_classes(values)
    schema = OmegaConf.structured(root)
    for group in open_groups:  # materialise the node, then let it take untyped keys
        setattr(schema, group, OmegaConf.structured(typing.get_type_hints(root)[group]))
        OmegaConf.set_struct(schema[group], False)
    try:
        merged = OmegaConf.merge(schema, values)
    except (ValidationError, ConfigKeyError) as err:
        raise ValueError(_type_message(err, root, values)) from None
    typed = OmegaConf.to_container(merged)
    assert isinstance(typed, dict)
    _check_values(root, values, typed, prefix="")
    _check_finite(typed, prefix="")
    trainer = typed.get("trainer")
    if isinstance(trainer, dict) and world_size > 1:
        check_batch_split(trainer["batch_size"], world_size)
    out = OmegaConf.create(_present(typed))
    OmegaConf.set_struct(out, bool(OmegaConf.is_struct(source)))
    return out


def _present(node: Any) -> Any:
    """``node`` less the schema's keys the config did not set (still ``???`` after the merge)."""
    if isinstance(node, dict):
        return {k: _present(v) for k, v in node.items() if v != "???"}
    return node


def _check_values(
    cls: type, given: Mapping[str, Any], typed: Mapping[str, Any], prefix: str
) -> None:
    """Booleans given as booleans, then each field's rule, in the schema's order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in given:
            continue
        key, kind = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(kind):
            _check_values(kind, given[f.name], typed[f.name], prefix=f"{key}.")
            continue
        value = given[f.name]
        if kind in (bool, bool | None) and not (isinstance(value, bool) or value is None):
            raise ValueError(f"{key} must be {_describe(kind)}, got {value!r}")
        if _of_scalars(kind) and isinstance(value, list | tuple):  # OmegaConf lets [1,{a:1}] in
            if any(isinstance(item, dict | list) for item in value):
                raise ValueError(f"{key} must be {_describe(kind)}, got {value!r}")
        rule = f.metadata.get("rule")
        if rule is not None and typed[f.name] is not None:
            rule(key, typed[f.name])


def _of_scalars(kind: Any) -> bool:
    """Whether ``kind`` (or ``kind | None``) is a list or tuple of ints, floats, bools or
    strings: a value whose items must not be lists or mappings."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return len(args) == 1 and _of_scalars(args[0])
    scalars = (int, float, bool, str)
    return typing.get_origin(kind) in (list, tuple) and bool(args) and set(args) <= set(scalars)


def _check_finite(node: Any, prefix: str) -> None:
    """No NaN or infinity anywhere: no key of a run means 'unbounded' by a float."""
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for k, value in items:
        key = f"{prefix}{k}" if isinstance(node, dict) else prefix.rstrip(".")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{key} must be a finite number, got {value}")
        if isinstance(value, dict | list):
            _check_finite(value, f"{key}.")


def _type_message(err: ValidationError | ConfigKeyError, root: type, values: Mapping) -> str:
    """One line for OmegaConf's refusal: the full key, the value as given, what it must be."""
    path = str(err.full_key).split("[", 1)[0].split(".")  # a list item: report the whole list
    cls: Any = root
    for name in path[:-1]:
        cls = typing.get_type_hints(cls).get(name, Any)
    parent = ".".join(path[:-1])
    if isinstance(err, ConfigKeyError):
        allowed = ", ".join(f.name for f in dataclasses.fields(cls))
        where = f"{parent} ({_label(cls)})" if parent else "the root config"
        return f"{'.'.join(path)} is not a key of {where}; allowed: {allowed or 'none'}"
    value: Any = values
    for name in path:
        value = value.get(name) if isinstance(value, Mapping) else None
    kind = typing.get_type_hints(cls).get(path[-1], Any)
    return f"{'.'.join(path)} must be {_describe(kind)}, got {value!r}"


def _label(cls: type) -> str:
    """What a schema stands for, in messages: a torch target, a model or dataset name, ..."""
    for table in (OPTIMIZER_SCHEMAS, SCHEDULER_SCHEMAS):
        for target, schema in table.items():
            if schema is cls:
                return target
    return "scheduler=none" if cls is NoSchedulerConfig else cls.__name__


_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
_PLURALS = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}


def _describe(kind: Any) -> str:
    """``int | None`` -> 'an integer or null', ``list[int]`` -> 'a list of integers', ..."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None)) + " or null"
    if kind in _NAMES:
        return _NAMES[kind]
    if origin is list and args:
        return f"a list of {_PLURALS.get(args[0], 'values')}"
    if origin is tuple and args:
        noun = "a pair" if len(args) == 2 else f"a list of {len(args)}"
        return f"{noun} of {_PLURALS.get(args[0], 'values')}"
    if dataclasses.is_dataclass(kind):
        keys = ", ".join(f.name for f in dataclasses.fields(kind))
        return f"a mapping of keys ({keys})"
    return "a value"
