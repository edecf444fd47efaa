"""The resume walkthrough behind notebook 03: one small training run made several ways
(uninterrupted, killed and resumed, resumed from an older checkpoint, from best with a new
learning rate, ...) and the facts that answer common questions about checkpoints, resume and
EarlyStopping, each computed from the runs' files.

Nothing the notebook states is typed by hand: every claim is a value computed here and
checked with :func:`confirm`, which raises when it does not hold, so the notebook fails
loudly instead of teaching something the code no longer does.

A *scenario* is one run directory under a walkthrough root and the ``train()`` calls made on
it (:class:`Leg`). A leg can end in a graceful pause (``--max-steps``, which saves a step
checkpoint at the stop) or in an emulated crash: the same pause, after which the stop's own
checkpoint is deleted unless the run would have written it anyway, so the disk looks exactly
as a process killed right after that step leaves it, and the resume repeats the steps since
the last step checkpoint.

All runs are built by ``train()`` itself from the config (never from a model handed in), so a
walkthrough run is the run ``timellm train`` makes with the same settings; only
:func:`current_model` hands in a model, to look at the one in memory.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
import torch
from matplotlib.figure import Figure

from timellm_lib.config import Config, load_config
from timellm_lib.data.windows import training_samples
from timellm_lib.errors import WorkbenchError
from timellm_lib.evaluation.inference import load_for_inference
from timellm_lib.evaluation.metrics import evaluate
from timellm_lib.models import build_model
from timellm_lib.notebooks import anatomy, plots
from timellm_lib.notebooks.describe import describe_checkpoint
from timellm_lib.notebooks.runs import load_metrics, read_evals
from timellm_lib.training import schema as S
from timellm_lib.training import train
from timellm_lib.training.checkpoint import (
    load_checkpoint,
    save_checkpoint,
    state_digest,
    step_files,
    step_name,
)
from timellm_lib.training.metrics_log import read_metrics
from timellm_lib.training.rng import seed_everything
from timellm_lib.training.schedulers import Schedule

MARKER = "WALKTHROUGH.txt"  # marks a root whose scenario folders the walkthrough may re-create
# Every walkthrough run logs every step (per-step losses and lr), keeps every step
# checkpoint (the position table reads them) and runs on the CPU, where resumes are promised
# to be bit-identical; the overrides given to walkthrough_config cannot change that.
FIXED_OVERRIDES = ("train.log_steps=1", "train.save_total_limit=0", "train.device=cpu")
COMPARED_EVENTS = ("train", "val", "test", "early_stop")  # what must match between two runs


class WalkthroughError(WorkbenchError):
    """A walkthrough parameter is impossible, or a claim does not hold for the runs."""


def confirm(claim: str, holds: Any) -> None:
    """Print ``✓ claim: True``; print ``✗ claim: False`` and raise when the runs contradict
    the claim. The mark tells checked claims from values that are only shown."""
    holds = bool(holds)
    print(f"{'✓' if holds else '✗'} {claim}: {holds}")
    if not holds:
        raise WalkthroughError(
            f"the claim {claim!r} does not hold for these runs: the code no longer behaves as "
            "the walkthrough explains; look at the tables above and update the explanation or "
            "the code"
        )


# ------------------------------------------------------------------------------ set-up


def walkthrough_config(config: str | Path | None, overrides: Sequence[str], *extra: str) -> Config:
    """``config`` with the small-run defaults (one torch thread), ``overrides``, the
    walkthrough's fixed settings, then ``extra``."""
    return load_config(
        config or None,
        overrides=[*anatomy.SMALL_RUN_DEFAULTS, *overrides, *FIXED_OVERRIDES, *extra],
    )


