"""From a config to train/val/test window datasets: read, validate, split, scale.

Every problem with the input is found here, before a model is built, and reported as a
:class:`DataError` naming the file, column, row or split and the fix: a NaN in row 9,000 or
a split shorter than one window should cost milliseconds, not a failed training run.

Split layouts (rows ``[start, end)``; val and test start ``seq_len`` rows early so their
first window's history reaches back into the previous split, as in the published code):

- ``ett``: the fixed ETT borders, train ``[0, 8640)``, val ``[8640 - seq_len, 11520)``,
  test ``[11520 - seq_len, 14400)`` in hours (times 4 for 15-minute data).
- ``csv``: fractions ``data.split`` of the T rows: ``n_train = int(T * f_train)``,
  ``n_test = int(T * f_test)``, val the rest in between.
- ``synthetic``: the ETT borders when the series reaches the ETT test end (14,400 rows
  hourly, 57,600 at 15 minutes; the default 17,420 rows does), otherwise the fractions.

``data.percent`` (few-shot) keeps the first ``percent`` % of the training windows; the
scaler is still fitted on all training rows, so scaled values do not depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from timellm_lib.config import DataConfig
from timellm_lib.data.sampler import Windows, fixed_subset
from timellm_lib.data.synthetic import ensure_synthetic_csv
from timellm_lib.data.windows import DataError, Scaler, WindowDataset

ETT_ENDS = (8640, 11520, 14400)  # hourly rows where the ETT train, val and test splits end
STEPS_PER_HOUR = {"h": 1, "15min": 4}
STEP = {"h": pd.Timedelta(hours=1), "15min": pd.Timedelta(minutes=15)}
ETT_SOURCE = "https://github.com/zhouhaoyi/ETDataset (folder ETT-small)"


@dataclass
class Datasets:
    """The three splits of one series and what is needed to interpret them."""

    train: WindowDataset
    val: WindowDataset
    test: WindowDataset
    columns_in: list[str]
    columns_out: list[str]
    scaler: Scaler  # fitted on the training rows only
    target: str
    features: str
    freq: str

    @property
    def n_in(self) -> int:
        return len(self.columns_in)

    @property
    def n_out(self) -> int:
        return len(self.columns_out)

    def split(self, name: str) -> WindowDataset:
        """The split called ``name`` (train, val or test)."""
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}; choose train, val or test")
        return getattr(self, name)

    def validation_windows(self, data: DataConfig) -> Windows:
        """The val windows a validation scores: all of them, or the fixed subset of
        ``data.val_subset`` windows drawn from ``data.val_subset_seed`` (:func:`fixed_subset`);
        the trainer, its size check and ``timellm eval --split val`` all take them from here."""
        return fixed_subset(self.val, data.val_subset, data.val_subset_seed)

    def inference_state(self) -> dict[str, Any]:
        """What reading the model's inputs and outputs needs besides the weights: the scaler
        and the channel names. Checkpoints store it, so a model forecasts a new file without
        the training data; plain lists survive ``torch.load(weights_only=True)``."""
        return {
            "scaler": self.scaler.state_dict(),
            "columns_in": list(self.columns_in),
            "columns_out": list(self.columns_out),
        }


def build_datasets(cfg: DataConfig) -> Datasets:
    """Read and validate the configured series, then scale and window each split."""
    frame = read_series(cfg)
    if cfg.source == "ett":
        _check_ett_step(frame, cfg)
    columns = [c for c in frame.columns if c != cfg.date_column]
    # The target is the last channel (as in the Time-Series-Library), so a model that mixes
    # channels into the target (features MS) finds it at index -1, and for M the i-th output
    # channel is the i-th input channel.
    ordered = [c for c in columns if c != cfg.target] + [cfg.target]
    features = cfg.model_features  # MS with ms_mode published runs as M
    columns_in = [cfg.target] if features == "S" else ordered
    columns_out = ordered if features == "M" else [cfg.target]

    used = list(dict.fromkeys(columns_in + columns_out))
    values = frame[used].to_numpy(np.float64)
    train_end = _split_ends(cfg, len(frame))[0]
    origin = f"synthetic data ({cfg.path})" if cfg.source == "synthetic" else str(cfg.path)
    _check_spread(values[:train_end], used, origin)
    scaler = Scaler.fit(frame[columns].to_numpy(np.float64)[:train_end], columns)
    scaled = scale_to_float32(scaler, values, used, origin)
    x_all = scaled[:, [used.index(c) for c in columns_in]]
    y_all = scaled[:, [used.index(c) for c in columns_out]]
    dates = frame[cfg.date_column].to_numpy()

    splits = {
        name: WindowDataset(
            x_all[start:end],
            y_all[start:end],
            dates[start:end],
            cfg.seq_len,
            cfg.pred_len,
            split=name,
        )
        for name, (start, end) in split_borders(cfg, len(frame)).items()
    }
    return Datasets(
        **splits,
        columns_in=columns_in,
        columns_out=columns_out,
        scaler=scaler,
        target=cfg.target,
        features=features,
        freq=cfg.freq,
    )


def _check_spread(train: np.ndarray, columns: list[str], origin: str) -> None:
    """Every column the model uses must have a finite, non-zero spread over the training
    rows: the scaler divides by it. A value so large that the spread overflows (1e300) would
    make every scaled value 0 or NaN, and a constant column has nothing to scale by."""
    with np.errstate(over="ignore", invalid="ignore"):
        spread = train.std(axis=0)
    for k, name in enumerate(columns):
        if not np.isfinite(spread[k]):
            row = int(np.argmax(np.abs(train[:, k])))
            raise DataError(
                f"column {name!r} of {origin} cannot be standardised: {_where(row)} holds "
                f"{train[row, k]:g}, so large that the column's spread over the training rows "
                "overflows; fix that value (a unit error or a placeholder such as 1e300?) or "
                "remove the row"
            )
        if spread[k] == 0:
            raise DataError(
                f"column {name!r} of {origin} is constant ({train[0, k]:g}) over all "
                f"{len(train)} training rows (from {_where(0)}): it has no spread to "
                "standardise by and tells the model nothing; remove the column from the file "
                "(or, for a target, use data that varies)"
            )


def scale_to_float32(
    scaler: Scaler, values: np.ndarray, columns: list[str], origin: str, first_row: int = 0
) -> np.ndarray:
    """``values`` standardised with ``scaler`` as the float32 the model reads; a value whose
    scaled form leaves float32's range (it would become inf) is a DataError naming it
    (``first_row``: the data row of ``values[0]`` in the file)."""
    scaled = scaler.transform(values, columns)
    limit = np.finfo(np.float32).max
    beyond = np.argwhere(~(np.abs(scaled) <= limit))
    if len(beyond):
        row, k = beyond[0]
        raise DataError(
            f"column {columns[k]!r} of {origin} at {_where(first_row + row)} holds "
            f"{values[row, k]:g}, "
            f"{abs(scaled[row, k]):.3g} training standard deviations from the mean: beyond "
            "the float32 range the model computes in; fix that value (a unit error or a "
            "placeholder?) or remove the row"
        )
    return scaled.astype(np.float32)


def split_borders(cfg: DataConfig, n_rows: int) -> dict[str, tuple[int, int]]:
    """Rows ``[start, end)`` of train, val and test for a series of ``n_rows`` rows.

    The training end is shortened to keep ``percent`` % of its windows:
    ``(train_end - seq_len) * percent // 100 + seq_len``, the published formula.
    """
    train_end, val_end, test_end = _split_ends(cfg, n_rows)
    s = cfg.seq_len
    return {
        "train": (0, (train_end - s) * cfg.percent // 100 + s),
        "val": (train_end - s, val_end),
        "test": (val_end - s, test_end),
    }


def uses_ett_borders(cfg: DataConfig) -> bool:
    """ETT files always; synthetic series when they reach the ETT test end."""
    ett_rows = ETT_ENDS[2] * STEPS_PER_HOUR[cfg.freq]
    return cfg.source == "ett" or (cfg.source == "synthetic" and cfg.synthetic_rows >= ett_rows)


def _split_ends(cfg: DataConfig, n_rows: int) -> tuple[int, int, int]:
    if uses_ett_borders(cfg):
        train_end, val_end, test_end = (end * STEPS_PER_HOUR[cfg.freq] for end in ETT_ENDS)
        if n_rows < test_end:
            raise DataError(
                f"{cfg.path} has {n_rows} rows but the ETT split layout (freq {cfg.freq}) reads "
                f"rows up to {test_end}; for a shorter series set data.source=csv, which "
                f"splits by the fractions data.split = {list(cfg.split)}"
            )
        return train_end, val_end, test_end
    f_train, _, f_test = cfg.split
    n_train, n_test = int(n_rows * f_train), int(n_rows * f_test)
    return n_train, n_rows - n_test, n_rows


def _check_ett_step(frame: pd.DataFrame, cfg: DataConfig) -> None:
    """The ETT borders count rows, so an ETTm file read as hourly would split at the wrong
    dates without any error; compare the typical date step with ``data.freq`` instead."""
    steps = frame[cfg.date_column].diff().dropna()
    if steps.empty:
        return
    typical = steps.mode().iloc[0]
    if typical != STEP[cfg.freq]:
        hint = next((f for f, step in STEP.items() if step == typical), None)
        fix = f"set data.freq={hint}" if hint else "resample the file to hourly or 15-minute rows"
        raise DataError(
            f"the rows of {cfg.path} are {typical} apart but data.freq = {cfg.freq!r} expects "
            f"{STEP[cfg.freq]}; {fix}"
        )


# --------------------------------------------------------------------------- read + validate


def read_series(cfg: DataConfig, trained_columns: bool = False) -> pd.DataFrame:
    """The configured series as a validated frame: the date column (datetime64) followed by
    the numeric columns (float64) in file order. Also used to read user CSVs for predict,
    with ``trained_columns``: the date and target columns are then fixed by the checkpoint,
    so a message asks to rename the file's column instead of changing a setting."""
    if cfg.source == "synthetic":
        return _validate(ensure_synthetic_csv(cfg), cfg, f"synthetic data ({cfg.path})")
    return _validate(_read_csv(cfg), cfg, str(cfg.path), trained_columns)


