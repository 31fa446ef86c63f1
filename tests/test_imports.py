"""No import cycle inside ``reweight/``, not even one hidden by a function-level import, and
every module imports only its own layer and those below it (``LAYERS``, README's Design).

Every module's import statements are read with ``ast`` (those inside functions included, those
under ``if TYPE_CHECKING:`` left out, as they never run) and resolved to modules of the package:
``from reweight.meta import to_meta`` is an edge to ``reweight.meta`` (its ``__init__`` runs),
``from reweight.jvp import tape`` an edge to the submodule ``reweight.jvp.tape``. A package's
``__init__`` that Python runs implicitly before a submodule is not an edge (every absolute import
would otherwise meet the root ``__init__``). The graph must have no cycle.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from tests.helpers import run_command

PACKAGE = Path(__file__).resolve().parents[1] / "reweight"


def module_files(root: Path) -> dict[str, Path]:
    """``{dotted name: file}`` for every module of the package at ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: at any depth, except in ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:  # the else branch does run
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}``."""
    files = module_files(root)
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        package = name if is_package else name.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:  # relative: from .x import y / from .. import y
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = []
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    targets.append(sub if sub in files else source)
            graph[name].update(t for t in targets if t in files and t != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycle_in_the_package():
    graph = import_graph(PACKAGE)
    assert len(graph) > 20 and "reweight.methods.l2rw" in graph  # the package was read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checker_finds_a_cycle_hidden_in_a_function(tmp_path: Path):
    """A cycle through a function-level import is found; one through ``TYPE_CHECKING`` is not."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg.a import f\n")
    (pkg / "a.py").write_text("from pkg.sub import b\n\ndef f():\n    return b.g()\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from pkg import a\n\n"
        "def g():\n    from ..c import h\n    return h()\n"
    )
    (pkg / "c.py").write_text("def h():\n    return 1\n")
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"}
    assert find_cycle(graph) is None
    (pkg / "c.py").write_text("def h():\n    import pkg.a\n    return 1\n")
    assert find_cycle(import_graph(pkg)) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]


# -- no module-level switches ---------------------------------------------------------------------

_MUTATORS = {"add", "append", "clear", "discard", "extend", "insert", "pop", "remove", "setdefault"}
_MUTATORS |= {"update", "__setitem__", "__delitem__"}
# Module-level state that is mutated at run time and is no switch: what it holds cannot change
# which code runs or what it computes. Anything else mutable at module level fails the test.
ALLOWED_STATE = {
    "reweight.meta.modules._GENERATED": "memo of the Meta* subclass generated per layer type",
}


def module_state_mutations(root: Path) -> dict[str, str]:
    """``{module.name: how}`` for every module-level name that is a bool or a mutable
    container and is rebound (``global``) or mutated (method call, item assignment) anywhere in
    its module after its definition, or any module-level bool at all (a flag is a switch)."""
    found = {}
    for module, path in module_files(root).items():
        tree = ast.parse(path.read_text(), str(path))
        names = {}
        for node in tree.body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Name) and t.id != "__all__":
                        names[t.id] = node.value
        for name, value in names.items():
            if isinstance(value, ast.Constant) and isinstance(value.value, bool):
                found[f"{module}.{name}"] = "a module-level flag"
        for node in ast.walk(tree):
            if isinstance(node, ast.Global):
                for name in node.names:
                    found[f"{module}.{name}"] = "rebound with `global`"
            target = None
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr in _MUTATORS:
                    target = node.func.value
            elif isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
                targets = (
                    node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
                )
                target = next((t.value for t in targets if isinstance(t, ast.Subscript)), None)
            if isinstance(target, ast.Name) and target.id in names:
                found[f"{module}.{target.id}"] = "mutated"
    return found


def test_no_module_level_switches():
    """Switches are arguments (a planner a method owns), not module globals that tests and
    benchmarks assign to: no module of the package keeps mutable state at module level beyond
    the named, harmless caches above."""
    found = module_state_mutations(PACKAGE)
    unexpected = {k: v for k, v in found.items() if k not in ALLOWED_STATE}
    assert not unexpected, f"module-level mutable state: {unexpected}"
    assert set(ALLOWED_STATE) <= set(found)  # the allowlist is not stale


def test_the_switch_finder_finds_switches(tmp_path: Path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text(
        "ON = True\nDEVICES = {'cpu'}\nTABLE = {'x': 1}\nCACHE = {}\nLIMIT = 3\n\n"
        "def f(d):\n    global LIMIT\n    CACHE[d] = 1\n    DEVICES.add(d)\n    return TABLE['x']\n"
    )
    assert module_state_mutations(pkg) == {
        "pkg.a.ON": "a module-level flag",
        "pkg.a.DEVICES": "mutated",
        "pkg.a.CACHE": "mutated",
        "pkg.a.LIMIT": "rebound with `global`",
    }


# -- the layer order (README, Design) ------------------------------------------------------------

# Lowest first: a module may import its own layer and the layers below it, never one above.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("reweight.core",)),
    ("leaves", ("reweight.data", "reweight.models")),
    ("meta", ("reweight.meta",)),
    ("jvp", ("reweight.jvp",)),
    ("metastep", ("reweight.metastep", "reweight.functional")),
    ("methods", ("reweight.methods",)),
    ("loops", ("reweight.reweighter", "reweight.integrations")),
    ("outputs", ("reweight.outputs",)),
    ("train", ("reweight.train",)),
    ("cli", ("reweight.cli", "reweight.__main__", "reweight")),
]
# leaves import nothing of the package but the core (and themselves)
LEAVES = {"reweight.data": "reweight.data", "reweight.models": "reweight.models"}


