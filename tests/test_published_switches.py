"""The "as published" switches of the README's Models table added after the first ones, and
the config that sets every published value: prompt lags, prompt padding, features MS and the
test and validation metrics. Each
default keeps what the project computed before; each published value does what the
published code (KimMeen/Time-LLM) does."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from model_helpers import TINY_MODEL
from trainer_helpers import (
    REPO_ROOT,
    assert_same_run,
    cli,
    set_args,
    tiny_config,
    tiny_overrides,
)

from timellm_lib.config import ConfigError, config_from_dict, load_config
from timellm_lib.data import build_datasets
from timellm_lib.data.sampler import Shard
from timellm_lib.errors import WorkbenchError
from timellm_lib.evaluation.inference import (
    evaluate_checkpoint,
    evaluate_loaded,
    load_for_inference,
)
from timellm_lib.evaluation.metrics import (
    SeriesErrors,
    evaluate,
    forecasts,
    published_metric,
)
from timellm_lib.models import build_model, model_params
from timellm_lib.models.layers import RevIN
from timellm_lib.models.prompt import prompt_head, prompt_statistics, prompt_tails
from timellm_lib.models.timellm import TimeLLM
from timellm_lib.training import TrainingError, train
from timellm_lib.training.checkpoint import CheckpointError
from timellm_lib.training.metrics_log import read_metrics

SEQ = 32


def tiny_timellm(**model: object) -> TimeLLM:
    """A one-channel Time-LLM on the tiny random GPT-2 (eval mode, no dropout)."""
    data = {"seq_len": SEQ, "label_len": 8, "pred_len": 8, "features": "M"}
    hp = model_params(config_from_dict({"data": data, "model": {**TINY_MODEL, **model}}))
    torch.manual_seed(0)
    return TimeLLM(hp, 1, 1).eval()


# ------------------------------------------------------------------------- prompt lags


def published_lags(series: np.ndarray, k: int) -> list[int]:
    """The published rule by hand: circular autocorrelation by direct sums, top k over
    every lag 0..T-1 (even T)."""
    length = len(series)
    corr = np.array([np.dot(series, np.roll(series, -lag)) for lag in range(length)])
    return list(np.argsort(-corr, kind="stable")[:k])


def test_published_lags_are_the_published_rule_with_lag_zero_and_mirrors():
    t = np.arange(SEQ)
    rng = np.random.default_rng(1)
    series = (
        np.sin(2 * np.pi * t / 8) + 0.5 * np.sin(2 * np.pi * t / 5) + 0.1 * rng.normal(size=SEQ)
    )
    x = torch.tensor(series, dtype=torch.float32).unsqueeze(0)
    got = prompt_statistics(x, top_k_lags=5, lags="published")["lags"][0].tolist()
    expected = published_lags(series, 5)
    assert got[0] == expected[0] == 0  # lag 0 is always the largest
    # lags l and T-l have the same autocorrelation: their order is float rounding
    assert sorted(got) == sorted(expected)
    assert any(SEQ - lag in got for lag in got if lag)  # a mirrored pair is in
    # the default keeps lags 1..T/2, lag 0 and mirrors out
    distinct = prompt_statistics(x, top_k_lags=5)["lags"][0].tolist()
    assert 0 not in distinct and all(1 <= lag <= SEQ // 2 for lag in distinct)
    # and the prompt the model writes shows the published lags
    model = tiny_timellm(prompt_lags="published")
    tail = prompt_tails(prompt_statistics(x, 5, "published"), model.hp.prompt)[0]
    assert f"top 5 lags are : {got}" in tail


# ----------------------------------------------------------------------- prompt padding


def two_series_with_prompts_of_different_length(model: TimeLLM) -> tuple[torch.Tensor, int]:
    """Two normalised-input series [2, SEQ, 1] and the row whose prompt has fewer tokens."""
    gen = torch.Generator().manual_seed(3)
    x = torch.stack([torch.randn(SEQ, generator=gen), torch.linspace(0, 1, SEQ)]).unsqueeze(-1)
    series = RevIN()(x)[0].squeeze(-1)
    tails = prompt_tails(prompt_statistics(series, 5, model.hp.prompt.lags), model.hp.prompt)
    tok = model.backbone.tokenizer
    lengths = [len(tok(prompt_head(model.hp.prompt) + tail)["input_ids"]) for tail in tails]
    assert lengths[0] != lengths[1]
    return x, int(np.argmin(lengths))


def test_published_padding_pads_as_the_published_tokenizer_call():
    model = tiny_timellm(prompt_padding="published", prompt_format="published")
    x, _ = two_series_with_prompts_of_different_length(model)
    series = RevIN()(x)[0].squeeze(-1)
    tails = prompt_tails(prompt_statistics(series, 5), model.hp.prompt)
    texts = [prompt_head(model.hp.prompt) + tail for tail in tails]
    # the published call: the tokenizer's own side, eos as pad, padding=True, no mask used
    own = copy.deepcopy(model.backbone.tokenizer)
    own.padding_side = model.backbone.own_padding_side
    own.pad_token = own.eos_token
    expected = own(texts, return_tensors="pt", padding=True)["input_ids"]
    ids = model.prompt_tokenizer.unmasked(tails)
    assert torch.equal(ids.tail, expected)
    assert ids.head.numel() == 0 and bool(ids.tail_mask.all())
    assert model.backbone.own_padding_side == "right"  # pads between prompt and patches


@pytest.mark.parametrize("padding", ["masked", "published"])
def test_pad_tokens_change_the_forecast_only_under_published_padding(padding):
    model = tiny_timellm(prompt_padding=padding, prompt_format="published")
    x, short = two_series_with_prompts_of_different_length(model)
    with torch.no_grad():
        together = model(x).pred[short]
        alone = model(x[short : short + 1]).pred[0]
    if padding == "masked":
        torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
        assert model.speed_paths()["model.prefix_cache"] == "on"
    else:
        assert (together - alone).abs().max() > 1e-4  # attended pads move the forecast
        assert model.speed_paths()["model.prefix_cache"].startswith(
            "not applicable: model.prompt_padding = published"
        )
        assert not model.caches_prefix(None)


# ------------------------------------------------------------------------- features MS


def test_published_ms_trains_and_scores_every_channel_as_m(tmp_path):
    """features MS with ms_mode published: the run of features M, bit for bit, channel
    samples allowed; the published test metric is reported in eval_test.json."""
    extra = ["data.sample_unit=channel", "data.test_metric=published", "train.epochs=1"]
    ms = tiny_config(tmp_path, "data.features=MS", "data.ms_mode=published", *extra)
    m = tiny_config(tmp_path, "data.features=M", *extra)
    datasets = build_datasets(ms.data)
    assert datasets.n_out == datasets.n_in > 1 and datasets.columns_out == datasets.columns_in
    results = [
        train(cfg, run_dir=tmp_path / name, progress=False) for name, cfg in [("a", ms), ("b", m)]
    ]
    assert results[0].test == results[1].test
    test = json.loads((tmp_path / "a" / "eval_test.json").read_text())
    assert test["test_metric"] == "published" and test["n_series_dropped"] >= 0
    # timellm eval scores best.pt the same way
    again = evaluate_checkpoint(tmp_path / "a" / "checkpoints" / "best.pt", write=False)
    assert again["mse"] == pytest.approx(test["mse"], rel=1e-9)
    assert again["n_series_dropped"] == test["n_series_dropped"]


def test_ms_with_channel_samples_needs_the_published_ms_mode(tmp_path):
    with pytest.raises(ConfigError, match="data.ms_mode=published"):
        tiny_config(tmp_path, "data.features=MS", "data.sample_unit=channel")
    done = cli(
        "train", "--run-dir", str(tmp_path / "r"), "--set", "data.ms_mode=both", cwd=tmp_path
    )
    assert done.returncode == 2 and "data.ms_mode" in done.stderr


# ------------------------------------------------------------------------- test metric


def channel_major_errors(model, dataset) -> np.ndarray:
    """Forecast errors of every series by hand, [C*W, H]: channel-major, as the published
    loaders serve them."""
    x, y = dataset.get_batch(torch.arange(len(dataset)))
    with torch.no_grad():
        pred = model.eval()(x)
        pred = getattr(pred, "pred", pred).double().numpy()
    return (pred - y.double().numpy()).transpose(2, 0, 1).reshape(-1, y.shape[1])


def channel_major_scores(model, dataset, batch: int) -> tuple[float, float, int]:
    """The published test loop by hand: series channel-major, batches of ``batch``,
    drop_last, mean of batch means."""
    err = channel_major_errors(model, dataset)
    n_batches = len(err) // batch
    mse = np.mean([np.mean(err[b * batch : (b + 1) * batch] ** 2) for b in range(n_batches)])
    mae = np.mean([np.mean(np.abs(err[b * batch : (b + 1) * batch])) for b in range(n_batches)])
    return float(mse), float(mae), len(err) - n_batches * batch


def test_published_test_metric_on_etth1_drops_the_last_incomplete_batch(etth1_path):
    cfg = load_config(
        REPO_ROOT / "configs/etth1_512_96_published.yaml",
        [f"data.path={etth1_path}", "model.name=mlp", "train.device=cpu"],
    )
    datasets = build_datasets(cfg.data)
    metric = published_metric(cfg, datasets.n_out, "test", global_step=0)
    batch = metric.series_per_batch
    assert batch == 192
    series = len(datasets.test) * datasets.n_out
    assert series % batch != 0
    torch.manual_seed(0)
    model = build_model(cfg, datasets.n_in, datasets.n_out)
    published = evaluate(model, datasets.test, 256, published=metric)
    every = evaluate(model, datasets.test, 256)
    mse, mae, dropped = channel_major_scores(model, datasets.test, batch)
    assert published["mse"] == pytest.approx(mse, rel=1e-9)
    assert published["mae"] == pytest.approx(mae, rel=1e-9)
    assert published["n_series_dropped"] == dropped == series % batch
    assert published["n_series"] == series and published["n_windows"] == every["n_windows"]
    assert abs(published["mse"] - every["mse"]) > 1e-6
    assert "n_series_dropped" not in every  # the default report is unchanged


# ------------------------------------------------------------------- validation metric

VAL_PUBLISHED = ("data.sample_unit=channel", "data.val_metric=published", "train.epochs=2")


def test_published_validation_shuffles_anew_and_drops_the_last_incomplete_batch(tmp_path):
    """Each validation: the series in the order drawn from (train.seed, global step), batches
    of one training batch, the last incomplete one dropped, the mean over the kept series;
    by hand from each epoch's step checkpoint. ``timellm eval --split val`` of best.pt
    draws the order of the validation that saved it, so it gives that validation's loss."""
    cfg = tiny_config(tmp_path, *VAL_PUBLISHED)
    train(cfg, run_dir=tmp_path / "run", progress=False)
    vals = [e for e in read_metrics(tmp_path / "run/metrics.jsonl") if e["event"] == "val"]
    assert len(vals) == 2
    batch = published_metric(cfg, 1, "val", global_step=0).series_per_batch
    dropped = []
    for event in vals:
        step = event["global_step"]
        loaded = load_for_inference(tmp_path / f"run/checkpoints/step_{step:08d}.pt")
        err = channel_major_errors(loaded.model, loaded.datasets.val)
        kept = len(err) // batch * batch
        assert event["n_series_dropped"] == len(err) - kept > 0
        order = np.random.default_rng([cfg.train.seed, step]).permutation(len(err))
        assert event["val_loss"] == pytest.approx(np.mean(err[order[:kept]] ** 2), rel=1e-9)
        assert event["val_mae"] == pytest.approx(np.mean(np.abs(err[order[:kept]])), rel=1e-9)
        assert event["val_loss"] != pytest.approx(np.mean(err**2), rel=1e-9)
        dropped.append(set(order[kept:]))
    assert dropped[0] != dropped[1]  # a new shuffle at every validation
    best = max((e for e in vals if e["improved"]), key=lambda e: e["global_step"])
    again = evaluate_checkpoint(tmp_path / "run/checkpoints/best.pt", split="val", write=False)
    assert again["mse"] == pytest.approx(best["val_loss"], rel=1e-9)
    assert again["val_metric"] == "published"


