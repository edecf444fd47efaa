"""The training loop: resumable, so that an interrupted-and-resumed run is bit-identical to one
that was never interrupted (same machine, same thread count, CPU).

Read :func:`train` top to bottom: decide where to start, build everything, (maybe) restore a
checkpoint, then the loop. Its invariants:

- ``global_step`` counts optimizer steps across epochs and is never reset. With
  ``train_steps`` optimizer steps per epoch, the position is ``epoch = global_step //
  train_steps`` and ``step_in_epoch = global_step % train_steps``.
- ``train_steps = (training samples // batch_size) // grad_accum`` (a sample is a window,
  or one channel of one with ``data.sample_unit = channel``): the last incomplete
  batch is dropped, and so are the micro-batches at the end of an epoch that do not fill a
  whole accumulation (at most ``grad_accum - 1``), so every epoch has the same steps.
- The data order of epoch ``e`` is a permutation seeded from (seed, e) (see
  :mod:`timellm_lib.data.sampler`); resuming mid-epoch starts at micro-batch
  ``step_in_epoch * grad_accum`` without touching the ones before.
- Checkpoints are taken only between optimizer steps, after everything that step triggers:
  at an epoch end the order is train step -> validation -> EarlyStopping -> best.pt ->
  step checkpoint, so resuming neither repeats nor skips a validation. Step checkpoints are
  written every ``save_steps`` steps, at every epoch end, at every improvement (best.pt's
  resumable companion) and when the run stops (``--max-steps``, early stop, the end).
- The RNG states in a checkpoint are those after all of that, so the dropout masks of the
  next step are the uninterrupted run's.

Distributed runs (torchrun, see :mod:`timellm_lib.training.distributed`) execute this same
code in every process: each trains on its shard of the global batch, DDP averages the
gradients, losses and validation totals are summed over the processes, and anything that
happens once (choosing a checkpoint, writing a file) is done by rank 0 while the others wait
for its outcome. Faults (:mod:`timellm_lib.training.faults`): SIGTERM/SIGINT end the run after
the current step with a checkpoint; a failed save stops or continues as ``train.on_save_error``
says; a non-finite loss is handled as ``train.on_nan`` says; ``train.lock`` keeps a second
trainer out of the run directory (:mod:`timellm_lib.training.lock`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from timellm_lib.config import Config, checkpoint_config
from timellm_lib.data.sampler import ResumableLoader, Shard, fixed_subset
from timellm_lib.data.windows import training_samples
from timellm_lib.errors import WorkbenchError
from timellm_lib.evaluation.metrics import autocast, evaluate
from timellm_lib.files import write_text_atomic
from timellm_lib.models.output import as_forecast
from timellm_lib.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model_weights,
    remove_temp_files,
    rotate_step_checkpoints,
    save_checkpoint,
    select_resume_checkpoint,
    step_files,
    step_name,
)
from timellm_lib.training.distributed import (
    World,
    all_sum,
    any_rank,
    distributed_session,
    from_main,
    gather_to_main,
    on_main,
    window_mean,
    wrap_model,
)
from timellm_lib.training.early_stopping import EarlyStopping
from timellm_lib.training.ema import EMA
from timellm_lib.training.faults import StopSignals, describe_write_error, unwritable, write_fix
from timellm_lib.training.lock import RunLock
from timellm_lib.training.metrics_log import MetricsLog, rewind_log
from timellm_lib.training.rng import (
    capture_rng_state,
    restore_rng_state,
    seed_everything,
    seed_rank,
)
from timellm_lib.training.schedulers import build_scheduler
from timellm_lib.training.schema import FORMAT_VERSION

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


class TrainingError(WorkbenchError):
    """Training cannot start or go on (impossible settings, a non-finite loss, a failed
    write)."""


@dataclass
class TrainResult:
    """What :func:`train` did; ``summary()`` says it in one line."""

    run_dir: Path
    global_step: int
    epoch: int
    finished: bool  # reached the configured end or stopped early (final.pt written)
    stopped_early: bool
    best_score: float | None
    test: dict[str, Any] | None = None  # eval_test.json contents when the run finished now
    status: str = ""  # finished | stopped early | paused | interrupted | already complete
    resumed_from: str | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        best = "none yet" if self.best_score is None else f"{-self.best_score:.6g}"
        text = (
            f"run {self.run_dir}: {self.status} at global_step {self.global_step} "
            f"(epoch {self.epoch}); best val loss {best}"
        )
        if self.test:
            text += f"; test mse {self.test['mse']:.6g} mae {self.test['mae']:.6g}"
        if self.status in ("paused", "interrupted"):
            text += "; continue with --resume auto"
        return text


@dataclass
class _Run:
    """The live pieces of one run, passed to the helpers of the loop."""

    cfg: Config
    run_dir: Path
    world: World
    amp_dtype: torch.dtype | None
    datasets: Any
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    ema: EMA | None
    stopper: EarlyStopping
    metrics: MetricsLog | None
    train_steps: int
    total_steps: int
    signals: StopSignals
    # what the training forward calls: DDP's wrapper of model in a distributed run, else model
    forward_model: nn.Module | None = None
    global_step: int = 0
    last_saved_step: int = -1
    best_companion: str | None = None  # step checkpoint best.pt resumes from
    interrupted: bool = False  # a stop signal arrived: end after this step, with a checkpoint
    nan_reloads: int = 0  # train.on_nan = reload: reloads done by this process
    progress: bool = False  # progress bars (training, validation, test) on this process
    step_lr: float | None = None  # the lr the last optimizer step of this process used
    on_event: Callable[[dict[str, Any]], None] | None = None  # e.g. a notebook's live plot

    @property
    def device(self) -> torch.device:
        return self.world.device

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def event(self, name: str, epoch: int | None = None, **fields: Any) -> None:
        """One metrics.jsonl line (rank 0 only: the other ranks have no log); epoch and lr
        default to those of the last optimizer step, so an event written at an epoch end
        (val, best and step saves, early_stop, test) names the epoch that ended and the lr it
        trained with, not the next epoch's."""
        if self.metrics is None:
            return
        if epoch is None:
            epoch = max(self.global_step - 1, 0) // self.train_steps
        known = {
            "global_step": self.global_step,
            "epoch": epoch,
            "lr": self.lr if self.step_lr is None else self.step_lr,
            "best_score": self.stopper.best_score,
            "counter": self.stopper.counter,
        }
        record = self.metrics.write(name, **{**known, **fields})
        if self.on_event is not None:
            self.on_event(record)


