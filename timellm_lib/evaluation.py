"""Forecast metrics weighted by window: every window counts once, whatever the batching.

The MSE of a split is ``sum of squared errors / number of predicted values`` over ALL its
windows. A mean of per-batch means would weight the smaller last batch too much and change
with ``eval_batch_size``; summing first (in float64) does not.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor, nn

from timellm_lib.data.sampler import Windows, eval_batches
from timellm_lib.models.output import as_forecast


class ErrorTotals:
    """Running sums of squared and absolute errors over windows."""

    def __init__(self) -> None:
        self.sse = 0.0
        self.sae = 0.0
        self.values = 0
        self.windows = 0

    def add(self, pred: Tensor, y: Tensor) -> None:
        err = pred.detach().double() - y.detach().double()
        self.sse += float(err.square().sum())
        self.sae += float(err.abs().sum())
        self.values += err.numel()
        self.windows += err.shape[0]

    def metrics(self) -> dict[str, float | int]:
        if self.values == 0:
            raise ValueError("no windows were evaluated")
        return {
            "mse": self.sse / self.values,
            "mae": self.sae / self.values,
            "n_windows": self.windows,
        }


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> AbstractContextManager:
    """Mixed precision for a forward pass (``dtype`` None: full precision)."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Windows,
    batch_size: int,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float | int]:
    """Window-weighted ``mse``, ``mae`` and ``n_windows`` of ``model`` on ``dataset``.

    The model is put in eval mode (no dropout) and left there; the caller switches back.
    ``amp_dtype`` is the autocast precision of the forward (the training one), if any.
    """
    model.eval()
    totals = ErrorTotals()
    for x, y in eval_batches(dataset, batch_size):
        x, y = x.to(device), y.to(device)
        with autocast(device, amp_dtype):
            pred = as_forecast(model(x)).pred
        totals.add(pred.float(), y)
    return totals.metrics()
