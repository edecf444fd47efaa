"""Every speed-up of the Time-LLM forward keeps the result of the plain path (issue 7).

Prompt head tokenised once, prefix key/value cache on causal backbones, the final layer of a
bidirectional backbone for the patch positions only, prototypes once per forward, SDPA and no
attention maps or hidden states requested from the language model.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import pytest
import torch
import torch.nn.functional as F
from model_helpers import TINY_MODEL, whole_prompts

import timellm_lib.models.timellm as timellm_module
from timellm_lib.config import Config, config_from_dict
from timellm_lib.models.backbones import Backbone, _find_prefix_cache, load_backbone
from timellm_lib.models.enhanced import EnhancedTimeLLM
from timellm_lib.models.layers import RevIN, channel_rows
from timellm_lib.models.params import model_params
from timellm_lib.models.prompt import (
    PromptTokenizer,
    prompt_head,
    prompt_statistics,
    prompt_tails,
)
from timellm_lib.models.timellm import TimeLLM
from timellm_lib.notebooks.tracing import format_trace, trace_model

SEQ, PRED = 32, 8


def small_cfg(**model: object) -> Config:
    """Tiny sizes on the tiny random GPT-2 (causal): P = 8 patches, no dropout."""
    settings = {
        **TINY_MODEL,
        **model,
    }
    data = {"seq_len": SEQ, "label_len": 8, "pred_len": PRED}
    return config_from_dict({"data": data, "model": settings})


def seeded(cfg: Config, n: int = 2, cls: type = TimeLLM) -> TimeLLM:
    torch.manual_seed(0)
    return cls(model_params(cfg), n, n)


def mixed_batch() -> torch.Tensor:
    """Series whose compact prompts differ in length, so rows are padded differently."""
    g = torch.Generator().manual_seed(5)
    square = torch.tensor([1.0, -1.0]).repeat(SEQ // 2)
    walk = torch.randn(SEQ, generator=g).cumsum(0) * 3 + 2
    noise = torch.randn(2, SEQ, 2, generator=g)
    return torch.cat([torch.stack([square, walk], -1).unsqueeze(0), noise])  # [3, SEQ, 2]


def llm_positions(model: TimeLLM, x: torch.Tensor) -> int:
    """Positions per row that the language model runs (seen at the ``llm_input`` stage)."""
    seen = []
    handle = model.llm_input.register_forward_hook(lambda _m, _i, out: seen.append(out.shape[1]))
    try:
        model(x)
    finally:
        handle.remove()
    return seen[0]


# ----------------------------------------------------------------- prompt tokenisation


@pytest.mark.parametrize("backbone", ["tiny-random-gpt2", "minilm"])
@pytest.mark.parametrize("prompt_format", ["compact", "published"])
def test_head_tokenised_once_gives_the_ids_of_fresh_tokenisation(backbone, prompt_format):
    hp = model_params(small_cfg(backbone=backbone, prompt_format=prompt_format)).prompt
    tokenizer = load_backbone(backbone).tokenizer
    series = channel_rows(RevIN()(mixed_batch())[0])
    stats = prompt_statistics(series)
    cached = PromptTokenizer(tokenizer, prompt_head(hp), prompt_tails(stats, hp)[0])
    assert cached.splits and cached.head.numel() > 10

    ids, mask = cached(prompt_tails(stats, hp)).padded()
    fresh = tokenizer(whole_prompts(stats, hp), return_tensors="pt", padding=True)
    assert torch.equal(ids, fresh["input_ids"]) and torch.equal(mask, fresh["attention_mask"])
    assert mask[:, 0].eq(0).any()  # some rows really are padded (on the left)


def test_a_tokeniser_that_merges_across_the_split_falls_back_to_whole_prompts():
    tokenizer = load_backbone("tiny-random-gpt2").tokenizer
    head, tails = "forecast xy", ["zw min value 1", "q max value 22"]  # "xyzw" is one word
    cached = PromptTokenizer(tokenizer, head, tails[0])
    assert not cached.splits and cached.head.numel() == 0
    ids, mask = cached(tails).padded()
    fresh = tokenizer([head + t for t in tails], return_tensors="pt", padding=True)
    assert torch.equal(ids, fresh["input_ids"]) and torch.equal(mask, fresh["attention_mask"])


# ------------------------------------------------------------------ prefix key/value cache


def test_backbone_encode_with_a_shared_prefix_equals_encoding_the_whole_rows():
    b = load_backbone("tiny-random-gpt2")
    g = torch.Generator().manual_seed(0)
    prefix = torch.randn(6, b.llm_dim, generator=g)
    inputs = torch.randn(3, 9, b.llm_dim, generator=g, requires_grad=True)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :4] = 0  # padding between the prefix and the rest of row 0
    mask[2, :1] = 0

    cached = b.encode(inputs, mask, shared_prefix=prefix)
    whole = torch.cat([prefix.expand(3, -1, -1), inputs], dim=1)
    plain = b.encode(whole, torch.cat([mask.new_ones(3, 6), mask], dim=1))[:, 6:]
    real = mask.bool()
    torch.testing.assert_close(cached[real], plain[real], rtol=1e-5, atol=1e-5)

    (grad_cached,) = torch.autograd.grad(cached[real].sum(), inputs)
    (grad_plain,) = torch.autograd.grad(plain[real].sum(), inputs)
    torch.testing.assert_close(grad_cached, grad_plain, rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match="cannot reuse a prefix cache"):
        dataclasses.replace(b, is_causal=False).encode(inputs, mask, shared_prefix=prefix)


def test_prefix_cache_matches_the_uncached_model_in_outputs_and_gradients():
    cached, plain = seeded(small_cfg()), seeded(small_cfg(prefix_cache=False))
    x, y = mixed_batch(), torch.randn(3, PRED, 2)
    head = cached.prompt_tokenizer.head.numel()
    assert llm_positions(plain, x) - llm_positions(cached, x) == head  # the head ran once

    for model in (cached, plain):
        model.train()
        F.mse_loss(model(x).pred, y).backward()
    torch.testing.assert_close(cached(x).pred, plain(x).pred, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(cached.named_parameters(), plain.parameters(), strict=True):
        assert p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_prefix_cache_stays_off_where_it_would_change_the_result():
    x = mixed_batch()
    base = seeded(small_cfg(prefix_cache=False)).eval()
    full = llm_positions(base, x)
    assert llm_positions(seeded(small_cfg()).eval(), x) < full

    # dropout inside the LLM draws per row, also on the head: no sharing in train mode
    leaky = seeded(small_cfg(backbone_dropout=True))
    assert llm_positions(leaky.train(), x) == full
    assert llm_positions(leaky.eval(), x) < full
    # TAPR's trend token comes before the head, so the head is no longer a shared prefix
    tapr = seeded(small_cfg(use_tapr=True, d_repr=8), cls=EnhancedTimeLLM).eval()
    assert llm_positions(tapr, x) == full + 1
    # a bidirectional backbone: every position sees the statistics and the patches
    minilm = seeded(small_cfg(backbone="minilm")).eval()
    assert not minilm.backbone.can_cache_prefix


class _CacheUnder(torch.nn.Module):
    """A real GPT-2 whose forward names its key/value cache ``argument`` (or takes none), as
    transformers releases before and after 5.24 spell it; it hands the cache on under the
    spelling of the installed release (``inner``)."""

    def __init__(self, model: torch.nn.Module, argument: str | None, inner: str) -> None:
        super().__init__()
        self.model, self.config = model, model.config
        self.argument, self.inner = argument, inner
        self.train(model.training)  # the probe restores this mode on the shared model

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()

    def forward(self, inputs_embeds, attention_mask, position_ids, use_cache=False, **cache):
        assert set(cache) <= {self.argument}, f"unexpected argument {sorted(cache)}"
        return self.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **{self.inner: cache.get(self.argument)},
        )


def _gpt2_with_cache_argument(argument: str | None) -> Backbone:
    """The tiny GPT-2 wrapped to take its cache as ``argument``, probed as at load time."""
    shared = load_backbone("tiny-random-gpt2")
    backbone = dataclasses.replace(
        shared,
        name=f"gpt2-cache-as-{argument}",
        model=_CacheUnder(shared.model, argument, inner=shared.cache_argument),
        cache_argument=None,
        unavailable={},
    )
    _find_prefix_cache(backbone, [a for a in ("cache", "past_key_values") if a == argument])
    return backbone


@pytest.mark.parametrize("argument", ["cache", "past_key_values"])
def test_either_spelling_of_the_cache_argument_is_found_and_used(argument):
    b = _gpt2_with_cache_argument(argument)
    assert b.cache_argument == argument and b.can_cache_prefix and not b.unavailable
    g = torch.Generator().manual_seed(1)
    prefix, inputs = (
        torch.randn(4, b.llm_dim, generator=g),
        torch.randn(2, 5, b.llm_dim, generator=g),
    )
    mask = torch.ones(2, 5, dtype=torch.long)
    cached = b.encode(inputs, mask, shared_prefix=prefix)
    whole = b.encode(torch.cat([prefix.expand(2, -1, -1), inputs], 1), torch.ones(2, 9).long())
    torch.testing.assert_close(cached, whole[:, 4:], rtol=1e-5, atol=1e-5)


def test_the_installed_transformers_gives_the_prefix_cache_to_a_causal_backbone():
    b = load_backbone("tiny-random-gpt2")
    assert (
        b.cache_argument in ("cache", "past_key_values")
        and b.speed_path("model.prefix_cache") == "available"
    ), b.unavailable


def test_a_prefix_cache_the_backbone_cannot_give_is_reported_and_warned_about_once(
    monkeypatch, caplog
):
    no_cache = _gpt2_with_cache_argument(None)
    assert not no_cache.can_cache_prefix
    assert "no key/value cache argument" in no_cache.unavailable["model.prefix_cache"]
    monkeypatch.setattr(timellm_module, "load_backbone", lambda *_args: no_cache)

    with caplog.at_level(logging.WARNING, logger="timellm_lib"):
        first, second = seeded(small_cfg()), seeded(small_cfg())
    warnings = [r for r in caplog.records if "model.prefix_cache" in r.getMessage()]
    assert len(warnings) == 1 and "gpt2-cache-as-None" in warnings[0].getMessage()
    assert first.speed_paths()["model.prefix_cache"].startswith("unavailable: no key/value")
    x = mixed_batch()
    assert llm_positions(second.eval(), x) == llm_positions(
        seeded(small_cfg(prefix_cache=False)), x
    )

    rows = trace_model(first, x)
    assert rows[-1]["speed_paths"]["model.prefix_cache"].startswith("unavailable")
    assert "speed path model.prefix_cache: unavailable" in format_trace(rows)
    # asked off: no warning, and the trace says why it is not used
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="timellm_lib"):
        off = seeded(small_cfg(prefix_cache=False))
    assert not caplog.records and off.speed_paths()["model.prefix_cache"] == "off (config)"


def test_speed_paths_say_which_switch_acts_on_which_backbone():
    gpt2, minilm = seeded(small_cfg()), seeded(small_cfg(backbone="minilm"))
    assert gpt2.speed_paths() == {
        "model.prefix_cache": "on",
        "model.last_layer_patches_only": "not applicable: implemented for BERT-style encoders only",
    }
    assert minilm.speed_paths()["model.last_layer_patches_only"] == "on"
    assert minilm.speed_paths()["model.prefix_cache"].startswith("not applicable: bidirectional")


# ------------------------------------------------- final LLM layer for the patch positions


def test_backbone_encode_keeping_the_last_positions_equals_slicing_the_whole_output():
    b = load_backbone("minilm")
    assert b.last_layer is not None and load_backbone("tiny-random-gpt2").last_layer is None
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(3, 12, b.llm_dim, generator=g, requires_grad=True)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, :4] = 0  # left padding, as the prompts have
    whole = b.encode(inputs, mask)
    kept = b.encode(inputs, mask, keep_last=5)
    assert kept.shape == (3, 5, b.llm_dim)
    torch.testing.assert_close(kept, whole[:, -5:], rtol=1e-5, atol=1e-5)
    (grad_kept,) = torch.autograd.grad(kept.square().sum(), inputs)
    (grad_whole,) = torch.autograd.grad(whole[:, -5:].square().sum(), inputs)
    torch.testing.assert_close(grad_kept, grad_whole, rtol=1e-5, atol=1e-4)
    assert "forward" not in vars(b.last_layer)  # the layer is whole again afterwards
    torch.testing.assert_close(b.encode(inputs, mask), whole)


def test_keeping_the_last_positions_under_torch_compile_runs_the_whole_final_layer():
    """Dynamo cannot trace the swap of the layer's forward; compiled, encode keeps the last
    positions of the full output (backend "eager": Dynamo's tracing without code generation)."""
    b = load_backbone("minilm")
    inputs = torch.randn(2, 10, b.llm_dim, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 10, dtype=torch.long)
    compiled = torch.compile(lambda x, m: b.encode(x, m, keep_last=4), backend="eager")
    torch.testing.assert_close(compiled(inputs, mask), b.encode(inputs, mask)[:, -4:])
    assert "forward" not in vars(b.last_layer)


def test_a_backbone_switched_to_eager_attention_runs_its_whole_final_layer(monkeypatch):
    """The shortcut is SDPA's; after set_attn_implementation("eager") (as the benchmark's
    published-cost reference does) encode runs the layer itself and slices the output."""
    shared = load_backbone("minilm")
    model = copy.deepcopy(shared.model)
    b = dataclasses.replace(shared, model=model, last_layer=model.encoder.layer[-1])
    model.set_attn_implementation("eager")
    calls = []
    monkeypatch.setattr(
        "timellm_lib.models.backbones._last_rows_forward", lambda *a, **k: calls.append(1)
    )
    inputs = torch.randn(2, 9, b.llm_dim, generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 9, dtype=torch.long)
    kept = b.encode(inputs, mask, keep_last=4)
    assert calls == [] and kept.shape == (2, 4, b.llm_dim)
    torch.testing.assert_close(kept, b.encode(inputs, mask)[:, -4:])


def test_final_layer_for_patches_only_matches_the_full_model_in_outputs_and_gradients():
    x, y = mixed_batch(), torch.randn(3, PRED, 2)
    cfgs = [small_cfg(backbone="minilm", last_layer_patches_only=v) for v in (True, False)]
    kept, full = (seeded(cfg) for cfg in cfgs)
    shapes = []
    for model in (kept, full):
        handle = model.llm_output.register_forward_hook(
            lambda _m, _i, out: shapes.append(out.shape[1])
        )
        model.train()
        F.mse_loss(model(x).pred, y).backward()
        handle.remove()
    assert shapes[0] == kept.n_patch < shapes[1]  # the prompt positions never left layer 5
    torch.testing.assert_close(kept(x).pred, full(x).pred, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(kept.named_parameters(), full.parameters(), strict=True):
        assert p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


# ------------------------------------------------------------- the language model's path


@pytest.mark.parametrize("backbone", ["tiny-random-gpt2", "minilm"])
def test_the_llm_runs_sdpa_and_returns_no_attention_maps_or_hidden_states(backbone, monkeypatch):
    model = seeded(small_cfg(backbone=backbone))
    language_model = model.backbone.model
    assert language_model.config._attn_implementation == "sdpa"
    outputs, calls = [], []
    sdpa = F.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    handle = language_model.register_forward_hook(lambda _m, _i, out: outputs.append(out))
    try:
        model(mixed_batch())
    finally:
        handle.remove()
    assert len(calls) >= model.backbone.n_layers
    assert outputs and all(o.attentions is None and o.hidden_states is None for o in outputs)


@pytest.mark.parametrize("backbone", ["tiny-random-gpt2", "minilm"])
def test_sdpa_gives_the_eager_attention_s_result(backbone):
    """The published code's eager attention (every map returned) and the SDPA path the
    workbench uses compute the same hidden states."""
    b = load_backbone(backbone)
    eager = copy.deepcopy(b.model)  # the shared backbone keeps its SDPA
    eager.set_attn_implementation("eager")
    g = torch.Generator().manual_seed(2)
    inputs = torch.randn(3, 11, b.llm_dim, generator=g)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as encode derives them from the mask
    with torch.no_grad():
        fast = b.encode(inputs, mask)
        published = eager(
            inputs_embeds=inputs,
            attention_mask=mask,
            position_ids=positions,
            output_attentions=True,
        )
    assert len(published.attentions) == b.n_layers
    real = mask.bool()
    torch.testing.assert_close(fast[real], published.last_hidden_state[real], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ prototypes


def test_prototypes_are_computed_once_per_forward():
    """They do not depend on the batch: one Linear(vocab -> num_tokens) pass per forward,
    whatever the number of series, never one per series or per channel."""
    model = seeded(small_cfg())
    calls = []
    model.text_prototypes.register_forward_hook(lambda _m, _i, out: calls.append(out.shape))
    model(mixed_batch())
    model(torch.randn(5, SEQ, 2))
    assert calls == [(16, model.backbone.llm_dim)] * 2