def prepare_root(root: str | Path) -> Path:
    """Create ``root`` or empty one the walkthrough made before (it has :data:`MARKER`);
    refuse a non-empty folder it did not make, whose files it must not delete."""
    root = Path(root)
    if root.is_dir() and any(root.iterdir()) and not (root / MARKER).is_file():
        raise WalkthroughError(
            f"{root} already holds files the walkthrough did not write, and it re-creates its "
            "scenario folders on every execution; choose an empty or new output_root"
        )
    if root.is_dir():
        for child in root.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text(
        "Run directories of the resume walkthrough (notebooks/03_resume_walkthrough.ipynb);\n"
        "the folders here are deleted and re-created on every execution.\n"
    )
    return root


def train_steps_of(cfg: Config, datasets: Any) -> int:
    """Optimizer steps per epoch, as the trainer computes them (see :func:`epoch_arithmetic`)."""
    samples = training_samples(datasets.train, cfg.data.sample_unit)
    return len(samples) // cfg.data.batch_size // cfg.train.grad_accum


def check_parameters(
    cfg: Config,
    train_steps: int,
    steps: Sequence[int],
    crash: bool,
    patience: int,
    resume_counter: int,
) -> None:
    """Refuse settings the walkthrough's questions cannot be shown with: two interruption
    steps, one inside the first epoch before any validation (after a step checkpoint when
    ``crash``), one inside a later epoch; a ``resume_counter`` below ``patience``."""
    t = cfg.train
    total = t.epochs * train_steps
    problems = []
    if t.epochs < 2:
        problems.append(f"epochs is {t.epochs}; the walkthrough needs at least 2")
    if len(steps) != 2:
        raise WalkthroughError(
            f"interrupt_steps needs two steps (one inside the first epoch, one inside a later "
            f"epoch), got {list(steps)}"
        )
    first, later = steps
    first_val = min(train_steps, t.eval_steps or train_steps)
    if not 1 <= first < first_val:
        problems.append(
            f"the first interruption step {first} must lie inside the first epoch before the "
            f"first validation: 1 to {first_val - 1} ({train_steps} steps per epoch)"
        )
    elif crash and not (t.save_steps and first >= t.save_steps):
        problems.append(
            f"a crash at step {first} leaves no step checkpoint to resume from (save_steps "
            f"{t.save_steps}); choose a first interruption step of at least save_steps, or "
            "crash = False"
        )
    if not (train_steps < later < total and later % train_steps):
        problems.append(
            f"the second interruption step {later} must lie inside a later epoch: between "
            f"{train_steps} and {total}, not a multiple of {train_steps} (an epoch end)"
        )
    if not 0 <= resume_counter < patience:
        problems.append(
            f"resume_counter {resume_counter} must lie in 0 to patience - 1 ({patience - 1})"
        )
    if problems:
        raise WalkthroughError("; ".join(problems))


# ------------------------------------------------------------------------------ scenarios


@dataclass
class Leg:
    """One ``train()`` call of a scenario."""

    resumed_from: str | None  # checkpoint file resumed from (None: a fresh start)
    start_step: int
    stop_step: int
    status: str  # finished | stopped early | paused | already complete
    crashed: bool = False
    removed: str | None = None  # the stop's own checkpoint, deleted to emulate the crash
    warnings: list[str] = field(default_factory=list)


