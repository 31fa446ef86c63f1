"""The sweep table to the letter (reweight.outputs.sweeps): results.md and results.csv of a sweep
with a shared key, keys only some jobs set, a job without overrides, an unfinished job, nested and
numbered folders, overrides that add (``+``), delete (``~``) or hold ``=`` in their value, ties,
and the command line. Written after a mutation run (tools/mutation.py) showed what the other
tests left open."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from reweight.outputs import aggregate_sweep
from reweight.outputs.sweeps import main


def job(sweep: Path, name: str, overrides: list[str] | None, summary: dict) -> None:
    folder = sweep / name
    folder.mkdir(parents=True)
    if overrides is not None:
        (folder / ".hydra").mkdir()
        (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (folder / "summary.json").write_text(json.dumps(summary))


def summary(test: float, val: float | None, objective: str = "test_accuracy") -> dict:
    return {"objective": objective, "test_accuracy": test, "val_accuracy": val}


EXPECTED_MD = """\
# Sweep results

| method | note | n | test accuracy (%) | balanced accuracy (%) | val accuracy (%) |
| --- | --- | --- | --- | --- | --- |
| mwnet | (default) | 2 | 70.00 ± 14.14 | n/a | 60.00 ± 0.00 |
| erm | (default) | 1 | 50.00 | n/a | 40.00 |
| l2rw | a=b | 1 | 90.00 | n/a | 10.00 |
| (default) | (default) | 1 | 20.00 | n/a | 20.00 |

Shared by every job: `trainer.max_steps=20`

Final test accuracy, mean ± sample std over the seeds (n) of each configuration.

