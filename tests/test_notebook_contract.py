"""The notebook contract (every notebooks/*.ipynb), parameter checking, and a smoke run of 06."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pandas as pd
import papermill
import pytest
import yaml
from notebook_helpers import execute_notebook
from test_runs import make_runs

from timellm_lib.errors import WorkbenchError
from timellm_lib.notebooks.notebook_params import (
    Param,
    check,
    init_notebook,
    matches_type,
    parse_parameters_cell,
)

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
by_name = pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])


def test_there_are_notebooks():
    assert any(p.name == "06_runs_explorer.ipynb" for p in NOTEBOOKS)


@by_name
def test_committed_clean_with_the_python3_kernel(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    assert all("sys.path" not in c.source for c in nb.cells)


@by_name
def test_every_parameter_line_is_typed_and_documented(path):
    cell = next(
        c for c in nbformat.read(path, 4).cells if "parameters" in c.metadata.get("tags", [])
    )
    params = parse_parameters_cell(
        path
    )  # exactly one cell; each line `name: type = literal  # help`
    assert len(params) == len([line for line in cell.source.splitlines() if line.strip()])
    assert all(p.help for p in params)


@by_name
def test_papermill_help_lists_every_parameter_with_its_help(path):
    inspected = papermill.inspect_notebook(str(path))
    assert {n: (p["inferred_type_name"], p["help"]) for n, p in inspected.items()} == {
        p.name: (p.type, p.help) for p in parse_parameters_cell(path)
    }


@by_name
def test_smoke_parameters_fit_the_notebook(path):
    """configs/notebooks/<number>_smoke.yaml, when a notebook has one, names only its
    parameters, with the right types and existing config/checkpoint files."""
    repo_root = path.parents[1]
    smoke = repo_root / "configs" / "notebooks" / f"{path.stem.split('_')[0]}_smoke.yaml"
    if not smoke.is_file():
        pytest.skip(f"{path.name} has no {smoke.name}")
    check(yaml.safe_load(smoke.read_text()), parse_parameters_cell(path), path.name, repo_root)


# --------------------------------------------------------------------------- notebook_params


def write_notebook(path: Path, parameter_lines: list[str], n_parameter_cells: int = 1) -> Path:
    cells = [
        nbformat.v4.new_code_cell("\n".join(parameter_lines), metadata={"tags": ["parameters"]})
        for _ in range(n_parameter_cells)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nbformat.v4.new_notebook(cells=cells), path)
    return path


GOOD = [
    'config: str = "configs/smoke.yaml"  # run config',
    "",
    "seeds: list[int] = [1, 2]  # seeds to run",
    "lr: float = 1e-3  # learning rate",
    "plot: bool = True  # draw figures",
]


def test_parse_parameters_cell_reads_names_types_defaults_and_help(tmp_path):
    params = parse_parameters_cell(write_notebook(tmp_path / "nb.ipynb", GOOD))
    assert params == [
        Param("config", "str", "configs/smoke.yaml", "run config"),
        Param("seeds", "list[int]", [1, 2], "seeds to run"),
        Param("lr", "float", 1e-3, "learning rate"),
        Param("plot", "bool", True, "draw figures"),
    ]


@pytest.mark.parametrize(
    ("lines", "n_cells", "message"),
    [
        (["x: int = 1"], 1, r"line 1 \('x: int = 1'\) must read `name: type = literal  # help`"),
        (["x = 1  # no type"], 1, "must read"),
        (['x: int = "one"  # h'], 1, "the default is not of type int"),
        (["x: tuple = (1,)  # h"], 1, "type tuple is not one of"),
        (["x: str = some_name  # h"], 1, "the default must be a Python literal"),
        (["x: int = 1  # h"], 2, "has 2 cells tagged 'parameters'"),
        (["x: int = 1  # h"], 0, "has 0 cells tagged 'parameters'"),
    ],
)
def test_parse_parameters_cell_refuses_what_papermill_would_misread(
    tmp_path, lines, n_cells, message
):
    path = write_notebook(tmp_path / "nb.ipynb", lines, n_cells)
    with pytest.raises(WorkbenchError, match=message):
        parse_parameters_cell(path)


def test_a_file_that_is_not_a_notebook_is_refused(tmp_path):
    (tmp_path / "nb.ipynb").write_text("print('hello')")
    with pytest.raises(WorkbenchError, match="is not a Jupyter notebook"):
        parse_parameters_cell(tmp_path / "nb.ipynb")
    with pytest.raises(WorkbenchError, match="does not exist"):
        parse_parameters_cell(tmp_path / "other.ipynb")


@pytest.mark.parametrize(
    ("value", "type_text", "ok"),
    [
        (1, "float", True),
        (True, "int", False),
        (True, "float", False),
        (1.5, "int", False),
        ("a", "str", True),
        (["a", "b"], "list[str]", True),
        (["a", 1], "list[str]", False),
        ([1, 2.5], "list[float]", True),
        ((1, 2), "list", False),
        ({"a": 1}, "dict", True),
    ],
)
def test_matches_type(value, type_text, ok):
    assert matches_type(value, type_text) is ok


def test_check_refuses_unknown_names_wrong_types_and_missing_files(tmp_path):
    params = parse_parameters_cell(write_notebook(tmp_path / "nb.ipynb", GOOD))
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "smoke.yaml").write_text("{}")
    check({"config": "configs/smoke.yaml", "lr": 1, "seeds": []}, params, "nb", root=tmp_path)
    with pytest.raises(WorkbenchError) as err:
        check({"learning_rate": 0.1, "lr": "fast", "config": "nope.yaml"}, params, "nb", tmp_path)
    message = str(err.value)
    assert (
        "unknown parameter(s) ['learning_rate']; nb takes: config (str), seeds (list[int])"
        in message
    )
    assert "parameter lr must be float, got 'fast' (str)" in message
    assert "config = 'nope.yaml' is not an existing file" in message


def test_init_notebook_moves_to_the_repository_root_and_checks_types(tmp_path, monkeypatch):
    write_notebook(tmp_path / "notebooks" / "nb.ipynb", GOOD)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "smoke.yaml").write_text("{}")
    values = {"config": "configs/smoke.yaml", "seeds": [3], "lr": 0.1, "plot": False}
    monkeypatch.chdir(tmp_path / "notebooks")  # where JupyterLab starts the kernel
    assert init_notebook({**values, "other": 1}, "nb.ipynb") == values
    assert Path.cwd() == tmp_path
    with pytest.raises(WorkbenchError, match="parameter seeds must be list.int., got 3"):
        init_notebook(values | {"seeds": 3}, "nb.ipynb")
    with pytest.raises(
        WorkbenchError, match=r"run the parameters cell first \(missing \['plot'\]\)"
    ):
        init_notebook({k: v for k, v in values.items() if k != "plot"}, "nb.ipynb")
    os.chdir(tmp_path / "configs")
    with pytest.raises(WorkbenchError, match="cannot find notebooks/nb.ipynb"):
        init_notebook(values, "nb.ipynb")


# ---------------------------------------------------------------------- 06 with papermill


@pytest.mark.slow
def test_runs_explorer_notebook_runs_headless(repo_root, tmp_path):
    runs = make_runs(tmp_path / "outputs")
    nb = execute_notebook(
        repo_root,
        tmp_path,
        "06",
        runs_root=str(tmp_path / "outputs"),
        export_csv=str(tmp_path / "long.csv"),
    )
    long = pd.read_csv(tmp_path / "long.csv")
    assert set(long["run"]) == {f"exp/{name}" for name in runs}
    assert (long.groupby("run")["metric"].apply(set).map(lambda m: {"loss", "val_loss"} <= m)).all()
    mime_types = {
        mime
        for cell in nb.cells
        for output in cell.get("outputs", [])
        for mime in output.get("data", {})
    }
    assert {"image/png", "application/vnd.plotly.v1+json", "text/html"} <= mime_types