def _read_csv(cfg: DataConfig) -> pd.DataFrame:
    path = Path(cfg.path)
    if not path.is_file():
        fix = "set data.path to a CSV file with a date column and numeric columns"
        if cfg.source == "ett":
            from timellm_lib.data.download import PINNED_SHA256, download_command

            fix = f"download the ETT files from {ETT_SOURCE} and set data.path to one of them"
            if path.stem in PINNED_SHA256:
                fix = (
                    f"run `{download_command(path.stem)} --dir {path.parent}` to fetch it from "
                    f"{ETT_SOURCE}, or set data.path to where the file is"
                )
        raise DataError(f"data file {cfg.path} not found (looked at {path.resolve()}); {fix}")
    try:
        return pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DataError(
            f"{path} cannot be read as a CSV file ({err}); it needs a header row and "
            "comma-separated values"
        ) from err


def _validate(
    frame: pd.DataFrame, cfg: DataConfig, origin: str, trained_columns: bool = False
) -> pd.DataFrame:
    date = cfg.date_column
    if date not in frame.columns:
        fix = (
            f"Rename the file's timestamp column to {date!r}, the date column the checkpoint "
            "was trained with"
            if trained_columns
            else "Set data.date_column to the column holding the timestamps"
        )
        raise DataError(
            f"{origin} has no date column {date!r}; its columns are {list(frame.columns)}. {fix}"
        )
    columns = [c for c in frame.columns if c != date]
    if cfg.target not in columns:
        fix = (
            f"Rename the file's target column to {cfg.target!r}, as in the training data"
            if trained_columns
            else "Set data.target to one of them"
        )
        raise DataError(
            f"{origin} has no target column {cfg.target!r}; its value columns are {columns}. {fix}"
        )
    if frame.empty:
        raise DataError(f"{origin} has a header but no data rows; it needs a series")
    values = np.stack([_numeric(frame[c], origin, date) for c in columns], axis=1)
    missing = np.argwhere(~np.isfinite(values))
    if len(missing):
        row, k = missing[0]
        raise DataError(
            f"column {columns[k]!r} of {origin} has a missing or non-finite value "
            f"({values[row, k]}) at {_where(row)}; fill the gaps (e.g. "
            "interpolate) or drop those rows, then save the file again"
        )
    dates = _dates(frame[date], origin, date)
    out = pd.DataFrame(values, columns=columns, index=frame.index)
    out.insert(0, date, dates)
    return out.reset_index(drop=True)


