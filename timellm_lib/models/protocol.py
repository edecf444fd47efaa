"""What the trainer may ask of a model besides ``forward``, declared once.

Every model of :func:`timellm_lib.models.build_model` implements :class:`TrainableModel`;
:class:`TrainingHooks` gives the defaults of a model that needs none of it (a plain
forecaster), so the trainer calls these members instead of probing for them.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from timellm_lib.data.windows import WindowDataset


@runtime_checkable
class TrainableModel(Protocol):
    """The trainer's view of a model."""

    @property
    def needs_window_index(self) -> bool:
        """Training batches pass ``window_index`` (GRA-M masks a window's own memory)."""
        ...

    @property
    def skips_parameters(self) -> bool:
        """A step may leave trainable parameters without a gradient (DDP must look for them)."""
        ...

    @property
    def backbone_fingerprint(self) -> str | None:
        """Fingerprint of the frozen backbone (None without one); checkpoints store it."""
        ...

    def build_memory(self, train: WindowDataset, generator: torch.Generator | None = None) -> int:
        """Fill data-dependent buffers from the training split on a fresh start; the entries
        stored (a resume gets the buffers from the checkpoint)."""
        ...

    def init_trend_thresholds(self, train: WindowDataset) -> tuple[float, ...] | None:
        """Set thresholds learned from the training labels on a fresh start; None if none."""
        ...

    def speed_paths(self) -> dict[str, str]:
        """Each exact speed switch of the config -> its state (``timellm trace``, benchmarks);
        empty for a model without one."""
        ...


class TrainingHooks:
    """The defaults of :class:`TrainableModel`: no memory, no thresholds, no backbone."""

    needs_window_index = False
    skips_parameters = False
    backbone_fingerprint: str | None = None

    def build_memory(self, train: WindowDataset, generator: torch.Generator | None = None) -> int:
        return 0

    def init_trend_thresholds(self, train: WindowDataset) -> tuple[float, ...] | None:
        return None

    def speed_paths(self) -> dict[str, str]:
        return {}