@dataclass
class Scenario:
    """A run directory and the ``train()`` calls made on it, in order."""

    name: str
    run_dir: Path
    datasets: Any = None
    legs: list[Leg] = field(default_factory=list)

    @property
    def interruptions(self) -> list[int]:
        """Steps where a leg ended before the run was done (paused or crashed)."""
        return [leg.stop_step for leg in self.legs if leg.status == "paused"]

    def run(
        self,
        cfg: Config,
        stop: int | None = None,
        crash: bool = False,
        resume: str = "auto",
        **options: Any,
    ) -> Leg:
        """One ``train()`` call: a fresh start for the first leg, else a resume (``resume``
        and the resume ``options`` of :func:`train`); ``stop`` pauses at that step, and
        ``crash`` then deletes the pause's own checkpoint (see the module docstring)."""
        fresh = not self.legs
        with captured_warnings() as warnings:
            result = train(
                cfg,
                run_dir=self.run_dir,
                resume=None if fresh else resume,
                max_steps=stop,
                progress=False,
                datasets=self.datasets,
                **options,
            )
        start = 0
        if result.resumed_from:
            start = load_checkpoint(result.resumed_from, peek=True)[S.GLOBAL_STEP]
        leg = Leg(
            resumed_from=Path(result.resumed_from).name if result.resumed_from else None,
            start_step=start,
            stop_step=result.global_step,
            status=result.status,
            warnings=warnings,
        )
        if crash and result.status == "paused":
            leg.crashed = True
            leg.removed = _emulate_crash(self.run_dir, cfg, result.global_step)
        self.legs.append(leg)
        return leg

    def fork(self, name: str, run_dir: str | Path) -> Scenario:
        """A copy of this scenario's run directory, to resume in another way."""
        run_dir = Path(run_dir)
        shutil.copytree(self.run_dir, run_dir)
        legs = [Leg(**vars(leg)) for leg in self.legs]
        return Scenario(name, run_dir, self.datasets, legs)

    def legs_table(self) -> pd.DataFrame:
        """One row per train() call (its warnings left out)."""
        return pd.DataFrame([vars(leg) for leg in self.legs]).drop(columns="warnings")


def run_scenario(
    name: str,
    run_dir: str | Path,
    cfg: Config,
    datasets: Any,
    stops: Sequence[int] = (),
    crash: bool = False,
) -> Scenario:
    """Train ``cfg`` into ``run_dir``, interrupted at each of ``stops`` and resumed with
    ``--resume auto`` each time, to the end."""
    scenario = Scenario(name, Path(run_dir), datasets)
    for stop in stops:
        scenario.run(cfg, stop=stop, crash=crash)
    scenario.run(cfg)
    return scenario


def _emulate_crash(run_dir: Path, cfg: Config, step: int) -> str | None:
    """Delete the checkpoint a pause at ``step`` wrote unless the run writes it anyway (epoch
    end, a save_steps multiple, best.pt's companion); returns the name deleted."""
    path = run_dir / "checkpoints" / step_name(step)
    train_steps = load_checkpoint(path, peek=True)[S.TRAIN_STEPS]
    best = run_dir / "checkpoints" / "best.pt"
    companion = best.is_file() and load_checkpoint(best, peek=True)[S.GLOBAL_STEP] == step
    save_steps = cfg.train.save_steps
    if step % train_steps == 0 or (save_steps and step % save_steps == 0) or companion:
        return None
    path.unlink()
    return path.name


@contextmanager
def captured_warnings(logger: str = "timellm_lib") -> Iterator[list[str]]:
    """Collect the warnings the library logs inside the block (and still let them through)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Collect(logging.WARNING)
    target = logging.getLogger(logger)
    target.addHandler(handler)
    try:
        yield messages
    finally:
        target.removeHandler(handler)


def scenarios_table(scenarios: Sequence[Scenario]) -> pd.DataFrame:
    """One row per scenario: where it lives, how often train() ran, where it was interrupted
    and how it ended."""
    return pd.DataFrame(
        [
            {
                "scenario": s.name,
                "run directory": str(s.run_dir),
                "train() calls": len(s.legs),
                "interrupted at": s.interruptions,
                "resumed from": [leg.resumed_from for leg in s.legs if leg.resumed_from],
                "ended at step": s.legs[-1].stop_step,
                "status": s.legs[-1].status,
            }
            for s in scenarios
        ]
    )


def timeline(scenarios: Sequence[Scenario]) -> Figure:
    """plots.timeline_mpl of the scenarios, with each one's interruption steps."""
    return plots.timeline_mpl(
        [s.run_dir for s in scenarios],
        [s.name for s in scenarios],
        [s.interruptions for s in scenarios],
    )


# ------------------------------------------------------------------------------ comparing


