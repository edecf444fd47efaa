"""Stage-by-stage tensor shapes of a model, measured by forward hooks on one real pass.

The stages of the Time-LLM models and their notes are written here (submodule path -> (stage
name, note), in forward order; stages that are not modules of their own are ``Tap``
submodules called on the tensor). The tracer hooks each listed module, runs one forward pass
and records every call in execution order, so the shapes are never written by hand.

Each row also has a ``spread``: how much the stage's output differs between the series of the
batch, relative to its size (:func:`series_spread`). A stage whose spread is near zero passes
on almost nothing of its input, which shapes cannot show: traced on real windows with trained
weights (:func:`trace_checkpoint`) it tells whether the language model sees the series at all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from timellm_lib.config import Config
from timellm_lib.data.windows import DataError
from timellm_lib.models import TrainableModel, as_forecast, build_model
from timellm_lib.models.enhanced import EnhancedTimeLLM
from timellm_lib.models.tapr import class_frequencies, quantile_thresholds, training_changes
from timellm_lib.models.timellm import TimeLLM


def trace_shapes(cfg: Config, batch_size: int = 32, n_channels: int | None = None) -> list[dict]:
    """Rows ``{"stage", "module", "shape", "note"}`` of one forward pass, in execution order.

    The input is random [batch_size, seq_len, n_in] with n_in = n_channels (default 7) for
    features M and MS and 1 for S. The caller's random state is left untouched. With TAPR
    on, a row ``TAPR labels`` after the trend token gives the class shares of the training split
    (:func:`trend_classes`).
    """
    n_channels = 7 if n_channels is None else n_channels
    features = cfg.data.model_features
    n_in = 1 if features == "S" else n_channels
    n_out = n_channels if features == "M" else 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(cfg, n_in, n_out)
        rows = trace_model(model, torch.randn(batch_size, cfg.data.seq_len, n_in))
    if cfg.model.use_tapr:  # right after the trend head's token
        after = max(i for i, row in enumerate(rows) if row["stage"] == "Trend Token")
        rows.insert(after + 1, _trend_class_row(cfg))
    return rows


def trace_checkpoint(path: str | Path, batch_size: int = 32, split: str = "val") -> list[dict]:
    """Trace the model of checkpoint ``path`` (its trained weights, as ``timellm eval`` loads
    them) on ``batch_size`` real windows of ``split``, evenly spaced over the split, so each
    row's ``spread`` measures how much the trained stage varies with the data."""
    from timellm_lib.evaluation.inference import load_for_inference

    loaded = load_for_inference(path)
    windows = loaded.datasets.split(split)
    idx = torch.linspace(0, len(windows) - 1, min(batch_size, len(windows))).long()
    x, _ = windows.get_batch(idx)
    return trace_model(loaded.model, x.to(loaded.device))


def series_spread(tensor: Tensor) -> float | None:
    """The standard deviation across the first dimension (the batch's windows or series),
    averaged over every other position, over the tensor's root mean square: about 1 for
    independent series, 0 for a stage whose output is the same whatever the series. None
    where it is undefined (fewer than two series, integer ids, an all-zero tensor)."""
    if tensor.ndim == 0 or tensor.shape[0] < 2 or not tensor.is_floating_point():
        return None
    values = tensor.detach().double()
    rms = values.pow(2).mean().sqrt()
    return float(values.std(dim=0).mean() / rms) if rms > 0 else None


def trend_classes(cfg: Config) -> dict[str, Any]:
    """TAPR's label classes on the training split of ``cfg``'s data: the thresholds training
    starts from (``auto``: quantiles of these labels) and the share of the training series
    in each direction and magnitude class. Raises DataError when the data cannot be read."""
    from timellm_lib.data import build_datasets

    changes = training_changes(build_datasets(cfg.data).train)
    auto = cfg.model.trend_thresholds == "auto"
    thresholds = quantile_thresholds(changes) if auto else cfg.model.trend_thresholds
    return {
        "thresholds": [float(t) for t in thresholds],
        "source": "auto (training quantiles)" if auto else "configured",
        "series": changes.numel(),
        **class_frequencies(changes, torch.tensor(thresholds)),
    }


