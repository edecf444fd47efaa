"""A checkpoint forecasts a new CSV on its own: the training data file may be gone.

Checkpoints store the data's scaler and channel names (section ``data``), so ``timellm
predict --input`` needs only the checkpoint, while scoring a split still needs ``data.path``
and says so. Checkpoints written before that section rebuild both from the data file.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from process_helpers import run as run_process
from process_helpers import timellm
from trainer_helpers import tiny_config

from timellm_lib.cli import main
from timellm_lib.data import DataError, Scaler, build_datasets, generate_synthetic
from timellm_lib.evaluation.inference import evaluate_loaded, load_for_inference, predict_csv
from timellm_lib.training import train
from timellm_lib.training.checkpoint import load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run on a CSV file (source csv: a synthetic source would be generated
    again instead of read), and a second series to forecast, its columns in another order."""
    tmp = tmp_path_factory.mktemp("standalone")
    data = tmp / "train.csv"
    generate_synthetic(600, seed=0).to_csv(data, index=False)
    cfg = tiny_config(tmp, "data.source=csv", f"data.path={data}", "train.epochs=1")
    train(cfg, run_dir=tmp / "run", progress=False)
    other = generate_synthetic(100, seed=1)
    new_csv = tmp / "new.csv"
    other[["date", "OT", *other.columns[1:-1]]].to_csv(new_csv, index=False)
    return tmp / "run/checkpoints/best.pt", cfg, new_csv


@pytest.fixture
def data_moved(trained):
    """The training CSV renamed away for the test's duration, as on another machine."""
    data = trained[1].data.path
    moved = f"{data}.moved"
    shutil.move(data, moved)
    yield
    shutil.move(moved, data)


def predict_files(ckpt, new_csv, folder, name):
    """``timellm predict --input`` to CSV and npz files named ``name``, run in-process."""
    outputs = [folder / f"{name}.csv", folder / f"{name}.npz"]
    for out in outputs:
        command = ["predict", "--ckpt", str(ckpt), "--input", str(new_csv), "--out", str(out)]
        assert main(command) == 0
    return outputs


def assert_same_predictions(files, expected):
    assert files[0].read_text() == expected[0].read_text()
    got, want = np.load(files[1]), np.load(expected[1])
    assert sorted(got.files) == sorted(want.files) == ["channels", "dates", "forecast", "windows"]
    for key in want.files:
        np.testing.assert_array_equal(got[key], want[key])


@pytest.fixture(scope="module")
def with_data(trained, tmp_path_factory):
    """The predictions with the training data in place: what every other way must match."""
    best, _, new_csv = trained
    return predict_files(best, new_csv, tmp_path_factory.mktemp("with_data"), "preds")


def test_checkpoints_store_the_training_scaler_and_channels(trained):
    best, cfg, _ = trained
    datasets = build_datasets(cfg.data)
    for path in sorted(best.parent.glob("*.pt")):  # step, best and final checkpoints
        saved = load_checkpoint(path)["data"]
        assert saved == datasets.inference_state()
        scaler = Scaler.from_state_dict(saved["scaler"])
        assert scaler.columns == datasets.scaler.columns
        np.testing.assert_array_equal(scaler.mean, datasets.scaler.mean)
        np.testing.assert_array_equal(scaler.std, datasets.scaler.std)
    loaded = load_for_inference(best)
    np.testing.assert_array_equal(loaded.scaler.mean, datasets.scaler.mean)
    np.testing.assert_array_equal(loaded.scaler.std, datasets.scaler.std)
    assert (loaded.columns_in, loaded.channels) == (datasets.columns_in, datasets.columns_out)


def test_predict_needs_only_the_checkpoint(trained, with_data, data_moved, tmp_path):
    best, cfg, new_csv = trained
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    copy = shutil.copy(best, elsewhere / "best.pt")  # the file alone, as on another machine
    out = elsewhere / "preds.csv"
    command = timellm("predict", "--ckpt", str(copy), "--input", str(new_csv), "--out", str(out))
    done = run_process(command, cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    assert "1 window(s) x 12 steps x 7 channel(s)" in done.stdout
    assert out.read_text() == with_data[0].read_text()  # the very same forecasts

    assert_same_predictions(predict_files(copy, new_csv, tmp_path, "in_process"), with_data)
    loaded = load_for_inference(copy)
    assert loaded.channels[-1] == cfg.data.target
    assert predict_csv(loaded, new_csv).forecast.shape == (1, 12, 7)


def test_scoring_a_split_without_the_data_names_data_path_and_the_fix(trained, data_moved, capsys):
    best, cfg, _ = trained
    assert main(["eval", "--ckpt", str(best)]) == 2
    message = " ".join(capsys.readouterr().err.split())  # unwrapped
    assert "needs its training data to score or forecast its splits" in message
    assert f"data.path = {cfg.data.path}" in message and "put that file there" in message
    assert "predict --input" in message

    out = best.parent / "test_split.csv"
    assert main(["predict", "--ckpt", str(best), "--out", str(out)]) == 2  # the test split
    assert f"data.path = {cfg.data.path}" in capsys.readouterr().err.replace("\n", " ")
    assert not out.exists()


def test_a_data_file_with_other_channels_is_refused(trained, data_moved):
    best, cfg, _ = trained
    generate_synthetic(600, seed=0).drop(columns="HULL").to_csv(cfg.data.path, index=False)
    loaded = load_for_inference(best)
    with pytest.raises(DataError, match=r"gives \['HUFL', 'MUFL'"):
        evaluate_loaded(loaded, "val", write=False)
    with pytest.raises(DataError, match="point data.path at the series the run was trained on"):
        loaded.datasets  # noqa: B018 (a failed build is not kept)


@pytest.fixture(scope="module")
def older(trained, tmp_path_factory):
    """best.pt as written before checkpoints had the ``data`` section."""
    payload = load_checkpoint(trained[0])
    del payload["data"]
    path = tmp_path_factory.mktemp("older") / "older.pt"
    save_checkpoint(path, payload)
    return path


def test_an_older_checkpoint_rebuilds_the_scaler_from_the_data(trained, with_data, older):
    best, _, new_csv = trained
    assert_same_predictions(predict_files(older, new_csv, older.parent, "preds"), with_data)
    new, old = load_for_inference(best), load_for_inference(older)
    np.testing.assert_array_equal(old.scaler.mean, new.scaler.mean)
    np.testing.assert_array_equal(old.scaler.std, new.scaler.std)
    assert (old.columns_in, old.channels) == (new.columns_in, new.channels)
    scores = ("n_windows", "mse", "mae", "mse_original", "mae_original")
    old_val, new_val = evaluate_loaded(old, "val", False), evaluate_loaded(new, "val", False)
    assert {k: old_val[k] for k in scores} == {k: new_val[k] for k in scores}


def test_an_older_checkpoint_still_needs_the_data(trained, older, data_moved, capsys):
    out = older.parent / "no_data.csv"
    command = ["predict", "--ckpt", str(older), "--input", str(trained[2]), "--out", str(out)]
    assert main(command) == 2
    message = " ".join(capsys.readouterr().err.split())
    assert "needs its training data to rebuild its scaler and channel names" in message
    assert not out.exists()
