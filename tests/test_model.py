"""Baseline Time-LLM: shapes, RevIN, patching, prompts, masking, frozen backbone, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_helpers import TINY_MODEL, whole_prompts

from timellm_lib.config import Config, ConfigError, config_from_dict
from timellm_lib.models import build_model
from timellm_lib.models.layers import Patching, RevIN, n_patches
from timellm_lib.models.params import model_params
from timellm_lib.models.prompt import prompt_statistics
from timellm_lib.models.timellm import TimeLLM

SEQ, PRED = 32, 8


def small_cfg(features: str = "M", **model: object) -> Config:
    """Tiny sizes: P = (32 - 8)//4 + 2 = 8 patches, d_ff 16 <= llm_dim 128, no dropout."""
    settings = {
        **TINY_MODEL,
        **model,
    }
    data = {"seq_len": SEQ, "label_len": 8, "pred_len": PRED, "features": features}
    return config_from_dict({"data": data, "model": settings})


def seeded_model(cfg: Config, n_in: int, n_out: int, seed: int = 0) -> TimeLLM:
    torch.manual_seed(seed)
    return TimeLLM(model_params(cfg), n_in, n_out)


@pytest.mark.parametrize("features, n_in, n_out", [("M", 3, 3), ("S", 1, 1), ("MS", 3, 1)])
def test_output_shapes(features, n_in, n_out):
    model = build_model(small_cfg(features), n_in, n_out)
    pred = model(torch.randn(4, SEQ, n_in)).pred
    assert pred.shape == (4, PRED, n_out) and torch.isfinite(pred).all()


def test_ms_starts_as_the_target_channel_of_the_channel_independent_forecast():
    x = torch.randn(2, SEQ, 3) * torch.tensor([1.0, 5.0, 0.2]) + torch.tensor([0.0, 10.0, -3.0])
    m_pred = seeded_model(small_cfg("M"), 3, 3).eval()(x).pred
    ms_model = seeded_model(small_cfg("MS"), 3, 1).eval()
    assert ms_model.channel_mixing.weight.tolist() == [[0.0, 0.0, 1.0]]  # target = last column
    torch.testing.assert_close(ms_model(x).pred, m_pred[..., 2:], rtol=0, atol=1e-5)


def test_wrong_channel_counts_and_too_wide_d_ff_are_rejected():
    with pytest.raises(ConfigError, match="MS"):
        TimeLLM(model_params(small_cfg("M")), 3, 1)
    with pytest.raises(ConfigError, match="d_ff"):
        TimeLLM(model_params(small_cfg("M", d_ff=256)), 3, 3)  # tiny-random-gpt2 is 128 wide
    model = TimeLLM(model_params(small_cfg("M")), 3, 3)
    with pytest.raises(ValueError, match="seq_len=32"):
        model(torch.randn(2, SEQ + 1, 3))


def test_revin_round_trip():
    x = torch.randn(3, 50, 4, dtype=torch.float64) * 7 + 100
    x_norm, mean, std = RevIN()(x)
    torch.testing.assert_close(RevIN.denormalize(x_norm, mean, std), x)
    torch.testing.assert_close(x_norm.mean(1), torch.zeros(3, 4, dtype=torch.float64))
    torch.testing.assert_close(x_norm.std(1, unbiased=False), torch.ones(3, 4, dtype=torch.float64))


@pytest.mark.parametrize(
    "seq_len, patch_len, stride, expected",
    [(512, 16, 8, 64), (96, 16, 8, 12), (32, 8, 4, 8), (33, 8, 5, 7), (16, 16, 16, 2)],
)
def test_patch_count(seq_len, patch_len, stride, expected):
    x = torch.randn(5, seq_len)
    patches = Patching(patch_len, stride)(x)
    assert n_patches(seq_len, patch_len, stride) == expected
    assert patches.shape == (5, expected, patch_len)
    torch.testing.assert_close(patches[:, 0], x[:, :patch_len])
    torch.testing.assert_close(patches[:, -1, -1], x[:, -1])  # padding repeats the last value


