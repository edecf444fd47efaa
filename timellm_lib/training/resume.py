"""Resuming: which checkpoint to continue from (or that there is nothing to do), what a resume
may change, and putting every piece of state back so the continuation is bit-identical."""

from __future__ import annotations

import json
import logging
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import torch

from timellm_lib.config import Config, checkpoint_config
from timellm_lib.files import write_text_atomic
from timellm_lib.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model_weights,
    remove_temp_files,
    select_resume_checkpoint,
    step_files,
)
from timellm_lib.training.distributed import on_main
from timellm_lib.training.metrics_log import MetricsLog, rewind_log
from timellm_lib.training.rng import restore_rng_state, seed_rank
from timellm_lib.training.schedulers import build_scheduler
from timellm_lib.training.state import (
    Run,
    TrainingError,
    TrainResult,
    backbone_record,
    relative,
)

log = logging.getLogger(__name__)

# Config keys a resume may change (anything else must match the checkpoint's config).
RESUME_MAY_CHANGE = {
    "train.lr",
    "train.epochs",
    "train.patience",
    "train.delta",
    "train.save_steps",
    "train.save_total_limit",
    "train.eval_steps",
    "train.log_steps",
    "train.test_every_epoch",  # an extra report; it decides nothing
    "train.threads",
    "train.device",
    "train.on_nan",
    "train.on_nan_lr_factor",
    "train.on_nan_max_reloads",
    "train.on_save_error",
    # speed only: the same computation up to float rounding (prefix_cache: exact)
    "train.compile",
    "train.fused_optimizer",
    "model.prefix_cache",
    "model.last_layer_patches_only",
    "data.num_workers",  # batches are gathered identically with or without workers
}

# Optimizer param_group keys that choose a kernel, not what the optimizer computes.
_KERNEL_KEYS = ("fused", "foreach")


def find_start(
    run_dir: Path, resume: str | None, cfg: Config, max_steps: int | None, counter: int | None
) -> tuple[Path | None, dict[str, list], TrainResult | None]:
    """(checkpoint to resume from or None, config changes, the result when there is nothing
    to do); run by rank 0 alone, before anything in the run directory changes."""
    ckpt_dir = run_dir / "checkpoints"
    if resume not in (None, "auto", "last", "best"):
        _refuse_foreign_history(run_dir, Path(resume))
    found = select_resume_checkpoint(run_dir, resume) if resume else None
    if found is None:
        if resume:
            log.warning("no valid checkpoint in %s; starting from scratch", ckpt_dir)
        elif step_files(ckpt_dir) or (ckpt_dir / "final.pt").exists():
            raise TrainingError(
                f"{run_dir} already holds checkpoints; pass --resume auto to continue that run "
                "or choose another --run-dir (or run.run_id) for a new one"
            )
        return None, {}, None
    path, ckpt = found
    changes = _config_changes(checkpoint_config(ckpt["config"]), cfg.to_dict())
    return path, changes, _already_done(run_dir, path, ckpt, cfg, max_steps, counter)


def _refuse_foreign_history(run_dir: Path, path: Path) -> None:
    """Resuming from a checkpoint of another run rewinds this directory to that run's
    position: it would discard this directory's own checkpoints and log. So that is allowed
    only into a directory without a run history."""
    if path.resolve().parent == (run_dir / "checkpoints").resolve():
        return
    ckpt_dir = run_dir / "checkpoints"
    history = [p for _, p in step_files(ckpt_dir)]
    history += [ckpt_dir / n for n in ("best.pt", "final.pt") if (ckpt_dir / n).exists()]
    history += [p for p in (run_dir / "metrics.jsonl",) if p.is_file() and p.stat().st_size]
    if history:
        shown = ", ".join(relative(p, run_dir) for p in history[:4])
        more = f" and {len(history) - 4} more" if len(history) > 4 else ""
        raise TrainingError(
            f"--run-dir {run_dir} holds the history of another run ({shown}{more}), and "
            f"--resume {path} is not one of its checkpoints: resuming would replace that "
            "history. To continue from that checkpoint, pass a --run-dir that does not exist "
            f"yet (or is empty); to continue the run in {run_dir}, use --resume auto or one of "
            "its own checkpoints"
        )