Configuration chosen by test_accuracy (the sweep's objective, mean over seeds): `method=l2rw`, \
`trainer.max_steps=20`, `note=a=b`, test_accuracy 90.00. Its test accuracy, reported apart and \
not used in the choice: 90.00 %.
Warning: the objective is a TEST-SET metric; the number is optimistic.

Left out: 2 job(s) without a summary (failed or unfinished).
"""

EXPECTED_CSV = """\
method,trainer.max_steps,note,n,test_accuracy_mean,test_accuracy_std,\
test_balanced_accuracy_mean,test_balanced_accuracy_std,val_accuracy_mean,val_accuracy_std
mwnet,20,,2,0.7,0.14142135623730956,nan,nan,0.6,0.0
erm,20,,1,0.5,nan,nan,nan,0.4,nan
l2rw,20,a=b,1,0.9,nan,nan,nan,0.1,nan
,20,,1,0.2,nan,nan,nan,0.2,nan
"""


def test_the_table_to_the_letter(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    common = "trainer.max_steps=20"
    job(tmp_path, "10", ["method=erm", "seed=0", common], summary(0.5, 0.4))
    job(tmp_path, "2", ["method=mwnet", "seed=0", common], summary(0.6, 0.6))
    job(tmp_path, "3", ["method=mwnet", "seed=1", common], summary(0.8, 0.6))
    job(tmp_path, "11", ["method=l2rw", "+note=a=b", common], summary(0.9, 0.1))
    job(tmp_path, "12", [common], summary(0.2, 0.2))  # every other key at its default
    for name in ("20", "4"):  # unfinished: overrides, no summary
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / ".hydra" / "overrides.yaml").write_text("- method=erm\n")
    with caplog.at_level(logging.INFO, logger="reweight.outputs.sweeps"):
        rows = aggregate_sweep(tmp_path)
    assert (tmp_path / "results.md").read_text() == EXPECTED_MD
    assert (tmp_path / "results.csv").read_bytes() == EXPECTED_CSV.encode()  # \n, not \r\n
    assert [r["method"] for r in rows] == ["mwnet", "erm", "l2rw", ""]
    assert "left out: 4, 20" in caplog.text  # the unfinished jobs, in natural order
    assert "nothing to aggregate" not in caplog.text


def test_an_empty_sweep_says_so(tmp_path: Path):
    with pytest.raises(ValueError, match=r"holds no job of a sweep .*: give the folder of a"):
        aggregate_sweep(tmp_path)


def test_overrides_that_add_delete_or_are_missing(tmp_path: Path):
    job(tmp_path, "0", ["+extra=1", "~trainer.eval_every", "method=erm"], summary(0.5, 0.5))
    job(tmp_path, "1", None, summary(0.6, 0.6))  # no .hydra/overrides.yaml: the defaults
    rows = aggregate_sweep(tmp_path)
    assert rows[0]["extra"] == "1" and rows[0]["method"] == "erm"
    assert rows[0]["trainer.eval_every"] == ""  # a deletion has no value
    assert [rows[1][k] for k in ("extra", "trainer.eval_every", "method")] == ["", "", ""]


def test_overrides_that_are_not_a_list_are_named(tmp_path: Path):
    (tmp_path / "0" / ".hydra").mkdir(parents=True)
    (tmp_path / "0" / ".hydra" / "overrides.yaml").write_text("method: erm\n")
    (tmp_path / "0" / "summary.json").write_text(json.dumps(summary(0.5, 0.5)))
    with pytest.raises(ValueError, match=r"overrides.yaml should hold a list of KEY=VALUE"):
        aggregate_sweep(tmp_path)


def test_job_folders_in_natural_order_numbers_before_names(tmp_path: Path):
    for name, method in (("b", "b"), ("10", "ten"), ("2", "two"), ("a", "a")):
        job(tmp_path, name, [f"method={method}"], summary(0.5, 0.5))
    assert [r["method"] for r in aggregate_sweep(tmp_path)] == ["two", "ten", "a", "b"]


def test_a_tie_goes_to_the_first_configuration_in_the_table(tmp_path: Path):
    """The chosen line lists the keys the configuration sets, not those it leaves default."""
    job(tmp_path, "0", ["method=erm"], summary(0.1, 0.7, "val_accuracy"))
    job(tmp_path, "1", ["method=mwnet", "+Xtra=1"], summary(0.9, 0.7, "val_accuracy"))
    job(tmp_path, "2", ["~Xgone", "method=l2rw"], summary(0.9, 0.1, "val_accuracy"))
    rows = aggregate_sweep(tmp_path)
    assert [k for k in rows[0] if not k.endswith(("_mean", "_std"))] == [
        "method",
        "Xtra",
        "Xgone",
        "n",
    ]
    md = (tmp_path / "results.md").read_text()
    assert "(the sweep's objective, mean over seeds): `method=erm`, val_accuracy 70.00. Its" in md


def test_the_chosen_default_configuration_and_two_shared_keys(tmp_path: Path):
    job(tmp_path / "alone", "0", [], summary(0.5, 0.5, "val_accuracy"))
    aggregate_sweep(tmp_path / "alone")
    md = (tmp_path / "alone" / "results.md").read_text()
    assert "mean over seeds): (default), val_accuracy 50.00. Its" in md
    job(tmp_path / "shared", "0", ["a=1", "b=2", "c=3"], summary(0.5, 0.5, "val_accuracy"))
    job(tmp_path / "shared", "1", ["a=1", "b=2", "c=4"], summary(0.5, 0.5, "val_accuracy"))
    aggregate_sweep(tmp_path / "shared")
    md = (tmp_path / "shared" / "results.md").read_text()
    assert "\nShared by every job: `a=1`, `b=2`\n" in md


@pytest.mark.parametrize("objectives", [("val_accuracy", "val_balanced_accuracy")])
def test_no_choice_without_one_objective_or_a_value(tmp_path: Path, objectives):
    """Jobs of two objectives (each job has both values), or of one objective without a
    value: the table names no configuration, and does not fail."""
    for i, name in enumerate(objectives):
        values = {"val_accuracy": 0.5 + i / 10, "val_balanced_accuracy": 0.5 + i / 10}
        job(tmp_path / "two", str(i), [f"method=m{i}"], {"objective": name, **values})
    job(tmp_path / "none", "0", ["method=erm"], summary(0.5, None, "val_accuracy"))
    for sweep in ("two", "none"):
        aggregate_sweep(tmp_path / sweep)
        assert "Configuration chosen" not in (tmp_path / sweep / "results.md").read_text()


def test_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture):
    job(tmp_path, "0", ["dataset.seed=0", "method=erm"], summary(0.5, 0.5))
    job(tmp_path, "1", ["dataset.seed=1", "method=erm"], summary(0.7, 0.5))
    assert main([str(tmp_path), "--seed-keys", "seed", "dataset.seed"]) == 0
    assert "| erm | 2 | 60.00 ± 14.14 |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith("usage: python -m reweight.outputs [-h] [--seed-keys SEED_KEYS")
    assert (
        "Aggregate a sweep: mean ± std of the final test accuracy per configuration into " in text
    )
    assert "SWEEP_DIR/results.csv and SWEEP_DIR/results.md." in text
    assert " the multirun directory (holds one folder per job) " in text
    assert " override keys averaged over rather than told apart (default: seed)" in text
    assert text.endswith("(default: seed)")
