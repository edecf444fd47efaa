"""From a checkpoint file to scores and forecasts: ``timellm eval`` and ``timellm predict``.

Inference needs only what a checkpoint holds for it: the trained weights, the resolved
config, the data's scaler and channel names (section ``data``, fitted on the training split),
and the frozen backbone, loaded by name (it is never stored; the checkpoint keeps its
fingerprint, which must match, so the weights are never paired with another model).
Forecasts are therefore always given in the data's original units.

Forecasting a user CSV (``timellm predict --input``) needs nothing else, so a checkpoint
copied to another machine predicts without the training data. Scoring a split (``timellm
eval``), forecasting the test split and :func:`forecast_example` read the splits of the
configured series (``data.path``); they are built on first use, exactly as training built
them. Checkpoints written before the ``data`` section existed rebuild the scaler and channel
names from ``data.path`` as well.

The model is built from the config and the weights are loaded strictly by name, so a
checkpoint that does not fit (another ``model.name``, other sizes) fails with the list of
mismatched tensors instead of loading half a model. Step and final checkpoints of a run with
``train.eval_with_ema`` are evaluated with their EMA weights, as training evaluated them;
``best.pt`` already stores the weights it was evaluated with.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from timellm_lib.config import Config, checkpoint_config, load_config
from timellm_lib.data import Datasets, Scaler, build_datasets, read_series
from timellm_lib.data.loaders import scale_to_float32
from timellm_lib.data.windows import DataError
from timellm_lib.errors import WorkbenchError
from timellm_lib.evaluation.metrics import (
    evaluate_report,
    forecasts,
    predict,
    published_metric,
)
from timellm_lib.files import atomic_file, write_text_atomic
from timellm_lib.models import build_model
from timellm_lib.models.backbones import BackboneError
from timellm_lib.training import schema as S
from timellm_lib.training.checkpoint import CheckpointError, load_checkpoint, load_model_weights
from timellm_lib.training.faults import describe_write_error, unwritable, write_fix

OUTPUT_SUFFIXES = (".csv", ".npz")


class InferenceError(WorkbenchError):
    """An eval or predict request cannot be served; the message says why and the fix."""


@dataclass
class Loaded:
    """A model ready for inference and everything needed to interpret its outputs."""

    model: nn.Module  # in eval mode, on ``device``
    cfg: Config  # the checkpoint's config (plus any overrides given when loading)
    scaler: Scaler  # the training split's statistics: scaled values <-> original units
    columns_in: list[str]  # the model's input channels, in input order
    columns_out: list[str]  # its forecast channels, in output order
    path: Path  # the checkpoint file
    kind: str  # step | best | final
    global_step: int
    weights: str  # "model" or "ema": which stored weights were loaded
    device: torch.device
    amp_dtype: torch.dtype | None  # the training precision, where this device supports it
    _datasets: Datasets | None = field(default=None, repr=False)  # built by ``datasets``

    @property
    def run_dir(self) -> Path:
        return run_dir_of(self.path)

    @property
    def channels(self) -> list[str]:
        """Names of the forecast channels, in model output order."""
        return self.columns_out

    @property
    def datasets(self) -> Datasets:
        """The configured splits, built from ``data.path`` on first use: only scoring and
        forecasting a split read the data file."""
        if self._datasets is None:
            why = "to score or forecast its splits (predict --input with a CSV of yours does not)"
            datasets = _training_data(self.cfg, self.path, why)
            found = (datasets.columns_in, datasets.columns_out)
            if found != (self.columns_in, self.columns_out):
                raise DataError(
                    f"checkpoint {self.path} was trained on input channels {self.columns_in} "
                    f"and output channels {self.columns_out}, but data.path = "
                    f"{self.cfg.data.path} gives {found[0]} and {found[1]}; point data.path "
                    "at the series the run was trained on"
                )
            self._datasets = datasets
        return self._datasets


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory of a checkpoint: the parent of ``checkpoints/``, else the file's
    own folder."""
    folder = Path(checkpoint).parent
    return folder.parent if folder.name == "checkpoints" else folder