def train(
    cfg: Config,
    run_dir: str | Path | None = None,
    resume: str | None = None,
    max_steps: int | None = None,
    resume_new_lr: bool = False,
    resume_reset_scheduler: bool = False,
    resume_counter: int | None = None,
    progress: bool = True,
    model: nn.Module | None = None,
    datasets: Any = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train ``cfg`` (or continue it) and return what happened.

    ``resume``: None starts fresh (refused when the run directory already holds checkpoints);
    ``auto`` the newest valid checkpoint or a fresh start when there is none; ``last`` the
    newest step checkpoint; ``best`` best.pt's companion step checkpoint; or a path.
    ``max_steps`` ends the run once global_step reaches it, after a step checkpoint, exactly
    as an interruption would (no final.pt, no test). ``resume_new_lr`` keeps the optimizer
    moments but makes ``train.lr`` the base lr (the schedule's current factor still applies;
    add ``resume_reset_scheduler`` to start the schedule over from the current step);
    ``resume_counter`` overrides the EarlyStopping counter. ``model``/``datasets`` replace
    the ones the config would build (tests, notebooks); after a finished run ``model`` holds
    best.pt's weights (those the test split was evaluated with), and with train.compile it
    stays compiled (in place). ``on_event`` receives every metrics.jsonl record as it is
    written (a notebook draws its live loss plot from them).

    Under torchrun every process calls this with the same arguments (see the module
    docstring). The run directory is locked while training; SIGTERM/SIGINT end the run after
    the current step with a checkpoint (status ``interrupted``).
    """
    _check_arguments(resume, max_steps, resume_new_lr, resume_reset_scheduler, resume_counter)
    device = _pick_device(cfg.train.device)
    amp_dtype = _amp_dtype(cfg.train.amp, device)
    with _session(cfg, run_dir, device) as (cfg, run_dir, world, signals):
        t = cfg.train

        # -- 1. where to start: decided by rank 0 before anything is written -------------------
        ckpt_path, changes, done = from_main(
            world, partial(_find_start, run_dir, resume, cfg, max_steps, resume_counter)
        )
        if done:
            log.info("%s", done.notes[0])
            return done
        ckpt = load_checkpoint(ckpt_path) if ckpt_path else None

        # -- 2. build everything ---------------------------------------------------------------
        seed_everything(t.seed)
        if datasets is None:
            from timellm_lib.data import build_datasets

            datasets = build_datasets(cfg.data)
        if model is None:
            from timellm_lib.models import build_model

            model = build_model(cfg, datasets.n_in, datasets.n_out)
        model.to(world.device)
        if t.compile:
            model.compile(dynamic=True)  # in place: state_dict keys stay those of the eager model
        _check_split_sizes(cfg, datasets, world)
        data = cfg.data
        samples = training_samples(datasets.train, data.sample_unit)
        loader = ResumableLoader(
            samples, data.batch_size, t.seed, data.num_workers, world.rank, world.size
        )
        train_steps = len(loader) // t.grad_accum
        total_steps = t.epochs * train_steps
        optimizer = _build_optimizer(model, t)
        run = _Run(
            cfg=cfg,
            run_dir=run_dir,
            world=world,
            amp_dtype=amp_dtype,
            datasets=datasets,
            model=model,
            optimizer=optimizer,
            scheduler=build_scheduler(optimizer, t, train_steps, total_steps),
            scaler=torch.amp.GradScaler("cuda") if t.amp == "fp16" else None,
            ema=EMA(model, t.ema_decay) if t.ema_decay > 0 else None,
            stopper=EarlyStopping(t.patience, t.delta),
            metrics=None,
            train_steps=train_steps,
            total_steps=total_steps,
            signals=signals,
            on_event=on_event,
        )

        # -- 3. fresh start or restore ---------------------------------------------------------
        if ckpt is None:
            if hasattr(model, "init_trend_thresholds"):  # TAPR's auto thresholds: from the data
                model.init_trend_thresholds(datasets.train)
            if hasattr(model, "build_memory"):  # e.g. GRA-M: its buffers then live in checkpoints
                model.build_memory(datasets.train, torch.Generator().manual_seed(t.seed))
            if world.rank > 0:
                seed_rank(t.seed, world.rank)  # its own dropout masks
            on_main(world, partial(_open_fresh_log, run))
        else:
            _restore(
                run,
                ckpt_path,
                ckpt,
                changes,
                base_lr=t.lr if resume_new_lr else None,
                reset_scheduler=resume_reset_scheduler,
                counter=resume_counter,
            )
        on_main(world, partial(write_text_atomic, run_dir / "config.yaml", cfg.to_yaml()))

        # -- 4. the loop, then final.pt and the test split -------------------------------------
        end_step = total_steps if max_steps is None else min(max_steps, total_steps)
        run.forward_model = wrap_model(world, model)
        run.progress = progress and world.is_main
        with _torch_threads(t.threads):
            _loop(run, loader, end_step, run.progress)
            finished = run.global_step >= total_steps or run.stopper.should_stop
            test = _finish(run) if finished else None
        if run.metrics:
            run.metrics.close()
        stopped_early = finished and run.global_step < total_steps
        if finished:
            status = "stopped early" if stopped_early else "finished"
        else:
            status = "interrupted" if run.interrupted else "paused"
        return TrainResult(
            run_dir=run_dir,
            global_step=run.global_step,
            epoch=run.global_step // train_steps,
            finished=finished,
            stopped_early=stopped_early,
            best_score=run.stopper.best_score,
            test=test,
            status=status,
            resumed_from=str(ckpt_path) if ckpt_path else None,
        )


@contextmanager
def _session(
    cfg: Config, run_dir: str | Path | None, device: torch.device
) -> Iterator[tuple[Config, Path, World, StopSignals]]:
    """What one :func:`train` call runs inside: the process group, the resolved run directory
    and its lock, the stop-signal handlers. A run directory that cannot be written is refused
    before any work. A failed write other than a checkpoint save (those are handled where
    they happen), taking the lock included, ends the call as a TrainingError that says what
    to do. Folders this call created and left empty (it failed before writing anything) are
    removed again."""
    with ExitStack() as stack:
        world = stack.enter_context(distributed_session(device))
        cfg, run_dir = from_main(world, partial(_resolve_run_dir, cfg, run_dir))
        on_main(world, partial(_check_run_dir, run_dir))
        if world.is_main:
            stack.callback(_remove_empty, _missing_folders(run_dir))
        try:
            lock = on_main(world, RunLock(run_dir).acquire)
            if lock is not None:
                stack.callback(lock.release)
            signals = stack.enter_context(StopSignals())
            yield cfg, run_dir, world, signals
        except OSError as err:
            raise TrainingError(
                f"{describe_write_error(err)}; {write_fix(err)}, then run the command again "
                "(with --resume auto to continue from the newest checkpoint)"
            ) from err


def _check_run_dir(run_dir: Path) -> None:
    err = unwritable(run_dir)
    if err is not None:
        raise TrainingError(
            f"run directory {run_dir} cannot be written: {describe_write_error(err, run_dir)}; "
            f"{write_fix(err)}, or pass another --run-dir"
        )


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    folder = folder.absolute()
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_empty(folders: list[Path]) -> None:
    """Remove those of ``folders`` (deepest first) that are empty: a run that failed before
    writing anything leaves no trace."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (the run wrote something) or already gone
            return


def _find_start(
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
        shown = ", ".join(_relative(p, run_dir) for p in history[:4])
        more = f" and {len(history) - 4} more" if len(history) > 4 else ""
        raise TrainingError(
            f"--run-dir {run_dir} holds the history of another run ({shown}{more}), and "
            f"--resume {path} is not one of its checkpoints: resuming would replace that "
            "history. To continue from that checkpoint, pass a --run-dir that does not exist "
            f"yet (or is empty); to continue the run in {run_dir}, use --resume auto or one of "
            "its own checkpoints"
        )


def _open_fresh_log(run: _Run) -> None:
    run.ckpt_dir.mkdir(parents=True, exist_ok=True)
    run.metrics = MetricsLog(run.run_dir / "metrics.jsonl", fresh=True)


def _loop(run: _Run, loader: ResumableLoader, end_step: int, progress: bool) -> None:
    """Optimizer steps from run.global_step until end_step, an EarlyStopping stop or a stop
    signal."""
    t, train_steps, ga = run.cfg.train, run.train_steps, run.cfg.train.grad_accum
    # all of the run's steps (a resumed run starts at its position); the rate is that of
    # training steps alone: validation and saves have their own bars and are left out
    bar = tqdm(
        total=run.total_steps,
        initial=run.global_step,
        disable=not progress,
        desc="train (ETA excl. eval)",
        unit="step",
    )
    run.model.train()
    while run.global_step < end_step and not run.stopper.should_stop and not run.interrupted:
        epoch, step_in_epoch = divmod(run.global_step, train_steps)
        batches = loader.epoch(epoch, start=step_in_epoch * ga, stop=train_steps * ga)
        for _ in range(step_in_epoch, train_steps):
            lr = run.lr
            warmup = min(1.0, run.global_step / t.aux_warmup_steps) if t.aux_warmup_steps else 1.0
            stats = _optimizer_step(run, [next(batches) for _ in range(ga)], warmup)
            if stats is None:  # non-finite loss, last checkpoint reloaded: go on from there
                bar.n = run.global_step
                break
            run.global_step += 1
            run.step_lr = lr
            bar.update(1)
            if run.global_step % t.log_steps == 0 or "skipped" in stats:
                run.event("train", lr=lr, aux_warmup=warmup, **stats)
                bar.set_postfix(loss=f"{stats['loss']:.4g}")
            if any_rank(run.world, run.signals.received is not None):
                run.interrupted = True  # every rank stops after this same step
                run.event("interrupt", signal=run.signals.received)

            end_of_epoch = run.global_step % train_steps == 0
            if end_of_epoch or (t.eval_steps and run.global_step % t.eval_steps == 0):
                _validate(run)  # -> val event, EarlyStopping, best.pt + its companion
            stop = run.stopper.should_stop or run.global_step >= end_step or run.interrupted
            if end_of_epoch or stop or (t.save_steps and run.global_step % t.save_steps == 0):
                _save_step(run)
            bar.unpause()  # the time of validation and saves is not a training step's
            if stop:
                break
    bar.close()


def checkpoint_payload(
    run: _Run, kind: str, rng_states: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The checkpoint dict: flat, readable, loadable with ``torch.load(weights_only=True)``.

    ``rng_states``: every rank's RNG state in rank order (a distributed run gathers them);
    by default this process's.
    """
    rng_states = rng_states or [capture_rng_state()]
    epoch, step_in_epoch = divmod(run.global_step, run.train_steps)
    return {
        "format_version": FORMAT_VERSION,
        "kind": kind,  # step | final
        "global_step": run.global_step,
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        "train_steps": run.train_steps,
        "model": run.model.state_dict(),  # trainable weights + buffers, no frozen backbone
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler else None,
        "ema": run.ema.state_dict() if run.ema else None,
        "early_stopping": run.stopper.state_dict(),
        "rng": rng_states[0],
        "rng_other_ranks": rng_states[1:],
        "world_size": run.world.size,
        "sampler": {
            "seed": run.cfg.train.seed,
            "epoch": epoch,
            "position": step_in_epoch * run.cfg.train.grad_accum,  # micro-batches consumed
        },
        "config": run.cfg.to_dict(),
        "backbone": _backbone(run.cfg, run.model),
        "data": run.datasets.inference_state(),  # scaler and channels: predict needs no data
        "metrics_lines": run.metrics.lines,
        "lr": run.lr,
    }


def best_payload(run: _Run) -> dict[str, Any]:
    """best.pt: for inference (no optimizer); ``resume_from`` names its resumable companion."""
    weights = run.model.state_dict()
    if run.ema and run.cfg.train.eval_with_ema:
        weights = run.ema.averaged_state_dict(run.model)
    epoch, step_in_epoch = divmod(run.global_step, run.train_steps)
    return {
        "format_version": FORMAT_VERSION,
        "kind": "best",
        "global_step": run.global_step,
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        "train_steps": run.train_steps,
        "model": weights,
        "early_stopping": run.stopper.state_dict(),
        "config": run.cfg.to_dict(),
        "backbone": _backbone(run.cfg, run.model),
        "data": run.datasets.inference_state(),  # scaler and channels: predict needs no data
        "lr": run.lr,
        "resume_from": step_name(run.global_step),
    }


# ---------------------------------------------------------------------------- one step


def _optimizer_step(run: _Run, micro_batches: list, warmup: float) -> dict[str, float] | None:
    """Forward and backward over ``grad_accum`` micro-batches, then one optimizer step.

    Returns the step's mean loss parts for the log (means over every process's windows in a
    distributed run, so all ranks see the same numbers). A non-finite loss is handled as
    ``train.on_nan`` says (:func:`_non_finite`); None means the last checkpoint was reloaded,
    so the position moved back.
    """
    t = run.cfg.train
    sums: dict[str, float] = {}
    windows = 0
    # a retrieval model (GRA-M) gets the samples' positions so it never retrieves itself
    pass_index = getattr(run.model, "needs_window_index", False)
    for i, (x, y, idx) in enumerate(micro_batches):
        x, y = x.to(run.device), y.to(run.device)
        extra = {"window_index": idx.to(run.device)} if pass_index else {}
        with _gradient_sync(run, i == len(micro_batches) - 1):
            with autocast(run.device, run.amp_dtype):
                out = as_forecast(run.forward_model(x, y, **extra))
            mse = F.mse_loss(out.pred.float(), y)
            aux = {f"aux_{k}": v.float() for k, v in out.aux_losses.items()}
            loss = mse + warmup * sum(aux.values())
            backward = loss / len(micro_batches)
            (run.scaler.scale(backward) if run.scaler else backward).backward()
        windows += len(x)
        parts = {"loss": loss, "mse": mse, **aux, **out.diagnostics}
        for k, v in parts.items():
            value = float(v.detach()) if isinstance(v, torch.Tensor) else float(v)
            sums[k] = sums.get(k, 0.0) + value / len(micro_batches)
    # a NaN on one rank reaches every rank: through this mean and the averaged gradients
    sums = window_mean(run.world, sums, windows)
    if not math.isfinite(sums["loss"]):
        return _non_finite(run, sums["loss"])
    if t.grad_clip > 0:
        if run.scaler:
            run.scaler.unscale_(run.optimizer)
        params = [p for p in run.model.parameters() if p.requires_grad]
        sums["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, t.grad_clip))
    if run.scaler:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    if run.ema:
        run.ema.update(run.model)
    return sums


def _gradient_sync(run: _Run, last: bool) -> AbstractContextManager:
    """DDP averages gradients once per optimizer step, in the last micro-batch's backward."""
    if last or not run.world.distributed:
        return nullcontext()
    return run.forward_model.no_sync()


def _non_finite(run: _Run, loss: float) -> dict[str, float] | None:
    """``train.on_nan``: ``stop`` raises (naming the step and the last good checkpoint);
    ``skip`` drops the update (the schedule still advances, staying aligned with
    global_step); ``reload`` goes back to the newest valid step checkpoint, exactly as a
    resume from it with ``--resume-new-lr`` would, the base lr multiplied by
    ``train.on_nan_lr_factor`` once more at every reload (returns None). The log is rewound
    with the rest, so its resume event (``reason``) is the trace of the reload."""
    t = run.cfg.train
    step = run.global_step + 1
    run.optimizer.zero_grad(set_to_none=True)
    if t.on_nan == "skip":
        log.warning("loss %s at step %d: update skipped", loss, step)
        run.scheduler.step()
        return {"loss": loss, "skipped": 1.0}
    what = f"the loss became {loss} at global_step {step}"
    if t.on_nan == "stop" or run.nan_reloads >= t.on_nan_max_reloads:
        if t.on_nan == "reload":
            what += f" again after {run.nan_reloads} reloads (train.on_nan_max_reloads)"
        raise TrainingError(f"{what}; {_what_now(run)}")
    path = from_main(run.world, partial(_newest_step_checkpoint, run))
    if path is None:
        raise TrainingError(
            f"{what} and train.on_nan = reload, but there is no checkpoint to reload yet; use "
            "train.on_nan = skip or stop"
        )
    base_lr = run.scheduler.base_lrs[0] * t.on_nan_lr_factor  # lower again at each reload
    run.nan_reloads += 1
    log.warning("%s: reloading %s with base lr %g", what, path.name, base_lr)
    reason = (
        f"{what} (train.on_nan = reload {run.nan_reloads} of at most "
        f"{t.on_nan_max_reloads}, lr x {t.on_nan_lr_factor})"
    )
    ckpt = load_checkpoint(path)
    _restore(run, path, ckpt, changes={}, base_lr=base_lr, reason=reason)
    return None


def _newest_step_checkpoint(run: _Run) -> Path | None:
    if not step_files(run.ckpt_dir):
        return None
    return select_resume_checkpoint(run.run_dir, "last")[0]


def _what_now(run: _Run) -> str:
    """After a non-finite loss: the last good checkpoint and how to go on."""
    files = step_files(run.ckpt_dir)
    if not files:
        return (
            "no checkpoint was written yet. Lower train.lr or set train.grad_clip, or set "
            "train.on_nan to skip"
        )
    return (
        f"the last good checkpoint is {_relative(files[-1][1], run.run_dir)}. Continue from "
        "it with a lower lr (--resume auto --resume-new-lr --set train.lr=...), or set "
        "train.on_nan to skip or reload"
    )


# ---------------------------------------------------------------------------- validation


def _validate(run: _Run) -> None:
    """Validation loss over the val windows (all, or the fixed subset of data.val_subset),
    EarlyStopping update, best.pt on improvement. In a distributed run the loss is summed
    over the ranks' shards first, so every rank takes the same EarlyStopping decision."""
    d = run.cfg.data
    windows = fixed_subset(run.datasets.val, d.val_subset, d.val_subset_seed)
    metrics = _evaluate(run, windows, with_ema=True, progress="val")
    run.model.train()
    improved = run.stopper.step(metrics["mse"])
    run.event(
        "val",
        val_loss=metrics["mse"],
        val_mae=metrics["mae"],
        n_windows=metrics["n_windows"],
        improved=improved,
        val_loss_min=run.stopper.val_loss_min,
    )
    if improved:
        _save_best(run)
    if run.stopper.should_stop:
        run.event("early_stop", patience=run.stopper.patience)


def _evaluate(run: _Run, dataset: Any, with_ema: bool, progress: str) -> dict[str, Any]:
    """Window-weighted metrics; ``with_ema`` uses the EMA weights when train.eval_with_ema.
    Each rank of a distributed run scores its shard; the error totals are summed.
    ``progress`` labels the bar over the windows (shown where the training bar is)."""
    if with_ema and run.ema and run.cfg.train.eval_with_ema:
        with run.ema.applied(run.model):
            return _evaluate(run, dataset, with_ema=False, progress=progress)
    world = run.world
    if world.distributed:
        dataset = Shard(dataset, world.rank, world.size)
    return evaluate(
        run.model,
        dataset,
        run.cfg.data.eval_batch_size,
        run.device,
        run.amp_dtype,
        all_sum=partial(all_sum, world) if world.distributed else None,
        progress=progress if run.progress else None,
    )


# ---------------------------------------------------------------------------- saving


def _save_best(run: _Run) -> None:
    """best.pt first, then its companion step checkpoint: a crash in between leaves a best.pt
    newer than every step checkpoint, which the resume discards and the replay rewrites; the
    other order could leave a step checkpoint whose EarlyStopping state points to a best.pt
    that was never written."""

    def write() -> None:
        run.event("save", kind="best", path="checkpoints/best.pt")
        _write_checkpoint(run, run.ckpt_dir / "best.pt", best_payload(run))

    on_main(run.world, write)
    run.best_companion = step_name(run.global_step)
    _save_step(run)


def _save_step(run: _Run, kind: str = "step") -> None:
    """Write step_<global_step>.pt (once per step) or final.pt, then rotate step files.

    Every rank takes part: its RNG state goes into the file, and it waits until rank 0 has
    written (and fsynced) it. The save event is logged first so the checkpoint's
    metrics_lines includes it.
    """
    if kind == "step" and run.last_saved_step == run.global_step:
        return
    name = step_name(run.global_step) if kind == "step" else "final.pt"
    rng_states = gather_to_main(run.world, capture_rng_state())

    def write() -> bool:
        # the epoch of the last step and the steps of it done: (e, train_steps) at the end of
        # epoch e, where the file's own position is (e + 1, 0)
        steps_done = (
            run.global_step - max(run.global_step - 1, 0) // run.train_steps * run.train_steps
        )
        run.event("save", kind=kind, path=f"checkpoints/{name}", step_in_epoch=steps_done)
        payload = checkpoint_payload(run, kind, rng_states)
        if not _write_checkpoint(run, run.ckpt_dir / name, payload):
            return False
        if kind == "step":
            protect = {name} | ({run.best_companion} if run.best_companion else set())
            rotate_step_checkpoints(run.ckpt_dir, run.cfg.train.save_total_limit, protect)
        return True

    if from_main(run.world, write) and kind == "step":
        run.last_saved_step = run.global_step


def _write_checkpoint(run: _Run, path: Path, payload: dict[str, Any]) -> bool:
    """Save ``payload``; on a failed write (disk full, no permission) stop with a
    TrainingError or, with ``train.on_save_error = continue``, log it and return False.
    Either way the earlier checkpoints are intact (atomic writes) and none is rotated away."""
    try:
        save_checkpoint(path, payload)
        return True
    except OSError as err:
        files = step_files(run.ckpt_dir)
        intact = f"newest: {files[-1][1].name}" if files else "there are none yet"
        message = (
            f"checkpoint not saved: {describe_write_error(err, path)}; the earlier "
            f"checkpoints are intact ({intact})"
        )
        if run.cfg.train.on_save_error == "stop":
            raise TrainingError(
                f"{message}. {write_fix(err).capitalize()}, then continue with --resume auto "
                "(or set train.on_save_error=continue to train on when a save fails)"
            ) from err
        log.warning("%s; training goes on (train.on_save_error = continue)", message)
        run.event("save_error", path=_relative(path, run.run_dir), error=str(err))
        return False


def _finish(run: _Run) -> dict[str, Any]:
    """final.pt, then the test split with best.pt's weights (the test split never decides
    anything during training). final.pt is resumable, and a run only counts as complete
    once eval_test.json exists too, so a crash between the two is repaired on resume."""
    _save_step(run, kind="final")
    best = run.ckpt_dir / "best.pt"
    if best.is_file():
        payload = load_checkpoint(best)
        load_model_weights(run.model, payload["model"])
        used, at_step = "best.pt", payload["global_step"]
        # best.pt holds the EMA weights if used
        metrics = _evaluate(run, run.datasets.test, with_ema=False, progress="test")
    else:  # only after resuming from before a discarded best.pt without a new improvement
        log.warning("no best.pt; evaluating the test split with the final weights")
        used, at_step = "final.pt", run.global_step
        metrics = _evaluate(run, run.datasets.test, with_ema=True, progress="test")
    result = {"split": "test", **metrics, "checkpoint": used, "checkpoint_global_step": at_step}

    def write() -> None:
        write_text_atomic(run.run_dir / "eval_test.json", _json(result))
        run.event("test", **{k: v for k, v in result.items() if k != "split"})

    on_main(run.world, write)
    return result


# ---------------------------------------------------------------------------- resuming


def _restore(
    run: _Run,
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
    t = run.cfg.train
    if ckpt["train_steps"] != run.train_steps:
        raise CheckpointError(
            f"{path.name} was made with {ckpt['train_steps']} optimizer steps per epoch, this "
            f"run has {run.train_steps}: the training data or batch size changed; resume with "
            "the checkpoint's data and config"
        )
    saved, current = ckpt["backbone"], _backbone(run.cfg, run.model)
    if saved.get("fingerprint") != current.get("fingerprint"):
        raise CheckpointError(
            f"{path.name} belongs to backbone {saved.get('name')!r} (fingerprint "
            f"{saved.get('fingerprint')}), but this model's backbone is {current.get('name')!r} "
            f"(fingerprint {current.get('fingerprint')}); use the backbone it was trained with"
        )
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
    run.global_step = ckpt["global_step"]
    # the lr of the step before the checkpoint (LambdaLR: base lr x factor of that step), for
    # events written before this continuation's first step (a test event after final.pt)
    scheduler = run.scheduler
    last = scheduler.last_epoch - 1
    run.step_lr = scheduler.base_lrs[0] * scheduler.lr_lambdas[0](last) if last >= 0 else None

    lr_before = run.lr
    if reset_scheduler:
        for group in run.optimizer.param_groups:
            group["initial_lr"] = t.lr
        run.scheduler = build_scheduler(
            run.optimizer, t, run.train_steps, run.total_steps, origin=run.global_step
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
    counter_before = run.stopper.counter
    if counter is not None:
        run.stopper.counter = counter
    saved_world = int(ckpt.get("world_size", 1))
    if saved_world != run.world.size:
        log.warning(
            "%s was written by a %d-process run and this one has %d processes: the global "
            "batch order, steps per epoch and schedule stay the same (data.batch_size is the "
            "global batch), but the continuation is not bit-identical to an uninterrupted "
            "%d-process run (sums are taken in another order, ranks draw their own dropout)",
            path.name,
            saved_world,
            run.world.size,
            saved_world,
        )

    def reopen_run_dir() -> None:
        """Rank 0: set aside what the abandoned continuation wrote, rewind the log, log the
        resume."""
        run.ckpt_dir.mkdir(parents=True, exist_ok=True)  # a new run directory has none yet
        discarded, aside = _discard_newer(run, path)
        remove_temp_files(run.ckpt_dir)
        if (run.ckpt_dir / "best.pt").is_file():
            best = load_checkpoint(run.ckpt_dir / "best.pt", peek=True)
            run.best_companion = best["resume_from"]
        if run.metrics:  # a reload within the run: the log file is about to be replaced
            run.metrics.close()
        in_run_dir = path.parent.name == "checkpoints"
        source = path.parent.parent / "metrics.jsonl" if in_run_dir else None
        kept = rewind_log(source, run.run_dir / "metrics.jsonl", ckpt["metrics_lines"])
        run.metrics = MetricsLog(run.run_dir / "metrics.jsonl", fresh=False)
        epoch, step_in_epoch = divmod(run.global_step, run.train_steps)
        run.event(
            "resume",
            epoch=epoch,
            step_in_epoch=step_in_epoch,
            lr=run.lr,
            kind=ckpt["kind"],
            metrics_lines_kept=kept,
            config_changes=changes,
            resume_new_lr=base_lr is not None,
            resume_reset_scheduler=reset_scheduler,
            lr_before=lr_before,
            resume_counter=counter,
            counter_before=counter_before,
            early_stopping_missing=missing_es,
            discarded=discarded,
            discarded_to=_relative(aside, run.run_dir) if aside else None,
            world_size=run.world.size,
            world_size_before=saved_world,
            reason=reason,
            **{"from": _relative(path, run.run_dir)},
        )
        log.info(
            "resumed from %s at global_step %d (epoch %d, step %d)",
            path,
            run.global_step,
            epoch,
            step_in_epoch,
        )

    on_main(run.world, reopen_run_dir)
    _restore_rng(run, ckpt)


def _restore_rng(run: _Run, ckpt: dict[str, Any]) -> None:
    """Rank r restores the state rank r saved; a rank the checkpoint has none for (resumed
    on more processes) gets a fresh stream of its own."""
    states = [ckpt["rng"], *(ckpt.get("rng_other_ranks") or [])]
    if run.world.rank < len(states):
        restore_rng_state(states[run.world.rank])
    else:
        seed_rank(run.cfg.train.seed, run.world.rank, run.global_step)


def _load_training_state(run: _Run, ckpt: dict[str, Any]) -> None:
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


def _discard_newer(run: _Run, path: Path) -> tuple[list[str], Path | None]:
    """Move checkpoints of this run newer than the one resumed from, and the scores made
    from them, to ``discarded/after_step_<N>_<time>/`` with a copy of the log: they belong to
    the abandoned continuation and --resume auto must never pick them up, but nothing a user
    may want back is deleted. Returns the names moved and where to (None: nothing moved)."""
    newer = [p for step, p in step_files(run.ckpt_dir) if step > run.global_step]
    for name in ("final.pt", "best.pt"):
        other = run.ckpt_dir / name
        if other.is_file() and other != path:
            try:
                if load_checkpoint(other, peek=True)["global_step"] > run.global_step:
                    newer.append(other)
            except CheckpointError:
                newer.append(other)
    if not newer:
        return [], None
    newer += [p for p in run.run_dir.glob("eval_*.json") if _scored_step(p) > run.global_step]
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    aside = run.run_dir / "discarded" / f"after_step_{run.global_step:08d}_{stamp}"
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


# ---------------------------------------------------------------------------- building


def _check_arguments(
    resume: str | None,
    max_steps: int | None,
    new_lr: bool,
    reset_scheduler: bool,
    counter: int | None,
) -> None:
    if max_steps is not None and max_steps < 1:
        raise TrainingError(f"--max-steps {max_steps} must be at least 1")
    if counter is not None and counter < 0:
        raise TrainingError(f"--resume-counter {counter} must not be negative")
    if resume is None and (new_lr or reset_scheduler or counter is not None):
        raise TrainingError(
            "--resume-new-lr, --resume-reset-scheduler and --resume-counter only apply when "
            "resuming; add --resume auto|last|best|PATH"
        )


def _check_split_sizes(cfg: Config, datasets: Any, world: World) -> None:
    """Enough windows for one optimizer step, and for every process to have its share."""
    batch, accum, k = cfg.data.batch_size, cfg.train.grad_accum, world.size
    samples = len(training_samples(datasets.train, cfg.data.sample_unit))
    unit = "series" if cfg.data.sample_unit == "channel" else "windows"
    if batch % k:
        raise TrainingError(
            f"data.batch_size {batch} cannot be split evenly across {k} processes: it is the "
            f"global batch, shared by all of them; use a multiple of {k}"
        )
    if samples // batch // accum == 0:
        raise TrainingError(
            f"the training split has {samples} {unit}, fewer than one optimizer "
            f"step needs (batch_size {batch} x grad_accum {accum}); lower data.batch_size or "
            "train.grad_accum, or use more data"
        )
    for split in ("val", "test"):
        if len(getattr(datasets, split)) < k:
            raise TrainingError(
                f"the {split} split has {len(getattr(datasets, split))} windows, fewer than "
                f"the {k} processes that share its evaluation; use more data or fewer processes"
            )


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device = cuda but no CUDA GPU is available; use auto or cpu")
    return torch.device(name)


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "fp16" and device.type != "cuda":
        raise TrainingError(
            "train.amp = fp16 needs a CUDA GPU (its loss scaling is CUDA-only); on CPU use "
            "train.amp = bf16"
        )
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def _build_optimizer(model: nn.Module, t: Any) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the model has no trainable parameters")
    cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    # torch's fused Adam/AdamW kernels cover floating-point tensors on CPU and CUDA (the
    # devices this trainer runs on): one kernel per update instead of several per tensor.
    # None leaves the choice to torch (its foreach kernel on CUDA).
    fused = t.fused_optimizer and all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params
    )
    return cls(params, lr=t.lr, weight_decay=t.weight_decay, fused=fused or None)


@contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """Use ``threads`` torch threads (0: leave as is) and restore the previous count after."""
    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _backbone(cfg: Config, model: nn.Module) -> dict[str, str | None]:
    fingerprint = getattr(model, "backbone_fingerprint", None)
    return {"name": cfg.model.backbone if fingerprint else None, "fingerprint": fingerprint}


def _resolve_run_dir(cfg: Config, run_dir: str | Path | None) -> tuple[Config, Path]:
    """The run directory; a missing run.run_id becomes a timestamp (recorded in the config)."""
    if run_dir is not None:
        return cfg, Path(run_dir)
    if not cfg.run.run_id:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, run_id=stamp))
    return cfg, Path(cfg.run.output_dir) / cfg.run.experiment / cfg.run.run_id


def _relative(path: Path, run_dir: Path) -> str:
    """``path`` relative to the run directory when inside it (checkpoints/step_...pt)."""
    try:
        return str(path.resolve().relative_to(run_dir.resolve()))
    except ValueError:
        return str(path)


def _json(value: Any) -> str:
    return json.dumps(value, indent=2) + "\n"
