"""Reading run directories: the metrics log, the resolved config and evaluation files.

A run directory (``outputs/<experiment>/<run_id>/``) is the only thing notebooks, plots and
the batch driver share, so everything here reads files and never imports the trainer.

``metrics.jsonl`` holds one JSON object per event (``train``, ``val``, ``test``, ``save``,
``resume``, ``early_stop``), each with ``global_step`` and ``epoch``. A resumed run must not
show the abandoned stretch twice: the trainer truncates the log when it resumes, and
:func:`load_metrics` also drops what a ``resume`` event superseded and keeps only the last
record of each ``(event, global_step)``, so older or hand-edited logs plot correctly too.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from timellm_lib.errors import WorkbenchError

METRICS_FILE = "metrics.jsonl"
BASE_COLUMNS = "event global_step epoch loss val_loss lr best_score counter kind".split()
LONG_COLUMNS = ["run", "event", "metric", "global_step", "epoch", "value"]
# Fields that locate or describe an event rather than measure something.
NOT_METRICS = {"event", "global_step", "epoch", "step_in_epoch", "time", "path", "kind", "from"}

PathLike = str | Path


def metrics_path(run_dir: PathLike) -> Path:
    """The run's ``metrics.jsonl``; a WorkbenchError naming the fix when it is not a run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise WorkbenchError(
            f"run directory {run_dir} does not exist; pass a directory written by `timellm "
            "train`, such as outputs/<experiment>/<run_id>"
        )
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise WorkbenchError(
            f"{run_dir} has no {METRICS_FILE}, so it is not a run directory; pass the folder "
            "that `timellm train` wrote (outputs/<experiment>/<run_id>), not its parent"
        )
    return path


def _read_events(path: Path) -> list[dict[str, Any]]:
    """Parse the JSON lines; a truncated last line (a crash mid-write) is skipped with a warning."""
    lines = path.read_text().splitlines()
    events = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                warnings.warn(f"{path}:{number}: skipping a truncated last line", stacklevel=3)
                continue
            raise WorkbenchError(
                f"{path}:{number} is not valid JSON ({err}); fix or delete that line"
            ) from err
        if not isinstance(event, dict) or "event" not in event or "global_step" not in event:
            raise WorkbenchError(
                f"{path}:{number} must be a JSON object with 'event' and 'global_step'; "
                "fix or delete that line"
            )
        events.append(event)
    return events


