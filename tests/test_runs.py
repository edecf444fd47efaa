"""Reading run directories: metrics log (resumes, duplicates, damage), summaries, long format.

The fake runs are written the way the trainer writes them (train events every LOG_STEPS,
validation, best and step saves at epoch ends, EarlyStopping fields); test_plots and the
notebook test reuse ``make_runs``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import yaml

from timellm_lib.errors import WorkbenchError
from timellm_lib.notebooks.runs import (
    LONG_COLUMNS,
    best_updates,
    export_long_csv,
    list_runs,
    load_metrics,
    long_format,
    metrics_path,
    run_summary,
    runs_table,
    select_runs,
)

TRAIN_STEPS, LOG_STEPS = 10, 5


def trainer_events(val_losses: list[float], lr: float = 1e-3, patience: int = 2) -> list[dict]:
    """What an uninterrupted run logs until its last epoch or its early stop: like the
    trainer, every event carries lr and the EarlyStopping state after it."""
    events, best, counter = [], None, 0

    def emit(event: str, step: int, epoch: int, **fields) -> None:
        state = {"lr": lr, "best_score": best, "counter": counter}
        events.append({"event": event, "global_step": step, "epoch": epoch, **state, **fields})

    for step in range(1, TRAIN_STEPS * len(val_losses) + 1):
        epoch = (step - 1) // TRAIN_STEPS
        if step % LOG_STEPS == 0:
            emit("train", step, epoch, loss=round(2.0 / step, 5))
        if step % TRAIN_STEPS:
            continue
        val_loss = val_losses[epoch]
        improved = best is None or -val_loss > best
        best, counter = (-val_loss, 0) if improved else (best, counter + 1)
        emit("val", step, epoch, val_loss=val_loss, improved=improved)
        if improved:
            emit("save", step, epoch + 1, kind="best", path="checkpoints/best.pt")
        path = f"checkpoints/step_{step:08d}.pt"
        emit("save", step, epoch + 1, kind="step", path=path, step_in_epoch=0)
        if counter >= patience:
            emit("early_stop", step, epoch, patience=patience)
            break
    return events


def finish(events: list[dict], mse: float, mae: float) -> list[dict]:
    """Add final.pt and the test evaluation that end a run."""
    step = events[-1]["global_step"]
    state = {k: events[-1][k] for k in ("lr", "best_score", "counter")}
    final = {"kind": "final", "path": "checkpoints/final.pt"}
    return events + [
        {"event": "save", "global_step": step, "epoch": step // TRAIN_STEPS, **state, **final},
        {
            "event": "test",
            "global_step": step,
            "epoch": (step - 1) // TRAIN_STEPS,
            **state,
            "mse": mse,
            "mae": mae,
        },
    ]


def interrupted_then_resumed(events: list[dict], killed_at: int, resumed_from: int) -> list[dict]:
    """The raw log of a run killed at ``killed_at`` and resumed from the checkpoint of
    ``resumed_from``, *without* the trainer's truncation: the first attempt's events after
    the checkpoint are still there, marked by a loss 100 higher, and logged again later."""
    first = [
        dict(e, loss=e["loss"] + 100)
        if e["event"] == "train" and e["global_step"] > resumed_from
        else e
        for e in events
        if e["global_step"] <= killed_at
    ]
    resume = {
        "event": "resume",
        "global_step": resumed_from,
        "epoch": resumed_from // TRAIN_STEPS,
        "kind": "step",
        "from": f"checkpoints/step_{resumed_from:08d}.pt",
    }
    return first + [resume] + [e for e in events if e["global_step"] > resumed_from]


def write_run(run_dir: Path, events: list[dict], evals: dict | None = None) -> Path:
    run_dir.mkdir(parents=True)
    config = {"run": {"experiment": run_dir.parent.name, "run_id": run_dir.name}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    lines = [json.dumps(dict(e, time=1.7e9 + i)) for i, e in enumerate(events)]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    for split, scores in (evals or {}).items():
        (run_dir / f"eval_{split}.json").write_text(json.dumps(scores))
    return run_dir


def make_runs(root: Path) -> dict[str, Path]:
    """Three runs under ``root``: finished, stopped early, resumed (and then interrupted)."""
    exp = root / "exp"
    runs = {
        "finished": write_run(
            exp / "finished", finish(trainer_events([0.9, 0.7, 0.8, 0.6]), 0.5, 0.55)
        ),
        "early": write_run(
            exp / "early", finish(trainer_events([0.9, 0.8, 0.85, 0.95, 0.5]), 0.7, 0.6)
        ),
        "resumed": write_run(
            exp / "resumed", interrupted_then_resumed(trainer_events([0.9, 0.7, 0.8]), 17, 10)
        ),
    }
    for age, run_dir in enumerate(runs.values()):  # finished is the newest
        stamp = 1.7e9 - 100 * age
        os.utime(run_dir / "metrics.jsonl", (stamp, stamp))
    return runs


@pytest.fixture
def runs(tmp_path):
    return make_runs(tmp_path / "outputs")


def test_load_metrics_has_one_row_per_event_and_the_base_columns(runs):
    metrics = load_metrics(runs["finished"])
    assert list(metrics.columns[:9]) == [
        "event",
        "global_step",
        "epoch",
        "loss",
        "val_loss",
        "lr",
        "best_score",
        "counter",
        "kind",
    ]
    counts = metrics["event"].value_counts().to_dict()
    assert counts == {"train": 8, "val": 4, "save": 8, "test": 1}
    assert metrics.loc[metrics["event"] == "val", "val_loss"].tolist() == [0.9, 0.7, 0.8, 0.6]


def test_a_resumed_run_keeps_each_step_once_with_the_resumed_values(runs):
    metrics = load_metrics(runs["resumed"])
    uninterrupted = pd.DataFrame(trainer_events([0.9, 0.7, 0.8]))
    train = metrics[metrics["event"] == "train"]
    assert train["global_step"].tolist() == [5, 10, 15, 20, 25, 30]
    assert train["loss"].tolist() == uninterrupted.query("event == 'train'")["loss"].tolist()
    assert metrics["event"].tolist().count("resume") == 1
    assert metrics["event"].tolist().count("val") == 3


def test_repeated_records_without_a_resume_event_keep_the_last(tmp_path):
    events = trainer_events([0.9, 0.7])
    again = [dict(e, loss=e["loss"] - 0.01) for e in events if e["event"] == "train"]
    metrics = load_metrics(write_run(tmp_path / "e" / "r", events + again))
    train = metrics[metrics["event"] == "train"]
    assert train["global_step"].tolist() == [5, 10, 15, 20]
    assert train["loss"].tolist() == [e["loss"] for e in again]
    # a step save and a best save at the same step are different records
    assert len(metrics.query("event == 'save' and global_step == 10")) == 2


def test_a_truncated_last_line_is_skipped_with_a_warning(tmp_path):
    run_dir = write_run(tmp_path / "e" / "r", trainer_events([0.9]))
    with open(run_dir / "metrics.jsonl", "a") as log:
        log.write('{"event": "train", "global_st')
    with pytest.warns(UserWarning, match="truncated last line"):
        metrics = load_metrics(run_dir)
    assert len(metrics) == len(trainer_events([0.9]))


def test_a_corrupt_line_in_the_middle_names_file_and_line(tmp_path):
    run_dir = write_run(tmp_path / "e" / "r", trainer_events([0.9]))
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    lines[1] = "not json"
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(WorkbenchError, match=r"metrics.jsonl:2 is not valid JSON"):
        load_metrics(run_dir)


def test_not_a_run_directory_is_a_clear_error(tmp_path):
    with pytest.raises(WorkbenchError, match="does not exist"):
        metrics_path(tmp_path / "missing")
    with pytest.raises(WorkbenchError, match="has no metrics.jsonl.*not its parent"):
        metrics_path(tmp_path)


def test_best_updates_follow_the_early_stopping_counter(runs):
    best = best_updates(load_metrics(runs["early"]))
    # val losses 0.9, 0.8, 0.85, 0.95: improvements at epochs 0 and 1 only
    assert best["global_step"].tolist() == [10, 20]


def test_best_updates_without_a_counter_use_new_minima(tmp_path):
    events = [
        {k: v for k, v in e.items() if k != "counter"} for e in trainer_events([0.9, 0.7, 0.8, 0.6])
    ]
    best = best_updates(load_metrics(write_run(tmp_path / "e" / "r", events)))
    assert best["global_step"].tolist() == [10, 20, 40]


def test_list_runs_finds_run_directories_newest_first(runs, tmp_path):
    (tmp_path / "outputs" / "notebooks").mkdir()  # no metrics.jsonl: not a run
    assert list_runs(tmp_path / "outputs") == [runs["finished"], runs["early"], runs["resumed"]]
    with pytest.raises(WorkbenchError, match="does not exist; train a run first"):
        list_runs(tmp_path / "nowhere")


def test_select_runs_takes_given_directories_or_all(runs, tmp_path):
    assert select_runs(tmp_path / "outputs", [str(runs["early"])]) == [runs["early"]]
    assert len(select_runs(tmp_path / "outputs")) == 3
    (tmp_path / "empty").mkdir()
    with pytest.raises(WorkbenchError, match="no run directories under"):
        select_runs(tmp_path / "empty")


def test_run_summary_reports_progress_best_test_and_status(runs):
    finished = run_summary(runs["finished"])
    assert finished["experiment"] == "exp" and finished["run_id"] == "finished"
    assert (finished["steps"], finished["epochs"]) == (40, 4)
    assert (finished["best_val_loss"], finished["best_step"]) == (0.6, 40)
    assert (finished["test_mse"], finished["test_mae"], finished["status"]) == (
        0.5,
        0.55,
        "finished",
    )
    early = run_summary(runs["early"])
    assert (early["status"], early["steps"], early["best_step"]) == ("stopped early", 40, 20)
    resumed = run_summary(runs["resumed"])
    assert (resumed["status"], resumed["steps"], resumed["epochs"]) == ("interrupted", 30, 3)
    assert resumed["test_mse"] is None


def test_eval_test_json_takes_precedence_over_the_test_event(tmp_path):
    events = finish(trainer_events([0.9]), 0.5, 0.55)
    run_dir = write_run(tmp_path / "e" / "r", events, {"test": {"mse": 0.25, "mae": 0.3}})
    assert (run_summary(run_dir)["test_mse"], run_summary(run_dir)["test_mae"]) == (0.25, 0.3)


def test_runs_table_has_a_row_per_run(runs):
    table = runs_table(runs.values())
    assert table["run"].tolist() == ["exp/finished", "exp/early", "exp/resumed"]
    assert table["status"].tolist() == ["finished", "stopped early", "interrupted"]


def test_long_format_has_every_measurement_once(runs):
    long = long_format([runs["finished"], runs["resumed"]])
    assert list(long.columns) == LONG_COLUMNS
    assert set(long["metric"]) == {"loss", "lr", "val_loss", "best_score", "counter", "mse", "mae"}
    assert long.query("event == 'save' and metric == 'lr'")["value"].size > 0
    loss = long.query("run == 'exp/resumed' and metric == 'loss'")
    assert loss["global_step"].tolist() == [5, 10, 15, 20, 25, 30]
    assert long.query("run == 'exp/finished' and metric == 'mse'")["value"].tolist() == [0.5]


def test_export_long_csv_round_trips(runs, tmp_path):
    path = export_long_csv(runs.values(), tmp_path / "out" / "long.csv")
    back = pd.read_csv(path)
    assert list(back.columns) == LONG_COLUMNS
    assert set(back["run"]) == {"exp/finished", "exp/early", "exp/resumed"}
    assert len(back) == len(long_format(runs.values()))