def logged(run_dir: str | Path, event: str, column: str) -> pd.Series:
    """``column`` of every ``event`` the run logged, by global_step (what a resume
    superseded is dropped, see :func:`timellm_lib.notebooks.runs.load_metrics`)."""
    metrics = load_metrics(run_dir)
    rows = metrics[metrics["event"] == event]
    return pd.Series(rows[column].to_numpy(), index=rows["global_step"].astype(int), name=column)


def compared_events(run_dir: str | Path) -> list[dict[str, Any]]:
    """The run's train, val, test and early_stop events without wall-clock times."""
    events = read_metrics(Path(run_dir) / "metrics.jsonl")
    return [
        {k: v for k, v in e.items() if k != "time"} for e in events if e["event"] in COMPARED_EVENTS
    ]


def same_run(run_dir: str | Path, reference: str | Path) -> dict[str, bool]:
    """Whether a run ended exactly as ``reference``: final.pt's digests, every logged train,
    val and test value, and eval_test.json."""
    a, b = (describe_checkpoint(Path(d) / "checkpoints" / "final.pt") for d in (run_dir, reference))
    return {
        "final state_digest equal": a["state_digest"] == b["state_digest"],
        "final resume_digest equal": a["resume_digest"] == b["resume_digest"],
        "logged events equal": compared_events(run_dir) == compared_events(reference),
        "test scores equal": read_evals(run_dir).get("test") == read_evals(reference).get("test"),
    }


def digest_table(runs: dict[str, str | Path]) -> pd.DataFrame:
    """state and resume digests of the checkpoint files every run has (step files by step,
    then final.pt), with whether they agree across the runs."""
    names = None
    for run_dir in runs.values():
        files = {p.name for _, p in step_files(Path(run_dir) / "checkpoints")} | {"final.pt"}
        names = files if names is None else names & files
    ordered = sorted(names or (), key=lambda n: (n == "final.pt", n))
    rows = []
    for name in ordered:
        infos = {
            label: describe_checkpoint(Path(d) / "checkpoints" / name) for label, d in runs.items()
        }
        row: dict[str, Any] = {
            "file": name,
            "global_step": next(iter(infos.values()))["global_step"],
        }
        for label, info in infos.items():
            row[f"resume_digest ({label})"] = info["resume_digest"][:16]
        row["state digests equal"] = len({i["state_digest"] for i in infos.values()}) == 1
        row["resume digests equal"] = len({i["resume_digest"] for i in infos.values()}) == 1
        rows.append(row)
    return pd.DataFrame(rows)


def side_by_side(runs: dict[str, str | Path], event: str, column: str) -> pd.DataFrame:
    """``column`` of ``event`` for several runs, one column per run, by global_step (outer
    join: runs of different lengths leave gaps), with ``epoch`` first."""
    frames = {label: logged(d, event, column) for label, d in runs.items()}
    table = pd.DataFrame(frames).convert_dtypes()  # counters stay integers beside gaps
    epochs = pd.concat([logged(d, event, "epoch") for d in runs.values()])
    table.insert(0, "epoch", epochs[~epochs.index.duplicated()].reindex(table.index).astype(int))
    table.index.name = "global_step"
    return table


def equal_columns(table: pd.DataFrame, columns: Sequence[str]) -> bool:
    """Whether ``columns`` of ``table`` hold exactly the same values on every row where all
    of them have one (runs of different lengths are compared on their common steps)."""
    common = table[list(columns)].dropna()
    return len(common) > 0 and all(common[c].equals(common[columns[0]].rename(c)) for c in columns)


# ------------------------------------------------------------------------------ facts


