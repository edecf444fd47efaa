"""Learning-rate schedules as one ``LambdaLR`` stepped once per optimizer step: a multiplier
of the base lr that depends only on the step count, so the resumable state is that count plus
the plain attributes of :class:`Schedule`."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from timellm_lib.config import TrainConfig

ONECYCLE_DIV = 25.0  # initial lr = max lr / 25, as in torch's OneCycleLR
ONECYCLE_FINAL_DIV = 1e4  # final lr = initial lr / 1e4
# whose lr depends on the epoch only (not on the run's length): a finished run continued for
# more epochs ends bit-identical to the longer run (timellm_lib.training.resume)
EPOCH_ONLY_SCHEDULES = {"constant", "step", "type1", "type3", "published_type1", "published_type3"}
PUBLISHED_BETA1 = 0.95  # OneCycleLR's max_momentum, which its constructor writes into beta1


class Schedule:
    """The lr multiplier for the scheduler's step count. Its attributes are plain values, which
    ``LambdaLR.state_dict`` stores, so a checkpoint restores the schedule without pickled code.
    ``origin`` is the global step the schedule started at (0 unless it was reset on resume)."""

    def __init__(self, cfg: TrainConfig, train_steps: int, total_steps: int, origin: int) -> None:
        self.kind = cfg.scheduler
        self.train_steps = train_steps
        self.total_steps = max(total_steps, 1)
        self.origin = origin
        self.step_size = cfg.step_size
        self.gamma = cfg.gamma
        self.pct_start = cfg.pct_start

    def __call__(self, step: int) -> float:
        # epochs count from the epoch the schedule started in; their boundaries stay the data's
        epoch = (self.origin + step) // self.train_steps - self.origin // self.train_steps
        progress = min(step / self.total_steps, 1.0)
        if self.kind == "constant":
            return 1.0
        if self.kind == "step":
            return self.gamma ** (epoch // self.step_size)
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.kind == "onecycle":
            return self._onecycle(step)
        if self.kind == "type1":
            return 0.5**epoch
        if self.kind == "type3":
            return 1.0 if epoch < 3 else 0.9 ** (epoch - 2)
        if self.kind in ("published_type1", "published_type3"):
            # what the published run_main.py really runs: its never-stepped OneCycleLR's
            # constructor sets lr/25 (and beta1 0.95, see build_scheduler), which it then
            # takes as its base lr and decays from epoch 1 on (lr=0.01: 4e-4, 4e-4, 2e-4, ...)
            n = max(epoch, 1)  # epoch 0 and epoch 1 both train at the constructor's lr/25
            rule = 0.5 ** (n - 1) if self.kind == "published_type1" else 0.9 ** max(n - 3, 0)
            return rule / ONECYCLE_DIV
        raise ValueError(f"unknown scheduler {self.kind!r}")  # config validation prevents this

    def _onecycle(self, step: int) -> float:
        """OneCycleLR's lr shape (cosine warm-up, then cosine annealing); momentum not cycled."""
        warmup = max(int(self.pct_start * self.total_steps), 1)
        start, peak = 1.0 / ONECYCLE_DIV, 1.0
        end = start / ONECYCLE_FINAL_DIV
        if step < warmup:
            return _cosine_between(start, peak, step / warmup)
        rest = max(self.total_steps - warmup, 1)
        return _cosine_between(peak, end, min((step - warmup) / rest, 1.0))


def _cosine_between(a: float, b: float, fraction: float) -> float:
    """Cosine interpolation from ``a`` (fraction 0) to ``b`` (fraction 1)."""
    return b + (a - b) * 0.5 * (1.0 + math.cos(math.pi * fraction))


def build_scheduler(
    optimizer: Optimizer, cfg: TrainConfig, train_steps: int, total_steps: int, origin: int = 0
) -> LambdaLR:
    """A LambdaLR whose step 0 is global step ``origin`` (``--resume-reset-scheduler`` starts
    the schedule over there); cosine and onecycle span the ``total_steps - origin`` steps that
    remain. The published schedules also set beta1 as the
    published code's unstepped OneCycleLR does (the optimizer's state_dict keeps it)."""
    if cfg.scheduler.startswith("published_"):
        for group in optimizer.param_groups:
            group["betas"] = (PUBLISHED_BETA1, *group["betas"][1:])
    return LambdaLR(optimizer, Schedule(cfg, train_steps, total_steps - origin, origin))
