"""Run configuration: typed dataclasses, YAML loading, dotted overrides, validation.

Every run is described by one :class:`Config` (data, model, train, run sections). It is
resolved once, before anything runs, so that a typo or an impossible combination fails in
milliseconds with a message naming the key, instead of an hour into training. The resolved
config (every default filled in) is written as ``config.yaml`` into the run directory and
stored in each checkpoint.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from timellm_lib.errors import WorkbenchError
from timellm_lib.yaml_input import load_yaml

BASE_KEY = "base"  # a config file's `base: other.yaml`, merged underneath it


class ConfigError(WorkbenchError, ValueError):
    """A config value is unknown, of the wrong type or impossible; the message says the fix."""


@dataclass
class DataConfig:
    source: Literal["synthetic", "ett", "csv"] = "synthetic"  # synthetic is written to data/
    path: str = "data/synthetic_ett.csv"  # CSV file (ETT or generic); synthetic is written here
    freq: Literal["h", "15min"] = (
        "h"  # ETTh* (hourly) or ETTm* (15 minutes): split borders, dates of forecasts
    )
    features: Literal["M", "S", "MS"] = "M"  # M: all->all, S: target->target, MS: all->target
    # MS as what: target, the target forecast from all channels (a learned channel mix);
    # published, as the published ETT loader runs it: one channel a sample, every channel
    # trained and scored, i.e. features M (with sample_unit channel exactly the published run)
    ms_mode: Literal["target", "published"] = "target"
    target: str = "OT"
    date_column: str = "date"
    seq_len: int = 512
    label_len: int = 48
    pred_len: int = 96
    percent: int = 100  # few-shot: percentage of the training windows used
    split: tuple[float, float, float] = (0.7, 0.1, 0.2)  # generic CSV train/val/test fractions
    synthetic_rows: int = 17420
    synthetic_seed: int = 0
    # a training sample: a whole window (all channels) or, as the published ETT loader, one
    # channel of one window (batch_size then counts univariate series; features M or S)
    sample_unit: Literal["window", "channel"] = "window"
    batch_size: int = 8
    eval_batch_size: int = 32
    # validation windows scored at each validation: 0 all; N a fixed subset of N windows,
    # drawn once from val_subset_seed (the same windows at every validation and for every
    # train.seed); the test split is always scored whole
    val_subset: int = 0
    val_subset_seed: int = 0
    # test scores: every_window, each window once; published, the published test loader's
    # mean of batch means: series in channel-major order, batches of the series of one
    # training batch, the last incomplete batch dropped (eval JSON: n_series_dropped)
    test_metric: Literal["every_window", "published"] = "every_window"
    # validation loss (EarlyStopping, best.pt): every_window; published, the published
    # validation loader's: the same as test_metric published, with the series shuffled anew
    # at each validation (seeded by train.seed and the global step)
    val_metric: Literal["every_window", "published"] = "every_window"
    num_workers: int = 0

    @property
    def model_features(self) -> str:
        """The features the data and model run: MS with ``ms_mode = published`` runs as M."""
        return "M" if self.features == "MS" and self.ms_mode == "published" else self.features


@dataclass
class ModelConfig:
    name: Literal["timellm", "dlinear", "mlp"] = "timellm"  # mlp: tiny, fast baseline
    backbone: str = "minilm"  # minilm | tiny-random-gpt2 | a Hugging Face id or local directory
    llm_layers: int = 0  # 0 keeps every layer of the backbone; N truncates to the first N
    patch_len: int = 16
    stride: int = 8
    d_model: int = 32
    d_ff: int = 128
    n_heads: int = 8
    num_tokens: int = 1000  # text prototypes the patches are reprogrammed onto
    dropout: float = 0.1
    description: str = (
        "The Electricity Transformer Temperature (ETT) is a crucial indicator in the "
        "electric power long-term deployment."
    )
    top_k_lags: int = 5
    # distinct: the top lags among 1..L/2 (lag 0 and the mirrored lags L-k excluded);
    # published: top-k over every index of the circular autocorrelation, lag 0 and mirrors in
    prompt_lags: Literal["distinct", "published"] = "distinct"
    # masked: prompts padded on the left, padding masked, patches last in every row;
    # published: the tokenizer's own padding side and pad token (eos when it has one), no
    # attention mask, so pad tokens are attended (the shared-prefix cache is then off)
    prompt_padding: Literal["masked", "published"] = "masked"
    prompt_format: Literal["compact", "published"] = "compact"  # compact rounds statistics
    prompt_precision: int = 3  # significant digits of prompt statistics (compact format)
    backbone_dropout: bool = False  # the published code leaves dropout active in the frozen LM
    prefix_cache: bool = True  # causal LLMs: the constant prompt head runs once per batch (exact)
    # BERT-style LLMs: the final layer computes only the patch positions the head reads (exact)
    last_layer_patches_only: bool = True
    # enhanced model (TAPR, GRA-M) and LLM ablations
    use_tapr: bool = False
    use_gram: bool = False
    n_scales: int = 3
    top_k: int = 5
    d_repr: int = 64
    lambda_trend: float = 0.5
    lambda_retrieval: float = 0.3
    build_memory: bool = True
    max_memory_size: int = 10000
    memory_windows: int = 5000
    fusion: Literal["train_only", "always", "off"] = "always"
    # reference: move the forecast by adj x its distance from the last input value (the trend
    # labels' reference), so an up trend never lowers it; multiplicative: the design's
    # pred * (1 + adj) around the window mean (direction depends on the forecast's sign)
    fusion_form: Literal["reference", "multiplicative"] = "reference"
    # TAPR thresholds t1 < t2 < t3 < t4 on the change over the horizon in units of the window's
    # mean absolute deviation (learnable; initial values). auto: the 1/6, 1/3, 2/3, 5/6
    # quantiles of the training split's labels, set when training starts (timellm_lib.models.tapr)
    trend_thresholds: tuple[float, float, float, float] | Literal["auto"] = "auto"
    llm_ablation: Literal["none", "no_llm", "llm2attn", "llm2trsf"] = "none"


@dataclass
class TrainConfig:
    epochs: int = 10
    lr: float = 1e-3
    optimizer: Literal["adam", "adamw"] = "adam"
    weight_decay: float = 0.0
    # published_type1/3: run_main.py's lr as it really runs (lr/25, beta1 0.95; see schedulers)
    scheduler: Literal[
        "constant",
        "step",
        "cosine",
        "onecycle",
        "type1",
        "type3",
        "published_type1",
        "published_type3",
    ] = "constant"
    step_size: int = 1  # epochs between decays of the step scheduler
    gamma: float = 0.5
    pct_start: float = 0.2  # onecycle warm-up fraction
    patience: int = 3
    delta: float = 0.0
    save_steps: int = 0  # 0: step checkpoints only at epoch ends
    save_total_limit: int = 3  # step checkpoints kept (best.pt and the newest always kept)
    eval_steps: int = 0  # 0: validate at epoch ends only
    # also score the test split after every epoch, as the published run_main.py prints it
    # (an epoch_test event; it decides nothing and costs a test pass an epoch)
    test_every_epoch: bool = False
    log_steps: int = 10
    amp: Literal["off", "bf16", "fp16"] = "off"
    compile: bool = False  # torch.compile the model in place (for GPUs; state_dict keys unchanged)
    fused_optimizer: bool = True  # fused Adam/AdamW kernel where torch has one (faster update)
    ema_decay: float = 0.0  # 0 disables EMA
    eval_with_ema: bool = False
    grad_accum: int = 1
    grad_clip: float = 0.0  # 0 disables clipping
    aux_warmup_steps: int = 500
    seed: int = 2021
    threads: int = 0  # 0 leaves torch's thread count alone
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available, else cpu
    # a non-finite loss: stop (naming the last good checkpoint), skip the batch, or reload the
    # last checkpoint and go on from it with its lr times on_nan_lr_factor
    on_nan: Literal["stop", "skip", "reload"] = "stop"
    on_nan_lr_factor: float = 0.5  # on_nan = reload: lr multiplier after each reload
    on_nan_max_reloads: int = 3  # on_nan = reload: stop after this many reloads in one process
    # a checkpoint that cannot be written (disk full, no permission): stop the run (exit 2),
    # or log it and train on (later saves try again)
    on_save_error: Literal["stop", "continue"] = "stop"


@dataclass
class RunConfig:
    experiment: str = "default"
    run_id: str = ""  # empty: a timestamped id is chosen when the run starts
    output_dir: str = "outputs"


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _plain(value: Any) -> Any:
    """Tuples become lists so the dict survives YAML and ``torch.load(weights_only=True)``."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------------- loading


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> Config:
    """Build a validated Config from a YAML file, a dict and ``KEY=VALUE`` overrides.

    Precedence: defaults < the file's ``base`` chain < file < ``extra`` (nested dict) <
    ``overrides`` (dotted strings).
    """
    raw = _read_config_file(Path(path)) if path is not None else {}
    if extra:
        raw = _merge(raw, extra)
    for item in overrides or []:
        key, value = parse_override(item)
        raw = _merge(raw, _nest(key, value))
    return config_from_dict(raw)