def _drop_superseded(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Apply resumes, then keep the last record per (event, global_step, kind).

    Resuming from step S discards everything the earlier attempt logged after S. ``kind``
    keeps a step save and a best save at the same step apart.
    """
    kept: list[dict[str, Any]] = []
    for event in events:
        if event["event"] == "resume":
            kept = [e for e in kept if e["global_step"] <= event["global_step"]]
        kept.append(event)
    last = {_record_key(e): i for i, e in enumerate(kept)}
    return [e for i, e in enumerate(kept) if last[_record_key(e)] == i]


def _record_key(event: dict[str, Any]) -> tuple[Any, ...]:
    return event["event"], event["global_step"], event.get("kind")


def load_metrics(run_dir: PathLike) -> pd.DataFrame:
    """One row per event in log order, columns ``BASE_COLUMNS`` first (NaN where absent)."""
    events = _drop_superseded(_read_events(metrics_path(run_dir)))
    frame = pd.DataFrame(events)
    extra = [c for c in frame.columns if c not in BASE_COLUMNS]
    return frame.reindex(columns=BASE_COLUMNS + extra).reset_index(drop=True)


def best_updates(metrics: pd.DataFrame) -> pd.DataFrame:
    """The validation rows where EarlyStopping improved (and ``best.pt`` was written).

    The trainer logs the counter after the update, so ``counter == 0`` is exactly an
    improvement (delta included). Logs without a counter fall back to a new minimum.
    """
    val = metrics[metrics["event"] == "val"]
    if val["counter"].notna().any():
        return val[val["counter"] == 0]
    previous_min = val["val_loss"].cummin().shift(fill_value=math.inf)
    return val[val["val_loss"] < previous_min]


def read_config(run_dir: PathLike) -> dict[str, Any]:
    """The run's resolved ``config.yaml`` as a plain dict ({} when the file is missing)."""
    path = Path(run_dir) / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def read_evals(run_dir: PathLike) -> dict[str, dict[str, Any]]:
    """``eval_<split>.json`` files by split name."""
    return {
        path.stem.removeprefix("eval_"): json.loads(path.read_text())
        for path in sorted(Path(run_dir).glob("eval_*.json"))
    }


def run_label(run_dir: PathLike) -> str:
    """``<experiment>/<run_id>``, the name a run has in legends and tables."""
    run_dir = Path(run_dir)
    return f"{run_dir.parent.name}/{run_dir.name}"


def list_runs(root: PathLike = "outputs") -> list[Path]:
    """Every directory under ``root`` that holds a metrics.jsonl, newest log first."""
    root = Path(root)
    if not root.is_dir():
        raise WorkbenchError(
            f"runs folder {root} does not exist; train a run first (`make demo` or "
            "`timellm train`) or pass the folder that holds your run directories"
        )
    logs = sorted(root.rglob(METRICS_FILE), key=lambda p: p.stat().st_mtime, reverse=True)
    return [log.parent for log in logs]


def select_runs(root: PathLike = "outputs", run_dirs: Iterable[PathLike] = ()) -> list[Path]:
    """The runs a notebook shows: ``run_dirs`` when given (each checked), else all under root."""
    chosen = [Path(d) for d in run_dirs] or list_runs(root)
    for run_dir in chosen:
        metrics_path(run_dir)
    if not chosen:
        raise WorkbenchError(
            f"no run directories under {root}; train a run first (`make demo` or `timellm "
            "train`) or point runs_root at the folder that holds them"
        )
    return chosen


def run_status(run_dir: PathLike, metrics: pd.DataFrame) -> str:
    """``stopped early`` | ``finished`` (final.pt written) | ``interrupted`` (anything else,
    including a ``--max-steps`` stop, which by design looks exactly like an interruption)."""
    if (metrics["event"] == "early_stop").any():
        return "stopped early"
    if ((metrics["event"] == "save") & (metrics["kind"] == "final")).any() or (
        Path(run_dir) / "checkpoints" / "final.pt"
    ).is_file():
        return "finished"
    return "interrupted"


def run_summary(run_dir: PathLike) -> dict[str, Any]:
    """The headline numbers of one run: progress, best validation, test scores and status.

    ``epochs`` counts the epochs a validation has reached (a val event's epoch is the epoch it
    closes; save and resume events already count the next one). Test scores come from ``eval_test.json`` when it exists (an explicit, possibly later
    evaluation), else from the trainer's last ``test`` event.
    """
    run_dir = Path(run_dir)
    metrics = load_metrics(run_dir)
    run_cfg = read_config(run_dir).get("run", {})
    val = metrics[metrics["event"] == "val"]
    best = best_updates(metrics)
    test = metrics[metrics["event"] == "test"]
    test_scores = read_evals(run_dir).get("test") or (test.iloc[-1].to_dict() if len(test) else {})
    return {
        "run": run_label(run_dir),
        "experiment": run_cfg.get("experiment") or run_dir.parent.name,
        "run_id": run_cfg.get("run_id") or run_dir.name,
        "steps": int(metrics["global_step"].max()),
        "epochs": int(val["epoch"].max()) + 1 if val["epoch"].notna().any() else 0,
        "best_val_loss": float(best["val_loss"].iloc[-1]) if len(best) else None,
        "best_step": int(best["global_step"].iloc[-1]) if len(best) else None,
        "test_mse": test_scores.get("mse"),
        "test_mae": test_scores.get("mae"),
        "status": run_status(run_dir, metrics),
        "path": str(run_dir),
    }


def runs_table(run_dirs: Iterable[PathLike]) -> pd.DataFrame:
    """One :func:`run_summary` row per run."""
    return pd.DataFrame([run_summary(d) for d in run_dirs])


def long_format(run_dirs: Iterable[PathLike]) -> pd.DataFrame:
    """Every numeric measurement as a row: run, event, metric, global_step, epoch, value.

    The shape plotting tools and spreadsheets like: filter on metric, pivot on run. The
    trainer stamps lr, best_score and counter on every event, so those appear per event.
    """
    frames = []
    for run_dir in run_dirs:
        metrics = load_metrics(run_dir)
        value_columns = [
            c
            for c in metrics.columns
            if c not in NOT_METRICS
            and pd.api.types.is_numeric_dtype(metrics[c])
            and not pd.api.types.is_bool_dtype(metrics[c])
        ]
        long = metrics.melt(
            id_vars=["event", "global_step", "epoch"],
            value_vars=value_columns,
            var_name="metric",
            value_name="value",
        ).dropna(subset=["value"])
        long.insert(0, "run", run_label(run_dir))
        frames.append(long)
    if not frames:
        return pd.DataFrame(columns=LONG_COLUMNS)
    return pd.concat(frames, ignore_index=True)[LONG_COLUMNS]


def export_long_csv(run_dirs: Iterable[PathLike], path: PathLike) -> Path:
    """Write :func:`long_format` to ``path`` (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    long_format(run_dirs).to_csv(path, index=False)
    return path
