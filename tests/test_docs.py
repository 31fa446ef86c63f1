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


def test_readme_python_examples_run_as_written_and_are_seeded(capsys):
    """Every ```python block of the README, in order, in one namespace (a later block may use
    what an earlier one made, as a reader would), twice: the same printed numbers both times."""
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert any("Trainer.from_bundle" in b for b in blocks)
    printed = []
    for _ in range(2):
        namespace: dict = {}
        for block in blocks:
            exec(compile(block, "README.md", "exec"), namespace)
        printed.append(capsys.readouterr().out)
        w, g = namespace["w"], namespace["g"]
        assert w.shape == g.shape == (100,) and bool((w >= 0).all())
        total = float(w.sum())  # 1, or 0 for a batch none of whose examples helps (README)
        assert total == 0 or abs(total - 1) < 1e-5, total
    balanced, per_class = printed[0].split(" ", 1)
    assert 0 <= float(balanced) <= 1 and per_class.startswith("[")
    assert printed[0] == printed[1]  # seeded: a reader gets the numbers the README run got


def test_readme_commands_are_what_ci_runs():
    """CI installs exactly as the README says and runs the README's test command."""
    commands = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    test_command = next(c for c in commands if "pytest" in c)
    ci = (REPO / ".ci" / "run").read_text()
    # twice: the newest torch, then the oldest the declared range allows (.ci/oldest-torch.txt)
    assert ci.splitlines().count(test_command) == 2
    floor = dict(
        line.replace("===", "==").split("==")
        for line in (REPO / ".ci" / "oldest-torch.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    pyproject = (REPO / "pyproject.toml").read_text()
    for package, version in floor.items():
        major_minor = ".".join(version.split(".")[:2])
        assert f'"{package}>={major_minor}"' in pyproject, package
    main_command = commands[0]
    assert main_command.endswith("python -m reweight dataset=mnist_imbalanced")


@pytest.mark.parametrize(
    "module",
    [
        "reweight.meta.modules",
        "reweight.meta.optim",
        "reweight.models.hf",
        "reweight.functional",
        "reweight.train",
        "reweight.train.signals",
        "reweight.train.weight_stats",
        "reweight.train.meta_source",
        "reweight.outputs",
        "reweight.core.files",
        "reweight.outputs.suspects",
        "reweight.core.progress",
        "reweight.metastep",
        "reweight.meta.twins",
        "reweight.jvp.planner",
        "reweight.cli.run_config",
        "reweight.cli.schema",
    ]
    + [f"reweight.models.{m}" for m in ("factory", "lenet", "mlp", "resnet", "sequence")]
    + [f"reweight.models.{m}" for m in ("torchvision_models", "wide_resnet")],
)
def test_the_entry_points_show_an_example(module: str):
    """Each of these modules opens with (or holds) an example that runs: pytest runs every
    docstring example of the package (``--doctest-modules``); here, that they exist."""
    tests = doctest.DocTestFinder().find(importlib.import_module(module))
    assert sum(len(t.examples) for t in tests) > 0, module


def test_public_surface_imports():
    for name in reweight.__all__:
        assert getattr(reweight, name) is not None, name
    subpackages = ("meta", "methods", "data", "models", "cli", "outputs", "train")
    for sub in (f"reweight.{name}" for name in subpackages):
        mod = importlib.import_module(sub)
        for name in mod.__all__:
            assert hasattr(mod, name), f"{sub}.{name}"


def test_imbalance_figure_script(tmp_path: Path):
    """docs/imbalance_figure.py: mean ± std over the finished jobs, wall time, the figure."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    jobs = [("l2rw", 0.995, 0.02, 100), ("l2rw", 0.995, 0.04, 300), ("erm", 0.995, 0.3, 0)]
    for i, (method, p, err, zero) in enumerate(jobs):
        job = tmp_path / str(i)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "config.yaml").write_text(
            f"method:\n  name: {method}\ndataset:\n  proportion: {p}\n"
        )
        summary = {"test_balanced_error": err, "wall_time_s": 10.0 * (i + 1)}
        (job / "summary.json").write_text(json.dumps(summary | {"zero_sum_batches": zero}))
    (tmp_path / "3" / ".hydra").mkdir(parents=True)  # a job still running: no summary yet
    out = tmp_path / "fig"
    subprocess.run(
        [
            sys.executable,
            str(root / "docs" / "imbalance_figure.py"),
            str(tmp_path),
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    text = out.with_suffix(".md").read_text()
    assert "| l2rw | 3.00 ± 1.41 (n=2) |" in text  # mean and sample std of 2 % and 4 %
    assert "| erm | 30.00 ± 0.00 (n=1) |" in text
    assert "| l2rw | 0.995 | 2 | 15 | 200 |" in text
    assert out.with_suffix(".png").stat().st_size > 0
