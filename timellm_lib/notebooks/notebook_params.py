"""Notebook parameters: one source of truth, checked before and during execution.

Every notebook has exactly one cell tagged ``parameters`` made only of lines like::

    smooth: int = 1  # moving-average window of the train loss

That single line feeds three readers: papermill (which injects overrides in a cell after it
and documents it in ``papermill --help-notebook``), the batch driver (which refuses unknown
names and wrong types *before* starting a kernel, since papermill only warns about unknown
names) and the notebook itself, whose first code cell after the parameters calls::

    params = notebook_params.init_notebook(globals(), "06_runs_explorer.ipynb")

``init_notebook`` makes relative paths mean the same everywhere by working from the
repository root (papermill runs with ``--cwd`` at the root; JupyterLab starts kernels in
``notebooks/``, so it moves up one level), then checks the injected values' types against
the annotations and refuses names papermill injected that the parameters cell does not
declare (``papermill -p nosuch 1`` only warns and would run the whole notebook without it).

Parameters named ``config``, ``checkpoint``, ``ckpt`` or ending in ``_config``,
``_checkpoint``, ``_ckpt`` are file paths: when not empty they must name an existing file.
"""

from __future__ import annotations

import ast
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from timellm_lib.errors import WorkbenchError

TYPES = ("str", "int", "float", "bool", "list", "dict", "list[str]", "list[int]", "list[float]")
PARAMETER_LINE = re.compile(
    r"^(?P<name>[A-Za-z_]\w*): (?P<type>[\w\[\]]+) = (?P<literal>.+?)  # (?P<help>\S.*)$"
)
PYTHON_TYPES = {
    "str": str,
    "int": int,
    "float": (int, float),
    "bool": bool,
    "list": list,
    "dict": dict,
}
FILE_PARAMETERS = ("config", "checkpoint", "ckpt")
NOTEBOOKS_DIR = "notebooks"
INJECTED_MARKER = "# Parameters\n"  # how papermill's python translator opens its cell


@dataclass(frozen=True)
class Param:
    name: str
    type: str  # annotation text, one of TYPES
    default: Any
    help: str


