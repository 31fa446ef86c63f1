"""The documentation runs: README examples, docstring examples, the public surface, CI."""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import pytest

import reweight

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_readme_research_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    example = next(b for b in blocks if "Trainer.from_bundle" in b)
    exec(compile(example, "README.md", "exec"), {})
    balanced, per_class = capsys.readouterr().out.split(" ", 1)
    assert 0 <= float(balanced) <= 1 and per_class.startswith("[")


def test_readme_commands_are_what_ci_runs():
    """CI installs exactly as the README says and runs the README's test command."""
    commands = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    test_command = next(c for c in commands if "pytest" in c)
    ci = (REPO / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()
    main_command = commands[0]
    assert main_command.endswith("python -m reweight dataset=mnist_imbalanced")


@pytest.mark.parametrize(
    "module",
    ["reweight.meta.modules", "reweight.functional", "reweight.trainer"],
)
def test_docstring_examples(module: str):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_public_surface_imports():
    for name in reweight.__all__:
        assert getattr(reweight, name) is not None, name
    for sub in ("reweight.meta", "reweight.methods", "reweight.data", "reweight.models"):
        mod = importlib.import_module(sub)
        for name in mod.__all__:
            assert hasattr(mod, name), f"{sub}.{name}"
