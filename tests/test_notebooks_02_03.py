"""Notebooks 02 (checkpoint anatomy) and 03 (resume walkthrough) run headless with papermill
on their smoke parameters, and say what they must: the run files exist, every question has
its heading, the computed claims came out true and the figures were drawn."""

from __future__ import annotations

import nbformat
import papermill
import pytest
import yaml
from notebook_helpers import execute_notebook
from trainer_helpers import tiny_config

from timellm_lib.notebooks.walkthrough import MARKER
from timellm_lib.training import train

pytestmark = pytest.mark.slow

ANATOMY_HEADINGS = [
    "## The run and its checkpoints",
    "## One checkpoint, field by field",
    "## What inference needs versus what a resume needs",
    "## The model section, tensor by tensor",
    "## Why the frozen backbone is not in the file",
    "## Step, best and final checkpoints",
    "## The model in memory versus the file",
]
WALKTHROUGH_HEADINGS = [
    "## Interrupted inside the first epoch, before any validation: is anything affected?",
    "## A checkpoint from older code without best_score: does it still resume correctly?",
    "## Is the per-epoch validation loss affected by an interruption inside the epoch?",
    '## What is "the current model" during training, and where is it kept?',
    "## Is global_step (and the N in step_N) cumulative across epochs or reset each epoch?",
    "## How is train_steps computed, and does it matter if it is not a multiple of save_steps?",
    "## After training: what does inference load, and is validation during training already "
    "inference?",
    "## Resume from best with a new learning rate, with a reset scheduler, and the "
    "EarlyStopping counter",
]


def texts(nb: nbformat.NotebookNode) -> tuple[str, str, set[str]]:
    """Markdown, printed/displayed text, and the mime types of every output."""
    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    printed, mimes = [], set()
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            assert output.output_type != "error", output
            printed.append(output.get("text", "") + output.get("data", {}).get("text/plain", ""))
            mimes |= set(output.get("data", {}))
    return markdown, "\n".join(printed), mimes


def claims(printed: str) -> list[str]:
    """The claims the notebook's confirm() printed (without their mark)."""
    return [line[2:] for line in printed.splitlines() if line.startswith(("✓ ", "✗ "))]


def test_checkpoint_anatomy_notebook(repo_root, tmp_path):
    smoke = yaml.safe_load((repo_root / "configs/notebooks/02_smoke.yaml").read_text())
    overrides = [*smoke["overrides"], f"data.path={tmp_path / 'data.csv'}"]
    nb = execute_notebook(
        repo_root, tmp_path, "02", output_root=str(tmp_path / "out"), overrides=overrides
    )

    (run,) = (tmp_path / "out" / "anatomy").iterdir()
    names = {p.name for p in (run / "checkpoints").iterdir()}
    assert {"best.pt", "final.pt", "step_00000004.pt"} <= names
    assert (run / "metrics.jsonl").is_file() and (run / "eval_test.json").is_file()

    markdown, printed, mimes = texts(nb)
    assert all(heading in markdown for heading in ANATOMY_HEADINGS)
    assert "image/png" in mimes
    assert "GRA-M memory: 5 buffers" in printed  # use_gram is on in the smoke parameters
    confirmed = claims(printed)
    assert len(confirmed) == 10 and all(line.endswith(": True") for line in confirmed)
    assert "digests equal: file, model in memory, reloaded model: True" in confirmed
    assert "forecasts equal, bit for bit: True" in confirmed
    assert "no backbone tensor is in the model's state_dict: True" in confirmed


def test_checkpoint_anatomy_opens_a_given_run(repo_root, tmp_path):
    """A run directory given (a plain mlp: no backbone, no GRA-M): nothing is trained, the
    model in memory is loaded from best.pt, and the other branches of each section run."""
    cfg = tiny_config(tmp_path, "train.epochs=1")
    train(cfg, run_dir=tmp_path / "run", progress=False)
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    nb = execute_notebook(
        repo_root, tmp_path, "02", run_dir=str(tmp_path / "run"), output_root=str(tmp_path / "out")
    )

    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before
    _, printed, _ = texts(nb)
    assert "this model has no GRA-M memory" in printed
    assert "this model has no frozen language model" in printed
    assert "file: best.pt; model in memory: loaded" in printed
    confirmed = claims(printed)
    assert len(confirmed) == 7 and all(line.endswith(": True") for line in confirmed)


def test_resume_walkthrough_notebook(repo_root, tmp_path):
    root = tmp_path / "walkthrough"
    nb = execute_notebook(
        repo_root,
        tmp_path,
        "03",
        output_root=str(root),
        overrides=[f"data.path={tmp_path / 'd.csv'}"],
    )
    assert (root / MARKER).is_file()
    for scenario in ("uninterrupted", "interrupted", "multiple", "new_lr", "reset_scheduler"):
        assert (root / scenario / "checkpoints" / "final.pt").is_file(), scenario
    for scenario in ("es_uninterrupted", "es_resumed", "es_counter", "older_checkpoint"):
        assert (root / scenario / "eval_test.json").is_file(), scenario
    assert (root / "current_model" / "checkpoints" / "best.pt").is_file()

    markdown, printed, mimes = texts(nb)
    assert all(heading in markdown for heading in WALKTHROUGH_HEADINGS)
    confirmed = claims(printed)
    assert len(confirmed) >= 35 and all(line.endswith(": True") for line in confirmed)
    for claim in (
        "digests equal for every checkpoint both runs wrote: True",
        "best_score in that checkpoint is None: True",
        "the resume event lists the missing fields: True",
        "val losses equal: True",
        "one step checkpoint at that step, written after the validation: True",
        "--resume-new-lr: new base lr, same schedule position: True",
        "--resume-counter 2: the next validation counts on from 2: True",
    ):
        assert claim in confirmed
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the timeline and the lr curves


def test_a_bad_walkthrough_parameter_fails_in_the_first_cell(repo_root, tmp_path):
    with pytest.raises(papermill.PapermillExecutionError) as err:
        execute_notebook(
            repo_root,
            tmp_path,
            "03",
            output_root=str(tmp_path / "walkthrough"),
            overrides=[f"data.path={tmp_path / 'd.csv'}"],
            interrupt_steps=[30, 35],
        )
    assert "first interruption step 30 must lie inside the first epoch" in str(err.value)
    assert "init_notebook(globals()" in err.value.source  # the first cell after the parameters
    assert not (tmp_path / "walkthrough").exists()  # refused before anything was written
