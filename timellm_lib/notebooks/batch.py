"""Batch runs of notebooks with papermill: a YAML plan in, a summary table out.

A plan lists runs, each a notebook with parameters, or a grid whose every combination is a
run (``parameters`` then hold what the grid's runs share)::

    cwd: .                      # where notebooks run (from the current directory);
                                # the notebook and output_dir paths below start here
    output_dir: outputs/notebooks
    kernel: python3
    cell_timeout: 600           # seconds any one cell may take (papermill execution_timeout)
    runs:                       # an entry may set its own cell_timeout
      - notebook: notebooks/01_train.ipynb
        parameters: {config: configs/smoke.yaml}
      - notebook: notebooks/01_train.ipynb
        grid: {seed: [1, 2], lr: [1e-3, 5e-4]}
        parameters: {config: configs/smoke.yaml}

The whole plan is checked before any kernel starts: every parameter name and type against
the notebook's parameters cell (papermill itself only warns about unknown names, after the
run), the kernel and the output names. A bad plan is one WorkbenchError; a notebook that
fails while running is a ``failed`` row with its error, and the other runs still go ahead.
Each run writes ``<output_dir>/<notebook>__<parameter-slug>.ipynb``.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import yaml
from tqdm.auto import tqdm

from timellm_lib.errors import WorkbenchError
from timellm_lib.notebooks import notebook_params
from timellm_lib.yaml_input import StrictLoader

if TYPE_CHECKING:
    from papermill import PapermillExecutionError

PLAN_KEYS = {"runs", "cwd", "output_dir", "kernel", "cell_timeout"}
RUN_KEYS = {"notebook", "parameters", "grid", "cell_timeout"}
SUMMARY_COLUMNS = ["notebook", "parameters", "status", "seconds", "output", "error"]
SLUG_MAX = 80


class _PlanLoader(StrictLoader):
    """YAML with 1.2 floats: PyYAML reads ``1e-3`` (no dot) as a string, and plans write
    learning rates exactly that way."""


_PlanLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+.0123456789"),
)


@dataclass
class Run:
    notebook: Path
    parameters: dict[str, Any]
    output: Path
    cell_timeout: float | None  # seconds; None: no limit


def load_plan(plan: str | Path | dict[str, Any]) -> dict[str, Any]:
    if isinstance(plan, dict):
        return plan
    path = Path(plan)
    if not path.is_file():
        raise WorkbenchError(f"plan file {path} does not exist; pass a YAML plan (see batch.py)")
    try:
        loaded = yaml.load(path.read_text(), Loader=_PlanLoader)
    except yaml.YAMLError as err:
        raise WorkbenchError(f"plan file {path} is not valid YAML: {err}") from err
    if not isinstance(loaded, dict):
        raise WorkbenchError(f"plan file {path} must be a mapping with a 'runs' list")
    return loaded


def param_slug(parameters: dict[str, Any]) -> str:
    """``seed=1_lr=0.001`` made file-name safe; long ones are cut and given a short hash."""
    if not parameters:
        return "defaults"
    text = "_".join(
        f"{k}={json.dumps(v) if isinstance(v, list | dict) else v}" for k, v in parameters.items()
    )
    slug = re.sub(r"[^A-Za-z0-9_.=+-]+", "-", text).strip("-")
    if len(slug) <= SLUG_MAX:
        return slug
    digest = hashlib.sha1(json.dumps(parameters, sort_keys=True).encode()).hexdigest()[:8]
    return f"{slug[: SLUG_MAX - 9]}_{digest}"


def expand_runs(plan: dict[str, Any], cwd: Path) -> list[Run]:
    """Every run of the plan, with paths resolved against ``cwd``."""
    unknown = set(plan) - PLAN_KEYS
    if unknown:
        raise WorkbenchError(f"unknown plan key(s) {sorted(unknown)}; allowed: {sorted(PLAN_KEYS)}")
    entries = plan.get("runs")
    if not isinstance(entries, list) or not entries:
        raise WorkbenchError(
            "the plan needs a non-empty 'runs' list of {notebook, parameters} entries"
        )
    output_dir = cwd / plan.get("output_dir", "outputs/notebooks")
    runs = []
    for number, entry in enumerate(entries, start=1):
        where = f"plan run {number}"
        if not isinstance(entry, dict) or "notebook" not in entry or set(entry) - RUN_KEYS:
            raise WorkbenchError(
                f"{where} must be a mapping with 'notebook' and optional {sorted(RUN_KEYS)} "
                f"(got {entry!r})"
            )
        common = entry.get("parameters") or {}
        grid = entry.get("grid") or {}
        if not isinstance(common, dict) or not isinstance(grid, dict):
            raise WorkbenchError(f"{where}: 'parameters' and 'grid' must be mappings")
        bad = [k for k, v in grid.items() if not isinstance(v, list) or not v]
        if bad:
            raise WorkbenchError(f"{where}: grid values of {bad} must be non-empty lists")
        shared = sorted(set(grid) & set(common))
        if shared:
            raise WorkbenchError(f"{where}: {shared} appear in both 'grid' and 'parameters'")
        notebook = cwd / entry["notebook"]
        timeout = entry.get("cell_timeout", plan.get("cell_timeout"))
        for combination in itertools.product(*grid.values()):
            parameters = common | dict(zip(grid, combination, strict=True))
            output = output_dir / f"{notebook.stem}__{param_slug(parameters)}.ipynb"
            runs.append(Run(notebook, parameters, output, timeout))
    outputs = [r.output for r in runs]
    twice = sorted({str(o) for o in outputs if outputs.count(o) > 1})
    if twice:
        raise WorkbenchError(
            f"the plan runs the same notebook with the same parameters more than once {twice}; "
            "remove the duplicates"
        )
    return runs


def check_runs(runs: list[Run], cwd: Path) -> None:
    """Names, types and config/checkpoint files of every run, against each notebook's
    parameters cell, reported together so one edit fixes the plan."""
    problems, specs = [], {}
    for notebook in dict.fromkeys(r.notebook for r in runs):
        try:
            specs[notebook] = notebook_params.parse_parameters_cell(notebook)
        except WorkbenchError as err:
            problems.append(str(err))
    for number, run in enumerate(runs, start=1):
        if run.notebook not in specs:
            continue
        try:
            notebook_params.check(run.parameters, specs[run.notebook], run.notebook.name, cwd)
        except WorkbenchError as err:
            problems.append(f"run {number}: {err}")
    if problems:
        raise WorkbenchError("the plan was not started: " + " | ".join(problems))


def check_kernel(kernel: str) -> None:
    from jupyter_client.kernelspec import KernelSpecManager

    available = KernelSpecManager().find_kernel_specs()
    if kernel not in available:
        raise WorkbenchError(
            f"Jupyter kernel {kernel!r} is not installed (found {sorted(available)}); install it "
            f"with `python -m ipykernel install --sys-prefix --name {kernel}` (make setup does)"
        )


def describe_failure(err: Exception) -> str:
    """``ename: evalue`` plus the cell line that raised, from papermill's error; ``In [n]``
    is the execution count the executed notebook shows on that cell."""
    from papermill import PapermillExecutionError

    if not isinstance(err, PapermillExecutionError):
        return f"{type(err).__name__}: {err}"
    return f"{err.ename}: {err.evalue} (In [{err.exec_count}]: {failing_line(err)})"


def failing_line(err: PapermillExecutionError) -> str:
    """The notebook cell's own line from the IPython traceback (the ``---->`` line of the
    first ``Cell In[...]`` frame), falling back to the cell's first line."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(err.traceback))
    frame = plain.split("Cell In[", 1)[-1] if "Cell In[" in plain else ""
    marked = re.search(r"^-+> +\d+ (.*)$", frame, flags=re.M)
    if marked:
        return marked.group(1).strip()
    return err.source.strip().splitlines()[0] if err.source.strip() else ""


