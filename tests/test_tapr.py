"""TAPR: shapes, gradients, threshold ordering, label layout and bins, trend fusion."""

from __future__ import annotations

import pytest
import torch
from model_helpers import TINY_MODEL

from timellm_lib.config import Config, load_config
from timellm_lib.data import build_datasets
from timellm_lib.models.params import model_params
from timellm_lib.models.tapr import (
    DOWN,
    FLAT,
    STRONG_DOWN,
    STRONG_UP,
    TAPR,
    UP,
    WEAK_DOWN,
    WEAK_UP,
    CoarseToFineHead,
    MultiScaleDecomposition,
    apply_trend_fusion,
    class_frequencies,
    fold_magnitude,
    fusion_adjustment,
    future_to_series,
    series_to_future,
    training_changes,
    trend_labels,
)
from timellm_lib.notebooks.tracing import trace_shapes
from timellm_lib.training import train
from timellm_lib.training.checkpoint import load_checkpoint

D_MODEL, LLM_DIM = 16, 24


def n_patches(seq_len: int, patch_len: int = 16, stride: int = 8) -> int:
    """Patch count of the Time-LLM patcher (replication padding of one stride at the end)."""
    return (seq_len - patch_len) // stride + 2


def make_inputs(batch: int, channels: int, seq_len: int, pred_len: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rows = batch * channels
    return (
        torch.randn(rows, n_patches(seq_len), D_MODEL, generator=g),
        torch.randn(rows, seq_len, generator=g).cumsum(-1),
        torch.randn(rows, pred_len, generator=g),
    )


@pytest.mark.parametrize(
    "batch,channels,seq_len,pred_len", [(2, 3, 64, 16), (1, 7, 96, 24), (4, 1, 512, 96)]
)
def test_output_shapes(batch: int, channels: int, seq_len: int, pred_len: int) -> None:
    torch.manual_seed(0)
    model = TAPR(D_MODEL, LLM_DIM, pred_len)
    patch_emb, series, future = make_inputs(batch, channels, seq_len, pred_len)
    rows, patches = batch * channels, patch_emb.shape[1]
    out = model(patch_emb, series)
    assert out.patch_out.shape == out.trend.shape == (rows, patches, D_MODEL)
    assert len(out.scale_trends) == 3
    assert all(t.shape == (rows, patches, D_MODEL) for t in out.scale_trends)
    assert out.trend_token.shape == (rows, 1, LLM_DIM)
    assert out.direction_logits.shape == (rows, 3)
    assert out.magnitude_logits.shape == (rows, 4)
    assert out.regression.shape == out.gate.shape == (rows,)
    assert out.adjustment.shape == (rows, pred_len)
    total, parts, diagnostics = model.loss(out, series, future, lambda_trend=0.5)
    assert total.dim() == 0 and torch.isfinite(total)
    assert set(parts) == {"tapr_direction", "tapr_magnitude", "tapr_hierarchy", "tapr_regression"}
    assert 0.0 <= diagnostics["tapr_direction_accuracy"] <= 1.0
    assert 0.0 <= diagnostics["tapr_magnitude_accuracy"] <= 1.0


@pytest.mark.parametrize("patches", [1, 2, 3, 5])
def test_decomposition_handles_patch_sequences_shorter_than_the_kernels(patches: int) -> None:
    dm = MultiScaleDecomposition(8, n_scales=4, n_heads=2)  # kernels 1, 4, 16, 64
    assert dm.kernels == (1, 4, 16, 64)
    out, trend, trends = dm(torch.randn(3, patches, 8))
    assert out.shape == trend.shape == (3, patches, 8)
    assert len(trends) == 4 and torch.isfinite(out).all()


def test_every_parameter_gets_a_finite_gradient() -> None:
    torch.manual_seed(0)
    model = TAPR(D_MODEL, LLM_DIM, 16)
    patch_emb, series, future = make_inputs(2, 3, 64, 16)
    out = model(patch_emb, series)
    total, _, _ = model.loss(out, series, future)
    (out.patch_out.sum() + out.trend_token.sum() + out.adjustment.sum() + total).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    broken = [
        n
        for n, p in model.named_parameters()
        if p.grad is not None and not torch.isfinite(p.grad).all()
    ]
    assert not missing and not broken, (missing, broken)
    assert model.head.threshold_steps.grad.abs().sum() > 0  # thresholds really learn


def test_thresholds_stay_ordered_under_adversarial_large_steps() -> None:
    torch.manual_seed(0)
    model = TAPR(D_MODEL, LLM_DIM, 16)
    patch_emb, series, future = make_inputs(2, 3, 64, 16)
    # lr 1.0 on the threshold parameters (the rest of the network would diverge at that rate)
    optimizer = torch.optim.Adam([model.head.threshold_base, model.head.threshold_steps], lr=1.0)
    # pulls t1 and t3 up, t2 and t4 down: an unconstrained vector would cross at once
    push = torch.tensor([-1e4, 1e4, -1e4, 1e4])
    start = model.thresholds.detach().clone()
    for _ in range(50):
        optimizer.zero_grad()
        out = model(patch_emb, series)
        total, _, _ = model.loss(out, series, future)
        (total + (model.thresholds * push).sum()).backward()
        optimizer.step()
        t = model.thresholds.detach()
        assert torch.isfinite(t).all()
        assert (t.diff() > 0).all(), t
    assert (model.thresholds.detach() - start).abs().max() > 1.0  # they did move a lot


def test_future_layout_matches_a_per_sample_loop() -> None:
    g = torch.Generator().manual_seed(1)
    batch, channels, seq_len, pred_len = 3, 4, 32, 8
    x = torch.randn(batch, seq_len, channels, generator=g).cumsum(1)
    y = torch.randn(batch, pred_len, channels, generator=g) * 3
    series = x.permute(0, 2, 1).reshape(batch * channels, seq_len)
    future = future_to_series(y)
    thresholds = torch.tensor([-0.5, -0.1, 0.1, 0.5])
    labels = trend_labels(series, future, thresholds)
    for b in range(batch):
        for n in range(channels):
            one = trend_labels(x[b, :, n][None], y[b, :, n][None], thresholds)
            row = b * channels + n
            assert torch.equal(future[row], y[b, :, n])
            torch.testing.assert_close(labels.change[row], one.change[0])
            assert labels.direction[row] == one.direction[0]
            assert labels.magnitude[row] == one.magnitude[0]
    naive = trend_labels(series, y.reshape(batch * channels, pred_len), thresholds)
    assert not torch.equal(naive.change, labels.change)  # the plain reshape is wrong
    assert torch.equal(series_to_future(future, batch), y)


def test_loss_rejects_a_future_in_batch_layout() -> None:
    model = TAPR(D_MODEL, LLM_DIM, 16)
    patch_emb, series, _ = make_inputs(2, 3, 64, 16)
    out = model(patch_emb, series)
    with pytest.raises(ValueError, match="future_to_series"):
        model.loss(out, series, torch.randn(2, 16, 3))


def test_label_bins_around_the_thresholds() -> None:
    # alternating -1, 1: mean 0, mean absolute deviation 1, last value 1
    window = torch.tensor([-1.0, 1.0]).repeat(8)
    changes = torch.tensor([-0.05, -0.01, -0.001, 0.001, 0.01, 0.05])
    series = window.expand(len(changes), -1)
    future = (1.0 + changes * (1.0 + 1e-5)).unsqueeze(-1).expand(-1, 4)
    labels = trend_labels(series, future, torch.tensor([-0.02, -0.005, 0.005, 0.02]))
    torch.testing.assert_close(labels.change, changes)
    assert labels.direction.tolist() == [DOWN, DOWN, FLAT, FLAT, UP, UP]
    assert labels.magnitude.tolist() == [
        STRONG_DOWN,
        WEAK_DOWN,
        WEAK_DOWN,
        WEAK_UP,
        WEAK_UP,
        STRONG_UP,
    ]


def test_labels_are_invariant_to_instance_normalisation() -> None:
    g = torch.Generator().manual_seed(2)
    series, future = torch.randn(5, 20, generator=g), torch.randn(5, 6, generator=g)
    mean, std = series.mean(-1, keepdim=True), series.std(-1, keepdim=True)
    thresholds = torch.tensor([-0.3, -0.1, 0.1, 0.3])
    raw = trend_labels(series * 7 + 3, future * 7 + 3, thresholds)
    normalised = trend_labels((series - mean) / std, (future - mean) / std, thresholds)
    assert torch.equal(raw.direction, normalised.direction)
    torch.testing.assert_close(raw.change, normalised.change, rtol=1e-4, atol=1e-4)


def test_magnitude_folding_follows_the_flat_band_share() -> None:
    thresholds = torch.tensor([-0.02, -0.005, 0.005, 0.02])
    folded = fold_magnitude(torch.eye(4), thresholds)  # one row per pure magnitude class
    expected = torch.tensor(
        [[1.0, 0.0, 0.0], [0.75, 0.0, 0.25], [0.0, 0.75, 0.25], [0.0, 1.0, 0.0]]
    )  # weak up spans [0, 0.02], of which [0, 0.005] is flat
    torch.testing.assert_close(folded, expected)


def test_hierarchy_loss_vanishes_for_consistent_predictions() -> None:
    torch.manual_seed(0)
    model = TAPR(D_MODEL, LLM_DIM, 16)
    patch_emb, series, future = make_inputs(2, 3, 64, 16)
    out = model(patch_emb, series)
    folded = fold_magnitude(torch.softmax(out.magnitude_logits, -1), model.thresholds)
    out.direction_logits = folded.log()
    _, parts, _ = model.loss(out, series, future)
    assert parts["tapr_hierarchy"].abs() < 1e-6


def test_trend_fusion_is_pure_and_maps_rows_to_channels() -> None:
    g = torch.Generator().manual_seed(3)
    batch, horizon, channels = 2, 5, 3
    pred = torch.randn(batch, horizon, channels, generator=g)
    adjustment = torch.rand(batch * channels, horizon, generator=g) - 0.5
    before = pred.clone()
    fused = apply_trend_fusion(pred, adjustment)
    assert torch.equal(pred, before)
    for b in range(batch):
        for c in range(channels):
            expected = pred[b, :, c] * (1 + adjustment[b * channels + c])
            torch.testing.assert_close(fused[b, :, c], expected)
    with pytest.raises(ValueError, match="does not fit"):
        apply_trend_fusion(pred, adjustment[:, :-1])

    reference = torch.randn(batch * channels, generator=g)  # last input value of each row
    fused = apply_trend_fusion(pred, adjustment, reference)
    for b in range(batch):
        for c in range(channels):
            row = b * channels + c
            distance = (pred[b, :, c] - reference[row]).abs()
            expected = pred[b, :, c] + adjustment[row] * distance
            torch.testing.assert_close(fused[b, :, c], expected)


def test_fusion_adjustment_is_ramped_and_bounded() -> None:
    regression = torch.tensor([-50.0, -0.3, 0.0, 0.4, 50.0])
    gate = torch.full((5,), 0.49)
    adjustment = fusion_adjustment(regression, gate, 7)
    assert adjustment.shape == (5, 7)
    assert torch.equal(adjustment[:, 0], torch.zeros(5))
    torch.testing.assert_close(adjustment[:, -1], gate * torch.tanh(regression))
    assert adjustment.abs().max() < 0.5
    steps = adjustment[1].diff()
    torch.testing.assert_close(steps, steps[:1].expand_as(steps))  # linear in the step


def test_same_seed_gives_same_outputs() -> None:
    patch_emb, series, _ = make_inputs(2, 3, 64, 16)

    def run(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        out = TAPR(D_MODEL, LLM_DIM, 16)(patch_emb, series)
        return torch.cat(
            [out.patch_out.flatten(), out.trend_token.flatten(), out.adjustment.flatten()]
        )

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


def test_from_config_uses_model_settings() -> None:
    cfg = Config()
    cfg.model.use_tapr, cfg.model.n_scales, cfg.data.pred_len = True, 2, 12
    model = TAPR.from_params(model_params(cfg).tapr, llm_dim=20)
    assert model.decomposition.kernels == (1, 4)
    out = model(torch.randn(2, n_patches(64), cfg.model.d_model), torch.randn(2, 64))
    assert out.trend_token.shape == (2, 1, 20) and out.adjustment.shape == (2, 12)
    cfg.model.trend_thresholds = [-0.4, -0.1, 0.1, 0.4]
    configured = TAPR.from_params(model_params(cfg).tapr, llm_dim=20).thresholds
    assert torch.allclose(configured, torch.tensor([-0.4, -0.1, 0.1, 0.4]))


def test_head_learns_the_direction_of_clear_trends() -> None:
    """On series with clear linear trends that continue, direction accuracy rises well above chance."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(4)
    rows, seq_len, pred_len = 96, 32, 8
    slope = torch.randn(rows, 1, generator=g)
    t = torch.arange(seq_len + pred_len, dtype=torch.float32)
    full = slope * t / seq_len + 0.05 * torch.randn(rows, seq_len + pred_len, generator=g)
    series, future = full[:, :seq_len], full[:, seq_len:]
    patch_emb = torch.randn(rows, n_patches(seq_len), 8, generator=g)
    model = TAPR(
        8, 8, pred_len, n_scales=2, n_heads=2, d_hidden=32, thresholds_init=(-1.0, -0.2, 0.2, 1.0)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(80):
        optimizer.zero_grad()
        out = model(patch_emb, series)
        total, _, diagnostics = model.loss(out, series, future)
        total.backward()
        optimizer.step()
    assert diagnostics["tapr_direction_accuracy"] > 0.9


def test_default_thresholds_spread_the_classes_of_real_etth1_training_series(etth1_path, tmp_path):
    """The trainer sets auto thresholds from the training labels when a run starts (stored
    in the checkpoint): on ETTh1 at seq 96 every direction holds about a third of the
    training series and every magnitude class at least a sixth (the design's relative-change
    values left 0.4% flat), and ``timellm trace`` reports those shares."""
    overrides = [
        "data.source=ett",
        f"data.path={etth1_path}",
        "data.seq_len=96",
        "data.pred_len=24",
        "data.batch_size=4",
        "model.use_tapr=true",
        "train.epochs=1",
        "train.device=cpu",
        *[f"model.{k}={v}" for k, v in TINY_MODEL.items()],
    ]
    cfg = load_config(overrides=overrides)
    train(cfg, run_dir=tmp_path / "run", max_steps=1, progress=False)
    weights = load_checkpoint(tmp_path / "run/checkpoints/step_00000001.pt")["model"]
    head = CoarseToFineHead(8, 8)
    head.threshold_base.data.copy_(weights["tapr.head.threshold_base"])
    head.threshold_steps.data.copy_(weights["tapr.head.threshold_steps"])
    datasets = build_datasets(cfg.data)
    changes = training_changes(datasets.train)
    shares = class_frequencies(changes, head.thresholds.detach())
    assert all(0.3 < s < 0.37 for s in shares["direction"].values()), shares
    assert all(s > 0.15 for s in shares["magnitude"].values()), shares

    row = next(r for r in trace_shapes(cfg, batch_size=2) if r["stage"] == "TAPR labels")
    assert row["shape"] == [changes.numel()]
    assert "thresholds auto" in row["note"] and "flat 33." in row["note"]