def _read_config_file(path: Path, including: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config as a dict, its ``base: other.yaml`` (relative to this file) merged
    underneath, so a variant states only what differs from the file it builds on."""
    if not path.is_file():
        named = f", named as base by {including[-1]}" if including else ""
        raise ConfigError(f"config file {path} does not exist{named}; pass an existing YAML file")
    if path.resolve() in including:
        chain = " -> ".join(str(p) for p in (*including, path.resolve()))
        raise ConfigError(f"config files include each other in a circle ({chain}); remove a base")
    try:
        loaded = load_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if loaded is None:  # an empty file would silently run every default (hours of work)
        raise ConfigError(
            f"config file {path} is empty (or holds only comments), so every setting would "
            "take its default (the full default run); write the sections you mean, or `{}` "
            "on a line of its own to run the defaults on purpose"
        )
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    base = loaded.pop(BASE_KEY, None)
    if base is None:
        return loaded
    if not isinstance(base, str) or not base:
        raise ConfigError(
            f"config file {path}: {BASE_KEY} must be a file name (e.g. base: baseline.yaml), "
            f"got {base!r}"
        )
    parent = _read_config_file(path.parent / base, (*including, path.resolve()))
    return _merge(parent, loaded)


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``section.key=value``; the value is read as YAML (``true``, ``5e-4``, ``[1,2]``)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.lr=5e-4")
    key, text = item.split("=", 1)
    key = key.strip()
    if key.count(".") != 1:
        raise ConfigError(
            f"override key {key!r} must be section.key with section one of {_section_names()}"
        )
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    # YAML 1.1 reads yes/no/on/off as booleans; only true/false mean that here (fusion=off)
    if isinstance(value, bool) and text.strip().lower() not in {"true", "false"}:
        value = text.strip()
    # YAML 1.1 reads 5e-4 as a string; numbers written that way are meant as floats
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else value
        except ValueError:
            pass
    return key, value


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Type-check every key, fill defaults, then check combinations."""
    sections = {f.name: f for f in dataclasses.fields(Config)}
    unknown = set(raw) - set(sections)
    if unknown:
        raise ConfigError(
            f"unknown config section(s) {sorted(unknown)}; allowed sections: {_section_names()}"
        )
    built = {}
    for name, f in sections.items():
        cls = f.default_factory  # type: ignore[misc]
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"config section {name!r} must be a mapping of keys to values")
        built[name] = _build_section(name, cls, values)
    cfg = Config(**built)
    validate(cfg)
    return cfg


