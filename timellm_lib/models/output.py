"""What a forecasting model returns to the trainer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Forecast:
    """Predictions plus the optional extras the trainer understands.

    ``aux_losses`` are already multiplied by their lambda weights; the trainer adds
    ``warmup_factor * sum(aux_losses.values())`` to the MSE. ``diagnostics`` are plain floats
    (accuracies, gate means) that the trainer logs to metrics.jsonl as they are.
    A model may also return a bare tensor: that is a Forecast without extras.
    """

    pred: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    diagnostics: dict[str, float] = field(default_factory=dict)


def as_forecast(output: torch.Tensor | Forecast) -> Forecast:
    return output if isinstance(output, Forecast) else Forecast(pred=output)