def load_for_inference(
    path: str | Path, device: str = "cpu", overrides: list[str] | None = None
) -> Loaded:
    """Load checkpoint ``path`` for evaluation and prediction (see the module docstring).

    ``device``: cpu, cuda or auto. ``overrides`` (``section.key=value``) change the
    checkpoint's config before the model is built; only settings that leave the weights'
    names and shapes alone make sense (e.g. ``model.fusion``, ``data.eval_batch_size``).
    """
    path, chosen = Path(path), _device(device)
    payload = load_checkpoint(path)
    cfg = load_config(extra=checkpoint_config(payload[S.CONFIG]), overrides=overrides)
    data, datasets = payload.get(S.DATA), None
    if data is None:  # written before checkpoints stored the scaler and channel names
        datasets = _training_data(cfg, path, "to rebuild its scaler and channel names")
        data = datasets.inference_state()
    columns_in, columns_out = data["columns_in"], data["columns_out"]
    model = _build(cfg, len(columns_in), len(columns_out), path, payload.get(S.BACKBONE) or {})
    state, weights = payload[S.MODEL], "model"
    if payload.get(S.KIND) != "best" and cfg.train.eval_with_ema and payload.get(S.EMA):
        # averaged parameters only: older checkpoints also averaged buffers (GRA-M memory)
        params = dict(model.named_parameters())
        shadow = {n: t for n, t in payload[S.EMA]["shadow"].items() if n in params}
        state, weights = {**state, **shadow}, "ema"
    load_model_weights(model, state)
    model.to(chosen).eval()
    return Loaded(
        model=model,
        cfg=cfg,
        scaler=Scaler.from_state_dict(data["scaler"]),
        columns_in=columns_in,
        columns_out=columns_out,
        path=path,
        kind=payload.get(S.KIND, "step"),
        global_step=int(payload[S.GLOBAL_STEP]),
        weights=weights,
        device=chosen,
        amp_dtype=_amp_dtype(cfg.train.amp, chosen),
        _datasets=datasets,
    )


def _training_data(cfg: Config, path: Path, why: str) -> Datasets:
    try:
        return build_datasets(cfg.data)
    except DataError as err:
        raise DataError(
            f"checkpoint {path} needs its training data {why}: data.source = "
            f"{cfg.data.source}, data.path = {cfg.data.path} (relative to the working "
            f"directory); put that file there or run from where it is found. {err}"
        ) from None


def _build(cfg: Config, n_in: int, n_out: int, path: Path, saved: dict[str, Any]) -> nn.Module:
    """The model of the config, its random initial weights drawn without touching the
    caller's random state (they are overwritten by the checkpoint's anyway)."""
    try:
        with torch.random.fork_rng(devices=[]):
            model = build_model(cfg, n_in, n_out)
    except BackboneError as err:
        raise BackboneError(
            f"checkpoint {path} was trained on the frozen backbone {cfg.model.backbone!r} "
            "(model.backbone), which is not stored in checkpoints and must be loadable here: "
            f"{err}"
        ) from None
    current = model.backbone_fingerprint
    if saved.get("fingerprint") != current:
        raise CheckpointError(
            f"checkpoint {path} belongs to backbone {saved.get('name')!r} (fingerprint "
            f"{saved.get('fingerprint')}), but {cfg.model.backbone!r} loads here with fingerprint "
            f"{current}: the language model differs (other weights, layers or version), so the "
            "trained layers would not fit it; load the exact backbone the run was trained with"
        )
    return model


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise InferenceError(f"device {name!r} is unknown; choose cpu, cuda or auto")
    if name == "cuda" and not torch.cuda.is_available():
        raise InferenceError("device cuda was asked for but no CUDA GPU is available; use cpu")
    return torch.device(name)


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """Evaluate in the training precision; fp16 needs CUDA, so on a CPU it runs in float32."""
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16" and device.type == "cuda":
        return torch.float16
    return None


# ------------------------------------------------------------------------------ evaluation


def evaluate_checkpoint(
    path: str | Path,
    split: str = "test",
    batch_size: int | None = None,
    device: str = "cpu",
    write: bool = True,
    whole_split: bool = False,
) -> dict[str, Any]:
    """Load checkpoint ``path`` and score it on ``split`` (see :func:`evaluate_loaded`)."""
    _check_split(split, whole_split)  # before the model is loaded: a typo should cost nothing
    return evaluate_loaded(load_for_inference(path, device), split, batch_size, write, whole_split)


