"""Small baselines: DLinear and a per-channel MLP. Both return plain tensors [B, pred_len, n_out].

They share Time-LLM's interface (``Model(hp, n_in, n_out)``, ``forward(x, y=None)``) so the
trainer, evaluation and notebooks treat them alike, and they train in seconds on a CPU: the
MLP (with dropout) is what the resume tests train.

Channels are handled independently with weights shared across channels. With fewer outputs
than inputs (features MS) the forecast is for the last input channel, the target.
"""

from __future__ import annotations

from torch import Tensor, nn

from timellm_lib.models.layers import moving_average
from timellm_lib.models.params import LinearParams
from timellm_lib.models.protocol import TrainingHooks

MOVING_AVG_KERNEL = 25
MLP_HIDDEN = 64


def _check_channels(n_in: int, n_out: int) -> None:
    if not 1 <= n_out <= n_in:
        raise ValueError(f"n_out = {n_out} must be between 1 and n_in = {n_in}")


class DLinear(TrainingHooks, nn.Module):
    """DLinear (Zeng et al., 2023): split the history into trend (moving average) and
    seasonal (the rest), map each from seq_len to pred_len with one linear layer, and add."""

    def __init__(self, hp: LinearParams, n_in: int, n_out: int) -> None:
        super().__init__()
        _check_channels(n_in, n_out)
        self.n_out = n_out
        self.seasonal = nn.Linear(hp.seq_len, hp.pred_len)
        self.trend = nn.Linear(hp.seq_len, hp.pred_len)

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        x = x[..., -self.n_out :]  # MS: only the target channel is forecast
        trend = moving_average(x.transpose(1, 2), MOVING_AVG_KERNEL).transpose(1, 2)
        seasonal = x - trend
        out = self.seasonal(seasonal.transpose(1, 2)) + self.trend(trend.transpose(1, 2))
        return out.transpose(1, 2)  # [B, pred_len, n_out]


class MLP(TrainingHooks, nn.Module):
    """Per-channel MLP seq_len -> 64 -> pred_len with dropout, on windows centred by their mean
    (added back afterwards), since a window's level says little about its shape."""

    def __init__(self, hp: LinearParams, n_in: int, n_out: int) -> None:
        super().__init__()
        _check_channels(n_in, n_out)
        self.n_out = n_out
        self.net = nn.Sequential(
            nn.Linear(hp.seq_len, MLP_HIDDEN),
            nn.GELU(),
            nn.Dropout(hp.dropout),
            nn.Linear(MLP_HIDDEN, hp.pred_len),
        )

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        x = x[..., -self.n_out :]
        level = x.mean(dim=1, keepdim=True)
        out = self.net((x - level).transpose(1, 2)).transpose(1, 2)
        return out + level  # [B, pred_len, n_out]
