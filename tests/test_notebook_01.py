"""01_train.ipynb under papermill with smoke parameters: it trains, evaluates and plots."""

from __future__ import annotations

import json

import pytest
from notebook_helpers import execute_notebook


@pytest.mark.slow
def test_train_notebook_writes_a_complete_run_and_its_figures(repo_root, tmp_path):
    run_dir = tmp_path / "run"
    executed = execute_notebook(
        repo_root, tmp_path, "01", run_dir=str(run_dir), overrides=["train.epochs=1"]
    )
    for name in ["config.yaml", "metrics.jsonl", "eval_test.json", "checkpoints/best.pt"]:
        assert (run_dir / name).is_file(), name
    assert (run_dir / "checkpoints/final.pt").is_file()
    assert json.loads((run_dir / "eval_test.json").read_text())["n_windows"] > 0
    outputs = [o for c in executed.cells for o in c.get("outputs", [])]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    plotly = [o for o in outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert len(images) >= 3  # live loss plot, loss curves, forecasts
    assert len(plotly) >= 2  # interactive loss curves and forecasts
