"""``reweight.core.configs``: where the shipped configs are (the package, or a checkout's
``conf/``) and one option's keys read from its YAML file, as written (interpolations kept), in
the file's order, as a copy; a missing option's message."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import yaml

from reweight.core import configs


def test_config_dir_is_the_package_and_a_checkouts_conf_without_it(monkeypatch):
    installed = configs.config_dir()
    assert (installed / "config.yaml").is_file()
    spec = importlib.util.find_spec("reweight.conf")
    assert installed.resolve() == Path(next(iter(spec.submodule_search_locations))).resolve()
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "reweight.conf" else real(name, *a),
    )
    checkout = configs.config_dir()  # only on sys.path: the conf/ beside the package
    assert checkout == Path(configs.__file__).resolve().parents[2] / "conf"


def test_option_keys_are_the_files_as_written_in_order_and_a_copy():
    path = configs.config_dir() / "dataset" / "mnist_noisy.yaml"
    want = yaml.safe_load(path.read_text())
    got = configs.option_keys("dataset", "mnist_noisy")
    assert got == want and list(got) == list(want)  # the file's order
    assert got["root"] == "${oc.env:REWEIGHT_DATA_DIR,data}"  # not resolved
    got["noise_rate"] = 0.9
    got.clear()
    assert configs.option_keys("dataset", "mnist_noisy") == want  # the cache is not touched


def test_a_missing_option_names_the_file():
    with pytest.raises(FileNotFoundError) as info:
        configs.option_keys("dataset", "no_such_option")
    path = configs.config_dir() / "dataset" / "no_such_option.yaml"
    assert str(info.value) == f"no config {path}: the package's conf/ folder is incomplete"


def test_nested_values_are_copied_too():
    got = configs.option_keys("experiment", "l2rw_mnist_imbalance")
    want = copy.deepcopy(got)
    assert got["dataset"]["proportion"] == 0.995 and got["defaults"][0] == {
        "override /dataset": "mnist_imbalanced"
    }
    got["dataset"].clear()
    got["defaults"].append("extra")
    assert configs.option_keys("experiment", "l2rw_mnist_imbalance") == want