def restore(
    run: Run,
    path: Path,
    ckpt: dict[str, Any],
    changes: dict[str, list],
    base_lr: float | None = None,
    reset_scheduler: bool = False,
    counter: int | None = None,
    reason: str | None = None,
) -> None:
    """Put every piece of state back; each rank's RNG last, right before the loop goes on.

    ``base_lr`` replaces the base lr, keeping the optimizer moments (the schedule's current
    factor still applies); ``reset_scheduler`` starts the schedule over at train.lr;
    ``counter`` overrides the EarlyStopping counter; ``reason`` says why a run reloads itself
    (a non-finite loss) and goes into the resume event.
    """
    _check_fits(run, path, ckpt)
    load_model_weights(run.model, ckpt["model"])
    _load_training_state(run, ckpt)
    run.scheduler.load_state_dict(ckpt["scheduler"])
    missing_es = run.stopper.load_state_dict(ckpt.get("early_stopping"))
    if missing_es:
        log.warning(
            "%s has no EarlyStopping fields %s (an older checkpoint): they start as best_score "
            "None, val_loss_min inf, counter 0",
            path.name,
            missing_es,
        )
    run.state.global_step = ckpt["global_step"]
    # the lr of the step before the checkpoint (LambdaLR: base lr x factor of that step), for
    # events written before this continuation's first step (a test event after final.pt)
    scheduler = run.scheduler
    last = scheduler.last_epoch - 1
    run.state.step_lr = scheduler.base_lrs[0] * scheduler.lr_lambdas[0](last) if last >= 0 else None
    lr_before = run.lr
    if "train.epochs" in changes and not reset_scheduler:
        _span_new_length(run, *changes["train.epochs"])
    _change_lr(run, changes, base_lr, reset_scheduler)
    counter_before = run.stopper.counter
    if counter is not None:
        run.stopper.counter = counter
    saved_world = int(ckpt.get("world_size", 1))
    if saved_world != run.world.size:
        _warn_world_size(path, saved_world, run.world.size)
    facts = {
        "config_changes": changes,
        "resume_new_lr": base_lr is not None,
        "resume_reset_scheduler": reset_scheduler,
        "lr_before": lr_before,
        "resume_counter": counter,
        "counter_before": counter_before,
        "early_stopping_missing": missing_es,
    }
    on_main(run.world, partial(_reopen_run_dir, run, path, ckpt, facts, saved_world, reason))
    _restore_rng(run, ckpt)


def _check_fits(run: Run, path: Path, ckpt: dict[str, Any]) -> None:
    """The checkpoint was made for this data (steps per epoch) and this frozen backbone."""
    if ckpt["train_steps"] != run.train_steps:
        raise CheckpointError(
            f"{path.name} was made with {ckpt['train_steps']} optimizer steps per epoch, this "
            f"run has {run.train_steps}: the training data or batch size changed; resume with "
            "the checkpoint's data and config"
        )
    saved, current = ckpt["backbone"], backbone_record(run.cfg, run.model)
    if saved.get("fingerprint") != current.get("fingerprint"):
        raise CheckpointError(
            f"{path.name} belongs to backbone {saved.get('name')!r} (fingerprint "
            f"{saved.get('fingerprint')}), but this model's backbone is {current.get('name')!r} "
            f"(fingerprint {current.get('fingerprint')}); use the backbone it was trained with"
        )


def _span_new_length(run: Run, old_epochs: int, new_epochs: int) -> None:
    """train.epochs changed: from here the schedule is the new length's, so a finished run
    continued for more epochs ends as the longer run would (bit for bit where the lr depends
    on the epoch only; cosine and onecycle, which span the whole run, change their lr now)."""
    scheduler, schedule = run.scheduler, run.scheduler.lr_lambdas[0]
    before = schedule(scheduler.last_epoch)
    schedule.total_steps = max(run.total_steps - schedule.origin, 1)
    after = schedule(scheduler.last_epoch)
    for group, base in zip(run.optimizer.param_groups, scheduler.base_lrs, strict=True):
        group["lr"] = base * after
    if after != before:
        log.warning(
            "train.epochs changed from %s to %s: the %s schedule now spans %d steps and its lr "
            "goes from %.4g to %.4g at this step (--resume-reset-scheduler starts it over)",
            old_epochs,
            new_epochs,
            schedule.kind,
            schedule.total_steps,
            scheduler.base_lrs[0] * before,
            scheduler.base_lrs[0] * after,
        )


