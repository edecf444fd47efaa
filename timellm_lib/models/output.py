"""What a forecasting model returns to the trainer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Forecast:
    """Predictions plus the optional extras the trainer understands.

    ``aux_losses`` are already multiplied by their lambda weights; the trainer adds
    ``warmup_factor * sum(aux_losses.values())`` to the MSE. ``diagnostics`` are scalars
    (accuracies, gate means; detached tensors, so a forward never waits for the device) that
    the trainer reads at once and logs to metrics.jsonl.
    A model may also return a bare tensor: that is a Forecast without extras.
    """

    pred: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    diagnostics: dict[str, torch.Tensor | float] = field(default_factory=dict)


def as_forecast(output: torch.Tensor | Forecast) -> Forecast:
    return output if isinstance(output, Forecast) else Forecast(pred=output)
