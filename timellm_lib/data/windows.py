"""Scaling and sliding windows: the two things every split needs once the rows are chosen.

A split is stored once, as contiguous float32 tensors of its rows; a window is only a start
offset into them. Strided views (``unfold``) present the same storage as [windows, length,
channels] without copying, so a batch is one indexing operation on the first axis (a block
copy per window, about 4x faster than gathering rows) instead of a Python loop over windows.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from timellm_lib.errors import WorkbenchError

ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, Tensor)


class DataError(WorkbenchError, ValueError):
    """The input data cannot be used; the message names the file, column, row or split and
    the fix. Defined here, the lowest module of the data layer that raises it."""


class Scaler:
    """Per-column standardisation (mean, population std) that remembers column names.

    Names make it safe to scale a subset of columns (features S/MS) or to undo the scaling
    of model outputs, which hold only the output columns, with the statistics of the
    training rows of the full frame.
    """

    def __init__(self, columns: list[str], mean: np.ndarray, std: np.ndarray) -> None:
        self.columns = list(columns)
        self.mean = np.asarray(mean, dtype=np.float64)
        self.std = np.asarray(std, dtype=np.float64)
        if self.mean.shape != (len(self.columns),) or self.std.shape != self.mean.shape:
            raise ValueError(
                f"Scaler needs one mean and one std per column; got {len(self.columns)} "
                f"columns, mean {self.mean.shape}, std {self.std.shape}"
            )

    @classmethod
    def fit(cls, values: np.ndarray, columns: list[str]) -> Scaler:
        """Statistics of ``values`` [rows, columns]; like sklearn's StandardScaler (ddof=0,
        and a constant column gets std 1 so it is centred instead of divided by zero)."""
        values = np.asarray(values, dtype=np.float64)
        std = values.std(axis=0)
        return cls(columns, values.mean(axis=0), np.where(std == 0, 1.0, std))

    def transform(self, values: np.ndarray, columns: list[str]) -> np.ndarray:
        """Standardise ``values`` whose last axis holds ``columns`` (float64 result)."""
        mean, std = self._stats(values, columns)
        return (np.asarray(values, dtype=np.float64) - mean) / std

    def inverse_transform(self, values: ArrayOrTensor, columns: list[str]) -> ArrayOrTensor:
        """Back to original units; a tensor stays a tensor (same dtype and device)."""
        mean, std = self._stats(values, columns)
        if isinstance(values, Tensor):
            like = {"dtype": values.dtype, "device": values.device}
            return values * torch.as_tensor(std, **like) + torch.as_tensor(mean, **like)
        return np.asarray(values, dtype=np.float64) * std + mean

    def state_dict(self) -> dict[str, list]:
        """Plain lists, so the scaler survives ``torch.load(weights_only=True)`` and YAML."""
        return {"columns": self.columns, "mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_state_dict(cls, state: dict[str, list]) -> Scaler:
        return cls(state["columns"], np.array(state["mean"]), np.array(state["std"]))

    def _stats(self, values: np.ndarray | Tensor, columns: list[str]) -> tuple[np.ndarray, ...]:
        unknown = [c for c in columns if c not in self.columns]
        if unknown:
            raise DataError(
                f"the scaler has no statistics for column(s) {unknown}; it was fitted on "
                f"{self.columns}. Use the same columns as the training data"
            )
        if values.shape[-1] != len(columns):
            raise DataError(
                f"values have {values.shape[-1]} columns on the last axis but {len(columns)} "
                f"column names were given ({columns})"
            )
        index = [self.columns.index(c) for c in columns]
        return self.mean[index], self.std[index]

    def __repr__(self) -> str:
        return f"Scaler(columns={self.columns})"


class WindowDataset(Dataset):
    """Sliding windows over one split: window ``i`` is history rows ``[i, i + seq_len)`` of
    the input columns and the next ``pred_len`` rows of the output columns.

    ``x`` and ``y`` are the scaled split rows ([T, C_in], [T, C_out]) and ``dates`` their
    datetime64 stamps [T].
    """

    def __init__(
        self,
        x: np.ndarray | Tensor,
        y: np.ndarray | Tensor,
        dates: np.ndarray,
        seq_len: int,
        pred_len: int,
        split: str = "train",
    ) -> None:
        self.split = split
        self.seq_len = seq_len
        self.pred_len = pred_len
        self._x = _float_tensor(x)
        self._y = _float_tensor(y)
        self._dates = np.asarray(dates)
        rows = len(self._x)
        if not len(self._y) == len(self._dates) == rows:
            raise ValueError(
                f"x, y and dates must have the same rows; got {len(self._x)}, "
                f"{len(self._y)}, {len(self._dates)}"
            )
        needed = seq_len + pred_len
        if rows < needed:
            raise DataError(
                f"the {split} split has {rows} rows but one window needs seq_len + pred_len "
                f"= {seq_len} + {pred_len} = {needed} rows; lower data.seq_len or "
                "data.pred_len, raise data.percent, or use a longer series"
            )
        self._n = rows - needed + 1
        self._x_windows = _windows(self._x, 0, seq_len, self._n)
        self._y_windows = _windows(self._y, seq_len, pred_len, self._n)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        """One window as fresh tensors (a caller changing them in place cannot corrupt the
        stored series)."""
        if not 0 <= i < self._n:
            raise IndexError(f"window {i} is out of range for {self._n} {self.split} windows")
        start = i + self.seq_len
        return self._x[i:start].clone(), self._y[start : start + self.pred_len].clone()

    def get_batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Windows ``idx`` [B] as x [B, seq_len, C_in], y [B, pred_len, C_out], one gather."""
        idx = self._checked(idx)
        return self._x_windows[idx], self._y_windows[idx]

    def channel_batch(self, starts: Tensor, channels: Tensor) -> tuple[Tensor, Tensor]:
        """Channel ``channels[b]`` of window ``starts[b]``: x [B, seq_len], y [B, pred_len]."""
        starts = self._checked(starts)
        return self._x_windows[starts, :, channels], self._y_windows[starts, :, channels]

    @property
    def n_out(self) -> int:
        """Output channels per window."""
        return self._y.shape[1]

    def dates(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """datetime64 stamps of the history and future rows of window ``i``."""
        if not 0 <= i < self._n:
            raise IndexError(f"window {i} is out of range for {self._n} {self.split} windows")
        start = i + self.seq_len
        return self._dates[i:start].copy(), self._dates[start : start + self.pred_len].copy()

    def series(self) -> Tensor:
        """The whole scaled input slice [T, C_in] (shared storage: do not modify in place)."""
        return self._x

    def _checked(self, idx: Tensor) -> Tensor:
        """Window indices as a 1-D long tensor; negative ones are rejected because tensor
        indexing would silently wrap them to the last windows."""
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self._n):
            raise IndexError(
                f"window indices must lie in [0, {self._n}) for the {self.split} split; got "
                f"min {int(idx.min())}, max {int(idx.max())}"
            )
        return idx

    def __repr__(self) -> str:
        return (
            f"WindowDataset(split={self.split!r}, windows={self._n}, seq_len={self.seq_len}, "
            f"pred_len={self.pred_len}, in={self._x.shape[1]}, out={self._y.shape[1]})"
        )


