"""An ETT-like series generated from a seed, so the workbench runs with no download.

The frame imitates ETTh1: six load columns (High/Middle/Low Useful/Useless Load) and the
oil temperature OT, hourly from 2016-07-01. The loads share a daily, weekly and yearly
demand cycle plus slow autocorrelated noise, so they are correlated the way the real ones
are (useful loads strongly, useless loads through a second factor). OT follows the loads
through a smoothed lag (the oil heats up over hours), a summer/winter cycle of its own and a
slow drift. Nothing here is fitted to the real data; it only has the same shape and ranges,
which is enough for models, prompts and notebooks to behave as they would on ETT.

The frame is always generated in memory (about 10 ms for 17,420 rows) and also written to
``cfg.path`` so users can open it; the file is rewritten only when its text differs, and only
when it is a file this module wrote: ``<path>.sha256`` beside it lists the sha256 of every
version written there. Any other file at ``cfg.path`` (a user's own data) is never touched:
it is an error to name it with ``data.source: synthetic``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from timellm_lib.config import DataConfig
from timellm_lib.data.windows import DataError

START = "2016-07-01 00:00:00"
COLUMNS = ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]
HOURS_PER_STEP = {"h": 1.0, "15min": 0.25}


def generate_synthetic(rows: int, seed: int, freq: str = "h") -> pd.DataFrame:
    """Return a deterministic ETT-like frame: ``date`` then the seven ETT columns."""
    if rows < 1:
        raise ValueError(f"synthetic rows = {rows} must be at least 1")
    if freq not in HOURS_PER_STEP:
        raise ValueError(f"freq {freq!r} is not supported; choose one of {list(HOURS_PER_STEP)}")
    rng = np.random.default_rng(seed)
    hours = np.arange(rows) * HOURS_PER_STEP[freq]
    day = 2 * np.pi * hours / 24
    week = 2 * np.pi * hours / 168
    year = 2 * np.pi * hours / 8766  # the series starts on 1 July: cos(year) peaks in summer
    years = hours / 8766
    per_day = 24 / HOURS_PER_STEP[freq]  # steps per day, so noise correlation is in hours

    def noise(hours_memory: float) -> np.ndarray:
        return _ar1(rng, rows, decay=np.exp(-1 / (hours_memory / HOURS_PER_STEP[freq])))

    # useful demand: evening peak, morning shoulder, quieter weekends, more load in winter
    demand = (
        np.sin(day - 2.2)
        + 0.4 * np.sin(2 * day + 0.5)
        + 0.45 * np.cos(week)
        - 0.2 * np.cos(year)
        + 0.5 * noise(36)
    )
    # useless (reactive) demand: a second factor with its own phase, partly tied to demand
    reactive = 0.7 * np.sin(day - 1.0) + 0.5 * np.cos(year + 0.8) + 0.6 * noise(48)
    hufl = 7.4 + 5.0 * demand - 1.0 * years + 0.6 * noise(2)
    mufl = 4.3 + 4.8 * demand - 1.2 * years + 0.4 * noise(2)
    lufl = 3.0 + 0.45 * demand + 0.4 * np.sin(day - 1.0) + 0.4 * noise(6)
    hull = 2.2 + 1.6 * reactive + 0.5 * demand + 0.3 * noise(3)
    mull = 0.9 + 1.5 * reactive + 0.2 * demand + 0.3 * noise(3)
    lull = 0.86 + 0.25 * reactive + 0.3 * (lufl - 3.0) + 0.15 * noise(6)
    heating = _smooth(hufl + 2.0 * hull, decay=np.exp(-1 / (0.5 * per_day)))
    ot = (
        16.0
        + 8.0 * np.cos(year)
        + 1.2 * np.sin(day - 2.6)
        + 0.9 * (heating - 11.8)
        - 1.5 * years
        + 2.5 * noise(72)
    )
    values = np.stack([hufl, hull, mufl, mull, lufl, lull, ot], axis=1).round(3)
    frame = pd.DataFrame(values, columns=COLUMNS)
    dates = pd.date_range(START, periods=rows, freq=freq)
    frame.insert(0, "date", dates)
    return frame


def ensure_synthetic_csv(cfg: DataConfig) -> pd.DataFrame:
    """Generate the configured synthetic frame and write it to ``cfg.path`` if that differs.

    The file is a convenience copy for users (it is never read back): the frame returned is
    the in-memory one. It is written atomically, so a crash or a concurrent run never leaves
    a half-written CSV behind, and only over a file this function wrote (see the module
    docstring); any other file there is a DataError.
    """
    frame = generate_synthetic(cfg.synthetic_rows, cfg.synthetic_seed, cfg.freq)
    text = frame.to_csv(index=False)
    path = Path(cfg.path)
    if path.exists():
        current = path.read_bytes() if path.is_file() else None
        if current == text.encode():
            return frame
        if current is None or _digest(current) not in _written_digests(path):
            raise DataError(
                f"data.path = {cfg.path} already holds a file that synthetic data did not "
                f"write (it is not listed in {_sidecar(path).name}), and data.source = "
                "synthetic would overwrite it. To train on that file set data.source=csv (or "
                "ett); to use synthetic data choose a data.path where no file is, e.g. "
                "data/synthetic_ett.csv (an older synthetic file there can be deleted by hand)"
            )
    # the hash goes on the list first: whoever reads either version of the file finds it
    digests = _written_digests(path) | {_digest(text.encode())}
    _write_atomic(_sidecar(path), _SIDECAR_HEADER + "".join(f"{d}\n" for d in sorted(digests)))
    _write_atomic(path, text)
    return frame


_SIDECAR_HEADER = (
    "# sha256 of each version of the CSV beside this file that timellm_lib's synthetic data\n"
    "# wrote; only a file listed here is ever replaced by it\n"
)


def _sidecar(path: Path) -> Path:
    return path.with_name(f"{path.name}.sha256")


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _written_digests(path: Path) -> set[str]:
    """The hashes of the versions of ``path`` this module wrote (none when no list)."""
    sidecar = _sidecar(path)
    if not sidecar.is_file():
        return set()
    lines = sidecar.read_text().splitlines()
    return {line.strip() for line in lines if line.strip() and not line.startswith("#")}


def _ar1(rng: np.random.Generator, n: int, decay: float) -> np.ndarray:
    """Unit-variance AR(1) noise, computed as a causal convolution (no Python loop)."""
    taps = _taps(decay)
    white = rng.standard_normal(n + len(taps) - 1)  # warm-up so the start is stationary
    return np.convolve(white, taps, mode="valid") * np.sqrt(1 - decay**2)


def _smooth(x: np.ndarray, decay: float) -> np.ndarray:
    """Exponential moving average of ``x``, the start padded with its first value."""
    taps = _taps(decay)
    padded = np.concatenate([np.full(len(taps) - 1, x[0]), x])
    return np.convolve(padded, taps / taps.sum(), mode="valid")


def _taps(decay: float) -> np.ndarray:
    """Weights decay**k until they fall below 1e-6 (the truncation error is negligible)."""
    length = int(np.ceil(np.log(1e-6) / np.log(decay))) + 1
    return decay ** np.arange(length)


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and ``os.replace`` (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the file is meant to be opened by users
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
