"""Enhanced Time-LLM: TAPR and GRA-M composed with the baseline, fusion modes, memory, ablations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from model_helpers import TINY_MODEL, whole_prompts

from timellm_lib.config import Config, ConfigError, config_from_dict, load_config
from timellm_lib.data.windows import WindowDataset
from timellm_lib.models import build_model
from timellm_lib.models.enhanced import EnhancedTimeLLM
from timellm_lib.models.layers import RevIN
from timellm_lib.models.params import EnhancedParams, model_params
from timellm_lib.models.prompt import prompt_statistics
from timellm_lib.models.tapr import DOWN, UP
from timellm_lib.models.timellm import TimeLLM
from timellm_lib.notebooks.tracing import trace_shapes

SEQ, PRED, LLM_DIM = 32, 8, 128
VARIANTS = {
    "baseline": {},
    "tapr": {"use_tapr": True},
    "gram": {"use_gram": True},
    "full": {"use_tapr": True, "use_gram": True},
}


def enabled(variant: str) -> set[str]:
    """The modules a variant switches on: a subset of {"tapr", "gram"}."""
    return {name for name in ("tapr", "gram") if VARIANTS[variant].get(f"use_{name}")}


def small_cfg(features: str = "M", seq_len: int = SEQ, pred_len: int = PRED, **model) -> Config:
    """Tiny sizes (P = (32 - 8)//4 + 2 = 8), a short prompt, no dropout, a small memory."""
    settings = {
        **TINY_MODEL,
        "description": "Toy. ",
        "d_repr": 8,
        "top_k": 3,
        "memory_windows": 60,
        "max_memory_size": 100,
        "trend_thresholds": [-0.8, -0.3, 0.3, 0.8],
        **model,
    }
    data = {"seq_len": seq_len, "label_len": 8, "pred_len": pred_len, "features": features}
    return config_from_dict({"data": data, "model": settings})


def seeded(cfg: Config, n_in: int, n_out: int, seed: int = 0, cls=None):
    torch.manual_seed(seed)
    if cls is None:
        return build_model(cfg, n_in, n_out)
    return cls(model_params(cfg), n_in, n_out)


def training_series(rows: int = 120, channels: int = 2, seed: int = 0) -> torch.Tensor:
    """Random walks plus a daily-like cycle: windows differ, so retrieval has something to do."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(rows, dtype=torch.float32).unsqueeze(-1)
    return torch.randn(rows, channels, generator=g).cumsum(0) * 0.3 + torch.sin(t / 4)


def batch(n: int, channels: int, seq_len: int = SEQ, pred_len: int = PRED, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    series = torch.randn(n, seq_len + pred_len, channels, generator=g).cumsum(1)
    return series[:, :seq_len], series[:, seq_len:]


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "features, b, n_in, n_out, seq_len, pred_len",
    [("M", 2, 3, 3, 32, 8), ("S", 3, 1, 1, 40, 12), ("MS", 2, 3, 1, 32, 4)],
)
def test_output_shapes_of_the_four_variants(variant, features, b, n_in, n_out, seq_len, pred_len):
    cfg = small_cfg(features, seq_len, pred_len, **VARIANTS[variant])
    model = build_model(cfg, n_in, n_out).eval()
    assert isinstance(model, EnhancedTimeLLM) == (variant != "baseline")
    x, y = batch(b, n_in, seq_len, pred_len)
    y = y[..., -n_out:]
    if variant != "baseline":
        model.build_memory(training_series(channels=n_in))
    out = model(x, y)
    assert out.pred.shape == (b, pred_len, n_out) and torch.isfinite(out.pred).all()
    assert set(out.aux_losses) == enabled(variant)
    assert all(torch.isfinite(v) and v.dim() == 0 for v in out.aux_losses.values())


@pytest.mark.parametrize("ablation", ["no_llm", "llm2attn", "llm2trsf"])
@pytest.mark.parametrize(
    "variant, b, n, seq_len, pred_len", [("baseline", 2, 3, 32, 8), ("full", 1, 2, 48, 6)]
)
def test_output_shapes_of_the_llm_ablations(ablation, variant, b, n, seq_len, pred_len):
    cfg = small_cfg("M", seq_len, pred_len, llm_ablation=ablation, **VARIANTS[variant])
    model = build_model(cfg, n, n)
    x, y = batch(b, n, seq_len, pred_len)
    out = model(x, y)
    assert out.pred.shape == (b, pred_len, n) and torch.isfinite(out.pred).all()
    assert set(out.aux_losses) == enabled(variant)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize(
    "variant, ablation",
    [("tapr", "none"), ("gram", "none"), ("full", "none"), ("full", "no_llm"),
     ("full", "llm2attn"), ("full", "llm2trsf")],
)  # fmt: skip
def test_gradients_reach_every_trainable_parameter(variant, ablation):
    model = seeded(small_cfg(llm_ablation=ablation, **VARIANTS[variant]), 2, 2)
    model.build_memory(training_series(), torch.Generator().manual_seed(0))
    x, y = batch(4, 2)
    out = model.train()(x, y, window_index=torch.tensor([0, 7, 30, 55]))
    loss = F.mse_loss(out.pred, y) + sum(out.aux_losses.values())
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient reaches {missing}"
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name
    for module in enabled(variant):
        grads = [p.grad.abs().sum() for p in getattr(model, module).parameters()]
        assert sum(grads) > 0
    if model.backbone is not None:
        assert all(p.grad is None for p in model.backbone.model.parameters())


# ----------------------------------------------------------------------------- parameters


def test_disabled_modules_add_no_parameters_and_the_baseline_is_reproduced():
    cfg = small_cfg()
    baseline = seeded(cfg, 2, 2, cls=TimeLLM)
    torch.manual_seed(0)
    composed = EnhancedTimeLLM(EnhancedParams(model_params(cfg), None, None), 2, 2)
    names = [n for n, _ in baseline.named_parameters()]
    assert [n for n, _ in composed.named_parameters()] == names
    assert list(composed.state_dict()) == list(baseline.state_dict())
    x, _ = batch(3, 2)
    assert torch.equal(composed.eval()(x).pred, baseline.eval()(x).pred)
    assert composed.build_memory(training_series()) == 0  # GRA-M off: nothing to build

    tapr = {n for n, _ in build_model(small_cfg(use_tapr=True), 2, 2).named_parameters()}
    gram = {n for n, _ in build_model(small_cfg(use_gram=True), 2, 2).named_parameters()}
    assert {n.split(".")[0] for n in tapr - set(names)} == {"tapr"} and set(names) <= tapr
    assert {n.split(".")[0] for n in gram - set(names)} == {"gram"} and set(names) <= gram


def test_llm_ablations_replace_only_the_llm_body():
    no_llm = build_model(small_cfg(llm_ablation="no_llm"), 2, 2)
    assert no_llm.backbone is None and no_llm.backbone_fingerprint is None
    assert {n.split(".")[0] for n in no_llm.state_dict()} == {"patch_embedding", "head"}
    assert no_llm.head.linear.in_features == 8 * 8  # d_model * P: patch embeddings -> head

    full = build_model(small_cfg(llm_ablation="no_llm", use_tapr=True, use_gram=True), 2, 2)
    assert full.head.linear.in_features == 8 * (1 + 2 + 8)  # the head reads the extra tokens

    baseline_names = {n.split(".")[0] for n in build_model(small_cfg(), 2, 2).state_dict()}
    for ablation in ("llm2attn", "llm2trsf"):
        model = build_model(small_cfg(llm_ablation=ablation), 2, 2)
        assert {n.split(".")[0] for n in model.state_dict()} == baseline_names | {"llm_standin"}
        assert model.backbone_fingerprint == model.backbone.fingerprint
        assert all(p.requires_grad for p in model.llm_standin.parameters())
    with pytest.raises(ConfigError, match="divisible"):
        build_model(small_cfg(llm_ablation="llm2attn", n_heads=3), 2, 2)  # 128 % 3


# ----------------------------------------------------------------------------- LLM input


def test_trace_has_the_tapr_and_gram_stages_and_1_plus_2_plus_prompt_plus_p_tokens():
    rows = trace_shapes(small_cfg(use_tapr=True, use_gram=True), batch_size=2, n_channels=3)
    shapes = {row["stage"]: row["shape"] for row in rows}
    stages = [row["stage"] for row in rows]
    assert stages.index("Patch Embedding") < stages.index("TAPR-DM") < stages.index("GRA-M")
    assert stages.index("Retrieval Tokens") < stages.index("Reprogramming")
    assert stages[-2:] == ["Trend Fusion", "Output"]
    bn, p, prompt = 6, 8, shapes["Prompt Embedding"][1]
    assert shapes["TAPR-DM"] == shapes["GRA-M"] == [bn, p, 8]
    assert shapes["Trend Token"] == [bn, 1, LLM_DIM]
    assert shapes["Retrieval Tokens"] == [bn, 2, LLM_DIM]
    assert shapes["LLM Input"] == shapes["LLM Output"] == [bn, 1 + 2 + prompt + p, LLM_DIM]
    assert shapes["LLM Features"] == [bn, p, 16] and shapes["Output"] == [2, PRED, 3]

    tapr_only = {r["stage"]: r["shape"] for r in trace_shapes(small_cfg(use_tapr=True), 1, 2)}
    assert tapr_only["LLM Input"][1] == 1 + tapr_only["Prompt Embedding"][1] + p
    assert "GRA-M" not in tapr_only


def test_extra_tokens_follow_the_padding_and_padding_changes_nothing():
    model = seeded(small_cfg("S", use_tapr=True, use_gram=True), 1, 1).eval()
    model.build_memory(training_series(channels=1))
    square = torch.tensor([1.0, -1.0]).repeat(SEQ // 2)  # compact statistics: a short prompt
    noise = torch.randn(SEQ, generator=torch.Generator().manual_seed(3)) * 3 + 2
    x = torch.stack([square, noise]).unsqueeze(-1)
    prompts = whole_prompts(prompt_statistics(RevIN()(x)[0][..., 0]), model.hp.prompt)
    lengths = [len(model.backbone.tokenizer(p)["input_ids"]) for p in prompts]
    pad = lengths[1] - lengths[0]
    assert pad > 0

    prefix = torch.randn(2, 3, LLM_DIM)
    patches = torch.randn(2, model.n_patch, LLM_DIM)
    embeds, mask = model.llm_inputs(prompts, patches, prefix)
    assert embeds.shape[1] == 3 + lengths[1] + model.n_patch
    assert torch.equal(embeds[0, pad : pad + 3], prefix[0])  # right after the padding
    assert torch.equal(embeds[1, :3], prefix[1])
    assert torch.equal(embeds[:, -model.n_patch :], patches)
    plain, _ = model.llm_inputs(prompts, patches)
    for row, start in enumerate([pad, 0]):  # without the prefix, the rest is the plain input
        rest = torch.cat([embeds[row, :start], embeds[row, start + 3 :]])
        assert torch.equal(rest, plain[row])
    assert mask[0, :pad].eq(0).all() and mask[0, pad:].eq(1).all() and mask[1].eq(1).all()

    together = model(x).pred
    for i in range(2):
        torch.testing.assert_close(together[i], model(x[i : i + 1]).pred[0], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- fusion


def test_fusion_modes_train_only_differs_between_train_and_eval_always_and_off_do_not():
    x, _ = batch(2, 2)
    preds = {}
    state = seeded(small_cfg(use_tapr=True), 2, 2).state_dict()
    for mode in ("train_only", "always", "off"):
        model = build_model(small_cfg(use_tapr=True, fusion=mode), 2, 2)
        model.load_state_dict(state)
        with torch.no_grad():
            preds[mode] = model.train()(x).pred, model.eval()(x).pred
    train, evaluation = preds["train_only"]
    assert not torch.allclose(train, evaluation)
    for mode in ("always", "off"):
        assert torch.equal(*preds[mode])
    assert torch.equal(train, preds["always"][0]) and torch.equal(evaluation, preds["off"][0])
    # the ramp starts at 0: fusion leaves the first forecast step alone
    torch.testing.assert_close(preds["always"][0][:, 0], preds["off"][0][:, 0])


@pytest.mark.parametrize("direction", [1.0, -1.0], ids=["up", "down"])
def test_fusion_moves_the_forecast_the_way_the_trend_class_points(direction):
    """An "up" class of probability 1 never lowers any step of the forecast (and "down"
    never raises one) with the default reference form; the design's multiplicative form,
    which scales around the window mean, does move below-mean forecasts the wrong way."""
    x, _ = batch(4, 2, seed=5)
    preds, probabilities = {}, []
    for fusion, form in [
        ("off", "reference"),
        ("always", "reference"),
        ("always", "multiplicative"),
    ]:
        model = seeded(small_cfg(use_tapr=True, fusion=fusion, fusion_form=form), 2, 2).eval()
        head = model.tapr.head
        with torch.no_grad():  # a certain trend: r_hat = +-50, the gate at its 0.5 bound
            head.regressor[-1].weight.zero_()
            head.regressor[-1].bias.fill_(50.0 * direction)
            head.gate.bias.fill_(20.0)
        model.tapr.register_forward_hook(
            lambda _m, _i, out: probabilities.append(torch.softmax(out.direction_logits, -1))
        )
        preds[fusion, form] = model(x).pred
    cls = UP if direction > 0 else DOWN
    assert all((p[:, cls] > 0.999).all() for p in probabilities)
    unfused = preds["off", "reference"]
    moved = (preds["always", "reference"] - unfused) * direction
    assert (moved >= 0).all() and (moved > 0).any()
    wrong_way = (preds["always", "multiplicative"] - unfused) * direction
    assert (wrong_way < 0).any()


def test_ms_fusion_and_trend_loss_use_the_target_rows():
    fused_model = seeded(small_cfg("MS", use_tapr=True), 3, 1).eval()
    plain_model = build_model(small_cfg("MS", use_tapr=True, fusion="off"), 3, 1).eval()
    plain_model.load_state_dict(fused_model.state_dict())
    adjustments = []
    fused_model.tapr.register_forward_hook(lambda _m, _i, out: adjustments.append(out.adjustment))
    x, y = batch(2, 3)
    with torch.no_grad():
        fused, plain = fused_model(x).pred, plain_model(x).pred
    _, mean, std = RevIN()(x)
    mean, std = mean[..., 2:], std[..., 2:]  # the target is the last input column
    target = adjustments[0].reshape(2, 3, PRED)[:, 2].unsqueeze(-1)  # rows b*3 + 2
    normalised = (plain - mean) / std
    last = (x[:, -1:, 2:] - mean) / std  # the target's last input value: the reference
    expected = normalised + target * (normalised - last).abs()
    torch.testing.assert_close(fused, RevIN.denormalize(expected, mean, std))

    # the trend loss reads only the target's rows: other input channels cannot change it
    other = x.clone()
    other[..., :2] = torch.randn(2, SEQ, 2)
    losses = [fused_model(inputs, y[..., 2:]).aux_losses["tapr"] for inputs in (x, other)]
    assert torch.isfinite(losses[0]) and losses[0] > 0
    torch.testing.assert_close(losses[0], losses[1])


# ----------------------------------------------------------------------------- losses


def test_aux_losses_are_clearly_above_zero_at_init_and_diagnostics_are_detached_scalars():
    model = seeded(small_cfg(use_tapr=True, use_gram=True), 2, 2)
    model.build_memory(training_series(), torch.Generator().manual_seed(0))
    x, y = batch(4, 2)
    out = model.train()(x, y, window_index=torch.tensor([0, 10, 20, 40]))
    assert set(out.aux_losses) == {"tapr", "gram"}
    assert out.aux_losses["tapr"] > 0.05 and out.aux_losses["gram"] > 1e-3
    # scalars the trainer reads at once: tensors without a graph (or python numbers), never a
    # float() inside forward, which would wait for the device at every step
    for value in out.diagnostics.values():
        assert isinstance(value, float) or (value.numel() == 1 and not value.requires_grad)
    assert any(isinstance(v, torch.Tensor) for v in out.diagnostics.values())
    for name in (
        "tapr_direction", "tapr_magnitude", "tapr_hierarchy", "tapr_regression",
        "tapr_direction_accuracy", "tapr_magnitude_accuracy", "tapr_gate_mean",
        "tapr_adjustment_abs_mean", "gram_gate_entropy", "gram_gate_consistency",
        "gram_gate_mean", "gram_top_similarity", "gram_top_weight", "gram_memory_size",
    ):  # fmt: skip
        assert name in out.diagnostics, name
    assert out.diagnostics["gram_memory_size"] == 60.0
    plain = model.eval()(x)
    assert plain.aux_losses == {} and plain.diagnostics == {}


def test_window_index_keeps_training_windows_from_retrieving_their_own_future():
    cfg = small_cfg(use_gram=True, top_k=3, memory_windows=102, max_memory_size=200)
    model = seeded(cfg, 2, 2).train()
    series = training_series(rows=90)
    assert model.build_memory(series) == 2 * (90 - SEQ - PRED + 1)  # every window is stored
    starts = torch.tensor([3, 25, 44])
    x = torch.stack([series[s : s + SEQ] for s in starts.tolist()])
    seen = []
    model.gram.register_forward_hook(lambda _m, _i, out: seen.append(out.retrieval.indices))
    model(x, window_index=starts)
    with pytest.warns(UserWarning, match="query_positions"):
        model(x)
    masked, unmasked = seen
    positions = model.gram.retriever.memory_positions
    channel = torch.arange(2).repeat(3)
    start = starts.repeat_interleave(2)
    for row in range(6):
        entries = positions[masked[row]]
        overlap = (entries[:, 0] == channel[row]) & (entries[:, 1] < start[row] + SEQ + PRED)
        assert not (overlap & (start[row] < entries[:, 2])).any()
        own = (positions[:, 0] == channel[row]) & (positions[:, 1] == start[row])
        assert own.nonzero().item() in unmasked[row].tolist()  # unmasked: finds itself


@pytest.mark.parametrize("variant", ["baseline", "full"])
def test_a_batch_of_single_channels_forecasts_as_the_windows_they_came_from(variant):
    """data.sample_unit = channel: each channel of a window is a sample [L, 1]; the model
    (channel-independent for M) gives it the forecast it gets inside its window, GRA-M
    included, whose leakage mask takes the (channel, start) rows."""
    cfg = small_cfg(**VARIANTS[variant], memory_windows=60, max_memory_size=100)
    model = seeded(cfg, 2, 2).eval()
    series = training_series(rows=90)
    starts = torch.tensor([3, 25, 44])
    positions = torch.stack([torch.arange(2).repeat(3), starts.repeat_interleave(2)], -1)
    by_window, by_channel = {}, {}
    if variant == "full":
        model.build_memory(series)
        by_window, by_channel = {"window_index": starts}, {"window_index": positions}
    x = torch.stack([series[s : s + SEQ] for s in starts.tolist()])  # [3, L, 2]
    windows = model(x, **by_window).pred  # [3, H, 2]
    singles = x.transpose(1, 2).reshape(6, SEQ, 1)  # row b*2 + n: channel n of window b
    channels = model(singles, **by_channel).pred  # [6, H, 1]
    torch.testing.assert_close(channels[..., 0], windows.transpose(1, 2).reshape(6, PRED))


# ----------------------------------------------------------------------------- memory


def window_dataset(series: torch.Tensor) -> WindowDataset:
    rows = series.shape[0]
    dates = np.arange("2020-01-01T00", rows, dtype="datetime64[h]")
    return WindowDataset(series, series, dates, SEQ, PRED)


def test_memory_survives_save_and_load_bit_identically_and_changes_the_forward(tmp_path):
    cfg = small_cfg(use_tapr=True, use_gram=True)
    model = seeded(cfg, 2, 2).eval()
    x, _ = batch(2, 2)
    empty = model(x).pred
    stored = model.build_memory(window_dataset(training_series()), torch.Generator().manual_seed(5))
    assert stored == 60 and model.gram.retriever.size == 60
    built = model(x).pred
    assert not torch.allclose(empty, built)

    torch.save(model.state_dict(), tmp_path / "model.pt")
    fresh = seeded(cfg, 2, 2, seed=1).eval()
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert torch.equal(fresh(x).pred, built)

    off = seeded(small_cfg(use_gram=True, build_memory=False), 2, 2)
    assert off.build_memory(training_series()) == 0 and off.gram.retriever.size == 0


# ----------------------------------------------------------------------------- configs


def test_ablation_configs_load_build_and_differ_only_in_the_switches(repo_root):
    configs = {v: load_config(repo_root / f"configs/ablation/{v}.yaml") for v in VARIANTS}
    reference = configs["baseline"].to_dict()
    for variant, cfg in configs.items():
        assert {m for m in ("tapr", "gram") if getattr(cfg.model, f"use_{m}")} == enabled(variant)
        flat = cfg.to_dict()
        flat["model"] |= {"use_tapr": False, "use_gram": False}
        flat["run"]["experiment"] = reference["run"]["experiment"]
        assert flat == reference, variant
        model = build_model(cfg, 2, 2).eval()
        if enabled(variant):  # the baseline has no memory to build
            stored = cfg.model.memory_windows if "gram" in enabled(variant) else 0
            assert model.build_memory(training_series(rows=150)) == stored
        x, y = batch(2, 2, cfg.data.seq_len, cfg.data.pred_len)
        assert model(x, y).pred.shape == (2, cfg.data.pred_len, 2)


def test_config_rejects_unordered_thresholds_and_heads_that_do_not_divide_d_model():
    with pytest.raises(ConfigError, match="trend_thresholds"):
        small_cfg(use_tapr=True, trend_thresholds=[0.1, -0.1, 0.2, 0.3])
    with pytest.raises(ConfigError, match="n_heads"):
        small_cfg(use_gram=True, n_heads=3)