def layer_of(module: str) -> int:
    """The index in LAYERS of ``module``: the longest prefix that names it wins."""
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    if rank is None:
        raise KeyError(f"{module} is in no layer of LAYERS: add it where it belongs")
    return rank


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for module, targets in sorted(graph.items()):
        here = layer_of(module)
        leaf = next((p for p in LEAVES if module == p or module.startswith(p + ".")), None)
        for t in sorted(targets):
            if layer_of(t) > here:
                out.append(f"{module} ({LAYERS[here][0]}) imports {t} ({LAYERS[layer_of(t)][0]})")
            elif leaf and layer_of(t) > 0 and not (t == leaf or t.startswith(leaf + ".")):
                out.append(f"{module} (a leaf) imports {t}")
    return out


def test_every_module_imports_only_its_layer_and_those_below():
    graph = import_graph(PACKAGE)
    assert layer_violations(graph) == []


def test_the_layer_check_finds_an_upward_import():
    graph = {
        "reweight.meta.twins": {"reweight.methods.base"},
        "reweight.methods.base": {"reweight.meta"},
        "reweight.data.core": {"reweight.models.lenet", "reweight.core.inputs"},
        "reweight.models.lenet": set(),
        "reweight.core.inputs": set(),
        "reweight.meta": set(),
    }
    assert layer_violations(graph) == [
        "reweight.data.core (a leaf) imports reweight.models.lenet",
        "reweight.meta.twins (meta) imports reweight.methods.base (methods)",
    ]


def _imported(importtime_stderr: str) -> set[str]:
    """The modules named by ``python -X importtime``'s report (one ``import time:`` line each)."""
    return {
        line.rsplit("|", 1)[1].strip()
        for line in importtime_stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


@pytest.mark.slow
def test_a_mnist_run_never_imports_torchvision(tmp_path: Path):
    """torchvision's import alone takes seconds (with torch's compiler, which it imports), so
    the package imports it only where it is used (CIFAR, the real-noise images, torchvision's
    and the ViT models, a download): a MNIST run, from the command line, goes without it."""
    run = tmp_path / "run"
    args = ["dataset=mnist_imbalanced", "trainer.max_steps=1", "trainer.final_weights=0"]
    proc = run_command(
        [sys.executable, "-X", "importtime", "-m", "reweight", *args, f"hydra.run.dir={run}"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = _imported(proc.stderr)
    assert {"torch", "reweight.cli.app", "reweight.data.mnist", "reweight.models.lenet"} <= imported
    assert not {m for m in imported if m.split(".")[0] == "torchvision"}
    # the report does see torchvision where a model needs it
    probe = "from reweight.models import build_model; build_model('vit_tiny', 10, 1, (1, 28, 28))"
    proc = run_command([sys.executable, "-X", "importtime", "-c", probe], tmp_path)
    assert proc.returncode == 0 and "torchvision.models" in _imported(proc.stderr), proc.stderr


@pytest.mark.slow
def test_the_cli_exits_with_the_heap_frozen_after_the_exit_handlers_it_let_run(tmp_path: Path):
    """The interpreter's last garbage collection walks every object torch, Hydra and
    matplotlib made (~2 s of each exit): ``main()`` freezes the heap at exit instead, after the
    exit handlers registered once it ran (a tracker's) and only once per process."""
    script = """
import atexit, gc, sys
atexit.register(lambda: print("at the end, frozen:", gc.get_freeze_count() > 0))
from reweight.cli import main
for _ in range(2):
    sys.argv = ["reweight", "trainer.batch_size=0"]
    try:
        main()
    except SystemExit as stop:
        print("exit", stop.code, "exit handlers:", atexit._ncallbacks())
atexit.register(lambda: print("a later handler, frozen:", gc.get_freeze_count() > 0))
print("before exit, frozen:", gc.get_freeze_count() > 0)
"""
    proc = run_command([sys.executable, "-c", script], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    first, second = lines[0].split("exit handlers:"), lines[1].split("exit handlers:")
    assert first[0] == second[0] == "exit 2 " and first[1] == second[1]  # registered once
    assert lines[2:] == [
        "before exit, frozen: False",
        "a later handler, frozen: False",
        "at the end, frozen: True",
    ]
    assert proc.stderr.count("error: trainer.batch_size must be >= 1") == 2