def test_a_run_with_the_published_validation_resumes_bit_identically(tmp_path):
    overrides = tiny_overrides(tmp_path, *VAL_PUBLISHED)
    done = [
        cli("train", "--run-dir", str(tmp_path / name), *set_args(overrides), *extra, cwd=tmp_path)
        for name, extra in [("reference", []), ("resumed", ["--max-steps", "5"])]
    ]
    assert all(d.returncode == 0 for d in done), [d.stderr for d in done]
    resumed = cli("train", "--run-dir", str(tmp_path / "resumed"), "--resume", "auto", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(tmp_path / "resumed", tmp_path / "reference")


def test_the_test_split_after_every_epoch_is_a_report_that_changes_nothing(tmp_path):
    """train.test_every_epoch logs what the published code prints after each epoch: the
    test score of the weights validation scored. The run is the same run, bit for bit, and
    the epoch of best.pt has best.pt's test score."""
    runs = {
        name: train(tiny_config(tmp_path, *extra), run_dir=tmp_path / name, progress=False)
        for name, extra in [("plain", []), ("reported", ["train.test_every_epoch=true"])]
    }
    assert_same_run(tmp_path / "reported", tmp_path / "plain")
    events = read_metrics(tmp_path / "reported/metrics.jsonl")
    tests = [e for e in events if e["event"] == "epoch_test"]
    vals = [e for e in events if e["event"] == "val"]
    assert [e["global_step"] for e in tests] == [e["global_step"] for e in vals]
    assert len(tests) == 3 and len({e["test_mse"] for e in tests}) == 3
    at_best = next(
        e for e in tests if e["global_step"] == runs["reported"].test["checkpoint_global_step"]
    )
    assert at_best["test_mse"] == pytest.approx(runs["reported"].test["mse"], rel=1e-9)
    assert at_best["test_mae"] == pytest.approx(runs["reported"].test["mae"], rel=1e-9)


# --------------------------------------------------------------- published config, resume


def test_the_published_config_sets_every_published_switch():
    cfg = load_config(REPO_ROOT / "configs/etth1_512_96_published.yaml")
    base = load_config(REPO_ROOT / "configs/etth1_512_96.yaml")
    assert (cfg.data.sample_unit, cfg.data.batch_size) == ("channel", 192)
    assert cfg.data.ms_mode == "published" and cfg.data.test_metric == "published"
    assert cfg.data.val_metric == "published"
    assert cfg.train.scheduler == "published_type1"
    assert cfg.train.test_every_epoch
    m = cfg.model
    assert m.dropout == 0.1 and m.backbone_dropout
    assert (m.prompt_format, m.prompt_lags, m.prompt_padding) == ("published",) * 3
    # epochs, patience, precision and backbone stay those of the protocol config
    assert (cfg.train.epochs, cfg.train.patience, cfg.train.amp, m.backbone) == (
        base.train.epochs,
        base.train.patience,
        base.train.amp,
        base.model.backbone,
    )
    # the base config keeps the project's defaults for the four new switches
    assert (base.model.prompt_lags, base.model.prompt_padding) == ("distinct", "masked")
    assert (base.data.ms_mode, base.data.test_metric) == ("target", "every_window")
    assert base.data.val_metric == "every_window"


@pytest.mark.parametrize(
    "key",
    ["model.prompt_lags", "model.prompt_padding", "data.ms_mode", "data.test_metric"]
    + ["data.val_metric"],
)
def test_unknown_values_of_the_new_keys_are_refused(key):
    with pytest.raises(ConfigError, match=f"{key} = 'exact' is not allowed"):
        load_config(None, [f"{key}=exact"])


def test_resume_refuses_a_changed_prompt_lags(tmp_path):
    cfg = tiny_config(tmp_path)
    train(cfg, run_dir=tmp_path / "run", max_steps=3, progress=False)
    changed = tiny_config(tmp_path, "model.prompt_lags=published")
    with pytest.raises(CheckpointError, match="model.prompt_lags"):
        train(changed, run_dir=tmp_path / "run", resume="auto", progress=False)


def test_published_metric_of_shards_equals_the_whole_split(tmp_path):
    """A distributed test: each rank scores its contiguous shard and places its errors at
    their window positions; the element-wise sum over ranks is the whole split's."""
    cfg = tiny_config(tmp_path, "data.sample_unit=channel", "data.test_metric=published")
    datasets = build_datasets(cfg.data)
    torch.manual_seed(0)
    model = build_model(cfg, datasets.n_in, datasets.n_out)
    metric = published_metric(cfg, datasets.n_out, "test", global_step=0)
    whole = evaluate(model, datasets.test, 64, published=metric)
    placed = []
    for rank in range(2):
        errors = SeriesErrors()
        for pred, y in forecasts(model, Shard(datasets.test, rank, 2), 64):
            errors.add(pred, y)
        errors.combine(lambda a: a, Shard(datasets.test, rank, 2).start, len(datasets.test))
        placed.append(errors)
    merged = SeriesErrors()
    merged.sse = [placed[0].sse[0] + placed[1].sse[0]]
    merged.sae = [placed[0].sae[0] + placed[1].sae[0]]
    merged.horizon = placed[0].horizon
    got = merged.published(metric)
    assert (got["mse"], got["mae"]) == pytest.approx((whole["mse"], whole["mae"]), rel=1e-12)
    assert {k: v for k, v in got.items() if k not in ("mse", "mae")} == {
        k: v for k, v in whole.items() if k not in ("mse", "mae")
    }
    assert (
        whole["n_series_dropped"] == len(datasets.test) * datasets.n_out % metric.series_per_batch
    )


@pytest.mark.parametrize(
    "extra",
    [
        ("data.batch_size=200", "data.test_metric=published"),
        ("data.val_metric=published", "data.val_subset=2"),
    ],
)
def test_a_published_metric_that_would_drop_every_series_is_refused_before_training(
    tmp_path, extra
):
    """Found at the start, not when the first validation or the final test runs."""
    split = "test" if "data.test_metric=published" in extra else "val"
    with pytest.raises(TrainingError, match=f"data.{split}_metric = published drops every {split}"):
        train(tiny_config(tmp_path, *extra), run_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run/checkpoints").exists()


def test_a_checkpoint_scored_with_a_published_metric_that_drops_every_series_is_a_sentence(
    tmp_path,
):
    """A run trained with every_window, its checkpoint scored as published."""
    train(tiny_config(tmp_path, "data.batch_size=200"), run_dir=tmp_path / "ok", progress=False)
    loaded = load_for_inference(
        tmp_path / "ok/checkpoints/best.pt", overrides=["data.test_metric=published"]
    )
    with pytest.raises(WorkbenchError, match="drops every test series"):
        evaluate_loaded(loaded, "test", write=False)
