"""Studies: named experiments trained over seeds, scored beside the published numbers and
priced (parameters, s/step, wall time to best, GFLOP/step). Plans live in
``configs/studies/*.yaml`` (see the README's Results section for their keys).

Each run is a normal run directory trained with ``--resume auto`` semantics, so a study
killed at any moment and started again ends with the numbers of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from timellm_lib.config import Config, load_config
from timellm_lib.errors import WorkbenchError
from timellm_lib.files import write_text_atomic
from timellm_lib.training.faults import StopSignals
from timellm_lib.training.schedulers import EPOCH_ONLY_SCHEDULES
from timellm_lib.yaml_input import load_yaml

log = logging.getLogger(__name__)

PLAN_KEYS = {"name", "description", "config", "overrides", "seeds", "rows"}
ROW_KEYS = {"name", "description", "config", "overrides", "seeds", "published", "continues"}
PUBLISHED_KEYS = {"mse", "mae", "source", "note"}


class StudyError(WorkbenchError):
    """A study plan is malformed or cannot run; the message names the entry and the fix."""


@dataclass(frozen=True)
class Row:
    """One experiment of a plan: a resolved config (seed aside) run once per seed."""

    name: str
    description: str
    config_file: str
    overrides: tuple[str, ...]
    seeds: tuple[int, ...]
    published: dict[str, Any]
    configs: dict[int, Config] = field(compare=False, hash=False)
    continues: str | None = None  # an earlier row this one extends by more epochs


@dataclass(frozen=True)
class Plan:
    name: str
    description: str
    path: Path
    rows: tuple[Row, ...]


# ------------------------------------------------------------------------------ planning


def load_plan(path: str | Path, cli_overrides: list[str] | None = None) -> Plan:
    """Read, check and resolve a plan: every row's config for every seed is validated here,
    before anything trains.

    A plan has ``name``, ``description``, ``config`` (every row's base), ``overrides``,
    ``seeds`` and ``rows``, each row with ``name``, ``overrides`` and optionally ``config``,
    ``seeds`` and ``published: {mse, mae, source}`` (see ``configs/studies/``). Precedence:
    defaults < row config file < plan overrides < row overrides < ``cli_overrides``.
    """
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study plan {path} does not exist; pass a YAML file (configs/studies/)")
    try:
        raw = load_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise StudyError(f"study plan {path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict) or not isinstance(raw.get("rows"), list) or not raw["rows"]:
        raise StudyError(f"study plan {path} must be a mapping with a non-empty list 'rows'")
    _check_keys(raw, PLAN_KEYS, f"study plan {path}")
    name = str(raw.get("name") or path.stem)
    base = {
        "config": raw.get("config"),
        "overrides": _string_list(raw.get("overrides"), f"{path}: overrides"),
        "seeds": _seeds(raw.get("seeds", [2021]), f"{path}: seeds"),
    }
    rows: list[Row] = []
    for i, entry in enumerate(raw["rows"]):
        row = _load_row(entry, f"{path}: row {i + 1}", base, cli_overrides or [])
        if row.name in {r.name for r in rows}:
            raise StudyError(f"{path}: row {i + 1}: name {row.name!r} must be unique")
        rows.append(row)
    for i, row in enumerate(rows):
        if row.continues is not None:
            _check_continues(f"{path}: row {i + 1} ({row.name})", row, rows)
    return Plan(name, str(raw.get("description", "")), path, tuple(rows))


def _load_row(entry: Any, where: str, base: dict[str, Any], cli_overrides: list[str]) -> Row:
    """One row of a plan, its config resolved for every seed (``base``: the plan's config,
    overrides and seeds, which the row's own keys extend or replace)."""
    if not isinstance(entry, dict) or not entry.get("name"):
        raise StudyError(f"{where} must be a mapping with at least a 'name'")
    _check_keys(entry, ROW_KEYS, where)
    row_name = str(entry["name"])
    if "/" in row_name or row_name in {".", ".."}:
        raise StudyError(f"{where}: name {row_name!r} must be a plain name (no '/', not . or ..)")
    config_file = entry.get("config", base["config"])
    overrides = base["overrides"] + _string_list(entry.get("overrides"), f"{where}: overrides")
    seeds = _seeds(entry.get("seeds", base["seeds"]), f"{where}: seeds")
    published = entry.get("published") or {}
    if not isinstance(published, dict):
        raise StudyError(f"{where}: published must be a mapping {{mse, mae, source}}")
    _check_keys(published, PUBLISHED_KEYS, f"{where}: published")
    configs = {}
    for seed in seeds:
        try:
            configs[seed] = load_config(
                config_file, [*overrides, *cli_overrides, f"train.seed={seed}"]
            )
        except WorkbenchError as err:
            raise StudyError(f"{where} ({row_name}, seed {seed}): {err}") from err
    return Row(
        name=row_name,
        description=str(entry.get("description", "")),
        config_file=str(config_file or ""),
        overrides=tuple(overrides),
        seeds=seeds,
        published=published,
        configs=configs,
        continues=entry.get("continues"),
    )


def _check_continues(where: str, row: Row, rows: list[Row]) -> None:
    """``continues: ROW``: this row is ROW trained for more epochs, so it may start from ROW's
    finished run of the same seed; anything else differing would not be the same run."""
    shorter = next((r for r in rows if r.name == row.continues and r is not row), None)
    if shorter is None:
        raise StudyError(f"{where}: continues {row.continues!r} must name another row")
    for seed, cfg in row.configs.items():
        if seed not in shorter.configs:
            raise StudyError(f"{where}: continues {row.continues!r}, which has no seed {seed}")
        mine, theirs = cfg.to_dict(), shorter.configs[seed].to_dict()
        longer = mine["train"]["epochs"] > theirs["train"]["epochs"]
        mine["train"]["epochs"] = theirs["train"]["epochs"]
        if mine != theirs or not longer or cfg.train.scheduler not in EPOCH_ONLY_SCHEDULES:
            raise StudyError(
                f"{where}: continues {row.continues!r}, so it may differ from it only by "
                "more train.epochs, with a schedule that depends on the epoch only "
                f"({sorted(EPOCH_ONLY_SCHEDULES)})"
            )


def _start_from_shorter_run(out: Path, plan: Plan, row: Row, seed: int) -> None:
    """A row that ``continues`` another starts from that row's finished run of the seed (a
    copy, resumed with more epochs: the same numbers as training it from the start)."""
    directory = run_dir(out, row, seed)
    if row.continues is None or (directory / "checkpoints").is_dir():
        return
    shorter = run_dir(out, next(r for r in plan.rows if r.name == row.continues), seed)
    if (shorter / "eval_test.json").is_file() and (shorter / "checkpoints/final.pt").is_file():
        # dirs_exist_ok: a failed start's leftovers
        shutil.copytree(shorter, directory, copy_function=_link_checkpoint, dirs_exist_ok=True)
        print(f"  starts from {row.continues}'s finished run: {shorter}", flush=True)


def _link_checkpoint(source: str, target: str) -> None:
    """Checkpoints are only ever replaced whole (atomic rename) or deleted, never written in
    place, so both runs can share them: a hard link where the file system allows one. Logs are
    appended to, so they (and anything else) are copied."""
    if source.endswith(".pt"):
        with contextlib.suppress(OSError):
            os.link(source, target)
            return
    shutil.copy2(source, target)


def _check_keys(entry: dict, allowed: set[str], where: str) -> None:
    unknown = set(entry) - allowed
    if unknown:
        raise StudyError(
            f"{where} has unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}"
        )


def _string_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise StudyError(f"{where} must be a list of KEY=VALUE strings, got {value!r}")
    return list(value)


def _seeds(value: Any, where: str) -> tuple[int, ...]:
    ok = isinstance(value, list | tuple) and value and all(type(v) is int for v in value)
    if not ok or len(set(value)) != len(value):
        raise StudyError(f"{where} must be a non-empty list of distinct integers, got {value!r}")
    return tuple(value)


def run_dir(out: Path, row: Row, seed: int) -> Path:
    return out / "runs" / row.name / f"seed{seed}"


# ------------------------------------------------------------------------------ running


def run_study(
    plan: Plan,
    out: str | Path,
    only: list[str] | None = None,
    progress: bool = True,
    command: str = "",
) -> dict[str, Any]:
    """Train (or reuse, or resume) every run of the rows named in ``only`` (default all),
    then write and return the results (``results.json`` and ``results.md``, rewritten after
    every run). A run whose config no longer matches the plan is refused with the keys that
    differ. SIGTERM or Ctrl-C stops the study after the current run (interrupted with a
    checkpoint): starting the study again continues it. A run that fails with a WorkbenchError
    is recorded with its message and the others go on."""
    from timellm_lib.training import train

    out = Path(out)
    unknown = sorted(set(only or []) - {r.name for r in plan.rows})
    if unknown:
        raise StudyError(
            f"--rows {unknown} not in the plan; its rows are {[r.name for r in plan.rows]}"
        )
    selected = [r for r in plan.rows if not only or r.name in only]
    selected.sort(key=lambda r: r.continues is not None)  # after the runs they may start from
    todo = [(row, seed) for row in selected for seed in row.seeds]
    errors: dict[tuple[str, int], str] = {}
    with StopSignals("the study stops after the current run") as stop:
        for i, (row, seed) in enumerate(todo):
            if stop.received:  # also when the interrupted run then failed (e.g. its save)
                break
            directory = run_dir(out, row, seed)
            print(f"[{i + 1}/{len(todo)}] {row.name} seed {seed}: {directory}", flush=True)
            _start_from_shorter_run(out, plan, row, seed)
            resume = "auto" if (directory / "checkpoints").is_dir() else None
            try:
                cfg = row.configs[seed]
                result = train(cfg, run_dir=directory, resume=resume, progress=progress)
            except WorkbenchError as err:
                errors[(row.name, seed)] = str(err)
                print(f"  failed: {err}", flush=True)
                continue
            print(f"  {result.summary()}", flush=True)
            if result.finished:
                row_cost(out, row)
            write_results(plan, out, command, errors)
            if result.status == "interrupted":
                break
    return write_results(plan, out, command, errors)


# ------------------------------------------------------------------------------ reading back


def run_record(directory: Path) -> dict[str, Any]:
    """What one run directory says: status, test scores of best.pt, best val loss, costs."""
    from timellm_lib.training.metrics_log import read_metrics

    record: dict[str, Any] = {"run_dir": directory.as_posix(), "status": "not started"}
    metrics = directory / "metrics.jsonl"
    if not metrics.is_file():
        return record
    events = read_metrics(metrics)
    done = (directory / "eval_test.json").is_file() and (
        directory / "checkpoints/final.pt"
    ).is_file()
    record["status"] = "finished" if done else "incomplete"
    steps = [e["global_step"] for e in events]
    record["global_step"] = max(steps) if steps else 0
    vals = [e for e in events if e["event"] == "val"]
    if vals:
        record["val_loss_min"] = min(e["val_loss"] for e in vals)
        record["epochs"] = vals[-1]["epoch"] + 1
    record["s_per_step"] = seconds_per_step(events)
    record["wall_s_to_best"] = wall_seconds_to_best(events, record["s_per_step"])
    if done:
        test = json.loads((directory / "eval_test.json").read_text())
        record.update(
            test_mse=test["mse"],
            test_mae=test["mae"],
            test_windows=test["n_windows"],
            best_step=test.get("checkpoint_global_step"),
        )
    return record


def active_seconds(events: list[dict[str, Any]]) -> list[float]:
    """Running wall time at each event, not counting the gap before a ``resume`` event (the
    time between an interruption and the next sitting)."""
    total, out = 0.0, []
    for before, event in zip([None, *events[:-1]], events, strict=True):
        if before is not None and event["event"] != "resume":
            total += event["time"] - before["time"]
        out.append(total)
    return out


def wall_seconds_to_best(
    events: list[dict[str, Any]], s_per_step: float | None = None
) -> float | None:
    """Active wall time to the last ``best`` save (None: no best yet). The log starts at its
    first event, after ``global_step`` steps of that event; those are added as ``s_per_step``
    each."""
    best = [i for i, e in enumerate(events) if e["event"] == "save" and e.get("kind") == "best"]
    if not best:
        return None
    before_log = events[0]["global_step"] * (s_per_step or 0.0)
    return round(active_seconds(events)[best[-1]] + before_log, 3)


def seconds_per_step(events: list[dict[str, Any]]) -> float | None:
    """Median seconds per optimizer step between consecutive ``train`` events with no other
    event between them (so no validation, save or restart is counted as training)."""
    rates = [
        (b["time"] - a["time"]) / (b["global_step"] - a["global_step"])
        for a, b in zip(events, events[1:], strict=False)
        if a["event"] == b["event"] == "train" and b["global_step"] > a["global_step"]
    ]
    return round(statistics.median(rates), 6) if rates else None


def row_cost(out: Path, row: Row) -> dict[str, Any]:
    """Parameters and GFLOP per optimizer step of ``row`` (its first seed's config), from
    ``<row>/cost.json`` when it was measured for the same config."""
    cfg = row.configs[row.seeds[0]]
    key = hashlib.sha256(cfg.to_yaml().encode()).hexdigest()[:16]
    path = out / "runs" / row.name / "cost.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("config_hash") == key:
            return cached
    cost = {"config_hash": key, **measure_cost(cfg)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cost, indent=2) + "\n")
    return cost


def measure_cost(cfg: Config) -> dict[str, Any]:
    """Trainable and total parameters (the frozen language model included) and GFLOP of one
    optimizer step (forward, MSE and backward over ``grad_accum`` batches of real training
    windows; the optimizer update itself is not a matmul and is not counted)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from timellm_lib.data import build_datasets, training_samples
    from timellm_lib.data.sampler import fetch_batch, sample_positions
    from timellm_lib.models import as_forecast, build_model
    from timellm_lib.notebooks.model_summary import parameter_table

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        datasets = build_datasets(cfg.data)
        model = build_model(cfg, datasets.n_in, datasets.n_out)
        model.build_memory(datasets.train, torch.Generator().manual_seed(cfg.train.seed))
        model.train()
        total = parameter_table(model).iloc[-1]
        # a micro-batch as the trainer draws it: batch_size windows, or series (sample_unit)
        samples = training_samples(datasets.train, cfg.data.sample_unit)
        index = torch.arange(cfg.data.batch_size)
        x, y = fetch_batch(samples, index)
        # a retrieval model (GRA-M) gets the samples' positions, as the trainer passes them
        extra = (
            {"window_index": sample_positions(samples, index)} if model.needs_window_index else {}
        )
        with FlopCounterMode(display=False) as counter:
            out = as_forecast(model(x, y, **extra))
            loss = F.mse_loss(out.pred.float(), y) + sum(out.aux_losses.values())
            loss.backward()
    return {
        "trainable_params": int(total["trainable"]),
        "total_params": int(total["trainable"] + total["frozen"]),
        "gflop_per_step": float(f"{counter.get_total_flops() * cfg.train.grad_accum / 1e9:.4g}"),
    }


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    std = statistics.stdev(values) if len(values) > 1 else None
    return statistics.fmean(values), std


def summarise_row(out: Path, row: Row) -> dict[str, Any]:
    """A row's runs and aggregates: mean and standard deviation (n - 1) over its finished
    seeds, the difference to the published numbers, costs."""
    runs = [{"seed": seed, **run_record(run_dir(out, row, seed))} for seed in row.seeds]
    for run in runs:  # relative to the study folder: results hold no path of this machine
        run["run_dir"] = Path(run["run_dir"]).relative_to(out).as_posix()
    finished = [r for r in runs if r["status"] == "finished"]
    summary: dict[str, Any] = {
        "name": row.name,
        "description": row.description,
        "config": row.config_file,
        "overrides": list(row.overrides),
        "seeds": list(row.seeds),
        "n": len(finished),
        "published": row.published,
    }
    for metric in ("test_mse", "test_mae", "s_per_step", "wall_s_to_best"):
        values = [r[metric] for r in finished if r.get(metric) is not None]
        summary[f"{metric}_mean"], summary[f"{metric}_std"] = _mean_std(values)
    for metric in ("mse", "mae"):
        mean, ref = summary[f"test_{metric}_mean"], row.published.get(metric)
        summary[f"{metric}_diff"] = None if mean is None or ref is None else mean - ref
    cfg = row.configs[row.seeds[0]].data
    data = Path(cfg.path)
    if cfg.source != "synthetic" and data.is_file():
        from timellm_lib.data.download import file_sha256

        summary["data"] = {"file": data.name, "sha256": file_sha256(data)}
    cost_file = out / "runs" / row.name / "cost.json"
    cost = json.loads(cost_file.read_text()) if cost_file.is_file() else {}
    for key in ("trainable_params", "total_params", "gflop_per_step"):
        summary[key] = cost.get(key)
    summary["runs"] = runs
    return summary


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: CPU model, cores, library versions."""
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
    }


