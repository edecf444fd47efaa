"""Metrics weighted by window, scores in both spaces, checkpoint loading, eval and predict."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

from timellm_lib.cli import build_parser
from timellm_lib.config import load_config
from timellm_lib.data import build_datasets
from timellm_lib.evaluation.inference import (
    InferenceError,
    evaluate_checkpoint,
    evaluate_loaded,
    forecast_example,
    load_for_inference,
    predict_csv,
    predict_split,
    run_eval,
    run_predict,
)
from timellm_lib.evaluation.metrics import ErrorTotals, evaluate, evaluate_report, forecasts
from timellm_lib.models import build_model
from timellm_lib.models.backbones import BackboneError
from timellm_lib.training import train
from timellm_lib.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from timellm_lib.training.metrics_log import read_metrics

FAST = ["model.name=mlp", "train.threads=1", "train.device=cpu", "train.log_steps=1"]


def smoke_config(folder, *extra):
    """configs/smoke.yaml with its synthetic CSV kept in ``folder``."""
    return load_config(
        "configs/smoke.yaml", [f"data.path={folder / 'synthetic.csv'}", *FAST, *extra]
    )


@pytest.fixture(scope="module", autouse=True)
def _repo_cwd(repo_root):
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(repo_root)  # configs/smoke.yaml is a relative path
        yield


@pytest.fixture(scope="module")
def run(tmp_path_factory, _repo_cwd):
    """A finished tiny MLP run (two epochs of configs/smoke.yaml)."""
    folder = tmp_path_factory.mktemp("run")
    cfg = smoke_config(folder)
    result = train(cfg, run_dir=folder / "run", progress=False)
    assert result.finished
    return folder / "run", cfg


def parse(command, *argv):
    return build_parser().parse_args([command, *map(str, argv)])


# ---------------------------------------------------------------------- window weighting


def test_scores_do_not_depend_on_the_batch_size(tmp_path):
    cfg = smoke_config(tmp_path)
    datasets = build_datasets(cfg.data)
    test = datasets.test
    assert len(test) % 7 != 0  # the last batch of 7 is a partial one
    torch.manual_seed(0)
    model = build_model(cfg, datasets.n_in, datasets.n_out)
    results = [evaluate(model, test, size) for size in (1, 7, len(test))]
    reports = [
        evaluate_report(model, test, datasets.scaler, datasets.columns_out, size)
        for size in (1, 7, len(test))
    ]
    # equal up to float32 rounding in the forward (its kernels depend on the batch size)
    for result in results[1:]:
        assert result["mse"] == pytest.approx(results[0]["mse"], rel=1e-7)
        assert result["mae"] == pytest.approx(results[0]["mae"], rel=1e-7)
    assert {r["n_windows"] for r in results} == {len(test)}
    for report in reports[1:]:
        for key in ("mse", "mae", "mse_original", "mae_original"):
            assert report[key] == pytest.approx(reports[0][key], rel=1e-7)

    # the same number computed by hand over every window at once
    x, y = test.get_batch(torch.arange(len(test)))
    with torch.no_grad():
        model.eval()
        err = model(x).double() - y.double()
    assert results[-1]["mse"] == pytest.approx(float(err.square().mean()), rel=1e-12)
    # a mean of batch means would weight the short last batch too much: not what we report
    batch_means = [
        float((p.double() - t.double()).square().mean()) for p, t in forecasts(model, test, 7)
    ]
    assert abs(np.mean(batch_means) - results[0]["mse"]) > 1e-4


def test_error_totals_refuse_an_empty_split():
    with pytest.raises(ValueError, match="no windows"):
        ErrorTotals().metrics()


def test_original_scores_are_the_scaled_ones_times_the_scaler(tmp_path):
    cfg = smoke_config(tmp_path)
    datasets = build_datasets(cfg.data)
    torch.manual_seed(1)
    model = build_model(cfg, datasets.n_in, datasets.n_out)
    report = evaluate_report(model, datasets.val, datasets.scaler, datasets.columns_out, 16)
    scaler = datasets.scaler
    for name, scores in report["per_channel"].items():
        std = scaler.std[scaler.columns.index(name)]
        assert std != pytest.approx(1.0)  # the check below would be empty otherwise
        assert scores["mse_original"] == pytest.approx(scores["mse"] * std**2, rel=1e-9)
        assert scores["mae_original"] == pytest.approx(scores["mae"] * std, rel=1e-9)

    horizon, channels = report["per_horizon"], report["per_channel"]
    assert [h["step"] for h in horizon] == list(range(1, cfg.data.pred_len + 1))
    assert list(channels) == datasets.columns_out
    # every cell has as many values, so the overall score is the mean of either breakdown
    for key in ("mse", "mae", "mse_original", "mae_original"):
        assert np.mean([h[key] for h in horizon]) == pytest.approx(report[key], rel=1e-9)
        assert np.mean([c[key] for c in channels.values()]) == pytest.approx(report[key], rel=1e-9)


# ---------------------------------------------------------------------- timellm eval


def test_eval_command_prints_and_writes_the_report(run, capsys):
    run_dir, _ = run
    best = run_dir / "checkpoints" / "best.pt"
    trainer_test = json.loads((run_dir / "eval_test.json").read_text())

    assert run_eval(parse("eval", "--ckpt", str(best), "--json")) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["split"] == "test" and printed["checkpoint"] == "checkpoints/best.pt"
    assert printed["global_step"] == load_checkpoint(best)["global_step"]
    assert printed["n_windows"] == trainer_test["n_windows"]
    assert printed["mse"] == pytest.approx(trainer_test["mse"], rel=1e-12)  # same weights
    assert printed["mae"] == pytest.approx(trainer_test["mae"], rel=1e-12)
    assert printed["mse_original"] > 0 and printed["mae_original"] > 0
    assert len(printed["per_horizon"]) == 8
    assert set(printed["per_channel"]) == {"HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"}
    assert json.loads((run_dir / "eval_test.json").read_text()) == printed

    assert run_eval(parse("eval", "--ckpt", str(best), "--split", "val")) == 0
    text = capsys.readouterr().out
    val = json.loads((run_dir / "eval_val.json").read_text())
    assert val["split"] == "val" and f"{val['n_windows']} windows" in text
    assert "overall" in text and "OT" in text


def test_checkpoints_with_ema_are_evaluated_with_the_ema_weights(tmp_path):
    cfg = smoke_config(tmp_path, "train.ema_decay=0.9", "train.eval_with_ema=true")
    train(cfg, run_dir=tmp_path / "run", progress=False)
    final = tmp_path / "run/checkpoints/final.pt"
    loaded = load_for_inference(final)
    assert loaded.weights == "ema" and load_for_inference(final.with_name("best.pt")).weights == (
        "model"
    )
    last_val = [e for e in read_metrics(tmp_path / "run/metrics.jsonl") if e["event"] == "val"][-1]
    assert last_val["global_step"] == loaded.global_step
    result = evaluate_loaded(loaded, "val", write=False)
    assert result["mse"] == pytest.approx(last_val["val_loss"], rel=1e-9)


# ---------------------------------------------------------------------- timellm predict


def test_predict_writes_every_test_window_in_original_units(run, tmp_path, capsys):
    run_dir, cfg = run
    best = str(run_dir / "checkpoints" / "best.pt")
    csv, npz = tmp_path / "p.csv", tmp_path / "p.npz"
    assert run_predict(parse("predict", "--ckpt", best, "--out", str(csv))) == 0
    assert run_predict(parse("predict", "--ckpt", best, "--out", str(npz))) == 0
    assert "window(s) x 8 steps x 7 channel(s)" in capsys.readouterr().out

    table = pd.read_csv(csv, parse_dates=["date"])
    datasets = build_datasets(cfg.data)
    n_windows, horizon = len(datasets.test), cfg.data.pred_len
    assert len(table) == n_windows * horizon
    assert list(table.columns[:3]) == ["date", "window", "step"]
    assert list(table.columns[3:5]) == ["HUFL_forecast", "HUFL_truth"]
    first = table[table["window"] == 0]
    assert list(first["step"]) == list(range(1, horizon + 1))
    assert (first["date"].diff().dropna() == pd.Timedelta(hours=1)).all()
    assert first["date"].iloc[0] == pd.Timestamp(datasets.test.dates(0)[1][0])

    raw = pd.read_csv(cfg.data.path, parse_dates=["date"])
    joined = table.merge(raw, on="date", how="left")
    for name in datasets.columns_out:
        np.testing.assert_allclose(joined[f"{name}_truth"], joined[name], rtol=1e-5, atol=1e-5)
        # original units: the forecasts live on the scale of the file's column, not near 0
        assert abs(table[f"{name}_forecast"].mean() - raw[name].mean()) < 2 * raw[name].std()

    arrays = np.load(npz, allow_pickle=False)
    assert arrays["forecast"].shape == arrays["truth"].shape == (n_windows, horizon, 7)
    assert list(arrays["channels"]) == datasets.columns_out
    assert arrays["dates"].dtype == np.dtype("datetime64[ns]")
    np.testing.assert_allclose(
        arrays["forecast"][:, :, -1].reshape(-1), table["OT_forecast"], rtol=1e-12
    )


def test_predict_from_a_user_csv_continues_its_dates(run, tmp_path, capsys):
    run_dir, cfg = run
    best = run_dir / "checkpoints" / "best.pt"
    loaded = load_for_inference(best)
    split = predict_split(loaded)
    raw = pd.read_csv(cfg.data.path)
    # the history of test window 5 as a user file, columns in another order
    past, _ = loaded.datasets.test.dates(5)
    history = raw[pd.to_datetime(raw["date"]).isin(past)]
    user = tmp_path / "user.csv"
    history[["date", "OT", *raw.columns[1:-1]]].to_csv(user, index=False)

    out = tmp_path / "user_forecast.csv"
    args = parse("predict", "--ckpt", str(best), "--input", str(user), "--out", str(out))
    assert run_predict(args) == 0
    table = pd.read_csv(out, parse_dates=["date"])
    assert len(table) == cfg.data.pred_len and set(table["window"]) == {0}
    assert not any(c.endswith("_truth") for c in table.columns)  # the future is unknown
    last = pd.Timestamp(past[-1])
    expected = [last + pd.Timedelta(hours=h) for h in range(1, cfg.data.pred_len + 1)]
    assert list(table["date"]) == expected
    forecast = table[[f"{c}_forecast" for c in loaded.channels]].to_numpy()
    np.testing.assert_allclose(forecast, split.forecast[5], rtol=1e-5)


def test_forecast_example_feeds_the_forecast_plots(run):
    from timellm_lib.notebooks.plots import forecast_mpl

    loaded = load_for_inference(run[0] / "checkpoints" / "best.pt")
    example = forecast_example(loaded, "test", 3)
    assert example["history"].shape == (32, 7) and example["forecast"].shape == (8, 7)
    np.testing.assert_allclose(
        example["forecast"], predict_split(loaded).forecast[3], rtol=1e-5, atol=1e-5
    )
    assert len(forecast_mpl(**example).axes) == 7
    with pytest.raises(InferenceError, match="window 999 does not exist"):
        forecast_example(loaded, "test", 999)


# ---------------------------------------------------------------------- bad input


def test_bad_requests_fail_with_the_problem_and_the_fix(run, tmp_path):
    run_dir, cfg = run
    best = run_dir / "checkpoints" / "best.pt"
    with pytest.raises(CheckpointError, match="does not exist"):
        load_for_inference(tmp_path / "missing.pt")
    with pytest.raises(InferenceError, match="split 'train' cannot be evaluated"):
        evaluate_checkpoint(best, "train")
    with pytest.raises(InferenceError, match=r"must end in \.csv .* or \.npz"):
        run_predict(parse("predict", "--ckpt", str(best), "--out", "p.txt"))

    loaded = load_for_inference(best)
    raw = pd.read_csv(cfg.data.path)
    wrong = tmp_path / "wrong.csv"
    raw.drop(columns="HULL").rename(columns={"MUFL": "mufl"}).tail(40).to_csv(wrong, index=False)
    with pytest.raises(
        InferenceError, match=r"missing \['HULL', 'MUFL'\], not in training \['mufl'\]"
    ):
        predict_csv(loaded, wrong)
    short = tmp_path / "short.csv"
    raw.tail(10).to_csv(short, index=False)
    with pytest.raises(
        InferenceError, match="has 10 rows but the model reads the last seq_len = 32"
    ):
        predict_csv(loaded, short)
    with pytest.raises(InferenceError, match="does not exist"):
        predict_csv(loaded, tmp_path / "nope.csv")

    # weights of another model: a strict load names the tensors
    payload = load_checkpoint(best)
    payload["config"]["model"]["name"] = "dlinear"
    save_checkpoint(tmp_path / "other.pt", payload)
    with pytest.raises(CheckpointError, match="do not fit this model"):
        load_for_inference(tmp_path / "other.pt")


def llm_checkpoint(tmp_path, **backbone):
    """A checkpoint of an untrained smoke Time-LLM (tiny random GPT-2)."""
    cfg = smoke_config(tmp_path, "model.name=timellm")
    datasets = build_datasets(cfg.data)
    model = build_model(cfg, datasets.n_in, datasets.n_out)
    config = cfg.to_dict()
    saved = {"name": cfg.model.backbone, "fingerprint": model.backbone_fingerprint}
    if "backbone" in backbone:
        config["model"]["backbone"] = backbone["backbone"]
    saved.update({k: v for k, v in backbone.items() if k == "fingerprint"})
    payload = {
        "format_version": 1,
        "kind": "best",
        "global_step": 0,
        "model": model.state_dict(),
        "config": config,
        "backbone": saved,
    }
    path = tmp_path / "llm.pt"
    save_checkpoint(path, payload)
    return path


def test_the_backbone_is_loaded_by_name_and_checked_by_fingerprint(tmp_path):
    loaded = load_for_inference(llm_checkpoint(tmp_path))
    assert loaded.model.backbone.name == "tiny-random-gpt2"
    assert forecast_example(loaded)["forecast"].shape == (8, 7)

    with pytest.raises(CheckpointError, match="belongs to backbone 'tiny-random-gpt2'"):
        load_for_inference(llm_checkpoint(tmp_path, fingerprint="0" * 64))

    missing = tmp_path / "my-backbone"
    with pytest.raises(BackboneError) as err:
        load_for_inference(llm_checkpoint(tmp_path, backbone=str(missing)))
    message = str(err.value)
    assert "llm.pt was trained on the frozen backbone" in message
    assert str(missing) in message and "save_pretrained" in message


def test_loading_leaves_the_callers_random_state_alone(run):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    load_for_inference(run[0] / "checkpoints" / "best.pt")
    assert torch.equal(torch.rand(3), expected)


def test_loading_can_change_settings_that_leave_the_weights_alone(run):
    best = run[0] / "checkpoints" / "best.pt"
    loaded = load_for_inference(best, overrides=["data.eval_batch_size=5"])
    assert loaded.cfg.data.eval_batch_size == 5
    assert dataclasses.replace(loaded.cfg.data, eval_batch_size=64) == run[1].data
