"""Validation on a fixed, seeded subset of windows (data.val_subset); the test split whole."""

from __future__ import annotations

import json

import pytest
import torch
from trainer_helpers import tiny_config

from timellm_lib.cli import main as cli_main
from timellm_lib.config import ConfigError
from timellm_lib.data import build_datasets
from timellm_lib.data.sampler import fixed_subset
from timellm_lib.evaluation.inference import InferenceError, evaluate_checkpoint
from timellm_lib.evaluation.metrics import evaluate
from timellm_lib.models import build_model
from timellm_lib.training import train
from timellm_lib.training.metrics_log import read_metrics


def test_fixed_subset_is_seeded_sorted_and_whole_when_asked(tmp_path):
    val = build_datasets(tiny_config(tmp_path).data).val
    a, b = fixed_subset(val, 20, 0), fixed_subset(val, 20, 0)
    assert len(a) == 20 and torch.equal(a.indices, b.indices)
    assert torch.equal(a.indices, a.indices.sort().values)  # time order
    assert not torch.equal(a.indices, fixed_subset(val, 20, 1).indices)
    x, y = a.get_batch(torch.tensor([0, 5]))
    x0, y0 = val[int(a.indices[0])]
    assert torch.equal(x[0], x0) and torch.equal(y[0], y0)
    assert fixed_subset(val, 0, 0) is val and fixed_subset(val, len(val), 0) is val
    with pytest.raises(ConfigError, match="data.val_subset = -1 must not be negative"):
        tiny_config(tmp_path, "data.val_subset=-1")


def test_validation_scores_the_subset_and_test_stays_whole(tmp_path):
    cfg = tiny_config(tmp_path, "train.epochs=1", "data.val_subset=25", "data.val_subset_seed=7")
    datasets = build_datasets(cfg.data)
    model = build_model(cfg, datasets.n_in, datasets.n_out)
    result = train(cfg, run_dir=tmp_path / "run", progress=False, model=model, datasets=datasets)
    events = read_metrics(tmp_path / "run/metrics.jsonl")
    (val,) = [e for e in events if e["event"] == "val"]
    assert val["n_windows"] == 25
    # one validation, so best.pt (which model now holds) is the validated state
    subset = fixed_subset(datasets.val, 25, 7)
    assert evaluate(model, subset, 64)["mse"] == pytest.approx(val["val_loss"], rel=1e-12)
    assert evaluate(model, datasets.val, 64)["mse"] != pytest.approx(val["val_loss"], rel=1e-6)
    assert result.test["n_windows"] == len(datasets.test)


def test_eval_of_val_scores_the_windows_the_run_validated_on(tmp_path, capsys):
    """`timellm eval --split val` of best.pt gives the loss of the validation that saved it,
    on the run's data.val_subset; --whole-split scores every window into its own file."""
    cfg = tiny_config(tmp_path, "train.epochs=2", "data.val_subset=25", "data.val_subset_seed=7")
    train(cfg, run_dir=tmp_path / "run", progress=False)
    best = tmp_path / "run/checkpoints/best.pt"
    vals = [e for e in read_metrics(tmp_path / "run/metrics.jsonl") if e["event"] == "val"]
    saved_best = max((e for e in vals if e["improved"]), key=lambda e: e["global_step"])

    assert cli_main(["eval", "--ckpt", str(best), "--split", "val", "--json"]) == 0
    subset = json.loads(capsys.readouterr().out)
    assert (subset["n_windows"], subset["val_subset"]) == (25, 25)
    assert subset["mse"] == pytest.approx(saved_best["val_loss"], rel=1e-12)
    assert json.loads((tmp_path / "run/eval_val.json").read_text()) == subset

    argv = ["eval", "--ckpt", str(best), "--split", "val", "--whole-split", "--json"]
    assert cli_main(argv) == 0
    whole = json.loads(capsys.readouterr().out)
    n_val = len(build_datasets(cfg.data).val)
    assert (whole["n_windows"], whole["val_subset"]) == (n_val, 0) and n_val > 25
    assert whole["mse"] != pytest.approx(subset["mse"], rel=1e-6)
    assert json.loads((tmp_path / "run/eval_val_all.json").read_text()) == whole
    assert json.loads((tmp_path / "run/eval_val.json").read_text()) == subset  # untouched

    with pytest.raises(InferenceError, match="--whole-split applies to --split val"):
        evaluate_checkpoint(best, "test", whole_split=True)