def _build_section(section: str, cls: type, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(
                f"unknown config key {section}.{key}; allowed keys in {section}: {allowed}"
            )
        kwargs[key] = _coerce(f"{section}.{key}", value, hints[key])
    return cls(**kwargs)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):  # the first alternative that takes the value
        errors = []
        for option in typing.get_args(hint):
            try:
                return _coerce(key, value, option)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(" or ".join(errors))
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{key} = {value!r} is not allowed; choose one of {list(choices)}")
        return value
    if origin is tuple:
        item_type = typing.get_args(hint)[0]
        n = len(typing.get_args(hint))
        if not isinstance(value, list | tuple) or len(value) != n:
            raise ConfigError(f"{key} must be a list of {n} numbers, got {value!r}")
        return tuple(_coerce(key, v, item_type) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"{key}: config field type {hint} is not handled by _coerce")


def validate(cfg: Config) -> None:
    """Reject impossible combinations before anything runs."""
    _check_signs(cfg)
    _check_ranges(cfg)
    _check_combinations(cfg)
    # d_ff > llm_dim is checked when the backbone is loaded: llm_dim comes from its config.


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_signs(cfg: Config) -> None:
    """Counts that must be at least 1, amounts that must not be negative."""
    d, m, t = cfg.data, cfg.model, cfg.train
    for key, value in [
        ("data.seq_len", d.seq_len),
        ("data.pred_len", d.pred_len),
        ("data.batch_size", d.batch_size),
        ("data.eval_batch_size", d.eval_batch_size),
        ("model.patch_len", m.patch_len),
        ("model.stride", m.stride),
        ("model.d_model", m.d_model),
        ("model.d_ff", m.d_ff),
        ("model.n_heads", m.n_heads),
        ("model.num_tokens", m.num_tokens),
        ("model.n_scales", m.n_scales),
        ("model.top_k", m.top_k),
        ("model.d_repr", m.d_repr),
        ("train.epochs", t.epochs),
        ("train.grad_accum", t.grad_accum),
        ("train.log_steps", t.log_steps),
        ("train.patience", t.patience),
        ("train.step_size", t.step_size),
        ("train.on_nan_max_reloads", t.on_nan_max_reloads),
        ("model.prompt_precision", m.prompt_precision),
    ]:
        _need(value >= 1, f"{key} = {value} must be at least 1")
    for key, value in [
        ("data.label_len", d.label_len),
        ("data.num_workers", d.num_workers),
        ("data.val_subset", d.val_subset),
        ("model.llm_layers", m.llm_layers),
        ("model.top_k_lags", m.top_k_lags),
        ("train.save_steps", t.save_steps),
        ("train.save_total_limit", t.save_total_limit),
        ("train.eval_steps", t.eval_steps),
        ("train.aux_warmup_steps", t.aux_warmup_steps),
        ("train.threads", t.threads),
        ("train.lr", t.lr),
        ("train.weight_decay", t.weight_decay),
        ("train.grad_clip", t.grad_clip),
        ("train.delta", t.delta),
        ("model.lambda_trend", m.lambda_trend),
        ("model.lambda_retrieval", m.lambda_retrieval),
    ]:
        _need(value >= 0, f"{key} = {value} must not be negative")