def parameters_source(path: Path) -> str:
    """The source of the one cell tagged ``parameters``; zero or several is an error.

    The notebook is read as plain JSON: nbformat would cost every notebook kernel a second
    of imports (its schema validator) for one field.
    """
    try:
        cells = json.loads(path.read_text())["cells"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise WorkbenchError(f"{path} is not a Jupyter notebook (no JSON 'cells' list)") from err
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(tagged) != 1:
        raise WorkbenchError(
            f"{path} has {len(tagged)} cells tagged 'parameters'; tag exactly one code cell"
        )
    source = tagged[0]["source"]
    return "".join(source) if isinstance(source, list) else source


def parse_parameters_cell(path: str | Path) -> list[Param]:
    """Read a notebook's parameters, checking every line has the ``name: type = literal  #
    help`` form and that each literal is of its annotated type."""
    path = Path(path)
    if not path.is_file():
        raise WorkbenchError(f"notebook {path} does not exist; check the path")
    params = []
    for number, line in enumerate(parameters_source(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} parameters cell line {number} ({line.strip()!r})"
        match = PARAMETER_LINE.match(line)
        if match is None:
            raise WorkbenchError(
                f"{where} must read `name: type = literal  # help` (two spaces before #)"
            )
        if match["type"] not in TYPES:
            raise WorkbenchError(f"{where}: type {match['type']} is not one of {list(TYPES)}")
        try:
            default = ast.literal_eval(match["literal"])
        except (ValueError, SyntaxError) as err:
            raise WorkbenchError(f"{where}: the default must be a Python literal") from err
        if not matches_type(default, match["type"]):
            raise WorkbenchError(f"{where}: the default is not of type {match['type']}")
        params.append(Param(match["name"], match["type"], default, match["help"]))
    return params


def matches_type(value: Any, type_text: str) -> bool:
    """Whether ``value`` fits an annotation of TYPES (an int is a fine float, a bool no int)."""
    if isinstance(value, bool) and type_text in ("int", "float"):
        return False
    if type_text.startswith("list["):
        return isinstance(value, list) and all(matches_type(v, type_text[5:-1]) for v in value)
    return isinstance(value, PYTHON_TYPES[type_text])


def is_file_parameter(name: str) -> bool:
    return any(name == s or name.endswith(f"_{s}") for s in FILE_PARAMETERS)


def check(
    values: Mapping[str, Any],
    params: list[Param],
    notebook: str = "the notebook",
    root: str | Path = ".",
) -> None:
    """Refuse unknown names, wrong types and missing config/checkpoint files, all at once.

    Relative file paths are taken from ``root``, the directory the notebook will run in.
    """
    known = {p.name: p for p in params}
    problems = []
    unknown = sorted(set(values) - set(known))
    if unknown:
        listing = ", ".join(f"{p.name} ({p.type})" for p in params)
        problems.append(f"unknown parameter(s) {unknown}; {notebook} takes: {listing}")
    for name, value in values.items():
        param = known.get(name)
        if param is None:
            continue
        if not matches_type(value, param.type):
            problems.append(
                f"parameter {name} must be {param.type}, got {value!r} ({type(value).__name__})"
            )
        elif is_file_parameter(name) and value and not (Path(root) / value).is_file():
            problems.append(
                f"parameter {name} = {value!r} is not an existing file (relative paths start at "
                f"{Path(root).resolve()}); pass the path of an existing file"
            )
    if problems:
        raise WorkbenchError(f"{notebook}: " + "; ".join(problems))


def find_notebook(name: str) -> Path:
    """Locate ``name`` as ``notebooks/<name>`` below the working directory or as ``<name>``
    inside a working directory called notebooks/ (how JupyterLab starts kernels)."""
    cwd = Path.cwd()
    for candidate in (cwd / NOTEBOOKS_DIR / name, cwd / name):
        if candidate.is_file() and candidate.parent.name == NOTEBOOKS_DIR:
            return candidate
    raise WorkbenchError(
        f"cannot find {NOTEBOOKS_DIR}/{name} from the working directory {cwd}; run papermill "
        f"with `--cwd` set to the repository root (as `make demo` does) or open the notebook "
        f"from {NOTEBOOKS_DIR}/ in JupyterLab"
    )


def init_notebook(namespace: Mapping[str, Any], notebook: str) -> dict[str, Any]:
    """Work from the repository root and check this notebook's parameter values.

    Call it in the first code cell after the parameters with ``globals()``; returns the
    parameter values by name, so the notebook can show what it runs with.
    """
    path = find_notebook(notebook)
    os.chdir(path.parent.parent)
    params = parse_parameters_cell(path)
    missing = [p.name for p in params if p.name not in namespace]
    if missing:
        raise WorkbenchError(f"{notebook}: run the parameters cell first (missing {missing})")
    values = {p.name: namespace[p.name] for p in params}
    injected = {name: namespace.get(name) for name in injected_names(namespace)}
    check({**injected, **values}, params, notebook)
    return values


def injected_names(namespace: Mapping[str, Any]) -> list[str]:
    """Names assigned by the newest cell papermill injected (its source starts with
    ``# Parameters``), read from IPython's input history ``In``; none outside IPython or
    without papermill."""
    history = namespace.get("In")
    if not isinstance(history, list):
        return []
    for source in reversed(history):
        if isinstance(source, str) and source.startswith(INJECTED_MARKER):
            try:
                tree = ast.parse(source)
            except SyntaxError:
                return []
            return [
                target.id
                for node in tree.body
                if isinstance(node, ast.Assign)
                for target in node.targets
                if isinstance(target, ast.Name)
            ]
    return []