def resume_events(run_dir: str | Path) -> pd.DataFrame:
    """The resume events of a run (from, position, EarlyStopping and lr as restored)."""
    events = [e for e in read_metrics(Path(run_dir) / "metrics.jsonl") if e["event"] == "resume"]
    columns = [
        "from",
        "global_step",
        "epoch",
        "step_in_epoch",
        "best_score",
        "counter",
        "counter_before",
        "resume_counter",
        "early_stopping_missing",
        "lr_before",
        "lr",
        "resume_new_lr",
        "resume_reset_scheduler",
        "discarded",
    ]
    table = pd.DataFrame(events).reindex(columns=columns).astype(object)
    return table.where(table.notna(), None)  # best_score None stays None, not NaN


def checkpoint_values(runs: dict[str, str | Path], column: str) -> pd.DataFrame:
    """``column`` of :func:`timellm_lib.notebooks.anatomy.checkpoint_files` (e.g. best_score, counter)
    for every step checkpoint of several runs, one column per run, by global_step."""
    frames = {}
    for label, run_dir in runs.items():
        files = anatomy.checkpoint_files(run_dir)
        files = files[files["kind"] == "step"]
        frames[label] = pd.Series(files[column].to_numpy(), index=files["global_step"])
    table = pd.DataFrame(frames).astype(object)
    table.index.name = "global_step"
    return table.where(table.notna(), None)


def strip_early_stopping(path: str | Path) -> list[str]:
    """Rewrite a checkpoint without its ``early_stopping`` entry, as code that did not save
    EarlyStopping wrote it; returns the fields removed."""
    payload = load_checkpoint(path)
    removed = list(payload.pop(S.EARLY_STOPPING, None) or {})
    save_checkpoint(path, payload)
    return removed


def position_table(run_dir: str | Path) -> pd.DataFrame:
    """Every step checkpoint's position as stored, and the arithmetic that recovers it:
    ``epoch = global_step // train_steps``, ``step_in_epoch = global_step % train_steps``."""
    files = anatomy.checkpoint_files(run_dir)
    files = files[files["kind"] == "step"]
    table = files[["file", "global_step", "train_steps", "epoch", "step_in_epoch"]].copy()
    table.insert(1, "N in file name", table["file"].str.extract(r"step_(\d+)\.pt")[0].astype(int))
    table["global_step // train_steps"] = table["global_step"] // table["train_steps"]
    table["global_step % train_steps"] = table["global_step"] % table["train_steps"]
    return table.reset_index(drop=True)


def position_consistent(table: pd.DataFrame) -> bool:
    """Whether a :func:`position_table` agrees with the arithmetic on every row."""
    return bool(
        (table["N in file name"] == table["global_step"]).all()
        and (table["epoch"] == table["global_step // train_steps"]).all()
        and (table["step_in_epoch"] == table["global_step % train_steps"]).all()
    )


def epoch_arithmetic(cfg: Config, datasets: Any, run_dir: str | Path) -> dict[str, Any]:
    """How train_steps comes about, and the optimizer steps each epoch really had."""
    windows = len(datasets.train)
    batches = windows // cfg.data.batch_size
    steps = logged(run_dir, "train", "epoch")
    return {
        "training windows": windows,
        "batch_size": cfg.data.batch_size,
        "full batches (last incomplete one dropped)": batches,
        "windows dropped per epoch": windows - batches * cfg.data.batch_size,
        "grad_accum": cfg.train.grad_accum,
        "train_steps = full batches // grad_accum": batches // cfg.train.grad_accum,
        "train_steps stored in checkpoints": sorted(
            set(anatomy.checkpoint_files(run_dir)["train_steps"])
        ),
        "optimizer steps logged per epoch": steps.value_counts().sort_index().tolist(),
    }


def saves(run_dir: str | Path) -> list[int]:
    """Steps at which the run saved a step checkpoint (from metrics.jsonl)."""
    metrics = load_metrics(run_dir)
    rows = metrics[(metrics["event"] == "save") & (metrics["kind"] == "step")]
    return rows["global_step"].astype(int).tolist()