def _check_ranges(cfg: Config) -> None:
    """Values that must lie in an interval."""
    d, m, t = cfg.data, cfg.model, cfg.train
    _need(t.lr > 0, f"train.lr = {t.lr} must be positive")
    _need(
        0.0 < t.on_nan_lr_factor <= 1.0,
        f"train.on_nan_lr_factor = {t.on_nan_lr_factor} must be in (0, 1]",
    )
    _need(
        d.seq_len >= m.patch_len,
        f"data.seq_len = {d.seq_len} is shorter than model.patch_len = {m.patch_len}; "
        "raise seq_len or lower patch_len",
    )
    _need(
        m.stride <= m.patch_len,
        f"model.stride = {m.stride} exceeds model.patch_len = {m.patch_len}; "
        "patches would skip time steps",
    )
    _need(
        d.label_len <= d.seq_len,
        f"data.label_len = {d.label_len} exceeds data.seq_len = {d.seq_len}",
    )
    _need(0 < d.percent <= 100, f"data.percent = {d.percent} must be in 1..100")
    _need(0.0 <= m.dropout < 1.0, f"model.dropout = {m.dropout} must be in [0, 1)")
    _need(0.0 <= t.ema_decay < 1.0, f"train.ema_decay = {t.ema_decay} must be in [0, 1)")
    _need(0.0 < t.pct_start < 1.0, f"train.pct_start = {t.pct_start} must be in (0, 1)")
    _need(0.0 < t.gamma <= 1.0, f"train.gamma = {t.gamma} must be in (0, 1]")


