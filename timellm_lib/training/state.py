"""What a run holds while it trains (:class:`Run`), where it is (:class:`Position`) and what
:func:`~timellm_lib.training.trainer.train` returns; shared by the loop, setup and resume."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from timellm_lib.config import Config
from timellm_lib.errors import WorkbenchError

if TYPE_CHECKING:  # types only: faults imports resume, which imports this module
    from timellm_lib.training.distributed import World
    from timellm_lib.training.early_stopping import EarlyStopping
    from timellm_lib.training.ema import EMA
    from timellm_lib.training.faults import StopSignals
    from timellm_lib.training.metrics_log import MetricsLog


class TrainingError(WorkbenchError):
    """Training cannot start or go on (impossible settings, a non-finite loss, a failed
    write)."""


@dataclass(frozen=True)
class Position:
    """A point of the run: optimizer steps done, and the epoch and step inside it they make."""

    global_step: int
    epoch: int
    step_in_epoch: int

    @classmethod
    def at(cls, global_step: int, train_steps: int) -> Position:
        """The one place the position is computed (train_steps is fixed for a run)."""
        epoch, step_in_epoch = divmod(global_step, train_steps)
        return cls(global_step, epoch, step_in_epoch)


@dataclass
class TrainResult:
    """What :func:`train` did; ``summary()`` says it in one line."""

    run_dir: Path
    global_step: int
    epoch: int  # the position, as in checkpoints: epoch `epoch` (0-based), step `step_in_epoch`
    step_in_epoch: int
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
            f"({self.position_words()}); best val loss {best}"
        )
        if self.test:
            text += f"; test mse {self.test['mse']:.6g} mae {self.test['mae']:.6g}"
        if self.status in ("paused", "interrupted"):
            text += "; continue with --resume auto"
        return text

    def position_words(self) -> str:
        """ "after 5 epochs" at an epoch boundary (not "epoch 5", which has not run)."""
        if self.step_in_epoch == 0:
            return f"after {self.epoch} epoch{'s' * (self.epoch != 1)}"
        return f"epoch {self.epoch}, step {self.step_in_epoch}"


@dataclass
class RunState:
    """What changes while the run trains (the rest of :class:`Run` is built once)."""

    global_step: int = 0
    last_saved_step: int = -1
    best_companion: str | None = None  # step checkpoint best.pt resumes from
    interrupted: bool = False  # a stop signal arrived: end after this step, with a checkpoint
    nan_reloads: int = 0  # train.on_nan = reload: reloads done by this process
    step_lr: float | None = None  # the lr the last optimizer step of this process used


@dataclass
class Run:
    """The pieces of one run, built once by setup, and its :class:`RunState`."""

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
    state: RunState = field(default_factory=RunState)
    # what the training forward calls: DDP's wrapper of model in a distributed run, else model
    forward_model: nn.Module | None = None
    progress: bool = False  # progress bars (training, validation, test) on this process
    on_event: Callable[[dict[str, Any]], None] | None = None  # e.g. a notebook's live plot

    @property
    def device(self) -> torch.device:
        return self.world.device

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def position(self) -> Position:
        """Where the next optimizer step is."""
        return Position.at(self.state.global_step, self.train_steps)

    @property
    def last_step(self) -> Position:
        """Where the last optimizer step done is: its epoch and that epoch's steps done, so an
        epoch end reads (e, train_steps) where :attr:`position` reads (e + 1, 0)."""
        epoch = Position.at(max(self.state.global_step - 1, 0), self.train_steps).epoch
        return Position(
            self.state.global_step, epoch, self.state.global_step - epoch * self.train_steps
        )

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
            epoch = self.last_step.epoch
        known = {
            "global_step": self.state.global_step,
            "epoch": epoch,
            "lr": self.lr if self.state.step_lr is None else self.state.step_lr,
            "best_score": self.stopper.best_score,
            "counter": self.stopper.counter,
        }
        record = self.metrics.write(name, **{**known, **fields})
        if self.on_event is not None:
            self.on_event(record)


def backbone_record(cfg: Config, model: nn.Module) -> dict[str, str | None]:
    """The frozen backbone a checkpoint belongs to (name and fingerprint; None without one)."""
    fingerprint = model.backbone_fingerprint
    return {"name": cfg.model.backbone if fingerprint else None, "fingerprint": fingerprint}


def relative(path: Path, run_dir: Path) -> str:
    """``path`` relative to the run directory when inside it (checkpoints/step_...pt)."""
    try:
        return str(path.resolve().relative_to(run_dir.resolve()))
    except ValueError:
        return str(path)
