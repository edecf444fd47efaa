"""Forecast metrics weighted by window: every window counts once, whatever the batching.

The MSE of a split is ``sum of squared errors / number of predicted values`` over ALL its
windows. A mean of per-batch means would weight the smaller last batch too much and change
with ``eval_batch_size``; summing first (in float64) does not. The sums are kept per
(horizon step, channel) cell, so the overall, per-step and per-channel scores all come from
one pass and always agree with each other.

Two spaces are reported. The *scaled* space (each column standardised with the training
split's statistics) is the one the published protocol reports and the trainer validates in;
the *original* space (inverse-transformed) is in the data's own units. Per channel the two
differ exactly by the scaler: ``mse_original = mse * std**2`` and ``mae_original = mae * std``.

This module scores a model on a dataset; :mod:`timellm_lib.evaluation.inference` loads checkpoints,
writes ``eval_<split>.json`` and predictions, and holds the ``timellm eval``/``predict``
commands.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from timellm_lib.config import Config
from timellm_lib.data.sampler import Shard, Windows, eval_batches
from timellm_lib.errors import WorkbenchError
from timellm_lib.models.output import as_forecast


class ErrorTotals:
    """Running float64 sums of squared and absolute errors per (horizon step, channel)."""

    def __init__(self) -> None:
        self.sse: np.ndarray | None = None  # [H, C]
        self.sae: np.ndarray | None = None  # [H, C]
        self.windows = 0

    def add(self, pred: Tensor, y: Tensor) -> None:
        """Add a batch of forecasts and targets, both [B, H, C]."""
        err = pred.detach().double() - y.detach().double()
        sse = err.square().sum(0).cpu().numpy()
        sae = err.abs().sum(0).cpu().numpy()
        if self.sse is None:
            self.sse, self.sae = sse, sae
        else:
            self.sse += sse
            self.sae += sae
        self.windows += err.shape[0]

    def combine(self, all_sum: Callable[[np.ndarray], np.ndarray]) -> None:
        """Make these the totals over all processes of a distributed run, each of which
        scored a shard of the windows; ``all_sum`` sums an array element-wise over them."""
        sse, sae = self._checked()
        flat = all_sum(np.concatenate([sse.ravel(), sae.ravel(), [float(self.windows)]]))
        self.sse = flat[: sse.size].reshape(sse.shape)
        self.sae = flat[sse.size : 2 * sse.size].reshape(sae.shape)
        self.windows = int(flat[-1])

    def _checked(self) -> tuple[np.ndarray, np.ndarray]:
        if self.sse is None or self.windows == 0:
            raise ValueError("no windows were evaluated")
        return self.sse, self.sae

    def metrics(self) -> dict[str, float | int]:
        """Overall ``mse``, ``mae`` and ``n_windows``."""
        sse, sae = self._checked()
        values = self.windows * sse.size
        return {
            "mse": float(sse.sum()) / values,
            "mae": float(sae.sum()) / values,
            "n_windows": self.windows,
        }

    def per_horizon(self) -> tuple[np.ndarray, np.ndarray]:
        """MSE and MAE of each horizon step [H] (over windows and channels)."""
        sse, sae = self._checked()
        values = self.windows * sse.shape[1]
        return sse.sum(1) / values, sae.sum(1) / values

    def per_channel(self) -> tuple[np.ndarray, np.ndarray]:
        """MSE and MAE of each channel [C] (over windows and horizon steps)."""
        sse, sae = self._checked()
        values = self.windows * sse.shape[0]
        return sse.sum(0) / values, sae.sum(0) / values


@dataclass(frozen=True)
class PublishedMetric:
    """How the published loaders score ``split`` (``data.<split>_metric = published``): the
    series (a channel of a window) in batches of ``series_per_batch``, the last incomplete
    batch dropped. Test keeps the channel-major order (every window of channel 0, then of
    channel 1, ...); the validation loader shuffles, a new order at every validation drawn from
    ``shuffle_seed`` = (train.seed, global_step), so that a resumed run, and ``timellm eval
    --split val`` of the checkpoint saved at that step, draw the same one."""

    split: str
    series_per_batch: int
    shuffle_seed: tuple[int, int] | None = None

    def order(self, series: int) -> np.ndarray | None:
        """The positions of the ``series`` series in scoring order (None: as they are)."""
        if self.shuffle_seed is None:
            return None
        return np.random.default_rng(list(self.shuffle_seed)).permutation(series)

    def drops_every_series(self, series: int) -> str:
        """Why a split of ``series`` series cannot be scored, and the fix."""
        return (
            f"data.{self.split}_metric = published drops every {self.split} series: {series} "
            f"series are fewer than one batch of {self.series_per_batch}; lower "
            f"data.batch_size or use data.{self.split}_metric=every_window"
        )


def published_metric(
    cfg: Config, n_out: int, split: str, global_step: int
) -> PublishedMetric | None:
    """The published metric of ``split`` (val or test) for a model of ``n_out`` output channels
    at ``global_step``, None when ``data.<split>_metric`` is ``every_window``. A batch holds
    the series of one training batch: ``data.batch_size`` with ``sample_unit = channel`` (the
    published 8 x 24 = 192), else ``batch_size`` windows of ``n_out`` channels."""
    data = cfg.data
    if getattr(data, f"{split}_metric") != "published":
        return None
    per_batch = data.batch_size * (1 if data.sample_unit == "channel" else n_out)
    shuffle_seed = (cfg.train.seed, global_step) if split == "val" else None
    return PublishedMetric(split, per_batch, shuffle_seed)


class SeriesErrors:
    """Squared and absolute errors summed over the horizon per (window, output channel), in
    window order: a published metric (:class:`PublishedMetric`) drops series, so it needs
    each series' errors, not only their totals."""

    def __init__(self) -> None:
        self.sse: list[np.ndarray] = []  # [B, C] per batch
        self.sae: list[np.ndarray] = []
        self.horizon = 0

    def add(self, pred: Tensor, y: Tensor) -> None:
        """Add a batch of forecasts and targets, both [B, H, C]."""
        err = pred.detach().double() - y.detach().double()
        self.sse.append(err.square().sum(1).cpu().numpy())
        self.sae.append(err.abs().sum(1).cpu().numpy())
        self.horizon = err.shape[1]

    def combine(self, all_sum: Callable[[np.ndarray], np.ndarray], start: int, total: int) -> None:
        """Make these the errors of all ``total`` windows of a distributed run, this process
        having scored the contiguous block from window ``start`` (see :class:`Shard`)."""
        sse, sae = np.concatenate(self.sse), np.concatenate(self.sae)
        full = np.zeros((2, total, sse.shape[1]))
        full[0, start : start + len(sse)], full[1, start : start + len(sae)] = sse, sae
        full = all_sum(full.ravel()).reshape(full.shape)
        self.sse, self.sae = [full[0]], [full[1]]

    def published(self, metric: PublishedMetric) -> dict[str, float | int]:
        """The score ``metric`` gives: the series in its order, batches of its size, the last
        incomplete batch dropped, the mean of the batch means (all batches equal in size: the
        mean over the kept series)."""
        sse, sae = np.concatenate(self.sse).T.ravel(), np.concatenate(self.sae).T.ravel()
        order = metric.order(len(sse))
        if order is not None:
            sse, sae = sse[order], sae[order]
        kept = len(sse) // metric.series_per_batch * metric.series_per_batch
        if kept == 0:
            raise WorkbenchError(metric.drops_every_series(len(sse)))
        values = kept * self.horizon
        return {
            "mse": float(sse[:kept].sum()) / values,
            "mae": float(sae[:kept].sum()) / values,
            "n_windows": int(sum(len(a) for a in self.sae)),
            "n_series": int(len(sse)),
            "n_series_dropped": int(len(sse) - kept),
            f"{metric.split}_metric": "published",
        }


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> AbstractContextManager:
    """Mixed precision for a forward pass (``dtype`` None: full precision)."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


@torch.no_grad()
def predict(
    model: nn.Module,
    x: Tensor,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
) -> Tensor:
    """The forecast [B, H, C] (float32, on ``device``) of inputs ``x`` [B, L, C_in].

    A forward pass only: eval mode (no dropout), no gradients. The model is left in eval
    mode; a caller that trains on switches back.
    """
    model.eval()
    with autocast(device, amp_dtype):
        return as_forecast(model(x.to(device))).pred.float()


def forecasts(
    model: nn.Module,
    dataset: Windows,
    batch_size: int,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    progress: str | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """(forecast, target) batches over every window of ``dataset`` in order, on ``device``
    (see :func:`predict`); the last batch may be smaller, none is dropped. ``progress``
    names a progress bar counting windows (rate and ETA included); None shows none."""
    with tqdm(
        total=len(dataset), desc=progress, unit="win", leave=False, disable=progress is None
    ) as bar:
        for x, y in eval_batches(dataset, batch_size):
            yield predict(model, x, device, amp_dtype), y.to(device)
            bar.update(len(x))


def evaluate(
    model: nn.Module,
    dataset: Windows,
    batch_size: int,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    all_sum: Callable[[np.ndarray], np.ndarray] | None = None,
    progress: str | None = None,
    published: PublishedMetric | None = None,
) -> dict[str, float | int]:
    """Window-weighted ``mse``, ``mae`` and ``n_windows`` of ``model`` on ``dataset``
    (scaled space; what the trainer validates with).

    ``published``: that metric instead (see :class:`PublishedMetric`), with ``n_series`` and
    ``n_series_dropped``.

    ``amp_dtype`` is the autocast precision of the forward (the training one), if any.
    ``all_sum`` (distributed runs): ``dataset`` is this process's shard, and the totals are
    summed over all processes before the metrics are taken (see :meth:`ErrorTotals.combine`).
    ``progress``: the label of a progress bar over the windows (None: no bar).
    """
    if published:
        series = SeriesErrors()
        for pred, y in forecasts(model, dataset, batch_size, device, amp_dtype, progress):
            series.add(pred, y)
        if all_sum is not None:
            whole = dataset.dataset if isinstance(dataset, Shard) else dataset
            start = dataset.start if isinstance(dataset, Shard) else 0
            series.combine(all_sum, start, len(whole))
        return series.published(published)
    totals = ErrorTotals()
    for pred, y in forecasts(model, dataset, batch_size, device, amp_dtype, progress):
        totals.add(pred, y)
    if all_sum is not None:
        totals.combine(all_sum)
    return totals.metrics()


def evaluate_report(
    model: nn.Module,
    dataset: Windows,
    scaler: Any,
    channels: list[str],
    batch_size: int,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    published: PublishedMetric | None = None,
) -> dict[str, Any]:
    """Scores in the scaled and the original space, overall, per horizon step and per channel.

    ``scaler`` (a :class:`~timellm_lib.data.Scaler`) undoes the scaling of the output
    ``channels``. Returns ``mse``, ``mae`` (scaled, the protocol's numbers), ``mse_original``,
    ``mae_original``, ``n_windows``, ``per_horizon`` (a list of ``{step, mse, mae,
    mse_original, mae_original}``, step 1 first) and ``per_channel`` (``{name: {mse, mae,
    mse_original, mae_original}}``).

    ``published`` (:class:`PublishedMetric`): the overall scores of both spaces are that
    metric's, with ``n_series``, ``n_series_dropped`` and ``<split>_metric``; per step and per
    channel stay over every window.
    """
    scaled, original = ErrorTotals(), ErrorTotals()
    series, series_original = SeriesErrors(), SeriesErrors()
    for pred, y in forecasts(model, dataset, batch_size, device, amp_dtype):
        pred_original = scaler.inverse_transform(pred.double(), channels)
        y_original = scaler.inverse_transform(y.double(), channels)
        scaled.add(pred, y)
        original.add(pred_original, y_original)
        if published:
            series.add(pred, y)
            series_original.add(pred_original, y_original)
    overall, overall_original = scaled.metrics(), original.metrics()
    if published:
        overall = series.published(published)
        overall_original = series_original.published(published)
    return {
        "mse": overall["mse"],
        "mae": overall["mae"],
        "mse_original": overall_original["mse"],
        "mae_original": overall_original["mae"],
        **{k: v for k, v in overall.items() if k not in ("mse", "mae")},
        **_breakdown(scaled, original, channels),
    }


def _breakdown(scaled: ErrorTotals, original: ErrorTotals, channels: list[str]) -> dict[str, Any]:
    """``per_horizon`` and ``per_channel`` scores of both spaces (see :func:`evaluate_report`)."""
    horizon = (*scaled.per_horizon(), *original.per_horizon())
    channel = (*scaled.per_channel(), *original.per_channel())
    names = ("mse", "mae", "mse_original", "mae_original")
    return {
        "per_horizon": [
            {"step": h + 1, **{n: float(v[h]) for n, v in zip(names, horizon, strict=True)}}
            for h in range(len(horizon[0]))
        ],
        "per_channel": {
            name: {n: float(v[c]) for n, v in zip(names, channel, strict=True)}
            for c, name in enumerate(channels)
        },
    }
