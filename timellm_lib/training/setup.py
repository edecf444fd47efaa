"""Setting a run up: arguments, device, run directory and its lock, and building the model,
data, optimizer and schedule into a :class:`~timellm_lib.training.state.Run`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from timellm_lib.config import Config
from timellm_lib.data import build_datasets
from timellm_lib.data.sampler import ResumableLoader
from timellm_lib.data.windows import training_samples
from timellm_lib.evaluation.metrics import published_metric
from timellm_lib.models import TrainableModel, build_model
from timellm_lib.training.distributed import World, distributed_session, from_main, on_main
from timellm_lib.training.early_stopping import EarlyStopping
from timellm_lib.training.ema import EMA
from timellm_lib.training.faults import StopSignals, describe_write_error, unwritable, write_fix
from timellm_lib.training.lock import RunLock
from timellm_lib.training.metrics_log import MetricsLog
from timellm_lib.training.rng import seed_everything, seed_rank
from timellm_lib.training.schedulers import build_scheduler
from timellm_lib.training.state import Run, TrainingError


def build_run(
    cfg: Config,
    run_dir: Path,
    world: World,
    signals: StopSignals,
    amp: torch.dtype | None,
    model: nn.Module | None,
    datasets: Any,
    on_event: Callable[[dict[str, Any]], None] | None,
) -> tuple[Run, ResumableLoader]:
    """Data, model, loader, optimizer, schedule and the rest of a run's live state, seeded
    from train.seed (``model``/``datasets`` replace the ones the config would build)."""
    t, data = cfg.train, cfg.data
    seed_everything(t.seed)
    if datasets is None:
        datasets = build_datasets(data)
    if model is None:
        model = build_model(cfg, datasets.n_in, datasets.n_out)
    elif not isinstance(model, TrainableModel):
        raise TrainingError(
            f"the model passed to train ({type(model).__name__}) lacks what the trainer asks of "
            "a model (timellm_lib.models.TrainableModel); subclass "
            "timellm_lib.models.TrainingHooks for its defaults"
        )
    model.to(world.device)
    if t.compile:
        model.compile(dynamic=True)  # in place: state_dict keys stay those of the eager model
    _check_split_sizes(cfg, datasets, world)
    samples = training_samples(datasets.train, data.sample_unit)
    loader = ResumableLoader(
        samples, data.batch_size, t.seed, data.num_workers, world.rank, world.size
    )
    train_steps = len(loader) // t.grad_accum
    total_steps = t.epochs * train_steps
    optimizer = _build_optimizer(model, t)
    run = Run(
        cfg=cfg,
        run_dir=run_dir,
        world=world,
        amp_dtype=amp,
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
    return run, loader


def start_fresh(run: Run) -> None:
    """A run from scratch: the model's data-dependent state, each rank's own dropout stream,
    a new log."""
    model, t = run.model, run.cfg.train
    model.init_trend_thresholds(run.datasets.train)  # TAPR's auto thresholds: from the data
    model.build_memory(run.datasets.train, torch.Generator().manual_seed(t.seed))  # GRA-M
    if run.world.rank > 0:
        seed_rank(t.seed, run.world.rank)  # its own dropout masks
    on_main(run.world, partial(_open_fresh_log, run))


def _open_fresh_log(run: Run) -> None:
    run.ckpt_dir.mkdir(parents=True, exist_ok=True)
    run.metrics = MetricsLog(run.run_dir / "metrics.jsonl", fresh=True)


@contextmanager
def session(
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


def check_arguments(
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
    scored = {"val": len(datasets.validation_windows(cfg.data)), "test": len(datasets.test)}
    for split, windows in scored.items():
        published = published_metric(cfg, datasets.n_out, split, global_step=0)
        series = windows * datasets.n_out
        if published and series < published.series_per_batch:  # now, not when it is scored
            raise TrainingError(published.drops_every_series(series))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device = cuda but no CUDA GPU is available; use auto or cpu")
    return torch.device(name)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
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
def torch_threads(threads: int) -> Iterator[None]:
    """Use ``threads`` torch threads (0: leave as is) and restore the previous count after."""
    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _resolve_run_dir(cfg: Config, run_dir: str | Path | None) -> tuple[Config, Path]:
    """The run directory; a missing run.run_id becomes a timestamp (recorded in the config)."""
    if run_dir is not None:
        return cfg, Path(run_dir)
    if not cfg.run.run_id:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, run_id=stamp))
    return cfg, Path(cfg.run.output_dir) / cfg.run.experiment / cfg.run.run_id
