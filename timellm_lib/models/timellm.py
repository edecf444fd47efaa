"""Time-LLM (Jin et al., ICLR 2024): forecasting by reprogramming a frozen language model.

Per series: instance-normalise, cut into patches, embed them, reprogram the patch tokens
onto text prototypes (so they live in the LLM's input space), put a prompt with dataset,
task and input statistics in front, run the frozen LLM, and map the hidden states of the
patch positions to the forecast. Only the patch embedding, the prototype mapping, the
reprogramming layer and the head (plus, for MS, a channel mix) are trained.

Differences from the published code, none of which change the method: statistics and lags
are batched tensor ops (lags exclude lag 0 and mirrored lags); prompts are padded on the left
with an attention mask and mask-derived positions, so the patches are always the last P
positions and padding does not change any result; no hard-coded bfloat16; the frozen LLM is
kept out of the module tree (never in ``state_dict``, optimizers or DDP); dropout in the
frozen LLM is off unless ``model.backbone_dropout``; MS really maps all inputs to the target.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from timellm_lib.backbones import Backbone, load_backbone
from timellm_lib.config import Config, ConfigError, check_llm_dim
from timellm_lib.models.layers import (
    FlattenHead,
    PatchEmbedding,
    Patching,
    ReprogrammingLayer,
    RevIN,
    Tap,
    TextPrototypes,
    n_patches,
)
from timellm_lib.models.output import Forecast
from timellm_lib.models.prompt import build_prompts, prompt_statistics


class TimeLLM(nn.Module):
    """Baseline Time-LLM for ``n_in`` input and ``n_out`` output channels.

    Features M and S forecast every input channel independently (n_in == n_out). MS forecasts
    all ``n_in`` channels the same way, then a learned ``Linear(n_in -> 1)``, initialised to
    pick the target channel, mixes them into the target. The target is input column
    ``target_index``: by default the last one, as OT in the ETT files; pass its index when
    the target column comes elsewhere in the input.
    """

    def __init__(self, cfg: Config, n_in: int, n_out: int, target_index: int = -1):
        super().__init__()
        m, d = cfg.model, cfg.data
        _check_channels(d.features, n_in, n_out)
        self.cfg = cfg
        self.n_in, self.n_out = n_in, n_out
        self.target_index = target_index % n_in
        # A plain attribute, not a submodule: see timellm_lib.backbones for why sharing is safe.
        self.backbone: Backbone = load_backbone(m.backbone, m.llm_layers, m.backbone_dropout)
        check_llm_dim(cfg, self.backbone.llm_dim)
        self.n_patch = n_patches(d.seq_len, m.patch_len, m.stride)
        llm_dim, vocab = self.backbone.llm_dim, self.backbone.word_embeddings.shape[0]

        self.normalize = RevIN()
        self.channel_independence = Tap()
        self.patching = Patching(m.patch_len, m.stride)
        self.patch_embedding = PatchEmbedding(m.patch_len, m.d_model, m.dropout)
        self.text_prototypes = TextPrototypes(vocab, m.num_tokens)
        self.reprogramming = ReprogrammingLayer(m.d_model, m.n_heads, m.d_ff, llm_dim, m.dropout)
        self.prompt_embedding = Tap()
        self.llm_input = Tap()
        self.llm_output = Tap()
        self.llm_features = Tap()
        self.head = FlattenHead(m.d_ff, self.n_patch, d.pred_len, m.dropout)
        if d.features == "MS":
            self.channel_mixing = nn.Linear(n_in, 1)
            with torch.no_grad():
                self.channel_mixing.weight.zero_()
                self.channel_mixing.weight[0, self.target_index] = 1.0
                self.channel_mixing.bias.zero_()

    @property
    def backbone_fingerprint(self) -> str:
        return self.backbone.fingerprint

    # ------------------------------------------------------------------ module plumbing

    def _apply(self, fn: Callable, recurse: bool = True) -> TimeLLM:
        """``.to()``, ``.cuda()``, ``.double()`` also move the frozen LLM kept outside the tree."""
        super()._apply(fn, recurse)
        self.backbone.model._apply(fn, recurse)
        return self

    def train(self, mode: bool = True) -> TimeLLM:
        """The frozen LLM stays in eval mode unless ``model.backbone_dropout``."""
        super().train(mode)
        self.backbone.model.train(mode and self.cfg.model.backbone_dropout)
        return self

    def trace_stages(self) -> dict[str, tuple[str, str]]:
        """Submodule path -> (stage name, note) for ``timellm_lib.tracing``, in forward order."""
        m, b = self.cfg.model, self.backbone
        stages = {
            "normalize": ("Instance Norm", "RevIN: per-series mean/std over time, no affine"),
            "channel_independence": ("Channel Independence", "[B, L, N] -> [B*N, L, 1]"),
            "patching": (
                "Patching",
                f"replication pad {m.stride}, P = (L - {m.patch_len})//{m.stride} + 2 "
                f"= {self.n_patch}",
            ),
            "patch_embedding": ("Patch Embedding", "circular Conv1d (kernel 3) to d_model"),
            "text_prototypes": (
                "Text Prototypes",
                f"Linear(vocab -> {m.num_tokens}) of the frozen word embeddings",
            ),
            "reprogramming": (
                "Reprogramming",
                f"{m.n_heads} heads x d_keys {m.d_ff} over the prototypes, to llm_dim",
            ),
            "prompt_embedding": ("Prompt Embedding", "left-padded prompt tokens, word embeddings"),
            "llm_input": ("LLM Input", "[prompt ; patches], patches last"),
            "llm_output": ("LLM Output", f"frozen {b.name}, {b.n_layers} layers"),
            "llm_features": ("LLM Features", f"first d_ff = {m.d_ff} features of the last P"),
            "head": ("Head", "FlattenHead: d_ff*P -> pred_len"),
        }
        if hasattr(self, "channel_mixing"):
            stages["channel_mixing"] = ("Channel Mixing", "MS: Linear(n_in -> 1) to the target")
        return stages

    # --------------------------------------------------------------------------- forward

    def forward(self, x: Tensor, y: Tensor | None = None) -> Forecast:
        """x [B, seq_len, n_in] -> Forecast(pred [B, pred_len, n_out]); ``y`` is not used."""
        self._check_input(x)
        x_norm, mean, std = self.normalize(x)
        pred = self.forecast_normalized(x_norm)  # [B, pred_len, n_in]
        if hasattr(self, "channel_mixing"):
            t = self.target_index
            pred = self.channel_mixing(pred)
            mean, std = mean[..., t : t + 1], std[..., t : t + 1]
        return Forecast(pred=RevIN.denormalize(pred, mean, std))

    def forecast_normalized(self, x_norm: Tensor) -> Tensor:
        """Channel-independent forecast in normalised space: [B, L, N] -> [B, pred_len, N]."""
        b, length, n = x_norm.shape
        series = self.channel_independence(x_norm.transpose(1, 2).reshape(b * n, length, 1))
        series = series.squeeze(-1)  # [B*N, L]
        tokens = self.patch_embedding(self.patching(series))
        prototypes = self.text_prototypes(self.backbone.word_embeddings)
        patches = self.reprogramming(tokens, prototypes)  # [B*N, P, llm_dim]
        prompts = build_prompts(prompt_statistics(series, self.cfg.model.top_k_lags), self.cfg)
        embeds, mask = self.llm_inputs(prompts, patches)
        hidden = self.llm_output(self.backbone.encode(embeds, mask))
        features = self.llm_features(hidden[:, -self.n_patch :, : self.cfg.model.d_ff])
        return self.head(features).reshape(b, n, -1).transpose(1, 2)

    def llm_inputs(self, prompts: list[str], patches: Tensor) -> tuple[Tensor, Tensor]:
        """[prompt ; patches] embeddings [M, T+P, llm_dim] and attention mask [M, T+P].

        Prompts are padded on the left, so the patches are the last P positions of every
        row whatever the prompt lengths; padded positions are masked out.
        """
        encoded = self.backbone.tokenizer(prompts, return_tensors="pt", padding=True)
        ids = encoded["input_ids"].to(patches.device)
        prompt_mask = encoded["attention_mask"].to(patches.device)
        words = self.prompt_embedding(self.backbone.word_embeddings[ids])
        embeds = self.llm_input(torch.cat([words.to(patches.dtype), patches], dim=1))
        mask = torch.cat([prompt_mask, prompt_mask.new_ones(patches.shape[:2])], dim=1)
        limit = self.backbone.max_positions
        if limit is not None and embeds.shape[1] > limit:
            raise ValueError(
                f"the LLM input has {embeds.shape[1]} positions ({ids.shape[1]} prompt tokens "
                f"+ {self.n_patch} patches) but backbone {self.backbone.name!r} takes at most "
                f"{limit}; lower data.seq_len, raise model.stride, use "
                "model.prompt_format=compact or shorten model.description"
            )
        return embeds, mask

    def _check_input(self, x: Tensor) -> None:
        expected = (self.cfg.data.seq_len, self.n_in)
        if x.dim() != 3 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"TimeLLM expects input [batch, seq_len={expected[0]}, channels={expected[1]}], "
                f"got {list(x.shape)}; check data.seq_len and the number of input columns"
            )


def _check_channels(features: str, n_in: int, n_out: int) -> None:
    if n_in < 1 or n_out < 1:
        raise ConfigError(f"n_in = {n_in} and n_out = {n_out} must be at least 1")
    if features == "S" and (n_in, n_out) != (1, 1):
        raise ConfigError(f"data.features = S maps 1 channel to 1, got n_in={n_in}, n_out={n_out}")
    if features == "M" and n_in != n_out:
        raise ConfigError(
            f"data.features = M forecasts every input channel, got n_in={n_in} != n_out={n_out}; "
            "use data.features=MS to forecast one target from several inputs"
        )
    if features == "MS" and n_out != 1:
        raise ConfigError(f"data.features = MS forecasts one target, got n_out = {n_out}")
