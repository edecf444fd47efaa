"""No function in timellm_lib is longer than a reader takes in at once (60 lines, docstring
included), so each can be read whole."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "timellm_lib"
MAX_LINES = 60


def long_functions(source: str, limit: int = MAX_LINES) -> list[tuple[str, int]]:
    """(name, lines) of every function or method longer than ``limit`` lines."""
    return [
        (node.name, node.end_lineno - node.lineno + 1)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > limit
    ]


def test_no_function_in_the_package_is_longer_than_60_lines() -> None:
    found = {
        str(path.relative_to(PACKAGE)): hits
        for path in sorted(PACKAGE.rglob("*.py"))
        if (hits := long_functions(path.read_text()))
    }
    assert found == {}


def test_the_length_check_counts_nested_functions() -> None:
    body = "".join(f"        x{i} = {i}\n" for i in range(60))
    source = f"def outer():\n    def inner():\n{body}"
    assert long_functions(source) == [("outer", 62), ("inner", 61)]
