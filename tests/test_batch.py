"""The papermill batch driver: plans, grids, refusals before execution, and real runs."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml

from timellm_lib.cli import build_parser
from timellm_lib.errors import WorkbenchError
from timellm_lib.notebooks import batch


def tiny_notebook(path: Path) -> Path:
    """Writes 10 / divisor into out_dir: divisor 0 fails inside the notebook."""
    cells = [
        nbformat.v4.new_code_cell(
            'divisor: int = 1  # what 10 is divided by\nout_dir: str = "."  # where results go',
            metadata={"tags": ["parameters"]},
        ),
        nbformat.v4.new_code_cell(
            "from pathlib import Path\n\n"
            'Path(out_dir, f"result_{divisor}.txt").write_text(str(10 / divisor))'
        ),
    ]
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata.kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


@pytest.fixture
def plan(tmp_path):
    tiny_notebook(tmp_path / "tiny.ipynb")
    (tmp_path / "results").mkdir()
    return {
        "output_dir": "executed",
        "cell_timeout": 60,
        "runs": [
            {
                "notebook": "tiny.ipynb",
                "grid": {"divisor": [2, 5]},
                "parameters": {"out_dir": "results"},
            },
            {"notebook": "tiny.ipynb", "parameters": {"divisor": 0, "out_dir": "results"}},
        ],
    }


def test_expand_runs_makes_one_run_per_grid_point_with_a_readable_name(plan, tmp_path):
    runs = batch.expand_runs(plan, tmp_path)
    assert [r.parameters for r in runs] == [
        {"out_dir": "results", "divisor": 2},
        {"out_dir": "results", "divisor": 5},
        {"divisor": 0, "out_dir": "results"},
    ]
    assert runs[0].output == tmp_path / "executed" / "tiny__out_dir=results_divisor=2.ipynb"
    assert [r.cell_timeout for r in runs] == [60, 60, 60]
    plan["runs"][1]["cell_timeout"] = 5
    assert batch.expand_runs(plan, tmp_path)[2].cell_timeout == 5


def test_param_slug_is_file_name_safe_and_bounded():
    assert batch.param_slug({}) == "defaults"
    assert batch.param_slug({"config": "configs/smoke.yaml", "lr": 5e-4}) == (
        "config=configs-smoke.yaml_lr=0.0005"
    )
    long = batch.param_slug({"run_dirs": [f"outputs/exp/run_{i}" for i in range(20)]})
    assert len(long) == batch.SLUG_MAX and "/" not in long


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"runs": []}, "non-empty 'runs' list"),
        ({"workers": 2}, r"unknown plan key\(s\) \['workers'\]"),
        ({"runs": [{"notebook": "tiny.ipynb", "grid": {"divisor": 2}}]}, "must be non-empty lists"),
        (
            {
                "runs": [
                    {
                        "notebook": "tiny.ipynb",
                        "grid": {"divisor": [1]},
                        "parameters": {"divisor": 2},
                    }
                ]
            },
            r"\['divisor'\] appear in both",
        ),
        ({"runs": [{"notebook": "tiny.ipynb"}, {"notebook": "tiny.ipynb"}]}, "more than once"),
    ],
)
def test_malformed_plans_are_refused(plan, tmp_path, change, message):
    with pytest.raises(WorkbenchError, match=message):
        batch.run_plan(plan | change, cwd=tmp_path, progress=False)


def test_unknown_names_and_wrong_types_are_refused_before_anything_runs(plan, tmp_path):
    plan["runs"].append({"notebook": "tiny.ipynb", "parameters": {"divisr": 3}})
    plan["runs"].append({"notebook": "tiny.ipynb", "parameters": {"divisor": "3"}})
    plan["runs"].append({"notebook": "missing.ipynb"})
    with pytest.raises(WorkbenchError) as err:
        batch.run_plan(plan, cwd=tmp_path, progress=False)
    message = str(err.value)
    assert "the plan was not started" in message
    assert "missing.ipynb does not exist" in message
    assert (
        "run 4: tiny.ipynb: unknown parameter(s) ['divisr']; tiny.ipynb takes: divisor (int), out_dir (str)"
        in message
    )
    assert "run 5: tiny.ipynb: parameter divisor must be int, got '3' (str)" in message
    assert not (tmp_path / "executed").exists()


def test_a_missing_kernel_is_refused_with_the_install_command(plan, tmp_path):
    with pytest.raises(WorkbenchError, match="--name no-such-kernel"):
        batch.run_plan(plan | {"kernel": "no-such-kernel"}, cwd=tmp_path, progress=False)


def test_plan_yaml_reads_exponent_floats_as_numbers(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text("runs:\n  - notebook: a.ipynb\n    grid: {lr: [1e-3, 5.0e-4, 2]}\n")
    assert batch.load_plan(path)["runs"][0]["grid"]["lr"] == [1e-3, 5e-4, 2]
    with pytest.raises(WorkbenchError, match="does not exist"):
        batch.load_plan(tmp_path / "nope.yaml")
    path.write_text("runs:\n  - notebook: a.ipynb\n    grid: {lr: [1e-3]}\n    grid: {}\n")
    with pytest.raises(WorkbenchError, match=r"'grid' appears twice \(lines 3 and 4\)"):
        batch.load_plan(path)


@pytest.mark.slow
def test_batch_runs_every_notebook_and_reports_the_failure(plan, tmp_path, capsys):
    """Three real papermill runs: two grid points succeed, divisor 0 fails in its cell."""
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan | {"cwd": str(tmp_path)}))
    csv = tmp_path / "summary.csv"
    args = build_parser().parse_args(
        ["batch", str(tmp_path / "plan.yaml"), "--no-progress", "--summary-csv", str(csv)]
    )
    assert batch.run_batch(args) == 1

    summary = pd.read_csv(csv, keep_default_na=False)
    assert list(summary.columns) == batch.SUMMARY_COLUMNS
    assert summary["status"].tolist() == ["ok", "ok", "failed"]
    assert [json.loads(p)["divisor"] for p in summary["parameters"]] == [2, 5, 0]
    assert summary["notebook"].tolist() == ["tiny.ipynb"] * 3
    assert all(Path(p).is_file() for p in summary["output"])  # the failed one too
    assert Path(summary["output"][2]).name == "tiny__divisor=0_out_dir=results.ipynb"
    assert summary["error"][:2].tolist() == ["", ""]
    assert summary["error"][2] == (
        "ZeroDivisionError: division by zero (In [3]: "
        'Path(out_dir, f"result_{divisor}.txt").write_text(str(10 / divisor)))'
    )
    assert (tmp_path / "results" / "result_2.txt").read_text() == "5.0"
    assert (tmp_path / "results" / "result_5.txt").read_text() == "2.0"
    printed = capsys.readouterr().out
    assert printed.count(" ok ") == 2
    assert f"FAILED {summary['output'][2]}\n  ZeroDivisionError" in printed
