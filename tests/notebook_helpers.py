"""Run a notebook headless the way its smoke config says, for the notebook tests.

Every notebook ships ``configs/notebooks/<number>_smoke.yaml``; a test changes a few of those
parameters (output folders under its tmp_path), checks them as the notebook's first cell
would, so that a typo fails here with a clear message instead of inside the kernel, and runs
the notebook with papermill from the repository root, as ``make`` and JupyterLab do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nbformat
import papermill
import yaml

from timellm_lib.notebooks.notebook_params import check, parse_parameters_cell


def execute_notebook(
    repo_root: Path, tmp_path: Path, number: str, **changes: Any
) -> nbformat.NotebookNode:
    """Run notebooks/<number>_*.ipynb with its smoke parameters updated by ``changes``; the
    executed notebook (also written to ``tmp_path``)."""
    notebook = next((repo_root / "notebooks").glob(f"{number}_*.ipynb"))
    smoke = repo_root / "configs" / "notebooks" / f"{number}_smoke.yaml"
    params = yaml.safe_load(smoke.read_text()) | changes
    check(params, parse_parameters_cell(notebook), notebook.name, repo_root)
    executed = tmp_path / notebook.name
    papermill.execute_notebook(
        str(notebook),
        str(executed),
        parameters=params,
        kernel_name="python3",
        cwd=str(repo_root),
        progress_bar=False,
    )
    return nbformat.read(executed, as_version=4)
