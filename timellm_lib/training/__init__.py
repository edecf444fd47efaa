"""Training: the resumable loop, checkpoints, EarlyStopping, schedules, RNG state, EMA,
distributed runs (torchrun/DDP), faults (stop signals, failed saves) and the run lock.

``train(cfg)`` runs (or continues) a run and returns a :class:`TrainResult`; checkpoint files
are read with :mod:`timellm_lib.training.checkpoint`, their fields defined in
:mod:`timellm_lib.training.schema`.
"""

from timellm_lib.training.checkpoint import CheckpointError
from timellm_lib.training.trainer import TrainingError, TrainResult, train

__all__ = ["CheckpointError", "TrainResult", "TrainingError", "train"]