def expected_saves(train_steps: int, save_steps: int, total_steps: int) -> list[int]:
    """Step saves of an uninterrupted run without early stop: every multiple of save_steps
    and every epoch end."""
    return [
        s
        for s in range(1, total_steps + 1)
        if s % train_steps == 0 or (save_steps and s % save_steps == 0)
    ]


def largest_divisor(n: int) -> int:
    """The largest divisor of ``n`` below ``n`` (``n`` itself when it is prime or 1): a
    save_steps whose multiples hit every epoch end."""
    return next((d for d in range(n // 2, 1, -1) if n % d == 0), n)


def events_at(run_dir: str | Path, step: int) -> pd.DataFrame:
    """Everything logged at ``step``, in log order."""
    events = [e for e in read_metrics(Path(run_dir) / "metrics.jsonl") if e["global_step"] == step]
    columns = ["event", "kind", "path", "val_loss", "improved", "best_score", "counter"]
    return pd.DataFrame(events).reindex(columns=columns)


def event_order(run_dir: str | Path, step: int) -> list[str]:
    """The events logged at ``step`` in order, saves with their kind: ``save (step)``."""
    events = events_at(run_dir, step)
    return [
        e if pd.isna(k) else f"{e} ({k})"
        for e, k in zip(events["event"], events["kind"], strict=True)
    ]


def checkpoint_after_validation(run_dir: str | Path, step: int) -> dict[str, Any]:
    """The step checkpoint at an epoch end against that step's validation: it must hold the
    EarlyStopping state *after* the validation and a log that already includes it."""
    events = read_metrics(Path(run_dir) / "metrics.jsonl")
    val_line = next(
        i for i, e in enumerate(events) if e["event"] == "val" and e["global_step"] == step
    )
    ckpt = load_checkpoint(Path(run_dir) / "checkpoints" / step_name(step), peek=True)
    es = ckpt[S.EARLY_STOPPING]
    return {
        "val_loss logged": events[val_line]["val_loss"],
        "checkpoint best_score": es["best_score"],
        "checkpoint val_loss_min": es["val_loss_min"],
        "checkpoint counter": es["counter"],
        "val event is line": val_line + 1,
        "checkpoint keeps log lines": ckpt[S.METRICS_LINES],
        "validation before the save": ckpt[S.METRICS_LINES] > val_line,
    }


def current_model(cfg: Config, run_dir: str | Path, stop: int, datasets: Any) -> pd.DataFrame:
    """Where "the current model" lives: one model object trained to ``stop`` (a pause), then
    resumed to the end, its weights' digest compared with the files at both moments."""
    run_dir = Path(run_dir)
    seed_everything(cfg.train.seed)
    model = build_model(cfg, datasets.n_in, datasets.n_out)
    rows = []
    for moment, options in (
        (f"paused at step {stop}", {"max_steps": stop}),
        ("after training ended", {"resume": "auto"}),
    ):
        train(cfg, run_dir=run_dir, progress=False, model=model, datasets=datasets, **options)
        ckpt_dir = run_dir / "checkpoints"
        files = {"newest step file": step_files(ckpt_dir)[-1][1]}
        files |= {name: ckpt_dir / name for name in ("best.pt", "final.pt")}
        memory = state_digest(model.state_dict())
        row: dict[str, Any] = {"moment": moment, "in memory": memory[:16]}
        for label, path in files.items():
            digest = state_digest(load_checkpoint(path)[S.MODEL]) if path.is_file() else None
            row[label] = f"{path.name}: {digest[:16]}" if digest else "(none yet)"
            row[f"memory = {label}"] = digest == memory
        rows.append(row)
    return pd.DataFrame(rows).set_index("moment")


def inference_facts(run_dir: str | Path) -> dict[str, Any]:
    """Load best.pt as inference does and score it again: validation during training was
    already this (forward passes only, eval mode, no gradients), so the numbers match the
    logged ones exactly; the model is put in train mode first to show evaluate switches."""
    run_dir = Path(run_dir)
    best = run_dir / "checkpoints" / "best.pt"
    loaded = load_for_inference(best)
    model, cfg, datasets = loaded.model, loaded.cfg, loaded.datasets
    calls: list[tuple[bool, bool]] = []
    hook = model.register_forward_pre_hook(
        lambda module, args: calls.append((module.training, torch.is_grad_enabled()))
    )
    before = state_digest(model.state_dict())
    model.train()
    val = evaluate(model, datasets.val, cfg.data.eval_batch_size)
    test = evaluate(model, datasets.test, cfg.data.eval_batch_size)
    hook.remove()
    best_step = load_checkpoint(best, peek=True)[S.GLOBAL_STEP]
    logged_val = logged(run_dir, "val", "val_loss")[best_step]
    return {
        "best.pt global_step": best_step,
        "fields inference reads": list(anatomy.INFERENCE_FIELDS),
        "val mse now": val["mse"],
        "val_loss logged at that step": float(logged_val),
        "test mse now": test["mse"],
        "test mse in eval_test.json": read_evals(run_dir)["test"]["mse"],
        "forward passes": len(calls),
        "any forward in train mode": any(training for training, _ in calls),
        "any forward with gradients": any(grad for _, grad in calls),
        "weights unchanged": state_digest(model.state_dict()) == before,
    }


# ------------------------------------------------------------------------------ lr, counter


def lr_curves(runs: dict[str, str | Path]) -> pd.DataFrame:
    """The lr each optimizer step used, one column per run (train events)."""
    return side_by_side(runs, "train", "lr")


def lr_figure(curves: pd.DataFrame, reference: str, resume_step: int) -> Figure:
    """One panel per resumed run, side by side: its lr against ``reference``'s, and the
    step it resumed from."""
    resumed = [c for c in curves.columns if c not in ("epoch", reference)]
    fig, axes = plt.subplots(
        1, len(resumed), sharey=True, squeeze=False, figsize=(11, 3.4), layout="constrained"
    )
    plt.close(fig)  # returned, not shown twice (see timellm_lib.notebooks.plots)
    for ax, name in zip(axes[0], resumed, strict=True):
        ax.plot(curves.index, curves[reference], color="0.6", lw=2.5, label=reference)
        ax.plot(curves.index, curves[name], color=plots.PALETTE[1], lw=1.5, label=name)
        ax.axvline(resume_step, color=plots.PALETTE[2], ls="--", lw=1, label="resumed from")
        ax.set_title(name, loc="left", fontsize="medium")
        ax.set_xlabel("global step")
        ax.legend(fontsize="small")
    axes[0, 0].set_ylabel("learning rate")
    return fig


def scheduled_lr(
    cfg: Config, train_steps: int, steps: Sequence[int], origin: int = 0
) -> list[float]:
    """The lr ``cfg``'s schedule gives the optimizer steps ``steps`` (1-based global steps,
    as logged) when it starts at global step ``origin`` with base lr ``cfg.train.lr``."""
    total = cfg.train.epochs * train_steps
    schedule = Schedule(cfg.train, train_steps, total - origin, origin)
    return [cfg.train.lr * schedule(step - 1 - origin) for step in steps]


def close(a: Sequence[float], b: Sequence[float]) -> bool:
    """Element-wise equality up to float rounding (lrs are products of the same factors)."""
    return len(a) == len(b) and all(
        math.isclose(x, y, rel_tol=1e-12) for x, y in zip(a, b, strict=True)
    )


def best_step(run_dir: str | Path) -> int:
    """The global_step best.pt was written at."""
    return int(load_checkpoint(Path(run_dir) / "checkpoints" / "best.pt", peek=True)[S.GLOBAL_STEP])


def stop_step(run_dir: str | Path) -> int | None:
    """The step EarlyStopping stopped the run at (None: it ran to the end)."""
    steps = logged(run_dir, "early_stop", "global_step")
    return int(steps.index[0]) if len(steps) else None