def _change_lr(
    run: Run, changes: dict[str, list], base_lr: float | None, reset_scheduler: bool
) -> None:
    """--resume-reset-scheduler, --resume-new-lr, or a warning that a changed train.lr is
    ignored without one of them."""
    t = run.cfg.train
    if reset_scheduler:
        for group in run.optimizer.param_groups:
            group["initial_lr"] = t.lr
        run.scheduler = build_scheduler(
            run.optimizer, t, run.train_steps, run.total_steps, origin=run.state.global_step
        )
    elif base_lr is not None:
        factor = run.scheduler.lr_lambdas[0](run.scheduler.last_epoch)
        for group in run.optimizer.param_groups:
            group["initial_lr"] = base_lr
            group["lr"] = base_lr * factor
        run.scheduler.base_lrs = [base_lr] * len(run.optimizer.param_groups)
    elif "train.lr" in changes:
        log.warning(
            "train.lr changed from %s to %s but the optimizer keeps the checkpoint's lr; add "
            "--resume-new-lr to use the new one",
            *changes["train.lr"],
        )


def _warn_world_size(path: Path, saved: int, now: int) -> None:
    log.warning(
        "%s was written by a %d-process run and this one has %d processes: the global "
        "batch order, steps per epoch and schedule stay the same (data.batch_size is the "
        "global batch), but the continuation is not bit-identical to an uninterrupted "
        "%d-process run (sums are taken in another order, ranks draw their own dropout)",
        path.name,
        saved,
        now,
        saved,
    )


def _reopen_run_dir(
    run: Run,
    path: Path,
    ckpt: dict[str, Any],
    facts: dict[str, Any],
    saved_world: int,
    reason: str | None,
) -> None:
    """Rank 0: set aside what the abandoned continuation wrote, rewind the log, log the
    resume."""
    run.ckpt_dir.mkdir(parents=True, exist_ok=True)  # a new run directory has none yet
    discarded, aside = _discard_newer(run, path)
    remove_temp_files(run.ckpt_dir)
    if (run.ckpt_dir / "best.pt").is_file():
        best = load_checkpoint(run.ckpt_dir / "best.pt", peek=True)
        run.state.best_companion = best["resume_from"]
    if run.metrics:  # a reload within the run: the log file is about to be replaced
        run.metrics.close()
    in_run_dir = path.parent.name == "checkpoints"
    source = path.parent.parent / "metrics.jsonl" if in_run_dir else None
    kept = rewind_log(source, run.run_dir / "metrics.jsonl", ckpt["metrics_lines"])
    run.metrics = MetricsLog(run.run_dir / "metrics.jsonl", fresh=False)
    pos = run.position
    run.event(
        "resume",
        epoch=pos.epoch,
        step_in_epoch=pos.step_in_epoch,
        lr=run.lr,
        kind=ckpt["kind"],
        metrics_lines_kept=kept,
        **facts,
        discarded=discarded,
        discarded_to=relative(aside, run.run_dir) if aside else None,
        world_size=run.world.size,
        world_size_before=saved_world,
        reason=reason,
        **{"from": relative(path, run.run_dir)},
    )
    log.info(
        "resumed from %s at global_step %d (epoch %d, step %d)",
        path,
        run.state.global_step,
        pos.epoch,
        pos.step_in_epoch,
    )


def _restore_rng(run: Run, ckpt: dict[str, Any]) -> None:
    """Rank r restores the state rank r saved; a rank the checkpoint has none for (resumed
    on more processes) gets a fresh stream of its own."""
    states = [ckpt["rng"], *(ckpt.get("rng_other_ranks") or [])]
    if run.world.rank < len(states):
        restore_rng_state(states[run.world.rank])
    else:
        seed_rank(run.cfg.train.seed, run.world.rank, run.state.global_step)


def _load_training_state(run: Run, ckpt: dict[str, Any]) -> None:
    """Optimizer, AMP scaler and EMA (the state that moves with the weights)."""
    _load_optimizer_state(run.optimizer, ckpt["optimizer"])
    if run.scaler:
        run.scaler.load_state_dict(ckpt["scaler"])
    if run.ema:
        run.ema.load_state_dict(ckpt["ema"])


