"""Frozen backbones: dimensions from the config, truncation, caching, offline loading, errors."""

from __future__ import annotations

import time

import pytest
import torch

from timellm_lib.config import config_from_dict
from timellm_lib.models import backbones
from timellm_lib.models.backbones import BackboneError, load_backbone
from timellm_lib.models.params import model_params
from timellm_lib.models.timellm import TimeLLM


def test_tiny_gpt2_is_frozen_left_padded_and_read_from_its_config():
    b = load_backbone("tiny-random-gpt2")
    config = b.model.config
    assert (b.llm_dim, b.n_layers) == (config.n_embd, config.n_layer) == (128, len(b.model.h))
    assert b.is_causal and b.takes_position_ids and b.max_positions == config.n_positions
    assert b.word_embeddings.shape == (len(b.tokenizer), b.llm_dim) and len(b.tokenizer) < 300
    assert not any(p.requires_grad for p in b.model.parameters())
    assert not b.model.training
    enc = b.tokenizer(["forecast the next steps xyz", "lags"], padding=True, return_tensors="pt")
    long, short = enc["attention_mask"].sum(dim=1).tolist()
    assert long == 7 and short == 1  # template words are one token; unknown words are characters
    assert enc["attention_mask"][1].tolist() == [0] * 6 + [1]  # padded on the left
    assert b.tokenizer.decode(enc["input_ids"][0]) == "forecast the next steps xyz"


def test_tiny_gpt2_is_cached_reproducible_and_leaves_the_global_rng_alone():
    cached = load_backbone("tiny-random-gpt2")
    assert load_backbone("tiny-random-gpt2", 0, False) is cached
    rng = torch.get_rng_state()
    fresh = backbones._load_cached.__wrapped__("tiny-random-gpt2", 0, False)  # bypass the cache
    assert torch.equal(torch.get_rng_state(), rng)
    assert fresh is not cached and fresh.fingerprint == cached.fingerprint
    assert torch.equal(fresh.word_embeddings, cached.word_embeddings)
    truncated = load_backbone("tiny-random-gpt2", llm_layers=1)
    assert truncated.n_layers == 1 and truncated.fingerprint != cached.fingerprint


def test_local_directory_reads_dims_from_config_and_truncates(tmp_path):
    tiny = load_backbone("tiny-random-gpt2")
    tiny.model.save_pretrained(tmp_path)
    tokenizer = backbones._tiny_tokenizer()
    tokenizer.pad_token = None  # like GPT-2 and LLaMA tokenizers
    tokenizer.save_pretrained(tmp_path)
    full = load_backbone(str(tmp_path))
    assert (full.llm_dim, full.n_layers) == (128, 2) and full.is_causal
    assert torch.equal(full.word_embeddings, tiny.word_embeddings)
    assert (
        full.tokenizer.padding_side == "left" and full.model.config._attn_implementation == "sdpa"
    )
    assert full.tokenizer.pad_token == full.tokenizer.eos_token == "<|endoftext|>"

    one = load_backbone(str(tmp_path), llm_layers=1)
    assert one.n_layers == 1 and len(one.model.h) == 1
    assert torch.equal(one.model.h[0].mlp.c_fc.weight, tiny.model.h[0].mlp.c_fc.weight)
    with pytest.raises(BackboneError, match="at most 2"):
        load_backbone(str(tmp_path), llm_layers=3)


def test_a_model_without_sdpa_support_loads_with_its_default_attention(tmp_path):
    from transformers import ConvBertConfig, ConvBertModel

    config = ConvBertConfig(
        vocab_size=257, hidden_size=32, embedding_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    ConvBertModel(config).save_pretrained(tmp_path)
    backbones._tiny_tokenizer().save_pretrained(tmp_path)
    b = load_backbone(str(tmp_path))
    assert b.model.config._attn_implementation == "eager"
    assert (b.llm_dim, b.n_layers, b.max_positions, b.is_causal) == (32, 2, 64, False)
    hidden = b.encode(torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.long))
    assert hidden.shape == (2, 5, 32)


def test_unknown_local_path_and_unreachable_hub_id_raise_backbone_error(tmp_path, monkeypatch):
    with pytest.raises(BackboneError, match="config.json"):
        load_backbone(str(tmp_path / "no-such-model"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError, match="hf download") as err:
        load_backbone("no-such-org-xyz/no-such-model")
    assert "no-such-org-xyz/no-such-model" in str(err.value)


def test_minilm_loads_offline_and_drives_a_small_timellm(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    b = load_backbone("minilm")
    assert (b.llm_dim, b.n_layers) == (384, 6) and not b.is_causal
    assert b.tokenizer.padding_side == "left" and len(b.fingerprint) == 64
    start = time.perf_counter()
    assert load_backbone("minilm") is b
    assert time.perf_counter() - start < 1.0

    cfg = config_from_dict(
        {
            "data": {"seq_len": 32, "label_len": 8, "pred_len": 8},
            "model": {"backbone": "minilm", "patch_len": 8, "stride": 8, "d_model": 8,
                      "d_ff": 16, "n_heads": 2, "num_tokens": 8},
        }
    )  # fmt: skip
    model = TimeLLM(model_params(cfg), 2, 2).eval()
    square = torch.tensor([1.0, -1.0]).repeat(16)  # its prompt is shorter: left padding
    x = torch.stack([torch.stack([square, -square], -1), torch.randn(32, 2) * 3], 0)
    pred = model(x).pred
    assert pred.shape == (2, 8, 2) and torch.isfinite(pred).all()
    for i in range(2):  # a bidirectional model sees the padding unless the mask hides it
        torch.testing.assert_close(pred[i], model(x[i : i + 1]).pred[0], rtol=0, atol=1e-4)
    assert model.backbone_fingerprint == b.fingerprint
