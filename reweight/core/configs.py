"""The shipped configs (``conf/``, installed as the package ``reweight.conf``): where they
are, and one option's keys read from them.

A default that the command line and the Python API share has one owner, the option's YAML
file: ``build_dataset("mnist_noisy")`` and ``python -m reweight dataset=mnist_noisy`` read the
same ``conf/dataset/mnist_noisy.yaml``.

    >>> option_keys("dataset", "mnist_noisy")["noise_rate"]
    0.4
"""

from __future__ import annotations

import copy
import importlib.resources
import importlib.util
from functools import cache
from pathlib import Path
from typing import Any

__all__ = ["config_dir", "option_keys"]


def config_dir() -> Path:
    """The folder holding ``config.yaml``: the package ``reweight.conf`` when installed (wheel
    or editable); in a checkout that is only on ``sys.path`` (``PYTHONPATH=.``), ``conf/``."""
    if importlib.util.find_spec("reweight.conf") is not None:
        return Path(str(importlib.resources.files("reweight.conf")))
    return Path(__file__).resolve().parents[2] / "conf"


@cache
def _read(group: str, option: str) -> dict[str, Any]:
    from omegaconf import OmegaConf

    path = config_dir() / group / f"{option}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no config {path}: the package's conf/ folder is incomplete")
    # interpolations (the data root's ${oc.env:...}) stay as written: the caller resolves them
    values = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    assert isinstance(values, dict)
    return values


def option_keys(group: str, option: str) -> dict[str, Any]:
    """The keys and values of ``conf/<group>/<option>.yaml``, in the file's order (a copy)."""
    return copy.deepcopy(_read(group, option))
