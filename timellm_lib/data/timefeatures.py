"""Calendar features of each row ("marks"), each scaled to [-0.5, 0.5].

The values follow the Time-Series-Library ``timeenc=1`` encoding, so models and numbers
stay comparable with the published code: a position inside a calendar period divided by
the period's last position, minus 0.5. Hourly data gets hour of day, day of week, day of
month and day of year; 15-minute data puts minute of hour in front of those.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

FEATURES: dict[str, list[str]] = {
    "h": ["hour_of_day", "day_of_week", "day_of_month", "day_of_year"],
    "15min": ["minute_of_hour", "hour_of_day", "day_of_week", "day_of_month", "day_of_year"],
}


def time_features(dates: pd.DatetimeIndex | np.ndarray, freq: str) -> np.ndarray:
    """Return float32 ``[T, F]`` calendar features for ``dates`` (F = 4 hourly, 5 at 15 min)."""
    if freq not in FEATURES:
        raise ValueError(f"freq {freq!r} has no time features; choose one of {list(FEATURES)}")
    index = pd.DatetimeIndex(dates)
    columns = {
        "minute_of_hour": index.minute / 59.0,
        "hour_of_day": index.hour / 23.0,
        "day_of_week": index.day_of_week / 6.0,
        "day_of_month": (index.day - 1) / 30.0,
        "day_of_year": (index.day_of_year - 1) / 365.0,
    }
    return np.stack([np.asarray(columns[name]) - 0.5 for name in FEATURES[freq]], axis=1).astype(
        np.float32
    )