def code_version() -> str | None:
    """The git commit of the timellm_lib checkout that ran (``-dirty`` when it had uncommitted
    changes); None for an installed copy outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        return None
    try:
        done = subprocess.run(
            [
                "git",
                "-C",
                str(root),
                "describe",
                "--always",
                "--dirty",
                "--abbrev=12",
                "--exclude=*",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def write_results(
    plan: Plan, out: Path, command: str, errors: dict[tuple[str, int], str] | None = None
) -> dict[str, Any]:
    """results.json and results.md of every row of the plan, from its run directories."""
    rows = [summarise_row(out, row) for row in plan.rows]
    for row in rows:
        for run in row["runs"]:
            error = (errors or {}).get((row["name"], run["seed"]))
            if error:
                run["error"] = error
    results = {
        "study": plan.name,
        "description": plan.description,
        "plan": str(plan.path),
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "code": code_version(),
        "machine": machine_info(),
        "rows": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    write_text_atomic(out / "results.md", markdown_table(results))
    return results


def _pm(mean: float | None, std: float | None, digits: int = 3) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown_table(results: dict[str, Any]) -> str:
    """The study as a markdown table: ours (mean ± std over n seeds) beside the published
    numbers, the differences, and the costs; a header with machine, date and command."""
    m = results["machine"]
    lines = [
        f"# Study {results['study']}",
        "",
        f"{results['description']}".strip(),
        "",
        f"Command: `{results['command']}`  ",
        f"Date: {results['date']}  ",
        f"Code: {results.get('code') or 'not a git checkout'}  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, "
        f"torch {m['torch']}, transformers {m['transformers']}"
        + (f", GPU {m['gpu']}" if m.get("gpu") else ""),
        "",
        "Test scores of each run's best.pt (EarlyStopping best), scaled space; mean ± standard "
        "deviation over n seeds. s/step: median seconds per optimizer step; to best: wall "
        "seconds until the best checkpoint was written.",
        "",
        "| row | n | test MSE | test MAE | published MSE / MAE | Δ MSE | Δ MAE | trainable "
        "params | total params | s/step | to best (s) | GFLOP/step | source |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        pub = r["published"]
        published = f"{pub['mse']:.3f} / {pub['mae']:.3f}" if "mse" in pub and "mae" in pub else "-"
        lines.append(
            "| "
            + " | ".join(
                [
                    r["name"],
                    str(r["n"]),
                    _pm(r["test_mse_mean"], r["test_mse_std"]),
                    _pm(r["test_mae_mean"], r["test_mae_std"]),
                    published,
                    _num(r["mse_diff"], "+.3f"),
                    _num(r["mae_diff"], "+.3f"),
                    _num(r["trainable_params"], ","),
                    _num(r["total_params"], ","),
                    _num(r["s_per_step_mean"], ".4g"),
                    _num(r["wall_s_to_best_mean"], ".0f"),
                    _num(r["gflop_per_step"], ".4g"),
                    str(pub.get("source", "-")),
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ command


def run_study_command(args: Any) -> int:
    """``timellm study PLAN [--out DIR] [--rows NAME ...] [--set KEY=VALUE ...]``: exit 0
    when every selected run finished, 1 when one failed or the study was interrupted."""
    plan = load_plan(args.plan, args.overrides)
    out = Path(args.out or Path("outputs/studies") / plan.name)
    command = " ".join(["timellm", *args.argv])
    results = run_study(plan, out, args.rows, progress=not args.no_progress, command=command)
    print((out / "results.md").read_text())
    wanted = [r for r in results["rows"] if not args.rows or r["name"] in args.rows]
    complete = all(r["n"] == len(r["seeds"]) for r in wanted)
    return 0 if complete else 1
