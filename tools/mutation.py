"""Mutation testing of one module with that module's tests: ``python tools/mutation.py MODULE``.

mutmut (``pip install mutmut``: not a dependency, not part of CI) changes one thing at a time in
MODULE (an operator, a constant, a string, a call's argument) and runs the tests that cover the
changed function; a mutant no test fails ("survived") is a behaviour the tests do not pin down,
or an equivalent change. The shared settings are ``[tool.mutmut]`` in pyproject.toml; the tests
of each module are ``[tool.reweight.mutation]`` there (fast tests only: ``-m "not slow"``, since
the slow ones start the CLI in a subprocess, which imports the installed code, not the mutant).

mutmut reads its settings from the pyproject.toml of the folder it runs in and writes
``mutants/`` there, so this runs it in a scratch copy of the checkout, ``.mutation/<module>/``,
whose pyproject.toml adds the module (``only_mutate``) and its tests; a second run of the same
module reuses what mutmut recorded there (``--fresh`` starts over; ``--survivors`` runs the
survivors, and the mutants no test reached, of the last run again against the tests as they are
now, e.g. after adding tests: mutmut keeps a recorded result otherwise). It prints the count of
each outcome, the kill rate (killed, timeouts included, over all mutants that ran) and the diff of
every surviving mutant. Example::

    python tools/mutation.py reweight/outputs/sweeps.py
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("reweight", "tests", "conf", "README.md")


def _toml(value: object) -> str:
    """A TOML value of strings, numbers, booleans and lists (JSON's syntax is TOML's here)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)


def scratch_copy(module: str, tests: list[str], fresh: bool) -> Path:
    """``.mutation/<module>/``: the checkout's code, tests and configs, and a pyproject.toml
    whose ``[tool.mutmut]`` names the module and its tests."""
    scratch = ROOT / ".mutation" / module.replace("/", ".").removesuffix(".py")
    if fresh and scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    for name in COPIED:  # the current checkout, every run (mutmut sees what changed)
        src, dst = ROOT / name, scratch / name
        if src.is_dir():
            shutil.copytree(
                src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(src, dst)
    text = (ROOT / "pyproject.toml").read_text()
    settings = tomllib.loads(text)["tool"]["mutmut"]
    settings = {**settings, "only_mutate": [module], "pytest_add_cli_args_test_selection": tests}
    table = "[tool.mutmut]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in settings.items())
    # the original [tool.mutmut] table (up to the next table) gives way to the rewritten one
    text = re.sub(r"(?ms)^\[tool\.mutmut\]\n.*?(?=^\[|\Z)", "", text) + "\n" + table
    (scratch / "pyproject.toml").write_text(text)
    return scratch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", help="a file under reweight/, as listed in pyproject.toml")
    parser.add_argument("--fresh", action="store_true", help="forget an earlier run's results")
    parser.add_argument(
        "--survivors", action="store_true", help="run the last run's survivors again"
    )
    parser.add_argument(
        "--max-children", type=int, default=1, help="mutants tested at once (default 1)"
    )
    args = parser.parse_args(argv)
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]
    table = config["reweight"]["mutation"]
    if args.module not in table:
        sys.stderr.write(
            f"error: {args.module} has no tests listed in [tool.reweight.mutation] of "
            f"pyproject.toml; one of: {', '.join(table)}\n"
        )
        return 2
    scratch = scratch_copy(args.module, table[args.module], args.fresh)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    mutmut = [sys.executable, "-m", "mutmut"]
    again = _results(mutmut, scratch, env, ("survived", "no tests")) if args.survivors else []
    run = subprocess.run(
        [*mutmut, "run", "--max-children", str(args.max_children), *again],
        cwd=scratch,
        env=env,
        stdout=subprocess.DEVNULL,  # a progress line redrawn per mutant
    )
    if run.returncode != 0:  # e.g. a selected test failing without a mutant (mutmut's stats)
        sys.stderr.write(
            f"error: mutmut run ended with status {run.returncode}; its output (hidden here) "
            f"says why: cd {scratch} && {sys.executable} -m mutmut run --max-children 1\n"
        )
        return run.returncode
    status = _statuses(mutmut, scratch, env)
    counts = collections.Counter(status.values())
    killed = counts["killed"] + counts["timeout"]
    tested = sum(n for s, n in counts.items() if s not in ("skipped", "not checked"))
    survivors = sorted((n for n, s in status.items() if s == "survived"), key=_natural)
    for name in survivors:
        shown = subprocess.run(
            [*mutmut, "show", name], cwd=scratch, env=env, capture_output=True, text=True
        )
        print(shown.stdout)
    print(f"{args.module}: {dict(counts)}")
    rate = f"{100 * killed / tested:.1f} %" if tested else "n/a"
    print(f"{args.module}: {killed} of {tested} mutants killed ({rate}), {len(survivors)} survived")
    return 0


def _statuses(mutmut: list[str], scratch: Path, env: dict) -> dict[str, str]:
    """``{mutant: status}`` as mutmut recorded them in ``scratch``."""
    listing = subprocess.run(
        [*mutmut, "results", "--all", "true"],
        cwd=scratch,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(re.findall(r"^\s*(\S+): (.+)$", listing, flags=re.M))


def _results(mutmut: list[str], scratch: Path, env: dict, statuses: tuple) -> list[str]:
    """The names of the mutants mutmut recorded with one of ``statuses`` in ``scratch``."""
    return [n for n, s in _statuses(mutmut, scratch, env).items() if s in statuses]


def _natural(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


if __name__ == "__main__":
    sys.exit(main())
