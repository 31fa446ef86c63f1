"""RunDir.check's refusals and config_differences' edges, in-process on real files
(reweight.cli.run_dir). test_run_dir.py checks the same refusals through the CLI in a
subprocess; a mutation run (tools/mutation.py) showed what that leaves open in-process."""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from reweight.cli.run_config import config_differences
from reweight.cli.run_dir import Finished, RunDir, RunDirError


def check(folder: Path, config: dict | str, resume: bool = True, max_steps: int = 4):
    text = config if isinstance(config, str) else yaml.safe_dump(config)
    with RunDir(folder, dir_key="hydra.run.dir") as run:
        return run.check(text, resume=resume, max_steps=max_steps)


def test_a_checkpoint_without_its_config(tmp_path: Path):
    torch.save({"step": 2}, tmp_path / "checkpoint.pt")
    assert check(tmp_path, {"a": 1}, resume=False) is None  # starts over
    with pytest.raises(RunDirError) as info:
        check(tmp_path, {"a": 1})
    assert str(info.value) == (
        f"{tmp_path} holds a checkpoint.pt but no config.yaml, so nothing says which config "
        "wrote it: to start over there run with resume=false, or choose another hydra.run.dir"
    )


def test_invalid_yaml_is_named(tmp_path: Path):
    (tmp_path / "config.yaml").write_text("a: [1\n")
    with pytest.raises(
        RunDirError, match=r"(?s)^\S+config\.yaml is not valid YAML \(.*\): start over there with"
    ):
        check(tmp_path, {"a": 1})
    (tmp_path / "config.yaml").write_text("a: 1\n")
    invalid = r"(?s)^the config is not valid YAML .*with resume=false$"
    with pytest.raises(RunDirError, match=invalid):
        check(tmp_path, "a: [1\n")


def test_seven_differences_show_five_and_count_the_rest(tmp_path: Path):
    old = {f"k{i}": i for i in range(7)}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    new = {f"k{i}": i + 10 for i in range(7)}
    with pytest.raises(RunDirError) as info:
        check(tmp_path, new)
    shown = "; ".join(f"k{i}: {i} there, {i + 10} here" for i in range(5))
    assert str(info.value) == (
        f"{tmp_path} holds a run with another config ({shown}; and 2 more): to start over "
        "there run with resume=false, or choose another hydra.run.dir"
    )


def test_values_shown_up_to_forty_characters_and_any_yaml_value(tmp_path: Path):
    forty = "x" * 38  # 40 characters once quoted
    old = {"s": forty, "d": datetime.date(2024, 1, 2)}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    with pytest.raises(RunDirError) as info:
        check(tmp_path, {"s": forty + "y", "d": datetime.date(2024, 1, 3)})
    message = str(info.value)
    assert f's: "{forty}" there, "{"x" * 36}... here' in message
    assert 'd: "2024-01-02" there, "2024-01-03" here' in message


def test_differences_between_lists_scalars_absent_and_ignored_keys():
    assert config_differences({"a": [1]}, {"a": 1}) == [("a", [1], 1)]
    assert config_differences({"a": 1}, {"a": [1]}) == [("a", 1, [1])]
    [(key, _, new)] = config_differences({"b": 1}, {"b": 1, "a": None})  # absent is not null
    assert (key, new) == ("a", None)
    assert config_differences({"x": {"y": 1}}, {"x": {"y": 2}}, ignore=("x",)) == []
    assert config_differences({"xy": 1}, {"xy": 2}, ignore=("x",)) == [("xy", 1, 2)]


def test_a_finished_run_reports_its_accuracy(tmp_path: Path):
    config = {"a": 1}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    torch.save({"step": 4}, tmp_path / "checkpoint.pt")
    (tmp_path / "summary.json").write_text(json.dumps({"test_accuracy": 0.5}))
    assert check(tmp_path, config) == Finished(tmp_path / "summary.json", 4, 0.5)
    assert check(tmp_path, config, max_steps=6) is None  # not finished for 6 steps: resumes


@pytest.mark.parametrize(("n", "more"), [(5, ""), (6, "; and 1 more")])
def test_five_differences_are_all_shown(tmp_path: Path, n: int, more: str):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({f"k{i}": i for i in range(n)}))
    with pytest.raises(RunDirError) as info:
        check(tmp_path, {f"k{i}": i + 10 for i in range(n)})
    shown = "; ".join(f"k{i}: {i} there, {i + 10} here" for i in range(5))
    assert f"another config ({shown}{more}): to start over" in str(info.value)


def test_a_finished_run_without_a_recorded_accuracy(tmp_path: Path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"a": 1}))
    torch.save({"step": 4}, tmp_path / "checkpoint.pt")
    (tmp_path / "summary.json").write_text(json.dumps({"test_accuracy": None}))  # NaN written
    found = check(tmp_path, {"a": 1})
    assert isinstance(found, Finished) and found.step == 4 and math.isnan(found.test_accuracy)
