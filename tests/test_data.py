"""Data layer: split borders, scaling, windows, synthetic data and input validation."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from timellm_lib.config import ConfigError, DataConfig, load_config
from timellm_lib.data import (
    ChannelWindows,
    DataError,
    Scaler,
    build_datasets,
    generate_synthetic,
    read_series,
    split_borders,
    training_samples,
    uses_ett_borders,
)
from timellm_lib.data import synthetic as synthetic_module
from timellm_lib.data.sampler import ResumableLoader

ETT_COLUMNS = ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]


def ett_cfg(path: Path, **kw) -> DataConfig:
    return DataConfig(source="ett", path=str(path), seq_len=512, pred_len=96, **kw)


def csv_cfg(path: Path, **kw) -> DataConfig:
    kw = {"seq_len": 48, "pred_len": 24, **kw}
    return DataConfig(source="csv", path=str(path), **kw)


def small_frame(rows: int = 1000, seed: int = 0) -> pd.DataFrame:
    return generate_synthetic(rows, seed)


def write_csv(tmp_path: Path, frame: pd.DataFrame, name: str = "series.csv") -> Path:
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def etth1(etth1_path):
    return build_datasets(ett_cfg(etth1_path))


@pytest.fixture(scope="module")
def etth1_raw(etth1_path) -> np.ndarray:
    return pd.read_csv(etth1_path)[ETT_COLUMNS].to_numpy(np.float64)


# ------------------------------------------------------------------------------ ETT borders


def test_etth1_window_counts(etth1):
    assert (len(etth1.train), len(etth1.val), len(etth1.test)) == (8033, 2785, 2785)
    assert etth1.columns_in == etth1.columns_out == ETT_COLUMNS
    assert (etth1.n_in, etth1.n_out, etth1.freq, etth1.target) == (7, 7, "h", "OT")
    assert etth1.train.series().shape == (8640, 7)
    assert etth1.val.series().shape == (2880 + 512, 7)


def test_etth1_percent_keeps_first_training_windows(etth1_path, etth1):
    few = build_datasets(ett_cfg(etth1_path, percent=10))
    # (8640 - 512) * 10 // 100 + 512 = 1324 rows -> 1324 - 512 - 96 + 1 windows
    assert len(few.train) == 717
    assert (len(few.val), len(few.test)) == (2785, 2785)
    idx = torch.arange(717)
    for a, b in zip(few.train.get_batch(idx), etth1.train.get_batch(idx), strict=True):
        assert torch.equal(a, b)  # same first windows, same scaling (scaler on all train rows)
    np.testing.assert_array_equal(few.scaler.mean, etth1.scaler.mean)


def test_channel_samples_are_the_published_loaders_one_channel_of_one_window(etth1):
    """Published Dataset_ETT_hour: sample i is channel i // n of the window starting at
    i % n (n windows), a univariate series x [seq_len, 1], y [pred_len, 1]."""
    samples = training_samples(etth1.train, "channel")
    n = len(etth1.train)
    assert isinstance(samples, ChannelWindows) and len(samples) == 8033 * 7
    idx = torch.tensor([0, 1, n - 1, n, 3 * n + 17, 7 * n - 1])
    x, y = samples.get_batch(idx)
    assert x.shape == (6, 512, 1) and y.shape == (6, 96, 1)
    for row, i in enumerate(idx.tolist()):
        channel, start = divmod(i, n)
        wx, wy = etth1.train[start]
        assert torch.equal(x[row, :, 0], wx[:, channel]) and torch.equal(
            y[row, :, 0], wy[:, channel]
        )
        assert samples.positions(idx)[row].tolist() == [channel, start]
    assert training_samples(etth1.train, "window") is etth1.train
    with pytest.raises(IndexError, match="sample indices"):
        samples.get_batch(torch.tensor([7 * n]))


def test_channel_sampling_gives_the_published_steps_per_epoch_on_etth1(etth1_path):
    """10% of ETTh1 at seq 512: 717 windows. The published global batch of 192 univariate
    series takes 26 steps an epoch; 8 whole windows (56 series) take 89."""
    few = build_datasets(ett_cfg(etth1_path, percent=10))
    channel = ResumableLoader(training_samples(few.train, "channel"), 192, seed=1)
    assert (len(channel), len(ResumableLoader(few.train, 8, seed=1))) == (26, 89)
    batch = channel.batch_indices(epoch=0, start=0, stop=1)[0]
    assert len(set((batch // 717).tolist())) > 1  # one batch mixes channels (shuffled pairs)


def test_channel_samples_need_matching_input_and_output_channels(tmp_path):
    ds = build_datasets(csv_cfg(write_csv(tmp_path, small_frame()), features="MS"))
    with pytest.raises(DataError, match="sample_unit=window"):
        ChannelWindows(ds.train)
    with pytest.raises(ConfigError, match="sample_unit = channel.*features MS"):
        load_config(overrides=["data.features=MS", "data.sample_unit=channel"])


def test_scaler_fitted_on_training_rows_only(etth1, etth1_raw):
    train = etth1_raw[:8640]
    np.testing.assert_allclose(etth1.scaler.mean, train.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(etth1.scaler.std, train.std(axis=0), rtol=1e-12)  # ddof=0
    assert not np.allclose(etth1.scaler.mean, etth1_raw[:14400].mean(axis=0), rtol=1e-3)
    expected = (etth1_raw[:8640] - train.mean(axis=0)) / train.std(axis=0)
    np.testing.assert_allclose(etth1.train.series().numpy(), expected, rtol=1e-5, atol=1e-5)


def test_val_and_test_windows_look_back_into_previous_split(etth1, etth1_raw):
    scaled = torch.as_tensor(etth1.scaler.transform(etth1_raw, ETT_COLUMNS), dtype=torch.float32)
    for split, end_before in [(etth1.val, 8640), (etth1.test, 11520)]:
        x, y = split.get_batch(torch.tensor([0, len(split) - 1]))
        assert torch.allclose(x[0], scaled[end_before - 512 : end_before])
        assert torch.allclose(y[0], scaled[end_before : end_before + 96])
    # the last test window ends exactly at row 14400: rows after it are never used
    assert torch.allclose(y[1], scaled[14400 - 96 : 14400])


def test_ett_rejects_wrong_freq(etth1_path):
    with pytest.raises(DataError, match=r"0 days 01:00:00 apart.*data\.freq=h"):
        build_datasets(ett_cfg(etth1_path, freq="15min"))


# ------------------------------------------------------------------------------ windows


@pytest.fixture
def small(tmp_path):
    return build_datasets(csv_cfg(write_csv(tmp_path, small_frame())))


def test_get_batch_equals_stacked_getitem(small):
    for split in (small.train, small.val, small.test):
        idx = torch.tensor([0, 5, len(split) - 1, 3])
        x, y = split.get_batch(idx)
        assert x.shape == (4, 48, 7) and y.shape == (4, 24, 7)
        assert torch.equal(x, torch.stack([split[i][0] for i in idx.tolist()]))
        assert torch.equal(y, torch.stack([split[i][1] for i in idx.tolist()]))


def test_y_starts_right_after_x(small):
    series = small.train.series()
    for i in (0, 17, len(small.train) - 1):
        x, y = small.train[i]
        assert torch.equal(x, series[i : i + 48])
        assert torch.equal(y, series[i + 48 : i + 72])
        history, future = small.train.dates(i)
        assert len(history) == 48 and len(future) == 24
        assert future[0] - history[-1] == np.timedelta64(1, "h")


def test_bad_window_indices_raise(small):
    with pytest.raises(IndexError, match="window indices"):
        small.train.get_batch(torch.tensor([-1, 0]))
    with pytest.raises(IndexError):
        small.train.get_batch(torch.tensor([len(small.train)]))
    with pytest.raises(IndexError):
        small.train[len(small.train)]


def test_dataset_survives_pickle(small):
    """DataLoader workers receive the dataset pickled; the strided views must survive."""
    clone = pickle.loads(pickle.dumps(small.train))
    idx = torch.tensor([1, 9])
    assert torch.equal(clone.get_batch(idx)[1], small.train.get_batch(idx)[1])


# ------------------------------------------------------------------------------ features


@pytest.mark.parametrize(("features", "n_in", "n_out"), [("M", 7, 7), ("S", 1, 1), ("MS", 7, 1)])
def test_feature_modes(tmp_path, features, n_in, n_out):
    ds = build_datasets(csv_cfg(write_csv(tmp_path, small_frame()), features=features))
    x, y = ds.train.get_batch(torch.tensor([0, 3]))
    assert (ds.n_in, ds.n_out) == (n_in, n_out)
    assert x.shape[-1] == n_in and y.shape[-1] == n_out
    if features != "M":
        assert ds.columns_out == ["OT"]
        ot = ds.columns_in.index("OT")
        # the output is the target column: the next rows of the target channel of the input
        assert torch.equal(y[0], ds.train.series()[48:72, ot : ot + 1])


def test_target_is_the_last_channel_so_ms_models_find_it_and_m_outputs_align(tmp_path):
    frame = small_frame()[["date", "OT", "HUFL", "LULL"]]
    path = write_csv(tmp_path, frame)
    ms = build_datasets(csv_cfg(path, target="HUFL", features="MS"))
    assert ms.columns_in == ["OT", "LULL", "HUFL"] and ms.columns_out == ["HUFL"]
    x, _ = ms.train[0]
    expected = ms.scaler.transform(frame[["HUFL"]].to_numpy()[: ms.train.seq_len], ["HUFL"])
    np.testing.assert_allclose(x[:, -1].numpy(), expected[:, 0], rtol=1e-5, atol=1e-6)
    m = build_datasets(csv_cfg(path, target="HUFL", features="M"))
    assert m.columns_in == m.columns_out == ["OT", "LULL", "HUFL"]


# ------------------------------------------------------------------------------ generic CSV


def test_csv_split_70_10_20(tmp_path):
    frame = small_frame(1000)
    cfg = csv_cfg(write_csv(tmp_path, frame))
    assert split_borders(cfg, 1000) == {"train": (0, 700), "val": (652, 800), "test": (752, 1000)}
    ds = build_datasets(cfg)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (629, 77, 177)
    train = frame[ETT_COLUMNS].to_numpy()[:700]
    np.testing.assert_allclose(ds.scaler.mean, train.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(ds.scaler.std, train.std(axis=0), rtol=1e-12)
    assert split_borders(csv_cfg(cfg.path, percent=50), 1000)["train"] == (0, 374)


def test_read_series_returns_dates_and_floats(tmp_path):
    frame = read_series(csv_cfg(write_csv(tmp_path, small_frame(50))))
    assert list(frame.columns) == ["date", *ETT_COLUMNS]
    assert pd.api.types.is_datetime64_any_dtype(frame["date"])
    assert all(frame[c].dtype == np.float64 for c in ETT_COLUMNS)


# ------------------------------------------------------------------------------ synthetic


def test_synthetic_is_deterministic_and_ett_like():
    a, b, other = (
        generate_synthetic(2000, 0),
        generate_synthetic(2000, 0),
        generate_synthetic(2000, 1),
    )
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a[ETT_COLUMNS], other[ETT_COLUMNS])
    assert list(a.columns) == ["date", *ETT_COLUMNS]
    assert a["date"].iloc[0] == pd.Timestamp("2016-07-01 00:00")
    assert (a["date"].diff().dropna() == pd.Timedelta(hours=1)).all()
    assert a["HUFL"].corr(a["MUFL"]) > 0.8  # the loads move together
    assert -20 < a["OT"].min() and a["OT"].max() < 60
    quarter = generate_synthetic(8, 0, freq="15min")
    assert quarter["date"].iloc[1] - quarter["date"].iloc[0] == pd.Timedelta(minutes=15)


def test_synthetic_file_written_once_and_rewritten_when_different(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = DataConfig(synthetic_rows=800, seq_len=48, pred_len=24)
    path = tmp_path / "data" / "synthetic_ett.csv"  # the default path, relative to the cwd
    assert not path.exists()
    ds = build_datasets(cfg)
    expected = generate_synthetic(800, 0).to_csv(index=False)
    assert path.read_text() == expected
    stamp = path.stat().st_mtime_ns, path.stat().st_ino
    build_datasets(cfg)
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == stamp  # unchanged: not rewritten

    build_datasets(DataConfig(synthetic_rows=800, synthetic_seed=3, seq_len=48, pred_len=24))
    assert path.read_text() == generate_synthetic(800, 3).to_csv(index=False)
    again = build_datasets(cfg)  # its own file: rewritten
    assert path.read_text() == expected
    assert torch.equal(again.test.series(), ds.test.series())
    names = ["synthetic_ett.csv", "synthetic_ett.csv.sha256"]  # the list of its own versions
    assert sorted(p.name for p in path.parent.iterdir()) == names


def test_synthetic_write_is_atomic(tmp_path, monkeypatch):
    cfg = DataConfig(path=str(tmp_path / "syn.csv"), synthetic_rows=300)
    read_series(DataConfig(path=cfg.path, synthetic_rows=300, synthetic_seed=5))
    old = (tmp_path / "syn.csv").read_text()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(synthetic_module.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        read_series(cfg)
    assert (tmp_path / "syn.csv").read_text() == old  # the previous file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn.csv", "syn.csv.sha256"]


def test_synthetic_layout_depends_on_length(tmp_path):
    long = DataConfig(path=str(tmp_path / "a.csv"), synthetic_rows=14400)
    short = DataConfig(path=str(tmp_path / "b.csv"), synthetic_rows=14399)
    assert uses_ett_borders(long) and not uses_ett_borders(short)
    assert split_borders(long, 14400)["val"] == (8640 - 512, 11520)
    assert split_borders(short, 14399)["train"] == (0, int(14399 * 0.7))
    ds = build_datasets(long)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (8033, 2785, 2785)


# ------------------------------------------------------------------------------ errors


def test_missing_file_says_where_it_looked(tmp_path):
    with pytest.raises(DataError, match="not found") as err:
        build_datasets(ett_cfg(tmp_path / "nope" / "ETTh1.csv"))
    assert str(tmp_path / "nope" / "ETTh1.csv") in str(err.value)
    assert "ETDataset" in str(err.value)


@pytest.mark.parametrize(
    ("edit", "cfg_kw", "expected"),
    [
        (
            lambda f: f.rename(columns={"date": "time"}),
            {},
            r"no date column 'date'.*data\.date_column",
        ),
        (lambda f: f.drop(columns="OT"), {}, r"no target column 'OT'.*data\.target"),
        (
            lambda f: f.assign(HULL=["x" if i == 7 else "1" for i in range(len(f))]),
            {},
            r"column 'HULL' .* not numeric: data row 8 \(line 9 of the file\) holds 'x'",
        ),
        (
            lambda f: f.assign(MULL=f["MULL"].where(f.index != 30)),
            {},
            r"column 'MULL' .* missing or non-finite value \(nan\) at data row 31",
        ),
        (
            lambda f: f.assign(date=f["date"].where(f.index != 40, f["date"].iloc[39])),
            {},
            r"strictly increase.*data row 41.*repeats",
        ),
        (lambda f: f.iloc[[0, 1, 3, 2, *range(4, len(f))]], {}, r"data row 4.*comes before.*sort"),
        (
            lambda f: f.assign(date=f["date"].astype(str).where(f.index != 5, "soon")),
            {},
            r"'soon' in column 'date' at data row 6 .* not a date",
        ),
        (
            lambda f: f,
            {"seq_len": 680},
            r"train split has 700 rows but one window needs .* = 704 rows",
        ),
        (
            lambda f: f,
            {"split": (0.9, 0.08, 0.02)},
            r"test split has 68 rows but one window needs .* = 72 rows",
        ),
        (lambda f: f.iloc[:0], {}, r"no data rows"),
    ],
    ids=[
        "date",
        "target",
        "non-numeric",
        "nan",
        "duplicate",
        "unsorted",
        "bad-date",
        "train-short",
        "test-short",
        "empty",
    ],
)
def test_data_errors(tmp_path, edit, cfg_kw, expected):
    path = write_csv(tmp_path, edit(small_frame()))
    with pytest.raises(DataError, match=expected):
        build_datasets(csv_cfg(path, **cfg_kw))


def test_ett_file_too_short(tmp_path):
    path = write_csv(tmp_path, small_frame(2000), "ETTh1.csv")
    with pytest.raises(DataError, match=r"2000 rows .* up to 14400.*data\.source=csv"):
        build_datasets(ett_cfg(path))


def test_empty_file(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("")
    with pytest.raises(DataError, match="cannot be read as a CSV"):
        read_series(csv_cfg(path))


# ------------------------------------------------------------------------------ scaler


def test_inverse_transform_round_trip(small):
    rng = np.random.default_rng(0)
    values = rng.normal(5, 3, size=(10, 7))
    scaler = small.scaler
    back = scaler.inverse_transform(scaler.transform(values, ETT_COLUMNS), ETT_COLUMNS)
    np.testing.assert_allclose(back, values, rtol=1e-12)
    # model outputs hold only the output columns; a tensor stays a tensor of the same dtype
    _, y = small.test.get_batch(torch.tensor([0, 1]))
    original = scaler.inverse_transform(y[..., -1:], ["OT"])
    assert isinstance(original, torch.Tensor) and original.dtype == torch.float32
    rows = small.test.dates(0)[1]
    raw = small_frame().set_index("date").loc[rows, "OT"].to_numpy()
    np.testing.assert_allclose(original[0, :, 0].numpy(), raw, rtol=1e-5, atol=1e-4)
    state = Scaler.from_state_dict(scaler.state_dict())
    np.testing.assert_array_equal(state.std, scaler.std)
    with pytest.raises(DataError, match="no statistics for column"):
        scaler.transform(values[:, :1], ["nope"])


def test_constant_column_is_centred_not_divided_by_zero():
    scaler = Scaler.fit(np.array([[1.0, 2.0], [1.0, 4.0]]), ["a", "b"])
    np.testing.assert_array_equal(scaler.transform(np.array([[1.0, 3.0]]), ["a", "b"]), [[0, 0]])


def test_no_stray_files_in_cwd(tmp_path, monkeypatch):
    """A csv source never writes anything (only synthetic data lands in data/)."""
    monkeypatch.chdir(tmp_path)
    path = write_csv(tmp_path, small_frame(300))
    before = sorted(os.listdir(tmp_path))
    build_datasets(csv_cfg(path))
    assert sorted(os.listdir(tmp_path)) == before