def _load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load the checkpoint's moments and hyperparameters but keep this optimizer's kernel
    choice: ``load_state_dict`` would also restore the checkpoint's ``fused``/``foreach``
    flags (and place ``step`` by them), so a resume with train.fused_optimizer changed would
    quietly keep the old kernel."""
    groups = [
        {**saved, **{key: live[key] for key in _KERNEL_KEYS}}
        for saved, live in zip(state["param_groups"], optimizer.param_groups, strict=True)
    ]
    optimizer.load_state_dict({**state, "param_groups": groups})


def _discard_newer(run: Run, path: Path) -> tuple[list[str], Path | None]:
    """Move checkpoints of this run newer than the one resumed from, and the scores made
    from them, to ``discarded/after_step_<N>_<time>/`` with a copy of the log: they belong to
    the abandoned continuation and --resume auto must never pick them up, but nothing a user
    may want back is deleted. Returns the names moved and where to (None: nothing moved)."""
    newer = [p for step, p in step_files(run.ckpt_dir) if step > run.state.global_step]
    for name in ("final.pt", "best.pt"):
        other = run.ckpt_dir / name
        if other.is_file() and other != path:
            try:
                if load_checkpoint(other, peek=True)["global_step"] > run.state.global_step:
                    newer.append(other)
            except CheckpointError:
                newer.append(other)
    if not newer:
        return [], None
    newer += [p for p in run.run_dir.glob("eval_*.json") if _scored_step(p) > run.state.global_step]
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    aside = run.run_dir / "discarded" / f"after_step_{run.state.global_step:08d}_{stamp}"
    aside.mkdir(parents=True)
    log_file = run.run_dir / "metrics.jsonl"
    if log_file.is_file():
        write_text_atomic(aside / log_file.name, log_file.read_text())
    for p in newer:
        p.rename(aside / p.name)
    names = [p.name for p in newer]
    log.warning("moved files newer than the resumed checkpoint to %s: %s", aside, names)
    return names, aside


def _scored_step(eval_file: Path) -> int:
    """The global_step of the checkpoint an eval_*.json scored (-1 when unreadable)."""
    try:
        return int(json.loads(eval_file.read_text()).get("checkpoint_global_step", -1))
    except (OSError, ValueError, TypeError, AttributeError):
        return -1


def _already_done(
    run_dir: Path, path: Path, ckpt: dict, cfg: Config, max_steps: int | None, counter: int | None
) -> TrainResult | None:
    """The result to return when resuming would do nothing (and so must change nothing):
    the run is complete (final.pt and eval_test.json written, position at the configured
    end or early-stopped), or the position is already at ``max_steps``."""
    step = ckpt["global_step"]
    es = ckpt.get("early_stopping") or {}
    at_end = step >= cfg.train.epochs * ckpt["train_steps"]
    stopped = (counter if counter is not None else es.get("counter", 0)) >= cfg.train.patience
    written = (run_dir / "checkpoints/final.pt").is_file() and (
        run_dir / "eval_test.json"
    ).is_file()
    if written and (at_end or stopped):
        how = "reached the configured end" if at_end else "stopped early"
        status, note = "already complete", f"the run {how} at global_step {step}; nothing to do"
    elif max_steps is not None and step >= max_steps:
        status, note = "paused", f"global_step {step} is already at --max-steps {max_steps}"
    else:
        return None
    complete = status == "already complete"
    return TrainResult(
        run_dir=run_dir,
        global_step=step,
        epoch=ckpt["epoch"],
        step_in_epoch=ckpt["step_in_epoch"],
        finished=complete,
        stopped_early=complete and not at_end,
        best_score=es.get("best_score"),
        test=json.loads((run_dir / "eval_test.json").read_text()) if complete else None,
        status=status,
        resumed_from=str(path),
        notes=[note],
    )


def _config_changes(saved: dict, current: dict) -> dict[str, list]:
    """Keys whose values differ, as {key: [checkpoint value, current value]}; raises when a
    key outside RESUME_MAY_CHANGE differs. Keys an older checkpoint lacks count as default."""
    a, b, defaults = _flatten(saved), _flatten(current), _flatten(Config().to_dict())
    changes = {}
    for key in sorted(set(a) | set(b)):
        old = a.get(key, defaults.get(key, "<absent>"))
        new = b.get(key, "<absent>")
        if old != new:
            changes[key] = [old, new]
    refused = {
        k: v for k, v in changes.items() if k not in RESUME_MAY_CHANGE and not k.startswith("run.")
    }
    if refused:
        listed = "; ".join(f"{k}: checkpoint {v[0]!r}, now {v[1]!r}" for k, v in refused.items())
        raise CheckpointError(
            f"the config differs from the checkpoint's in keys a resume cannot change: {listed}. "
            "Resume with the checkpoint's values (its config.yaml) or start a new run; a resume "
            f"may change only {sorted(RESUME_MAY_CHANGE)} and run.*"
        )
    return changes


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