def reference_statistics(row: np.ndarray, k: int) -> dict:
    """Straightforward per-series statistics: direct (not FFT) circular autocorrelation."""
    length = len(row)
    autocorr = [float(np.dot(row, np.roll(row, -lag))) for lag in range(1, length // 2 + 1)]
    order = sorted(range(len(autocorr)), key=lambda i: -autocorr[i])
    return {
        "min": row.min(),
        "max": row.max(),
        "median": np.sort(row)[(length - 1) // 2],  # lower median, as torch.median
        "trend": float(np.sum(np.diff(row))),
        "lags": [i + 1 for i in order[:k]],
    }


@pytest.mark.parametrize("length", [37, 48])
def test_prompt_statistics_match_a_per_series_reference(length):
    x = torch.randn(6, length, generator=torch.Generator().manual_seed(length))
    x = x + torch.sin(torch.arange(length) * 2 * torch.pi / 7)  # a period-7 component
    stats = prompt_statistics(x, top_k_lags=5)
    for i, row in enumerate(x.double().numpy()):
        ref = reference_statistics(row, 5)
        for key in ("min", "max", "median", "trend"):
            assert stats[key][i].item() == pytest.approx(ref[key], abs=1e-5), key
        assert stats["lags"][i].tolist() == ref["lags"]
        assert 0 not in ref["lags"] and max(ref["lags"]) <= length // 2


def test_published_prompt_text_and_compact_prompts_are_shorter():
    cfg = small_cfg(prompt_format="published", description="Toy data. ")
    stats = {
        "min": torch.tensor([0.1]),
        "max": torch.tensor([2.5]),
        "median": torch.tensor([-0.3]),
        "trend": torch.tensor([-1.0]),
        "lags": torch.tensor([[7, 14, 1, 3, 16]]),
    }
    (text,) = whole_prompts(stats, model_params(cfg).prompt)
    assert text == (
        "<|start_prompt|>Dataset description: Toy data. Task description: forecast the next 8 "
        "steps given the previous 32 steps information; Input statistics: min value "
        "0.10000000149011612, max value 2.5, median value -0.30000001192092896, the trend of "
        "input is downward, top 5 lags are : [7, 14, 1, 3, 16]<|<end_prompt>|>"
    )
    compact_cfg = small_cfg(prompt_format="compact", description="Toy data. ")
    assert (
        "min value 0.1, max value 2.5, median value -0.3, "
        in whole_prompts(stats, model_params(compact_cfg).prompt)[0]
    )
    random_stats = prompt_statistics(torch.randn(8, SEQ))
    tokenizer = TimeLLM(model_params(cfg), 1, 1).backbone.tokenizer
    published = whole_prompts(random_stats, model_params(cfg).prompt)
    compact = whole_prompts(random_stats, model_params(compact_cfg).prompt)
    for long, short in zip(published, compact, strict=True):
        assert len(tokenizer(short)["input_ids"]) < len(tokenizer(long)["input_ids"])


def two_series_with_different_prompt_lengths() -> torch.Tensor:
    square = torch.tensor([1.0, -1.0]).repeat(SEQ // 2)  # compact stats "-1", "1": short
    noise = torch.randn(SEQ, generator=torch.Generator().manual_seed(3)) * 3 + 2
    return torch.stack([square, noise]).unsqueeze(-1)  # [2, SEQ, 1]


def test_left_padding_puts_patches_last_and_padding_changes_nothing():
    model = seeded_model(small_cfg("S"), 1, 1).eval()
    x = two_series_with_different_prompt_lengths()
    prompts = whole_prompts(prompt_statistics(RevIN()(x)[0].squeeze(-1)), model.hp.prompt)
    lengths = [len(model.backbone.tokenizer(p)["input_ids"]) for p in prompts]
    assert lengths[0] < lengths[1]

    patches = torch.randn(2, model.n_patch, model.backbone.llm_dim)
    embeds, mask = model.llm_inputs(prompts, patches)
    assert torch.equal(embeds[:, -model.n_patch :], patches)
    pad = lengths[1] - lengths[0]
    assert mask[0, :pad].eq(0).all() and mask[0, pad:].eq(1).all() and mask[1].eq(1).all()

    together = model(x).pred
    for i in range(2):
        torch.testing.assert_close(together[i], model(x[i : i + 1]).pred[0], rtol=0, atol=1e-5)


def test_frozen_backbone_gets_no_gradient_and_stays_out_of_the_state_dict():
    model = TimeLLM(model_params(small_cfg("M")), 2, 2)
    model(torch.randn(2, SEQ, 2)).pred.square().mean().backward()
    backbone = model.backbone
    assert all(p.grad is None and not p.requires_grad for p in backbone.model.parameters())
    assert backbone.word_embeddings.grad is None
    for layer in (
        model.reprogramming.query,
        model.reprogramming.out,
        model.text_prototypes.mapping,
    ):
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0

    frozen = {p.data_ptr() for p in backbone.model.parameters()}
    state = model.state_dict()
    assert not frozen & {t.data_ptr() for t in state.values()}
    assert {key.split(".")[0] for key in state} == {
        "patch_embedding", "text_prototypes", "reprogramming", "head"
    }  # fmt: skip
    assert sum(p.numel() for p in model.parameters()) == sum(t.numel() for t in state.values())


def test_train_mode_and_device_moves_reach_the_backbone():
    model = TimeLLM(model_params(small_cfg("M")), 2, 2)
    model.train()
    assert model.training and not model.backbone.model.training  # dropout off by default
    leaky = TimeLLM(model_params(small_cfg("M", backbone_dropout=True)), 2, 2)
    assert leaky.backbone is not model.backbone
    assert leaky.train().backbone.model.training and not leaky.eval().backbone.model.training
    leaky.double()
    assert leaky.backbone.word_embeddings.dtype == torch.float64
    assert leaky(torch.randn(1, SEQ, 2, dtype=torch.float64)).pred.dtype == torch.float64
    leaky.float()


def test_llm_input_longer_than_the_backbone_allows_is_rejected():
    cfg = config_from_dict(
        {
            "data": {"seq_len": 1100, "label_len": 8, "pred_len": 4},
            "model": {"backbone": "tiny-random-gpt2", "patch_len": 1, "stride": 1,
                      "d_model": 4, "d_ff": 4, "n_heads": 1, "num_tokens": 4},
        }
    )  # fmt: skip
    with pytest.raises(ValueError, match="at most 1024"):
        TimeLLM(model_params(cfg), 1, 1)(torch.randn(1, 1100, 1))


def test_one_adam_step_lowers_the_mse_on_a_fixed_batch():
    torch.manual_seed(1)
    model = TimeLLM(model_params(small_cfg("M")), 2, 2)
    t = torch.arange(SEQ + PRED, dtype=torch.float32)
    series = torch.stack([torch.sin(t / 3), torch.cos(t / 5)], -1) + 0.1 * torch.randn(
        4, SEQ + PRED, 2
    )
    x, y = series[:, :SEQ], series[:, SEQ:]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = torch.nn.functional.mse_loss(model(x).pred, y)
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = torch.nn.functional.mse_loss(model(x).pred, y)
    assert after < before
