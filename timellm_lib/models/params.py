"""Each model family's own hyperparameters, and :func:`model_params`, the one place that reads
them from a run config.

Models are built from these small frozen records, never from the run config, so training,
data-source and run settings cannot reach a model, and a model's ``forward`` reads only what
was fixed when it was built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from timellm_lib.config import Config


@dataclass(frozen=True)
class Window:
    """The window a model maps: ``seq_len`` steps in, ``pred_len`` out."""

    seq_len: int
    pred_len: int
    features: str  # M: all -> all, S: target -> target, MS: all -> target


@dataclass(frozen=True)
class PromptParams:
    """What the prompt says: the dataset, the task and how its statistics are printed."""

    description: str
    seq_len: int
    pred_len: int
    top_k_lags: int
    lags: Literal["distinct", "published"]  # published: lag 0 and mirrored lags take places
    padding: Literal[
        "masked", "published"
    ]  # published: pads attended where the tokenizer puts them
    format: Literal["compact", "published"]
    precision: int  # significant digits of the compact format


@dataclass(frozen=True)
class TimeLLMParams:
    """The baseline Time-LLM (and the core the enhanced model extends)."""

    window: Window
    prompt: PromptParams
    backbone: str
    llm_layers: int
    backbone_dropout: bool
    patch_len: int
    stride: int
    d_model: int
    d_ff: int
    n_heads: int
    num_tokens: int
    dropout: float
    prefix_cache: bool
    last_layer_patches_only: bool
    llm_ablation: Literal["none", "no_llm", "llm2attn", "llm2trsf"]


@dataclass(frozen=True)
class TAPRParams:
    """TAPR's trend branch; ``thresholds`` None means learn them from the training labels."""

    d_model: int
    pred_len: int
    n_scales: int
    n_heads: int
    thresholds: tuple[float, float, float, float] | None
    lambda_trend: float
    fusion: Literal["train_only", "always", "off"]
    fusion_form: Literal["reference", "multiplicative"]


@dataclass(frozen=True)
class GRAMParams:
    """GRA-M's retrieval memory: its geometry and how it is filled."""

    seq_len: int
    pred_len: int
    d_model: int
    n_heads: int
    d_repr: int
    top_k: int
    max_memory_size: int
    memory_windows: int
    build_memory: bool
    lambda_retrieval: float


@dataclass(frozen=True)
class EnhancedParams:
    """Time-LLM with TAPR and/or GRA-M (None: that module is off)."""

    core: TimeLLMParams
    tapr: TAPRParams | None
    gram: GRAMParams | None


@dataclass(frozen=True)
class LinearParams:
    """DLinear and the MLP baseline: a window and the MLP's dropout."""

    seq_len: int
    pred_len: int
    dropout: float


ModelParams = TimeLLMParams | EnhancedParams | LinearParams


def model_params(cfg: Config) -> ModelParams:
    """The hyperparameters of the model ``cfg`` names (what :func:`build_model` builds)."""
    m, d = cfg.model, cfg.data
    if m.name != "timellm":
        return LinearParams(d.seq_len, d.pred_len, m.dropout)
    core = _timellm(cfg)
    if not (m.use_tapr or m.use_gram):
        return core
    tapr = gram = None
    if m.use_tapr:
        tapr = TAPRParams(
            d_model=m.d_model,
            pred_len=d.pred_len,
            n_scales=m.n_scales,
            n_heads=m.n_heads,
            thresholds=None if m.trend_thresholds == "auto" else tuple(m.trend_thresholds),
            lambda_trend=m.lambda_trend,
            fusion=m.fusion,
            fusion_form=m.fusion_form,
        )
    if m.use_gram:
        gram = GRAMParams(
            seq_len=d.seq_len,
            pred_len=d.pred_len,
            d_model=m.d_model,
            n_heads=m.n_heads,
            d_repr=m.d_repr,
            top_k=m.top_k,
            max_memory_size=m.max_memory_size,
            memory_windows=m.memory_windows,
            build_memory=m.build_memory,
            lambda_retrieval=m.lambda_retrieval,
        )
    return EnhancedParams(core, tapr, gram)


def _timellm(cfg: Config) -> TimeLLMParams:
    m, d = cfg.model, cfg.data
    prompt = PromptParams(
        description=m.description,
        seq_len=d.seq_len,
        pred_len=d.pred_len,
        top_k_lags=m.top_k_lags,
        lags=m.prompt_lags,
        padding=m.prompt_padding,
        format=m.prompt_format,
        precision=m.prompt_precision,
    )
    return TimeLLMParams(
        window=Window(d.seq_len, d.pred_len, d.model_features),
        prompt=prompt,
        backbone=m.backbone,
        llm_layers=m.llm_layers,
        backbone_dropout=m.backbone_dropout,
        patch_len=m.patch_len,
        stride=m.stride,
        d_model=m.d_model,
        d_ff=m.d_ff,
        n_heads=m.n_heads,
        num_tokens=m.num_tokens,
        dropout=m.dropout,
        prefix_cache=m.prefix_cache,
        last_layer_patches_only=m.last_layer_patches_only,
        llm_ablation=m.llm_ablation,
    )