def _check_combinations(cfg: Config) -> None:
    """Settings that contradict each other, and names that must stay plain."""
    d, m = cfg.data, cfg.model
    _need(
        d.sample_unit == "window" or d.model_features != "MS",
        "data.sample_unit = channel makes every sample one channel, but features MS with "
        "data.ms_mode = target forecasts the target from all channels of a window; use "
        "data.sample_unit=window, or data.ms_mode=published (MS as the published ETT loader "
        "runs it: every channel trained and scored as with features M; with "
        "sample_unit=channel that is exactly the published run)",
    )
    _need(
        abs(sum(d.split) - 1.0) < 1e-6 and all(s > 0 for s in d.split),
        f"data.split = {list(d.split)} must be three positive fractions that add up to 1",
    )
    _need(
        m.memory_windows <= m.max_memory_size,
        f"model.memory_windows = {m.memory_windows} exceeds model.max_memory_size = "
        f"{m.max_memory_size}",
    )
    thresholds = [] if m.trend_thresholds == "auto" else list(m.trend_thresholds)
    _need(
        thresholds == sorted(set(thresholds)),
        f"model.trend_thresholds = {thresholds} must be strictly increasing (t1 < t2 < t3 < t4)",
    )
    _need(
        not (m.use_tapr or m.use_gram) or m.d_model % m.n_heads == 0,
        f"model.d_model = {m.d_model} is not divisible by model.n_heads = {m.n_heads}, which "
        "TAPR and GRA-M attention need; change one of them",
    )
    _need(bool(cfg.run.experiment.strip()), "run.experiment must not be empty")
    for key, value in [("run.experiment", cfg.run.experiment), ("run.run_id", cfg.run.run_id)]:
        _need(
            "/" not in value and "\\" not in value and value not in {".", ".."},
            f"{key} = {value!r} must be a plain name (no path separators)",
        )


def check_llm_dim(d_ff: int, backbone: str, llm_dim: int) -> None:
    """The model keeps the first d_ff features of the LLM output, so d_ff <= llm_dim."""
    if d_ff > llm_dim:
        raise ConfigError(
            f"model.d_ff = {d_ff} exceeds the backbone width llm_dim = {llm_dim} of "
            f"{backbone!r}; set model.d_ff to at most {llm_dim}"
        )


# Keys added after checkpoints were first written, with the value those checkpoints were
# trained with where the new default behaves differently (model.fusion_form: issue 13).
CHECKPOINT_DEFAULTS: dict[str, dict[str, Any]] = {"model": {"fusion_form": "multiplicative"}}


def checkpoint_config(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's stored config with the keys it predates filled in as it was trained,
    so an older checkpoint keeps computing what it computed."""
    return _merge(CHECKPOINT_DEFAULTS, saved)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    section, key = dotted.split(".", 1)
    return {section: {key: value}}


def _section_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]
