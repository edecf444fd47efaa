"""Bad input and faults as a user meets them, through the real `timellm` command: each ends
with exit code 2 and a message naming the problem and the fix, and no file that existed
before the command is changed or removed (unless changing it is the command's purpose).

A full disk is a small tmpfs filled up, a read-only folder a tmpfs remounted read-only
(root ignores permission bits): both need root and a kernel that allows mounting, and are
skipped with the reason elsewhere."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fs_helpers import MountUnavailable, fill, remount_read_only, snapshot, tmpfs
from process_helpers import REPO_ROOT, run, timellm

from timellm_lib.cli import main as cli_main
from timellm_lib.config import ConfigError, DataConfig, load_config
from timellm_lib.data import DataError, build_datasets, ensure_synthetic_csv, generate_synthetic
from timellm_lib.training import train
from timellm_lib.training.checkpoint import load_checkpoint
from timellm_lib.training.metrics_log import read_metrics

SMOKE = str(REPO_ROOT / "configs" / "smoke.yaml")
FAST = ["model.name=mlp", "train.threads=1", "train.device=cpu"]


def _bare(text: str) -> str:
    """``text`` without whitespace: the CLI wraps messages at 100 columns."""
    return "".join(text.split())


def _refused(done: subprocess.CompletedProcess, *phrases: str) -> None:
    """Exit code 2, no traceback, one message holding every phrase."""
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    for phrase in phrases:
        assert _bare(phrase) in _bare(done.stderr), (phrase, done.stderr)


def _sets(*overrides: str) -> list[str]:
    return [a for item in overrides for a in ("--set", item)]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished smoke run (MLP model, 2 epochs of 21 steps): step_00000030.pt,
    step_00000040.pt, step_00000042.pt, best.pt, final.pt, eval_test.json."""
    folder = tmp_path_factory.mktemp("finished")
    cfg = load_config(SMOKE, [f"data.path={folder / 'synthetic.csv'}", *FAST])
    assert train(cfg, run_dir=folder / "run", progress=False).finished
    return folder / "run"


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    """A copy of the finished run, for a test to change."""
    return Path(shutil.copytree(finished, tmp_path / "run"))


@pytest.fixture
def small_fs(tmp_path) -> Path:
    """A 16 MiB tmpfs (skipped where mounting is impossible)."""
    try:
        with tmpfs(tmp_path / "fs") as folder:
            yield folder
    except MountUnavailable as why:
        pytest.skip(str(why))


# ------------------------------------------------------------------ 1. synthetic data


def test_synthetic_data_never_overwrites_a_users_csv(tmp_path):
    mine = tmp_path / "my.csv"
    generate_synthetic(300, 7).to_csv(mine, index=False)  # the user's own series
    before = mine.read_bytes()
    done = run(
        timellm("train", "--config", SMOKE, "--run-dir", "out/run", *_sets(f"data.path={mine}")),
        tmp_path,
    )
    _refused(done, f"data.path = {mine} already holds a file", "set data.source=csv")
    assert mine.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my.csv"]  # 12: no empty run dir


def test_synthetic_data_rewrites_only_its_own_file(tmp_path):
    cfg = DataConfig(path=str(tmp_path / "syn.csv"), synthetic_rows=300)
    ensure_synthetic_csv(cfg)
    other = DataConfig(path=cfg.path, synthetic_rows=300, synthetic_seed=3)
    ensure_synthetic_csv(other)  # its own earlier file: replaced
    assert (tmp_path / "syn.csv").read_text() == generate_synthetic(300, 3).to_csv(index=False)
    ensure_synthetic_csv(cfg)  # and back
    (tmp_path / "syn.csv").write_text((tmp_path / "syn.csv").read_text() + "edited\n")
    with pytest.raises(DataError, match="did not write"):
        ensure_synthetic_csv(other)  # edited by hand: no longer its file
    assert (tmp_path / "syn.csv").read_text().endswith("edited\n")


# ------------------------------------------------------------------ 2. resume from elsewhere


