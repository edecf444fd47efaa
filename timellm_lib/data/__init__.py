"""Data layer: read and validate a series, split it, scale it, and serve windows.

``build_datasets(cfg.data)`` is the one entry point training needs; ``read_series`` reads
any configured CSV (also user files for predict), ``generate_synthetic`` makes the default
ETT-like series. The resumable sampler lives in :mod:`timellm_lib.data.sampler`.
"""

from timellm_lib.data.loaders import (
    Datasets,
    build_datasets,
    read_series,
    split_borders,
    uses_ett_borders,
)
from timellm_lib.data.synthetic import ensure_synthetic_csv, generate_synthetic
from timellm_lib.data.windows import (
    ChannelWindows,
    DataError,
    Scaler,
    WindowDataset,
    training_samples,
)

__all__ = [
    "ChannelWindows",
    "DataError",
    "Datasets",
    "Scaler",
    "WindowDataset",
    "build_datasets",
    "ensure_synthetic_csv",
    "generate_synthetic",
    "read_series",
    "split_borders",
    "training_samples",
    "uses_ett_borders",
]
