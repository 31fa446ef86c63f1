"""The package's shape (issue #23): no module over 500 lines, and no function over 60 lines
unless the first comment inside it says why (a comment that begins ``# Why``)."""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "reweight"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60


def _first_comment(source: str, first: int, last: int) -> str | None:
    """The first comment between lines ``first`` and ``last`` (1-based, inclusive)."""
    lines = source.splitlines(keepends=True)[first - 1 : last]
    for tok in tokenize.generate_tokens(io.StringIO("".join(lines)).readline):
        if tok.type == tokenize.COMMENT:
            return tok.string
    return None


def too_long(source: str, name: str = "<source>") -> list[str]:
    """What breaks the shape in one module's source, one line each."""
    out = []
    n = len(source.splitlines())
    if n > MAX_MODULE_LINES:
        out.append(f"{name}: {n} lines (at most {MAX_MODULE_LINES})")
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        length = node.end_lineno - node.lineno + 1
        if length <= MAX_FUNCTION_LINES:
            continue
        comment = _first_comment(source, node.body[0].lineno, node.end_lineno)
        if comment is None or not comment.lstrip("# ").startswith("Why"):
            out.append(f"{name}:{node.lineno} {node.name}: {length} lines and no '# Why' comment")
    return out


def test_no_module_over_500_lines_and_no_function_over_60_without_a_reason():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 50  # the package was read
    found = [line for f in files for line in too_long(f.read_text(), str(f.relative_to(PACKAGE)))]
    assert found == []


def test_the_shape_check_finds_what_it_must():
    body = "".join(f"    x{i} = {i}\n" for i in range(61))
    long = f"def f():\n    '''doc'''\n{body}"
    assert too_long(long) == ["<source>:1 f: 63 lines and no '# Why' comment"]
    explained = (
        f"def f():\n    '''doc'''\n    # Why one function: the steps share six locals\n{body}"
    )
    assert too_long(explained) == []
    # a comment after the function does not count for it
    assert len(too_long(long + "\n\n# Why not\ndef g():\n    pass\n")) == 1
    assert too_long("x = 1\n" * 501) == ["<source>: 501 lines (at most 500)"]
    assert too_long("x = 1\n" * 500) == []