def evaluate_loaded(
    loaded: Loaded,
    split: str = "test",
    batch_size: int | None = None,
    write: bool = True,
    whole_split: bool = False,
) -> dict[str, Any]:
    """Score a loaded checkpoint on ``split`` (val or test); see
    :func:`timellm_lib.evaluation.evaluate_report` for the fields, plus ``split``,
    ``checkpoint`` (its path relative to the run directory), ``kind``, ``global_step``,
    ``weights`` and on val ``val_subset`` (the windows scored where the run validated on a
    ``data.val_subset``, else 0). With ``write`` the result also goes to the run directory, as
    :func:`eval_file_name` names it.

    Val is scored as the trainer validated: on the run's fixed ``data.val_subset`` where it
    has one (``whole_split``: every window, written as ``eval_val_all*.json``), and with
    ``data.val_metric = published`` in the order the validation at the checkpoint's global
    step drew, so best.pt gives the loss of the validation that saved it. Test is always
    whole. ``batch_size`` (default ``data.eval_batch_size``) changes only the speed.
    """
    _check_split(split, whole_split)
    cfg = loaded.cfg
    windows = loaded.datasets.split(split)
    if split == "val" and not whole_split:
        windows = loaded.datasets.validation_windows(cfg.data)
    report = evaluate_report(
        loaded.model,
        windows,
        loaded.datasets.scaler,
        loaded.channels,
        batch_size or cfg.data.eval_batch_size,
        loaded.device,
        loaded.amp_dtype,
        published_metric(cfg, len(loaded.channels), split, loaded.global_step),
    )
    result = {
        "split": split,
        **report,
        "checkpoint": _relative(loaded.path, loaded.run_dir),
        "kind": loaded.kind,
        "global_step": loaded.global_step,
        "checkpoint_global_step": loaded.global_step,  # the trainer's name for the same field
        "weights": loaded.weights,
    }
    if split == "val":  # fixed_subset gives the split itself where it is scored whole
        result["val_subset"] = 0 if windows is loaded.datasets.val else len(windows)
    if write:
        target = loaded.run_dir / eval_file_name(loaded.path, split, whole_split)
        try:
            write_text_atomic(target, json.dumps(result, indent=2) + "\n")
        except OSError as err:
            raise InferenceError(
                f"the {split} scores were computed but not saved: "
                f"{describe_write_error(err, target)}; {write_fix(err)} and evaluate again"
            ) from err
    return result


def eval_file_name(checkpoint: Path, split: str, whole_split: bool = False) -> str:
    """``eval_<split>.json`` is the run's official result, that of best.pt (the trainer
    writes it); any other checkpoint's scores go beside it under their own name,
    ``eval_<split>.<checkpoint stem>.json``, and never replace it. Val scored whole where the
    run may have validated on a subset is ``eval_val_all...``."""
    checkpoint = Path(checkpoint)
    label = f"{split}_all" if whole_split else split
    if checkpoint.name == "best.pt":
        return f"eval_{label}.json"
    return f"eval_{label}.{checkpoint.stem}.json"


def check_can_write(folder: Path, what: str) -> None:
    """Refuse, before any work, a command whose result could not be written into
    ``folder`` (read-only, no permission)."""
    err = unwritable(folder)
    if err is not None:
        raise InferenceError(
            f"{what} cannot be written: {describe_write_error(err, folder)}; {write_fix(err)}"
        )


def _check_split(split: str, whole_split: bool = False) -> None:
    if split not in ("val", "test"):
        raise InferenceError(f"split {split!r} cannot be evaluated; choose val or test")
    if whole_split and split != "val":
        raise InferenceError(
            "--whole-split applies to --split val (the test split is always scored whole); "
            "leave it out"
        )