def run_plan(
    plan: str | Path | dict[str, Any], cwd: str | Path | None = None, progress: bool = True
) -> pd.DataFrame:
    """Execute every run of the plan; returns the summary (one row per run, SUMMARY_COLUMNS).

    ``cwd`` overrides the plan's ``cwd`` (default: the current directory).
    """
    import papermill  # imported here: it loads nbformat's schema validator, a second or two

    plan = load_plan(plan)
    base = Path(cwd if cwd is not None else plan.get("cwd", ".")).resolve()
    runs = expand_runs(plan, base)
    check_runs(runs, base)
    kernel = plan.get("kernel", "python3")
    check_kernel(kernel)
    rows = []
    for run in tqdm(runs, desc="notebooks", unit="run", disable=not progress):
        run.output.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        error = ""
        try:
            papermill.execute_notebook(
                str(run.notebook),
                str(run.output),
                parameters=run.parameters,
                kernel_name=kernel,
                cwd=str(base),
                execution_timeout=run.cell_timeout,
                progress_bar=False,  # one bar over runs; per-cell bars would interleave
            )
        except Exception as err:  # one failing notebook must not stop the batch
            error = describe_failure(err)
        rows.append(
            {
                "notebook": os.path.relpath(run.notebook, base),
                "parameters": json.dumps(run.parameters),
                "status": "failed" if error else "ok",
                "seconds": round(time.perf_counter() - started, 1),
                "output": str(run.output),
                "error": error,
            }
        )
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


# ------------------------------------------------------------------------------ timellm batch


def format_summary(summary: pd.DataFrame) -> str:
    """The table without errors, then each failure with its error on its own lines."""
    lines = [summary.drop(columns="error").to_string(index=False)]
    for row in summary[summary["status"] == "failed"].itertuples():
        lines.append(f"\nFAILED {row.output}\n  {row.error}")
    return "\n".join(lines)


def run_batch(args: argparse.Namespace) -> int:
    """Run the plan and print the summary; exit code 1 when any notebook failed."""
    summary = run_plan(args.plan, cwd=args.cwd, progress=not args.no_progress)
    if args.summary_csv:
        Path(args.summary_csv).parent.mkdir(parents=True, exist_ok=True)
        summary.to_csv(args.summary_csv, index=False)
    print(format_summary(summary))
    return 1 if (summary["status"] == "failed").any() else 0