def test_resuming_from_another_runs_checkpoint_into_a_run_with_history_is_refused(
    finished, run_copy
):
    before = snapshot(run_copy)
    foreign = finished / "checkpoints" / "step_00000030.pt"
    done = run(
        timellm("train", "--run-dir", str(run_copy), "--resume", str(foreign), "--no-progress"),
        run_copy.parent,
    )
    _refused(done, "holds the history of another run", "a --run-dir that does not exist yet")
    assert snapshot(run_copy) == before


def test_discarded_newer_checkpoints_are_moved_aside_not_deleted(run_copy):
    ckpt_dir = run_copy / "checkpoints"
    newer = ["step_00000040.pt", "step_00000042.pt", "final.pt"]
    before = {n: (ckpt_dir / n).read_bytes() for n in newer}
    eval_before = (run_copy / "eval_test.json").read_bytes()
    log_before = (run_copy / "metrics.jsonl").read_bytes()
    cfg = load_config(run_copy / "config.yaml")
    train(cfg, run_dir=run_copy, resume=str(ckpt_dir / "step_00000030.pt"), progress=False)
    resume = [e for e in read_metrics(run_copy / "metrics.jsonl") if e["event"] == "resume"][-1]
    aside = run_copy / resume["discarded_to"]
    assert aside.parent == run_copy / "discarded" and set(newer) <= set(resume["discarded"])
    assert {n: (aside / n).read_bytes() for n in newer} == before
    assert (aside / "metrics.jsonl").read_bytes() == log_before
    if json.loads(eval_before)["checkpoint_global_step"] > 30:  # best.pt and its scores too
        assert {"best.pt", "eval_test.json"} <= set(resume["discarded"])
        assert (aside / "eval_test.json").read_bytes() == eval_before


# ------------------------------------------------------------------ 3. predict --out = --input


def test_predict_refuses_to_write_over_its_input(finished, tmp_path):
    series = tmp_path / "in.csv"
    shutil.copy(finished.parent / "synthetic.csv", series)
    before = series.read_bytes()
    (tmp_path / "link.csv").symlink_to(series)
    (tmp_path / "sub").mkdir()
    best = str(finished / "checkpoints" / "best.pt")
    done = run(
        timellm("predict", "--ckpt", best, "--input", str(series), "--out", "in.csv"), tmp_path
    )
    _refused(done, "is the --input file", "choose another --out")
    for out in (tmp_path / "link.csv", tmp_path / "sub" / ".." / "in.csv"):  # link, relative
        assert cli_main(["predict", "--ckpt", best, "--input", str(series), "--out", str(out)]) == 2
    assert series.read_bytes() == before and (tmp_path / "link.csv").is_symlink()


# ------------------------------------------------------------------ 4. eval of a step file


def test_eval_of_a_step_checkpoint_keeps_best_pts_eval_test_json(run_copy):
    official = (run_copy / "eval_test.json").read_bytes()
    step = run_copy / "checkpoints" / "step_00000040.pt"
    done = run(timellm("eval", "--ckpt", str(step), "--json"), run_copy)
    assert done.returncode == 0, done.stderr
    assert (run_copy / "eval_test.json").read_bytes() == official
    written = json.loads((run_copy / "eval_test.step_00000040.json").read_text())
    assert written == json.loads(done.stdout) and written["global_step"] == 40


# ------------------------------------------------------------------ 5. read-only


def test_a_read_only_run_directory_is_refused_before_any_work(finished, small_fs):
    run_dir = Path(shutil.copytree(finished, small_fs / "run"))
    remount_read_only(small_fs)
    before = snapshot(small_fs)
    best = str(run_dir / "checkpoints" / "best.pt")
    commands = {
        "train": ["train", "--run-dir", str(run_dir), "--resume", "auto", "--no-progress"],
        "fresh": ["train", "--config", SMOKE, "--run-dir", str(small_fs / "new/run")],
        "eval": ["eval", "--ckpt", best],
        "predict": ["predict", "--ckpt", best, "--out", str(small_fs / "p.csv")],
    }
    for name, args in commands.items():
        done = run(timellm(*args, *(_sets(*FAST) if name == "fresh" else [])), run_dir.parent)
        _refused(done, "Read-only file system [EROFS]", "remount it writable")
        assert str(small_fs) in done.stderr, name
    assert snapshot(small_fs) == before


