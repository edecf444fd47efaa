"""The checkpoint schema, in one place: every field of a step and a best checkpoint with its
type and purpose.

The load-time type check, the section lists (what a resume restores, what may be absent in
older files) and ``timellm inspect``'s descriptions are derived from :data:`FIELDS`. Key names
never change: checkpoints written by earlier versions must keep loading.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypedDict

import torch

FORMAT_VERSION = 1
CHECKPOINT_KINDS = ("step", "best", "final")

# Key names, for every reader outside this module.
FORMAT = "format_version"
KIND = "kind"
GLOBAL_STEP = "global_step"
EPOCH = "epoch"
STEP_IN_EPOCH = "step_in_epoch"
TRAIN_STEPS = "train_steps"
MODEL = "model"
OPTIMIZER = "optimizer"
SCHEDULER = "scheduler"
SCALER = "scaler"
EMA = "ema"
EARLY_STOPPING = "early_stopping"
RNG = "rng"
SAMPLER = "sampler"
WORLD_SIZE = "world_size"
RNG_OTHER_RANKS = "rng_other_ranks"
CONFIG = "config"
BACKBONE = "backbone"
DATA = "data"
METRICS_LINES = "metrics_lines"
LR = "lr"
RESUME_FROM = "resume_from"
CHECKSUM = "checksum"

_COUNT = ((int,), "a whole number >= 0")
_MAYBE_DICT = ((dict, type(None)), "a dict or None")


@dataclass(frozen=True)
class Field:
    """One checkpoint field: its key, accepted types, and what it is for."""

    key: str
    types: tuple[type, ...]
    wanted: str  # what the value must be, for the error that refuses a file
    purpose: str  # one line, shown by `timellm inspect` and notebook 02
    step: bool = True  # in step and final checkpoints
    best: bool = False  # in best.pt
    resume: bool = False  # restored by a resume (resume_digest hashes these, in this order)
    optional: bool = False  # a resume goes on without it (files written before it existed)
    required: bool = False  # every checkpoint has it; a file without it is refused

    @property
    def section(self) -> bool:
        """A structured part (a dict or list), listed with its size by `timellm inspect`."""
        return dict in self.types or list in self.types


# The order is the resume_digest's hashing order for the resume fields (keep it).
FIELDS = (
    Field(FORMAT, (int,), "a whole number",
          "layout version of this dict; a file newer than the code is refused",
          best=True, required=True),
    Field(KIND, (str,), f"one of {list(CHECKPOINT_KINDS)}",
          "step | best | final: what the file was written for", best=True),
    Field(GLOBAL_STEP, *_COUNT,
          "optimizer steps done since the run started, across epochs (never reset)",
          best=True, resume=True, required=True),
    Field(EPOCH, *_COUNT,
          "global_step // train_steps: the epoch the next optimizer step belongs to", best=True),
    Field(STEP_IN_EPOCH, *_COUNT,
          "global_step % train_steps: steps of that epoch already done", best=True),
    Field(TRAIN_STEPS, *_COUNT,
          "optimizer steps per epoch; a resume refuses data that gives another count",
          best=True),
    Field(MODEL, (dict,), "a dict of tensors by name",
          "trainable weights and buffers (a GRA-M memory bank is a buffer); the frozen "
          "backbone is not stored, only its fingerprint", best=True, resume=True, required=True),
    Field(OPTIMIZER, (dict,), "a dict (an optimizer state)",
          "optimizer moments and step counts, so updates continue as if never stopped",
          resume=True),
    Field(SCHEDULER, (dict,), "a dict (a scheduler state)",
          "learning-rate schedule position (its step count and base lr)", resume=True),
    Field(SCALER, *_MAYBE_DICT, "fp16 loss-scale state (None unless train.amp is fp16)",
          resume=True),
    Field(EMA, *_MAYBE_DICT,
          "exponential moving average of the weights (None unless train.ema_decay > 0)",
          resume=True),
    Field(EARLY_STOPPING, *_MAYBE_DICT, "best_score, val_loss_min and counter of EarlyStopping",
          best=True, resume=True, optional=True),
    Field(RNG, (dict,), "a dict of random states",
          "python, numpy and torch random states (of rank 0 in a distributed run), so dropout "
          "draws continue identically", resume=True),
    Field(SAMPLER, (dict,), "a dict",
          "data order: seed, epoch and batches already consumed in that epoch", resume=True),
    Field(WORLD_SIZE, *_COUNT,
          "processes the run trained with (1: one process); a resume with another count goes "
          "on, but is not bit-identical", resume=True, optional=True),
    Field(RNG_OTHER_RANKS, (list,), "a list of random states",
          "the same random states for ranks 1..K-1 of a K-process run (empty in a single "
          "process); each rank restores its own", resume=True, optional=True),
    Field(CONFIG, (dict,), "a dict of config sections",
          "the resolved run configuration, compared with the current one on resume",
          best=True, required=True),
    Field(BACKBONE, *_MAYBE_DICT,
          "name and fingerprint of the frozen language model the weights belong to", best=True),
    Field(DATA, *_MAYBE_DICT,
          "the training split's scaler (mean and std per column) and the model's input and "
          "output channel names, so forecasting a CSV needs no training data", best=True),
    Field(METRICS_LINES, *_COUNT,
          "lines metrics.jsonl had at this save; a resume truncates the log to them"),
    Field(LR, (float, int), "a number",
          "learning rate of the next step, for reading (the scheduler section is what resumes)",
          best=True),
    Field(RESUME_FROM, (str,), "a checkpoint file name",
          "best.pt only: the step checkpoint that `--resume best` continues from",
          step=False, best=True),
    Field(CHECKSUM, (str,), "a sha256 hex string",
          "sha256 over every other field; every full load recomputes it and refuses a file "
          "whose content changed (a flipped bit loads silently otherwise)", best=True),
)  # fmt: skip
BY_KEY = {f.key: f for f in FIELDS}
PURPOSE = {f.key: f.purpose for f in FIELDS}
SECTION_PURPOSE = {f.key: f.purpose for f in FIELDS if f.section}
RESUME_SECTIONS = tuple(f.key for f in FIELDS if f.resume)
OPTIONAL_SECTIONS = tuple(f.key for f in FIELDS if f.optional)
REQUIRED_FIELDS = tuple(f.key for f in FIELDS if f.required)
STEP_FIELDS = tuple(f.key for f in FIELDS if f.step)
BEST_FIELDS = tuple(f.key for f in FIELDS if f.best)
# What loading a model for forecasting reads: weights, the config that builds the model around
# them, the backbone (its fingerprint is checked), the data's scaler and channel names.
INFERENCE_FIELDS = (FORMAT, MODEL, CONFIG, BACKBONE, DATA, CHECKSUM)
# What a resume reads besides RESUME_SECTIONS (each is checked or used to rewind the log).
RESUME_FIELDS = (*RESUME_SECTIONS, FORMAT, CONFIG, BACKBONE, TRAIN_STEPS, METRICS_LINES, CHECKSUM)


class _Checkpoint(TypedDict):
    """The fields every checkpoint kind has: position, weights, EarlyStopping and what
    inference needs."""

    format_version: int
    kind: str
    global_step: int
    epoch: int
    step_in_epoch: int
    train_steps: int
    model: dict[str, torch.Tensor]
    early_stopping: dict[str, Any]
    config: dict[str, Any]
    backbone: dict[str, Any] | None
    data: dict[str, Any] | None
    lr: float


class BestCheckpoint(_Checkpoint):
    """best.pt: the EarlyStopping best weights for inference, no optimizer state."""

    resume_from: str


class StepCheckpoint(_Checkpoint):
    """A step (or final) checkpoint: everything a bit-identical resume needs."""

    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    ema: dict[str, Any] | None
    rng: dict[str, Any]
    sampler: dict[str, int]
    world_size: int
    rng_other_ranks: list[dict[str, Any]]
    metrics_lines: int


def problem_with(key: str, value: Any) -> str | None:
    """Why ``value`` cannot be field ``key`` of a checkpoint, or None when it can."""
    field = BY_KEY[key]
    if isinstance(value, bool) and bool not in field.types:  # bool is an int to isinstance
        ok = False
    elif key == KIND:
        ok = value in CHECKPOINT_KINDS
    elif key == MODEL:
        ok = isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
        )
    else:
        ok = isinstance(value, field.types) and not (isinstance(value, int) and value < 0)
    if ok:
        return None
    shown = repr(value) if not isinstance(value, dict | list) else type(value).__name__
    return f"has field {key!r} = {shown[:60]}, but it must be {field.wanted}"