def format_report(result: dict[str, Any]) -> str:
    """An evaluation result as a short text table for the terminal."""
    lines = [
        f"{result['split']} split, {result['n_windows']} windows, checkpoint "
        f"{result['checkpoint']} (global_step {result['global_step']}, {result['weights']} "
        "weights)",
        f"{'':<12}{'mse':>12}{'mae':>12}{'mse (orig)':>14}{'mae (orig)':>14}",
    ]

    def row(name: str, scores: dict[str, float]) -> str:
        return (
            f"{name:<12}{scores['mse']:>12.6g}{scores['mae']:>12.6g}"
            f"{scores['mse_original']:>14.6g}{scores['mae_original']:>14.6g}"
        )

    lines.append(row("overall", result))
    lines += [row(name, scores) for name, scores in result["per_channel"].items()]
    horizon = result["per_horizon"]
    shown = sorted({0, len(horizon) // 2, len(horizon) - 1})
    lines += [row(f"step {horizon[i]['step']}", horizon[i]) for i in shown]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ prediction


@dataclass
class Predictions:
    """Forecasts of ``W`` windows, ``H`` steps and ``C`` channels, in original units."""

    forecast: np.ndarray  # [W, H, C]
    truth: np.ndarray | None  # [W, H, C]; None when the future is unknown (user input)
    dates: np.ndarray  # [W, H] datetime64: the time each forecast value is for
    windows: np.ndarray  # [W] window index in its split (0 for user input)
    channels: list[str]

    def to_frame(self) -> pd.DataFrame:
        """One row per (window, step): ``date, window, step`` (1-based), then per channel
        ``<channel>_forecast`` and ``<channel>_truth`` (truth only when known)."""
        n_windows, horizon, _ = self.forecast.shape
        frame = pd.DataFrame(
            {
                "date": self.dates.reshape(-1),
                "window": np.repeat(self.windows, horizon),
                "step": np.tile(np.arange(1, horizon + 1), n_windows),
            }
        )
        for c, name in enumerate(self.channels):
            frame[f"{name}_forecast"] = self.forecast[:, :, c].reshape(-1)
            if self.truth is not None:
                frame[f"{name}_truth"] = self.truth[:, :, c].reshape(-1)
        return frame

    def save(self, path: str | Path) -> Path:
        """Write ``.csv`` (:meth:`to_frame`) or ``.npz`` (arrays ``forecast``, ``truth`` when
        known, ``dates``, ``windows``, ``channels``; loads without pickle) atomically."""
        path = check_output_path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix == ".csv":
                write_text_atomic(path, self.to_frame().to_csv(index=False))
            else:
                arrays = {
                    "forecast": self.forecast,
                    "dates": self.dates.astype("datetime64[ns]"),
                    "windows": self.windows,
                    "channels": np.array(self.channels),
                }
                if self.truth is not None:
                    arrays["truth"] = self.truth
                with atomic_file(path) as f:
                    np.savez(f, **arrays)
        except OSError as err:
            raise InferenceError(
                f"predictions not saved: {describe_write_error(err, path)}; {write_fix(err)}"
            ) from err
        return path


def check_output_path(path: str | Path) -> Path:
    """``path`` when it ends in .csv or .npz and its folder can be written (or created),
    else an error."""
    path = Path(path)
    if path.suffix not in OUTPUT_SUFFIXES:
        raise InferenceError(
            f"output {path} must end in .csv (a table) or .npz (numpy arrays); "
            f"got {path.suffix or 'no suffix'}"
        )
    check_can_write(path.parent, f"predictions {path}")
    return path


def predict_split(loaded: Loaded, split: str = "test") -> Predictions:
    """Forecasts and truth for every window of ``split``, in original units, with dates."""
    dataset = loaded.datasets.split(split)
    scaler, channels = loaded.datasets.scaler, loaded.channels
    preds, truths = [], []
    batches = forecasts(
        loaded.model,
        dataset,
        loaded.cfg.data.eval_batch_size,
        loaded.device,
        loaded.amp_dtype,
    )
    for pred, y in batches:
        preds.append(scaler.inverse_transform(pred.double().cpu().numpy(), channels))
        truths.append(scaler.inverse_transform(y.double().cpu().numpy(), channels))
    return Predictions(
        forecast=np.concatenate(preds),
        truth=np.concatenate(truths),
        dates=np.stack([dataset.dates(i)[1] for i in range(len(dataset))]),
        windows=np.arange(len(dataset)),
        channels=channels,
    )


def forecast_example(loaded: Loaded, split: str = "test", index: int = 0) -> dict[str, Any]:
    """Window ``index`` of ``split`` as keyword arguments of
    :func:`timellm_lib.notebooks.plots.forecast_mpl` / ``forecast_plotly``: the history of the forecast
    channels, the truth and the forecast (all in original units), channel names, the dates of
    history and future, and a title."""
    dataset = loaded.datasets.split(split)
    if not 0 <= index < len(dataset):
        raise InferenceError(
            f"window {index} does not exist: the {split} split has {len(dataset)} windows "
            f"(0 to {len(dataset) - 1})"
        )
    x, y = dataset[index]
    channels, scaler = loaded.channels, loaded.datasets.scaler
    pred = predict(loaded.model, x.unsqueeze(0), loaded.device, loaded.amp_dtype)
    history = x[:, [loaded.columns_in.index(c) for c in channels]].numpy()
    past, future = dataset.dates(index)
    return {
        "history": scaler.inverse_transform(history, channels),
        "truth": scaler.inverse_transform(y.numpy(), channels),
        "forecast": scaler.inverse_transform(pred[0].cpu().numpy(), channels),
        "channels": channels,
        "dates": np.concatenate([past, future]),
        "title": f"{split} window {index} of {len(dataset)}: {loaded.path.name} at global_step "
        f"{loaded.global_step}",
    }


def predict_csv(loaded: Loaded, csv_path: str | Path) -> Predictions:
    """The forecast that follows the last ``seq_len`` rows of a user CSV.

    The file is read and validated by the data layer with the training settings (date
    column, target) and must hold the training's value columns (any order) and at least
    ``seq_len`` rows. The forecast dates continue the file's own step (its most common
    spacing between rows).
    """
    csv_path = Path(csv_path)
    cfg = loaded.cfg.data
    if not csv_path.is_file():
        raise InferenceError(f"input CSV {csv_path} does not exist; pass --input an existing file")
    frame = read_series(
        dataclasses.replace(cfg, source="csv", path=str(csv_path)), trained_columns=True
    )
    expected = loaded.scaler.columns
    present = [c for c in frame.columns if c != cfg.date_column]
    missing = [c for c in expected if c not in present]
    extra = [c for c in present if c not in expected]
    if missing or extra:
        raise InferenceError(
            f"input CSV {csv_path} must have the training columns {expected} besides "
            f"{cfg.date_column!r}; missing {missing}, not in training {extra}. Rename or "
            "drop columns to match the data the checkpoint was trained on"
        )
    if len(frame) < cfg.seq_len:
        raise InferenceError(
            f"input CSV {csv_path} has {len(frame)} rows but the model reads the last seq_len "
            f"= {cfg.seq_len} rows; pass a longer history"
        )
    history = frame.iloc[-cfg.seq_len :]
    columns_in, scaler = loaded.columns_in, loaded.scaler
    rows = history[columns_in].to_numpy()
    first = len(frame) - cfg.seq_len
    x = torch.as_tensor(scale_to_float32(scaler, rows, columns_in, str(csv_path), first))
    x = x.unsqueeze(0)
    pred = predict(loaded.model, x, loaded.device, loaded.amp_dtype)
    forecast = scaler.inverse_transform(pred.double().cpu().numpy(), loaded.channels)
    dates = frame[cfg.date_column]
    step = dates.diff().mode().iloc[0] if len(dates) > 1 else pd.Timedelta(_freq_step(cfg.freq))
    future = dates.iloc[-1] + step * np.arange(1, cfg.pred_len + 1)
    return Predictions(
        forecast=forecast,
        truth=None,
        dates=np.asarray(future, dtype="datetime64[ns]")[None],
        windows=np.zeros(1, dtype=np.int64),
        channels=loaded.channels,
    )


def _freq_step(freq: str) -> str:
    return {"h": "1h", "15min": "15min"}[freq]


def _relative(path: Path, run_dir: Path) -> str:
    try:
        return str(path.resolve().relative_to(run_dir.resolve()))
    except ValueError:
        return str(path)


# ------------------------------------------------------------------------------ commands


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate, write ``eval_<split>.json`` into the run directory and print the scores."""
    if args.batch_size is not None and args.batch_size < 1:
        raise InferenceError(f"--batch-size {args.batch_size} must be at least 1")
    _check_split(args.split, args.whole_split)
    ckpt = Path(args.ckpt)
    if ckpt.is_file():  # else loading says what is wrong
        target = run_dir_of(ckpt) / eval_file_name(ckpt, args.split, args.whole_split)
        check_can_write(target.parent, f"the scores file {target}")
    result = evaluate_checkpoint(
        args.ckpt, args.split, args.batch_size, args.device, whole_split=args.whole_split
    )
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0


def run_predict(args: argparse.Namespace) -> int:
    """Forecast the test split or a user CSV and write the predictions file."""
    out = check_output_path(args.out)  # before the model is loaded: a typo should cost nothing
    if (
        args.input
        and out.exists()
        and Path(args.input).exists()
        and os.path.samefile(args.input, out)
    ):
        raise InferenceError(
            f"--out {args.out} is the --input file {args.input} itself (the same file, by "
            "path or link): writing the predictions would overwrite the series they are "
            "made from; choose another --out"
        )
    loaded = load_for_inference(args.ckpt, args.device)
    predictions = predict_csv(loaded, args.input) if args.input else predict_split(loaded)
    path = predictions.save(args.out)
    n_windows, horizon, n_channels = predictions.forecast.shape
    source = args.input or "the test split"
    first, last = predictions.dates[0, 0], predictions.dates[-1, -1]
    print(
        f"wrote {path}: {n_windows} window(s) x {horizon} steps x {n_channels} channel(s) "
        f"forecast from {source}, for {first} to {last}"
    )
    return 0
