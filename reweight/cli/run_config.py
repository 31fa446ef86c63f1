"""A run's config against the one its folder holds: which keys cannot change a result
(``NO_EFFECT_KEYS``), which keys differ (``config_differences``), and the refusal that names
them (``another_config``)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from reweight.train.config import NO_EFFECT_FIELDS

__all__ = ["LENGTH_KEY", "NO_EFFECT_KEYS", "another_config", "config_differences"]

NO_EFFECT_KEYS = (
    "resume",
    "threads",
    "malloc",
    "dataset.root",
    "dataset.download",
    *(f"trainer.{name}" for name in NO_EFFECT_FIELDS),
)
"""Config keys that cannot change a run's result: a run may resume, or be found finished, with
them changed. ``conf/config.yaml`` leaves them out of the run directory's name
(``hydra.job.config.override_dirname.exclude_keys``; a test keeps the two lists equal)."""

_LONG = 40  # characters of a value shown in an error message


def config_differences(
    old: Mapping[str, Any], new: Mapping[str, Any], ignore: Iterable[str] = NO_EFFECT_KEYS
) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for every leaf that differs between two configs
    (nested mappings, as ``config.yaml`` holds them), keys under ``ignore`` aside, in the new
    config's order; a key missing on one side has the value ``_ABSENT`` there.

    >>> config_differences({"trainer": {"max_steps": 4}, "resume": True},
    ...                    {"trainer": {"max_steps": 8}, "resume": False})
    [('trainer.max_steps', 4, 8)]
    """
    ignore = tuple(ignore)
    a, b = _flatten(old), _flatten(new)
    out = []
    for key in dict.fromkeys([*b, *a]):
        if any(key == i or key.startswith(i + ".") for i in ignore):
            continue
        x, y = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if not _same(x, y):
            out.append((key, x, y))
    return out


LENGTH_KEY = "trainer.max_steps"
"""A run may go on from its checkpoint to another length: compared apart from the others."""


def another_config(
    path: Path, diffs: list[tuple[str, Any, Any]], old: Any, new: Any, dir_key: str
) -> str:
    """The refusal of a run directory holding another config: the differing keys and both
    values; keys that follow a changed ``trainer.max_steps`` (a cosine schedule's ``T_max``)
    named as such, with the override that continues on the old schedule."""
    lengths = (_flatten(old).get(LENGTH_KEY), _flatten(new).get(LENGTH_KEY))
    follow = [k for k, a, b in diffs if lengths[0] != lengths[1] and (a, b) == lengths]
    if follow and len(follow) == len(diffs):
        keys = ", ".join(follow)
        return (
            f"{path} holds this run with trainer.max_steps={lengths[0]}, and {keys} follows "
            f"trainer.max_steps ({lengths[0]} there, {lengths[1]} here): a run cannot go on "
            f"with a schedule of another length; to continue it on its schedule add "
            f"{follow[0]}={lengths[0]}, to start over there run with resume=false"
        )
    shown = "; ".join(f"{k}: {_show(a)} there, {_show(b)} here" for k, a, b in diffs[:5])
    more = f"; and {len(diffs) - 5} more" if len(diffs) > 5 else ""
    return (
        f"{path} holds a run with another config ({shown}{more}): to start over "
        f"there run with resume=false, or choose another {dir_key}"
    )


class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


_ABSENT = _Absent()


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, Mapping) or not node:
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(_flatten(value, f"{prefix}{key}" if not prefix else f"{prefix}.{key}"))
    return out


def _same(a: Any, b: Any) -> bool:
    """Equal, and of one kind: ``1`` is not ``true`` nor ``1.0`` in a config."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _show(value: Any) -> str:
    text = repr(value) if value is _ABSENT else json.dumps(value, default=str)
    return text if len(text) <= _LONG else text[: _LONG - 3] + "..."