class ChannelWindows(Dataset):
    """One channel of one window per sample (``data.sample_unit = channel``), as the
    published ETT loader serves them: sample ``i`` is channel ``i // n`` of window ``i % n``
    of the ``n`` windows, so a shuffled epoch mixes channels and ``data.batch_size`` counts
    univariate series. x [seq_len, 1], y [pred_len, 1]; the i-th output channel must be the
    i-th input channel (features M or S), which is what makes a channel a sample of its own.
    """

    def __init__(self, windows: WindowDataset) -> None:
        n_in, n_out = windows.series().shape[1], windows.n_out
        if n_in != n_out:
            raise DataError(
                f"channel samples need the same input and output channels, got {n_in} inputs "
                f"and {n_out} outputs (features MS); use data.sample_unit=window"
            )
        self.windows = windows
        self.split = windows.split
        self.n_channels = n_in

    def __len__(self) -> int:
        return len(self.windows) * self.n_channels

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x, y = self.get_batch(torch.tensor([i]))
        return x[0], y[0]

    def get_batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Samples ``idx`` [B] as x [B, seq_len, 1], y [B, pred_len, 1], one gather each."""
        channel, start = self.positions(idx).unbind(-1)
        x, y = self.windows.channel_batch(start, channel)
        return x.unsqueeze(-1), y.unsqueeze(-1)

    def positions(self, idx: Tensor) -> Tensor:
        """[B, 2] (channel, window start) of samples ``idx``: where each series lies in the
        split (a retrieval model masks memory entries by it)."""
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(
                f"sample indices must lie in [0, {len(self)}) for the {self.split} split; got "
                f"min {int(idx.min())}, max {int(idx.max())}"
            )
        n = len(self.windows)
        return torch.stack([idx // n, idx % n], dim=-1)

    def __repr__(self) -> str:
        return f"ChannelWindows({self.windows!r}, channels={self.n_channels})"


def training_samples(train: WindowDataset, unit: str) -> WindowDataset | ChannelWindows:
    """What the training sampler draws from: whole windows (``window``) or one channel of a
    window per sample (``channel``, the published ETT loader's unit)."""
    return ChannelWindows(train) if unit == "channel" else train


def _windows(series: Tensor, offset: int, length: int, n: int) -> Tensor:
    """View [n, length, C] of ``series`` [T, C]: window i is rows offset + i ... + length."""
    return series[offset:].unfold(0, length, 1).transpose(1, 2)[:n]


def _float_tensor(values: np.ndarray | Tensor) -> Tensor:
    """A contiguous float32 CPU tensor (copied only when the input is not one already)."""
    return torch.as_tensor(values, dtype=torch.float32).contiguous()