def _numeric(column: pd.Series, origin: str, date: str) -> np.ndarray:
    """float64 values of a column, or a DataError naming the first value that is no number."""
    if pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
        return column.to_numpy(np.float64)
    numbers = pd.to_numeric(column, errors="coerce")
    bad = np.flatnonzero(numbers.isna().to_numpy() & column.notna().to_numpy())
    if len(bad):
        raise DataError(
            f"column {column.name!r} of {origin} is not numeric: {_where(bad[0])} holds "
            f"{column.iloc[bad[0]]!r}. Every column except {date!r} must hold numbers; fix "
            "the value or remove the column"
        )
    return numbers.to_numpy(np.float64)


def _dates(column: pd.Series, origin: str, date: str) -> pd.Series:
    """Parsed timestamps that strictly increase, or a DataError at the first bad row."""
    dates = pd.to_datetime(column, errors="coerce")
    if dates.dt.tz is not None:
        dates = dates.dt.tz_localize(None)  # keep wall-clock time; features are calendar-based
    bad = np.flatnonzero(dates.isna().to_numpy())
    if len(bad):
        raise DataError(
            f"{origin}: {column.iloc[bad[0]]!r} in column {date!r} at {_where(bad[0])} is "
            "not a date; write timestamps like 2016-07-01 00:00:00"
        )
    stamps = dates.to_numpy()
    back = np.flatnonzero(stamps[1:] <= stamps[:-1])
    if len(back):
        row = back[0] + 1
        how = "repeats" if stamps[row] == stamps[row - 1] else "comes before"
        raise DataError(
            f"{origin}: dates must strictly increase, but {dates.iloc[row]} at {_where(row)} "
            f"{how} {dates.iloc[row - 1]} on the row above; sort the file by {date!r} and "
            "remove duplicate timestamps"
        )
    return dates


def _where(row: int) -> str:
    """A row as users find it in the file: 1-based data row and line (after the header)."""
    return f"data row {row + 1} (line {row + 2} of the file)"