# ------------------------------------------------------------------ 6. full disk


def test_a_full_disk_at_resume_ends_with_a_message_and_leaves_no_lock(finished, small_fs):
    run_dir = Path(shutil.copytree(finished, small_fs / "run"))
    (run_dir / "checkpoints" / "final.pt").unlink()  # not complete: resume has work to do
    fill(small_fs)
    before = snapshot(small_fs)
    done = run(
        timellm("train", "--run-dir", str(run_dir), "--resume", "auto", "--no-progress"),
        small_fs.parent,
    )
    _refused(
        done, f"{run_dir / 'train.lock'}: No space left on device [ENOSPC]", "free space there"
    )
    assert snapshot(small_fs) == before  # no train.lock, nothing else touched


# ------------------------------------------------------------------ 7. resume into a new dir


def test_resuming_a_checkpoint_into_a_new_run_directory_saves_there(finished, tmp_path):
    before = snapshot(finished)
    new = tmp_path / "continued"
    step = finished / "checkpoints" / "step_00000040.pt"
    done = run(
        timellm("train", "--run-dir", str(new), "--resume", str(step), "--no-progress"), tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert {"step_00000042.pt", "final.pt"} <= {p.name for p in (new / "checkpoints").iterdir()}
    assert load_checkpoint(new / "checkpoints" / "final.pt")["global_step"] == 42
    assert snapshot(finished) == before


# ------------------------------------------------------------------ 8. crafted checkpoints


def test_inspect_names_a_missing_or_mistyped_field(finished, tmp_path):
    torch.save({"format_version": 1}, tmp_path / "bare.pt")
    done = run(timellm("inspect", str(tmp_path / "bare.pt")), tmp_path)
    _refused(done, "has no field 'global_step'", "written by `timellm train`")
    payload = load_checkpoint(finished / "checkpoints" / "best.pt")
    for field, value, says in [
        ("format_version", "1", "'format_version' = '1'"),
        ("global_step", 3.5, "'global_step' = 3.5"),
        ("model", {"w": [1.0]}, "'model' = dict"),
    ]:
        torch.save({**payload, field: value}, tmp_path / "crafted.pt")
        with pytest.raises(Exception, match=says) as raised:
            cli_main(["--debug", "inspect", str(tmp_path / "crafted.pt")])
        assert type(raised.value).__name__ == "CheckpointError"


# ------------------------------------------------------------------ 9. values out of range


def _csv(path: Path, rows: int = 300, **cells: tuple[int, float]) -> Path:
    frame = generate_synthetic(rows, 1)
    for column, (row, value) in cells.items():
        frame.loc[row, column] = value
    frame.to_csv(path, index=False)
    return path


def test_a_value_that_overflows_the_scaling_is_refused_with_its_column_and_row(tmp_path):
    bad = _csv(tmp_path / "bad.csv", OT=(10, 1e300))
    done = run(
        timellm(
            "train", "--config", SMOKE, "--run-dir", str(tmp_path / "run"),
            *_sets(*FAST, "data.source=csv", f"data.path={bad}"),
        ),
        tmp_path,
    )  # fmt: skip
    _refused(done, "column 'OT'", "data row 11 (line 12 of the file) holds 1e+300")
    assert not (tmp_path / "run").exists()

    def data(path: Path) -> DataConfig:
        return load_config(SMOKE, ["data.source=csv", f"data.path={path}"]).data

    with pytest.raises(DataError, match=r"'HUFL'.*data row 291.*float32"):
        build_datasets(data(_csv(tmp_path / "late.csv", HUFL=(290, 1e300))))  # in the test rows
    flat = pd.read_csv(_csv(tmp_path / "flat.csv")).assign(LULL=2.5)
    flat.to_csv(tmp_path / "flat.csv", index=False)
    with pytest.raises(DataError, match="'LULL'.*is constant"):
        build_datasets(data(tmp_path / "flat.csv"))
    assert np.isfinite(build_datasets(data(_csv(tmp_path / "ok.csv"))).scaler.std).all()


def test_predict_input_whose_scaled_values_overflow_is_refused(finished, tmp_path):
    bad = _csv(tmp_path / "bad.csv", rows=100, MULL=(99, 1e39))
    best = str(finished / "checkpoints" / "best.pt")
    done = run(timellm("predict", "--ckpt", best, "--input", str(bad), "--out", "p.csv"), tmp_path)
    _refused(done, "column 'MULL'", "data row 100", "float32")
    assert not (tmp_path / "p.csv").exists()


# ------------------------------------------------------------------ 10. empty config


def test_an_empty_config_file_is_an_error(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    done = run(timellm("train", "--config", "empty.yaml", "--run-dir", "run"), tmp_path)
    _refused(done, "config file empty.yaml is empty", "`{}`")
    assert not (tmp_path / "run").exists()
    (tmp_path / "comments.yaml").write_text("# data:\n#   path: x.csv\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(tmp_path / "comments.yaml")
    (tmp_path / "defaults.yaml").write_text("{}\n")
    assert load_config(tmp_path / "defaults.yaml") == load_config()


# ------------------------------------------------------------------ 11. notebook parameters


def test_an_unknown_notebook_parameter_stops_the_notebook_at_its_check(tmp_path):
    executed = tmp_path / "out.ipynb"
    command = [
        *(sys.executable, "-m", "papermill", "-k", "python3", "--cwd", str(REPO_ROOT)),
        *("-f", str(REPO_ROOT / "configs/notebooks/04_smoke.yaml"), "-p", "nosuch", "1"),
        *(str(REPO_ROOT / "notebooks/04_shape_trace.ipynb"), str(executed)),
    ]
    done = run(command, tmp_path)
    assert done.returncode != 0
    assert "unknown parameter(s) ['nosuch']" in done.stderr + done.stdout
    cells = [c for c in json.loads(executed.read_text())["cells"] if c["cell_type"] == "code"]
    failed = [i for i, c in enumerate(cells) if any(o.get("ename") for o in c["outputs"])]
    assert "init_notebook" in "".join(cells[failed[0]]["source"])  # stopped at the check
    assert all(c["execution_count"] is None for c in cells[failed[0] + 1 :])


# ------------------------------------------------------------------ 12. small ones


def test_a_failed_data_check_leaves_no_run_directory(tmp_path):
    (tmp_path / "outputs").mkdir()
    missing = tmp_path / "nope.csv"
    run_dir = tmp_path / "outputs" / "exp" / "run"
    done = run(
        timellm(
            "train", "--config", SMOKE, "--run-dir", str(run_dir),
            *_sets("data.source=csv", f"data.path={missing}"),
        ),
        tmp_path,
    )  # fmt: skip
    _refused(done, f"data file {missing} not found")
    assert list((tmp_path / "outputs").iterdir()) == []


def test_eval_and_predict_messages_name_only_their_own_options(finished, tmp_path):
    done = run(timellm("eval", "--ckpt", str(tmp_path / "missing.pt")), tmp_path)
    _refused(done, "missing.pt does not exist", "checkpoints/")
    assert "--resume" not in done.stderr
    assert cli_main(["predict", "--ckpt", str(tmp_path / "missing.pt"), "--out", "p.csv"]) == 2

    frame = generate_synthetic(100, 1).rename(columns={"date": "when"})
    frame.to_csv(tmp_path / "renamed.csv", index=False)
    best = str(finished / "checkpoints" / "best.pt")
    done = run(
        timellm("predict", "--ckpt", best, "--input", "renamed.csv", "--out", "p.csv"), tmp_path
    )
    _refused(done, "has no date column 'date'", "Rename the file's timestamp column to 'date'")
    assert "data.date_column" not in done.stderr