def _trend_class_row(cfg: Config) -> dict:
    """The trace row of :func:`trend_classes` (its note says why when there is no data)."""
    try:
        classes = trend_classes(cfg)
    except DataError as err:
        note = f"class shares need the training data: {err}"
        return {"stage": "TAPR labels", "module": "tapr.head", "shape": [], "spread": None,
                "note": note}  # fmt: skip
    shares = "; ".join(
        ", ".join(f"{name} {share:.1%}" for name, share in classes[kind].items())
        for kind in ("direction", "magnitude")
    )
    thresholds = ", ".join(f"{t:.3g}" for t in classes["thresholds"])
    note = f"thresholds {classes['source']} [{thresholds}]: {shares}"
    return {
        "stage": "TAPR labels",
        "module": "tapr.head",
        "shape": [classes["series"]],
        "spread": None,
        "note": note,
    }


def trace_model(model: nn.Module, x: Tensor) -> list[dict]:
    """Trace one forward pass of ``model`` (in eval mode, without gradients) on ``x``.

    Every stage of the model gets a row each time it runs; a model without listed stages gets
    only the input and output rows. The output row carries
    ``speed_paths`` when the model reports them (:meth:`TimeLLM.speed_paths`).
    """
    rows = [_row("Input", "", x, "model input")]
    handles = []
    for path, (stage, note) in _stages(model).items():
        module = model.get_submodule(path)
        label = f"{path} ({type(module).__name__})"
        handles.append(module.register_forward_hook(_recorder(rows, stage, label, note)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = as_forecast(model(x))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    rows.append(_row("Output", "", out.pred, "forecast"))
    # which exact speed switches the model really uses, and why not
    paths = model.speed_paths() if isinstance(model, TrainableModel) else {}
    if paths:
        rows[-1]["speed_paths"] = paths
    return rows


def format_trace(rows: list[dict]) -> str:
    """A plain-text table of trace rows."""
    header = {"stage": "stage", "module": "module", "shape": "shape", "spread": "spread",
              "note": "note"}  # fmt: skip
    cells = [header] + [
        {**row, "shape": _shape_text(row["shape"]), "spread": _spread_text(row.get("spread"))}
        for row in rows
    ]
    widths = {key: max(len(str(c[key])) for c in cells) for key in header}
    lines = ["  ".join(str(c[key]).ljust(widths[key]) for key in header).rstrip() for c in cells]
    lines.insert(1, "  ".join("-" * widths[key] for key in header))
    for path, status in rows[-1].get("speed_paths", {}).items():
        lines.append(f"speed path {path}: {status}")
    return "\n".join(lines)


def _stages(model: nn.Module) -> dict[str, tuple[str, str]]:
    """Submodule path -> (stage name, note), in forward order: the Time-LLM models' stages
    are written here; another model may list its own with ``trace_stages()``."""
    if isinstance(model, EnhancedTimeLLM):
        return _enhanced_stages(model)
    if isinstance(model, TimeLLM):
        return _timellm_stages(model)
    trace_stages = getattr(model, "trace_stages", None)
    return trace_stages() if callable(trace_stages) else {}


# ------------------------------------------------------------------ Time-LLM stage notes


def _timellm_stages(model: TimeLLM) -> dict[str, tuple[str, str]]:
    """The baseline Time-LLM's stages in forward order."""
    m = model.hp
    stages = {
        "normalize": ("Instance Norm", "RevIN: per-series mean/std over time, no affine"),
        "channel_independence": ("Channel Independence", "[B, L, N] -> [B*N, L, 1]"),
        "patching": (
            "Patching",
            f"replication pad {m.stride}, P = (L - {m.patch_len})//{m.stride} + 2 "
            f"= {model.n_patch}",
        ),
        "patch_embedding": ("Patch Embedding", "circular Conv1d (kernel 3) to d_model"),
    }
    if model.backbone is None:
        positions = model.head.linear.in_features // m.d_model
        stages["head"] = (
            "Head",
            f"no_llm: FlattenHead d_model*{positions} -> pred_len, no LLM, no prompt",
        )
    else:
        stages.update(_language_stages(model))
    if hasattr(model, "channel_mixing"):
        stages["channel_mixing"] = ("Channel Mixing", "MS: Linear(n_in -> 1) to the target")
    return stages


def _language_stages(model: TimeLLM) -> dict[str, tuple[str, str]]:
    m, b = model.hp, model.backbone
    if model.llm_standin is None:
        llm = f"frozen {b.name}, {b.n_layers} layers"
    else:
        kind = type(model.llm_standin).__name__
        llm = f"{m.llm_ablation}: one trainable {kind} replaces {b.name}"
    return {
        "text_prototypes": (
            "Text Prototypes",
            f"Linear(vocab -> {m.num_tokens}) of the frozen word embeddings",
        ),
        "reprogramming": (
            "Reprogramming",
            f"{m.n_heads} heads x d_keys {m.d_ff} over the prototypes, to llm_dim",
        ),
        "prompt_embedding": ("Prompt Embedding", _prompt_note(model)),
        "llm_input": ("LLM Input", _llm_input_note(model)),
        "llm_output": ("LLM Output", _llm_output_note(model, llm)),
        "llm_features": ("LLM Features", f"first d_ff = {m.d_ff} features of the last P"),
        "head": ("Head", "FlattenHead: d_ff*P -> pred_len"),
    }


def _llm_output_note(model: TimeLLM, llm: str) -> str:
    if model.keeps_patches_only():
        return f"{llm}; its final layer computes only the last P (patch) positions"
    return llm


def _llm_input_note(model: TimeLLM) -> str:
    if isinstance(model, EnhancedTimeLLM):
        return _enhanced_llm_input_note(model)
    if model.caches_prefix(None):
        return "[per-series prompt ; patches] after the cached head, patches last"
    return "[prompt ; patches], patches last"


def _prompt_note(model: TimeLLM) -> str:
    if model.caches_prefix(None):
        n_head = model.prompt_tokenizer.head.numel()
        return (
            f"per-series prompt tokens, left-padded; the shared head ({n_head} tokens) "
            "runs once per batch into a key/value cache"
        )
    if model.hp.prompt.padding == "published":
        side = model.prompt_tokenizer.own_padding_side
        return f"prompt tokens padded on the {side} as published, pads attended (no mask)"
    return "left-padded prompt tokens, word embeddings"


def _enhanced_stages(model: EnhancedTimeLLM) -> dict[str, tuple[str, str]]:
    """The enhanced model's stages: TAPR and GRA-M after the patch embedding."""
    tapr, gram = model.tapr_hp, model.gram_hp
    base = _timellm_stages(model)
    extra = {}
    if tapr is not None:
        kernels = ", ".join(str(4**s) for s in range(tapr.n_scales))
        extra["tapr.decomposition"] = (
            "TAPR-DM",
            f"{tapr.n_scales} scales (pooling {kernels}), cross-scale attention",
        )
        extra["trend_token"] = ("Trend Token", "TAPR-C2F trend class -> 1 LLM token")
    if gram is not None:
        extra["gram.akg"] = (
            "GRA-M",
            f"top-{gram.top_k} retrieval, gated cross-attention fusion of retrieved futures",
        )
        extra["retrieval_tokens"] = ("Retrieval Tokens", "context, confidence -> 2 tokens")
    stages = {}
    for path, stage in base.items():
        stages[path] = stage
        if path == "patch_embedding":
            stages.update(extra)
    if hasattr(model, "trend_fusion"):
        formula = {
            "reference": "pred + adj * |pred - last input|",
            "multiplicative": "pred * (1 + adj)",
        }[tapr.fusion_form]
        stages["trend_fusion"] = ("Trend Fusion", f"fusion={tapr.fusion}: {formula}")
    return stages


def _enhanced_llm_input_note(model: EnhancedTimeLLM) -> str:
    tokens = ["trend"] * (model.tapr_hp is not None) + ["retrieval x2"] * (
        model.gram_hp is not None
    )
    return f"[pad ; {' ; '.join(tokens)} ; prompt ; patches], patches last"


def _recorder(rows: list[dict], stage: str, label: str, note: str) -> Callable:
    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        rows.append(_row(stage, label, _first_tensor(output), note))

    return hook


def _first_tensor(output: Any) -> Tensor:
    """The tensor a stage produced: a module may return a tuple (RevIN's statistics, TAPR-DM's
    trends) or a dataclass (Forecast, GRA-M's fusion); the first tensor in it is the stage's
    main output."""
    if dataclasses.is_dataclass(output):
        output = [getattr(output, f.name) for f in dataclasses.fields(output)]
    if isinstance(output, list | tuple):
        return next(o for o in output if isinstance(o, Tensor))
    return output


def _row(stage: str, module: str, tensor: Tensor, note: str) -> dict:
    shape, spread = list(tensor.shape), series_spread(tensor)
    return {"stage": stage, "module": module, "shape": shape, "spread": spread, "note": note}


def _spread_text(spread: float | None) -> str:
    return "-" if spread is None else f"{spread:.2g}"


def _shape_text(shape: list[int] | str) -> str:
    return "[" + ", ".join(map(str, shape)) + "]" if isinstance(shape, list) else str(shape)
