"""A run folder whose config differs from this run's only in a list-valued key (a model's
hidden sizes, a sweep's milestones) holds another run: resuming there is refused, and a finished
run there is never reported as this run's result (reweight.cli.run_dir, on real files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from reweight.cli.run_config import config_differences
from reweight.cli.run_dir import Finished, RunDir, RunDirError


def finished_run(folder: Path, hidden: list) -> dict:
    """config.yaml, a checkpoint at the last step and summary.json, as a finished run leaves."""
    config = {"model": {"name": "mlp", "hidden": hidden}, "trainer": {"max_steps": 4}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    torch.save({"step": 4}, folder / "checkpoint.pt")
    (folder / "summary.json").write_text(json.dumps({"test_accuracy": 0.875}))
    return config


def check(folder: Path, config: dict):
    with RunDir(folder, dir_key="hydra.run.dir") as run:
        return run.check(yaml.safe_dump(config), resume=True, max_steps=4)


def test_the_same_list_finds_the_finished_run(tmp_path: Path):
    config = finished_run(tmp_path, [32, 16])
    found = check(tmp_path, config)
    assert isinstance(found, Finished)
    assert (found.step, found.test_accuracy) == (4, 0.875)


@pytest.mark.parametrize(
    ("there", "here"),
    [([32], [32, 16]), ([32, 16], [32]), ([32, 16], [16, 32]), ([], [8]), ([[1, 2]], [[1, 2, 3]])],
    ids=["grew", "shrank", "reordered", "from-empty", "nested-grew"],
)
def test_a_list_that_changed_is_another_config(tmp_path: Path, there: list, here: list):
    config = finished_run(tmp_path, there)
    config["model"]["hidden"] = here
    with pytest.raises(RunDirError) as info:  # not Finished: that run is not this one
        check(tmp_path, config)
    shown = f"model.hidden: {json.dumps(there)} there, {json.dumps(here)} here"
    assert shown in str(info.value) and "resume=false" in str(info.value)
    old = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert config_differences(old, config) == [("model.hidden", there, here)]


def test_a_list_of_other_kinds_is_another_config(tmp_path: Path):
    """1 is not true nor 1.0 in a config, inside a list too."""
    assert config_differences({"a": [1, 2]}, {"a": [True, 2]}) == [("a", [1, 2], [True, 2])]
    assert config_differences({"a": [1, 2]}, {"a": [1.0, 2]}) == [("a", [1, 2], [1.0, 2])]
    assert config_differences({"a": [1, 2]}, {"a": [1, 2]}) == []
