"""The training loop: train, loop, step, validate, save. Resumable, so that an interrupted and
resumed run is bit-identical to one never interrupted (same machine, thread count, CPU).

Invariants: ``global_step`` counts optimizer steps across epochs and is never reset
(:class:`~timellm_lib.training.state.Position`); every epoch has the same ``train_steps``
(incomplete batches and accumulations are dropped); checkpoints are taken only between
optimizer steps, after everything the step triggers (at an epoch end: step -> validation ->
EarlyStopping -> best.pt -> step checkpoint), with the RNG states of that moment. Under
torchrun every process runs this code; whatever happens once is done by rank 0 while the
others wait for its outcome. Setup is in :mod:`~timellm_lib.training.setup`, resuming in
:mod:`~timellm_lib.training.resume`, the fault policies in :mod:`~timellm_lib.training.faults`,
what rank 0 writes (checkpoint dicts, best.pt, eval_test.json) in
:mod:`~timellm_lib.training.saving`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from timellm_lib.config import Config
from timellm_lib.data.sampler import ResumableLoader, Shard
from timellm_lib.evaluation.metrics import autocast, evaluate, published_metric
from timellm_lib.files import write_text_atomic
from timellm_lib.models.output import as_forecast
from timellm_lib.training.checkpoint import (
    load_checkpoint,
    load_model_weights,
    step_name,
)
from timellm_lib.training.distributed import (
    all_sum,
    any_rank,
    from_main,
    gather_to_main,
    on_main,
    window_mean,
    wrap_model,
)
from timellm_lib.training.faults import on_non_finite
from timellm_lib.training.resume import find_start, restore
from timellm_lib.training.rng import capture_rng_state
from timellm_lib.training.saving import MainWriter
from timellm_lib.training.setup import (
    amp_dtype,
    build_run,
    check_arguments,
    pick_device,
    session,
    start_fresh,
    torch_threads,
)
from timellm_lib.training.state import (
    Run,
    TrainingError,
    TrainResult,
)

log = logging.getLogger(__name__)

__all__ = ["TrainResult", "TrainingError", "train"]


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
    """Train ``cfg`` (or continue it: ``resume`` None|auto|last|best|PATH, the CLI's flags of
    the same names) and return what happened. ``model``/``datasets`` replace the ones the
    config would build; after a finished run ``model`` holds best.pt's weights. ``on_event``
    receives every metrics.jsonl record as it is written (a notebook's live plot)."""
    check_arguments(resume, max_steps, resume_new_lr, resume_reset_scheduler, resume_counter)
    device = pick_device(cfg.train.device)
    amp = amp_dtype(cfg.train.amp, device)  # refused before anything is written
    with session(cfg, run_dir, device) as (cfg, run_dir, world, signals):
        t = cfg.train
        # where to start: decided by rank 0 before anything in the run directory changes
        ckpt_path, changes, done = from_main(
            world, partial(find_start, run_dir, resume, cfg, max_steps, resume_counter)
        )
        if done:
            log.info("%s", done.notes[0])
            return done
        ckpt = load_checkpoint(ckpt_path) if ckpt_path else None
        run, loader = build_run(cfg, run_dir, world, signals, amp, model, datasets, on_event)
        if ckpt is None:
            start_fresh(run)
        else:
            base_lr = t.lr if resume_new_lr else None
            restore(run, ckpt_path, ckpt, changes, base_lr, resume_reset_scheduler, resume_counter)
        on_main(world, partial(write_text_atomic, run_dir / "config.yaml", cfg.to_yaml()))

        end_step = run.total_steps if max_steps is None else min(max_steps, run.total_steps)
        run.forward_model = wrap_model(world, run.model)
        run.progress = progress and world.is_main
        with torch_threads(t.threads):
            _loop(run, loader, end_step, run.progress)
            finished = run.state.global_step >= run.total_steps or run.stopper.should_stop
            test = _finish(run) if finished else None
        if run.metrics:
            run.metrics.close()
        return _result(run, finished, test, ckpt_path)


def _result(
    run: Run, finished: bool, test: dict[str, Any] | None, ckpt_path: Path | None
) -> TrainResult:
    stopped_early = finished and run.state.global_step < run.total_steps
    if finished:
        status = "stopped early" if stopped_early else "finished"
    else:
        status = "interrupted" if run.state.interrupted else "paused"
    return TrainResult(
        run_dir=run.run_dir,
        global_step=run.state.global_step,
        epoch=run.position.epoch,
        step_in_epoch=run.position.step_in_epoch,
        finished=finished,
        stopped_early=stopped_early,
        best_score=run.stopper.best_score,
        test=test,
        status=status,
        resumed_from=str(ckpt_path) if ckpt_path else None,
    )


def _loop(run: Run, loader: ResumableLoader, end_step: int, progress: bool) -> None:
    """Optimizer steps from run.state.global_step until end_step, an EarlyStopping stop or a stop
    signal."""
    t, train_steps, ga = run.cfg.train, run.train_steps, run.cfg.train.grad_accum
    # all of the run's steps (a resumed run starts at its position); the rate is that of
    # training steps alone: validation and saves have their own bars and are left out
    bar = tqdm(
        total=run.total_steps,
        initial=run.state.global_step,
        disable=not progress,
        desc="train (ETA excl. eval)",
        unit="step",
    )
    run.model.train()
    while (
        run.state.global_step < end_step
        and not run.stopper.should_stop
        and not run.state.interrupted
    ):
        start = run.position
        batches = loader.epoch(start.epoch, start=start.step_in_epoch * ga, stop=train_steps * ga)
        for _ in range(start.step_in_epoch, train_steps):
            lr = run.lr
            warmup = (
                min(1.0, run.state.global_step / t.aux_warmup_steps) if t.aux_warmup_steps else 1.0
            )
            stats = _optimizer_step(run, [next(batches) for _ in range(ga)], warmup)
            if stats is None:  # non-finite loss, last checkpoint reloaded: go on from there
                bar.n = run.state.global_step
                break
            run.state.global_step += 1
            run.state.step_lr = lr
            bar.update(1)
            if run.state.global_step % t.log_steps == 0 or "skipped" in stats:
                run.event("train", lr=lr, aux_warmup=warmup, **stats)
                bar.set_postfix(loss=f"{stats['loss']:.4g}")
            _note_stop_signal(run)

            end_of_epoch = run.position.step_in_epoch == 0
            validates = end_of_epoch or (t.eval_steps and run.state.global_step % t.eval_steps == 0)
            if validates:
                _validate(run)  # -> val event, EarlyStopping, best.pt + its companion
            if end_of_epoch and t.test_every_epoch:
                _test_epoch(run)
            # a signal that arrived during the evaluations stops this step too, with a checkpoint
            # (written again if best.pt's companion was) whose log holds the interrupt event
            if validates and _note_stop_signal(run):
                run.state.last_saved_step = -1
            stop = (
                run.stopper.should_stop
                or run.state.global_step >= end_step
                or run.state.interrupted
            )
            if end_of_epoch or stop or (t.save_steps and run.state.global_step % t.save_steps == 0):
                _save_step(run)
            bar.unpause()  # the time of validation and saves is not a training step's
            if stop:
                break
    bar.close()


def _note_stop_signal(run: Run) -> bool:
    """True when a stop signal has just reached any rank: the run is marked interrupted (every
    rank stops after this same step) and an ``interrupt`` event logged, once."""
    if run.state.interrupted or not any_rank(run.world, run.signals.received is not None):
        return False
    run.state.interrupted = True
    run.event("interrupt", signal=run.signals.received)
    return True


def _optimizer_step(run: Run, micro_batches: list, warmup: float) -> dict[str, float] | None:
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
    pass_index = run.model.needs_window_index
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
        for k, value in _host_values(parts).items():
            sums[k] = sums.get(k, 0.0) + value / len(micro_batches)
    # a NaN on one rank reaches every rank: through this mean and the averaged gradients
    sums = window_mean(run.world, sums, windows)
    if not math.isfinite(sums["loss"]):
        return on_non_finite(run, sums["loss"])
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


def _host_values(parts: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Scalars as python floats, the tensors among them read from the device in one copy."""
    tensors = {
        k: v.detach().float().reshape(()) for k, v in parts.items() if isinstance(v, torch.Tensor)
    }
    read = torch.stack(list(tensors.values())).tolist() if tensors else []
    values = dict(zip(tensors, read, strict=True))
    return {k: values[k] if k in values else float(v) for k, v in parts.items()}


def _gradient_sync(run: Run, last: bool) -> AbstractContextManager:
    """DDP averages gradients once per optimizer step, in the last micro-batch's backward."""
    if last or not run.world.distributed:
        return nullcontext()
    return run.forward_model.no_sync()


def _validate(run: Run) -> None:
    """Validation loss over the val windows (all, or the fixed subset of data.val_subset),
    EarlyStopping update, best.pt on improvement. In a distributed run the loss is summed
    over the ranks' shards first, so every rank takes the same EarlyStopping decision."""
    windows = run.datasets.validation_windows(run.cfg.data)
    metrics = _evaluate(run, windows, with_ema=True, split="val")
    run.model.train()
    improved = run.stopper.step(metrics["mse"])
    run.event(
        "val",
        val_loss=metrics["mse"],
        val_mae=metrics["mae"],
        n_windows=metrics["n_windows"],
        **{k: metrics[k] for k in ("n_series_dropped",) if k in metrics},
        improved=improved,
        val_loss_min=run.stopper.val_loss_min,
    )
    if improved:
        _save_best(run)
    if run.stopper.should_stop:
        run.event("early_stop", patience=run.stopper.patience)


def _test_epoch(run: Run) -> None:
    """``train.test_every_epoch``: the test score of the weights the epoch ended with (the
    ones validation scored), which the published code prints after every epoch; the run's
    reported test score stays that of best.pt."""
    metrics = _evaluate(run, run.datasets.test, with_ema=True, split="test")
    run.model.train()
    run.event("epoch_test", test_mse=metrics["mse"], test_mae=metrics["mae"])


def _evaluate(run: Run, dataset: Any, with_ema: bool, split: str) -> dict[str, Any]:
    """Window-weighted metrics, or the published metric where ``data.<split>_metric`` says
    so (on val, in the order this validation draws: see ``PublishedMetric``); ``with_ema``
    uses the EMA weights when train.eval_with_ema. Each rank of a distributed run scores its
    shard; the errors are summed. ``split`` also labels the progress bar over the windows
    (shown where the training bar is)."""
    if with_ema and run.ema and run.cfg.train.eval_with_ema:
        with run.ema.applied(run.model):
            return _evaluate(run, dataset, False, split)
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
        progress=split if run.progress else None,
        published=published_metric(run.cfg, run.datasets.n_out, split, run.state.global_step),
    )


def _save_best(run: Run) -> None:
    """best.pt first, then its companion step checkpoint: a crash in between leaves a best.pt
    newer than every step checkpoint, which the resume discards and the replay rewrites; the
    other order could leave a step checkpoint whose EarlyStopping state points to a best.pt
    that was never written."""
    MainWriter(run).best()
    run.state.best_companion = step_name(run.state.global_step)
    _save_step(run)


def _save_step(run: Run, kind: str = "step") -> None:
    """Write step_<global_step>.pt (once per step) or final.pt, then rotate step files.
    Every rank takes part: its RNG state goes into the file."""
    if kind == "step" and run.state.last_saved_step == run.state.global_step:
        return
    rng_states = gather_to_main(run.world, capture_rng_state())
    if MainWriter(run).checkpoint(kind, rng_states) and kind == "step":
        run.state.last_saved_step = run.state.global_step


def _finish(run: Run) -> dict[str, Any]:
    """final.pt, then the test split with best.pt's weights (the test split never decides
    anything during training). final.pt is resumable, and a run only counts as complete
    once eval_test.json exists too, so a crash between the two is repaired on resume."""
    _save_step(run, kind="final")
    test = run.datasets.test
    best = run.ckpt_dir / "best.pt"
    if best.is_file():
        payload = load_checkpoint(best)
        load_model_weights(run.model, payload["model"])
        used, at_step = "best.pt", payload["global_step"]
        # best.pt holds the EMA weights if used
        metrics = _evaluate(run, test, with_ema=False, split="test")
    else:  # only after resuming from before a discarded best.pt without a new improvement
        log.warning("no best.pt; evaluating the test split with the final weights")
        used, at_step = "final.pt", run.state.global_step
        metrics = _evaluate(run, test, with_ema=True, split="test")
    result = {"split": "test", **metrics, "checkpoint": used, "checkpoint_global_step": at_step}
    MainWriter(run).test_result(result)
    return result
