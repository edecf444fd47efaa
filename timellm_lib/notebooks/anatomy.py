"""What a checkpoint holds, field by field, and what each part is for (notebook 02).

:func:`timellm_lib.training.checkpoint.describe_checkpoint` gives the headline fields and the
serialized size of each section. This module adds the views a reader needs to *understand*
a file, all computed from real files so they stay true when the layout changes:

- :func:`field_table`: every top-level field with its value, size and whether inference or
  a resume needs it (inference needs the weights, the config, the backbone's name and the
  data's scaler and channel names; a resume needs everything that moves during training as
  well).
- :func:`tensor_table`: the tensors of the ``model`` section and their role (trainable
  parameter, buffer, GRA-M memory buffer).
- :func:`backbone_report`: the frozen language model is not in the file; its size next to
  the file's, and the fingerprint that ties the weights to it.
- :func:`checkpoint_files` and :func:`fields_by_kind`: how step, best and final files differ;
  :func:`best_companion` checks best.pt's resumable twin.
- :func:`round_trip`: model in memory -> state_dict -> file -> fresh model gives the same
  digest and the same forecasts.

Models are loaded from files as inference loads them
(:func:`timellm_lib.evaluation.inference.load_for_inference`).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from torch import nn

from timellm_lib.config import Config, load_config
from timellm_lib.data import build_datasets
from timellm_lib.data.sampler import eval_batches
from timellm_lib.evaluation.inference import load_for_inference
from timellm_lib.models import build_model
from timellm_lib.models.output import as_forecast
from timellm_lib.notebooks.describe import describe_checkpoint
from timellm_lib.notebooks.plots import PALETTE
from timellm_lib.training import schema as S
from timellm_lib.training import train
from timellm_lib.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model_weights,
    state_digest,
    step_files,
)
from timellm_lib.training.rng import seed_everything

INFERENCE_FIELDS = S.INFERENCE_FIELDS
RESUME_FIELDS = S.RESUME_FIELDS
MEMORY_PREFIX = "memory_"  # GRA-M's memory bank buffers (see timellm_lib.models.gram.PVDR)
KIND_ORDER = {"step": 0, "best": 1, "final": 2}
# Applied before the user's overrides to the small runs the notebooks train: one torch
# thread, since small models gain nothing from more and on a busy machine threads waiting
# for each other make them several times slower.
SMALL_RUN_DEFAULTS = ("train.threads=1",)


def _build(cfg: Config, datasets: Any) -> tuple[nn.Module, Any]:
    """A freshly initialised model of ``cfg`` (and the datasets, built when None)."""
    if datasets is None:
        datasets = build_datasets(cfg.data)
    return build_model(cfg, datasets.n_in, datasets.n_out), datasets


def train_fresh(
    config: str | Path | None, overrides: list[str], output_root: str | Path
) -> tuple[Path, nn.Module]:
    """Train a new run of ``config`` (with :data:`SMALL_RUN_DEFAULTS`, then ``overrides``)
    into ``<output_root>/anatomy/<timestamp>``; return its directory and the model object it
    trained (which then holds best.pt's weights)."""
    cfg = load_config(
        config or None,
        overrides=[
            *SMALL_RUN_DEFAULTS,
            *overrides,
            f"run.output_dir={output_root}",
            "run.experiment=anatomy",
        ],
    )
    seed_everything(cfg.train.seed)  # the model's initial weights do not depend on the past
    model, datasets = _build(cfg, None)
    result = train(cfg, model=model, datasets=datasets, progress=False)
    return result.run_dir, model


def require_checkpoints(run_dir: str | Path) -> Path:
    """``run_dir`` if it holds step checkpoints (every run with checkpoints has one: rotation
    keeps the newest and best.pt's companion); else an error naming the fix."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(
            f"run directory {run_dir} does not exist; pass a directory written by `timellm "
            "train` (outputs/<experiment>/<run_id>) or leave run_dir empty to train one"
        )
    if not step_files(run_dir / "checkpoints"):
        raise CheckpointError(
            f"{run_dir / 'checkpoints'} holds no step checkpoints; train the run first, or "
            "leave run_dir empty to train one"
        )
    return run_dir


# ------------------------------------------------------------------------------ fields


def field_table(path: str | Path) -> pd.DataFrame:
    """One row per top-level field, in file order: its value (summarised), serialized size
    (sections only; scalars take a few bytes), whether inference and resume need it, and
    what it is for."""
    payload = load_checkpoint(path)
    sections = describe_checkpoint(path)["sections"]
    rows = [
        {
            "field": name,
            "value": summarize(value),
            "bytes": sections[name]["bytes"] if name in sections else None,
            "inference": name in INFERENCE_FIELDS,
            "resume": name in RESUME_FIELDS,
            "purpose": S.PURPOSE.get(name, ""),
        }
        for name, value in payload.items()
    ]
    return pd.DataFrame(rows).astype({"bytes": "Int64"})


def summarize(value: Any, width: int = 70) -> str:
    """A short readable text for a field's value (tensors by shape, dicts by content)."""
    if isinstance(value, torch.Tensor):
        return f"tensor {list(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, dict):
        tensors = [v for v in value.values() if isinstance(v, torch.Tensor)]
        if tensors and len(tensors) == len(value):
            return f"{len(value)} tensors, {sum(t.numel() for t in tensors):,} values"
        text = "{" + ", ".join(f"{k}: {summarize(v, 24)}" for k, v in value.items()) + "}"
    elif isinstance(value, list | tuple):
        text = f"list of {len(value)}" if len(value) > 4 else repr(value)
    elif isinstance(value, float):
        text = f"{value:.6g}"
    else:
        text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def tensor_table(state: dict[str, torch.Tensor], model: nn.Module) -> pd.DataFrame:
    """The ``model`` section tensor by tensor: role, shape, dtype and bytes.

    Roles come from ``model``: a trainable parameter (the optimizer updates it), a buffer
    (state that is not trained, e.g. counters) or a GRA-M memory buffer (the retrieval memory
    bank, built from the training windows before the first step; without it a resumed run
    would retrieve from an empty memory).
    """
    params = dict(model.named_parameters())
    rows = []
    for name, tensor in state.items():
        if name in params:
            role = "trainable parameter" if params[name].requires_grad else "frozen parameter"
        elif name.rsplit(".", 1)[-1].startswith(MEMORY_PREFIX):
            role = "GRA-M memory buffer"
        else:
            role = "buffer"
        rows.append(
            {
                "tensor": name,
                "role": role,
                "shape": list(tensor.shape),
                "dtype": str(tensor.dtype).removeprefix("torch."),
                "bytes": tensor.numel() * tensor.element_size(),
            }
        )
    return pd.DataFrame(rows, columns=["tensor", "role", "shape", "dtype", "bytes"])


def bytes_by_role(table: pd.DataFrame) -> pd.DataFrame:
    """Tensor count and bytes per role of a :func:`tensor_table`."""
    return table.groupby("role", sort=False).agg(tensors=("tensor", "size"), bytes=("bytes", "sum"))


def needs_summary(fields: pd.DataFrame) -> pd.DataFrame:
    """Bytes of the sections inference reads versus those only a resume reads, from a
    :func:`field_table`."""
    groups = {
        "inference (and resume)": fields["inference"],
        "resume only": fields["resume"] & ~fields["inference"],
        "neither (descriptive)": ~fields["resume"] & ~fields["inference"],
    }
    return pd.DataFrame(
        [
            {
                "needed by": name,
                "fields": ", ".join(fields.loc[mask, "field"]),
                "bytes": int(fields.loc[mask, "bytes"].fillna(0).sum()),
            }
            for name, mask in groups.items()
        ]
    )


def field_bytes_figure(fields: pd.DataFrame, title: str = "") -> Figure:
    """Serialized size of each section of a :func:`field_table`, coloured by who needs it.

    Each section is measured saved on its own, so even an empty one (``None``) shows the
    kilobyte or so of a torch file's own structure."""
    sized = fields.dropna(subset=["bytes"])
    readers = {"inference (and resume)": PALETTE[0], "resume only": PALETTE[1], "neither": "0.6"}
    names = [
        "inference (and resume)" if row.inference else "resume only" if row.resume else "neither"
        for row in sized.itertuples()
    ]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(sized) + 1.2), layout="constrained")
    plt.close(fig)  # returned, not shown twice (see timellm_lib.notebooks.plots)
    ax.barh(sized["field"], sized["bytes"].astype(float), color=[readers[n] for n in names])
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("serialized bytes (log scale)")
    ax.set_title(title or "checkpoint sections by size")
    used = dict.fromkeys(names)
    ax.legend(handles=[Patch(color=readers[n], label=n) for n in used], loc="lower right")
    return fig


# ------------------------------------------------------------------------------ backbone


def backbone_report(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """The frozen backbone next to the file: its size, whether any of its tensors is in the
    model's state_dict (none should be), and the stored versus the live fingerprint.

    ``backbone`` is None for models without a language model (mlp, dlinear, no_llm).
    """
    path = Path(path)
    stored = load_checkpoint(path, peek=True).get(S.BACKBONE) or {}
    backbone = getattr(model, "backbone", None)
    report: dict[str, Any] = {
        "backbone": stored.get("name"),
        "checkpoint_bytes": path.stat().st_size,
        "fingerprint_stored": stored.get("fingerprint"),
    }
    if backbone is None:
        return report
    weights = list(backbone.model.state_dict().values())
    frozen = {t.data_ptr() for t in weights}
    report |= {
        "backbone_tensors": len(weights),
        "backbone_values": sum(t.numel() for t in weights),
        "backbone_bytes": sum(t.numel() * t.element_size() for t in weights),
        "backbone_tensors_in_state_dict": sum(
            t.data_ptr() in frozen for t in model.state_dict().values()
        ),
        "backbone_trainable": any(p.requires_grad for p in backbone.model.parameters()),
        "fingerprint_live": backbone.fingerprint,
        "fingerprint_equal": backbone.fingerprint == stored.get("fingerprint"),
    }
    return report


# ------------------------------------------------------------------------------ kinds


def checkpoint_files(run_dir: str | Path) -> pd.DataFrame:
    """Every checkpoint of a run (step files by step, then best.pt and final.pt): kind,
    position, EarlyStopping state, size and digests."""
    ckpt_dir = require_checkpoints(run_dir) / "checkpoints"
    paths = [p for _, p in step_files(ckpt_dir)]
    paths += [ckpt_dir / name for name in ("best.pt", "final.pt") if (ckpt_dir / name).is_file()]
    rows = []
    for path in paths:
        info = describe_checkpoint(path)
        rows.append(
            {
                "file": path.name,
                "kind": info["kind"],
                "global_step": info["global_step"],
                "epoch": info["epoch"],
                "step_in_epoch": info["step_in_epoch"],
                "train_steps": info["train_steps"],
                "best_score": info["best_score"],
                "counter": info["counter"],
                "lr": info["lr"],
                "bytes": info["bytes"],
                "resume_from": info["resume_from"],
                "state_digest": info["state_digest"][:16],
                "resume_digest": (info["resume_digest"] or "")[:16] or None,
            }
        )
    return pd.DataFrame(rows)


def fields_by_kind(run_dir: str | Path) -> pd.DataFrame:
    """Which top-level fields each kind of file has: one column per kind (the newest file
    of that kind), one row per field, True where present."""
    files = checkpoint_files(run_dir)
    newest = files.sort_values("global_step").groupby("kind").tail(1)
    newest = newest.sort_values("kind", key=lambda k: k.map(KIND_ORDER))
    ckpt_dir = Path(run_dir) / "checkpoints"
    columns = {
        f"{row.kind} ({row.file})": list(load_checkpoint(ckpt_dir / row.file, peek=True))
        for row in newest.itertuples()
    }
    fields = list(dict.fromkeys(f for names in columns.values() for f in names))
    return pd.DataFrame(
        {col: [f in names for f in fields] for col, names in columns.items()},
        index=pd.Index(fields, name="field"),
    )


def best_companion(run_dir: str | Path) -> dict[str, Any]:
    """best.pt and the step checkpoint it names in ``resume_from``: same step, and the same
    weights unless best.pt holds EMA weights (train.eval_with_ema)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    best = load_checkpoint(ckpt_dir / "best.pt")
    companion_path = ckpt_dir / best[S.RESUME_FROM]
    companion = load_checkpoint(companion_path) if companion_path.is_file() else None
    return {
        "best_step": best[S.GLOBAL_STEP],
        "resume_from": best[S.RESUME_FROM],
        "companion_exists": companion is not None,
        "same_step": companion is not None and companion[S.GLOBAL_STEP] == best[S.GLOBAL_STEP],
        "same_weights": companion is not None
        and state_digest(companion[S.MODEL]) == state_digest(best[S.MODEL]),
        "best_has_optimizer": S.OPTIMIZER in best,
        "companion_has_optimizer": companion is not None and S.OPTIMIZER in companion,
    }


# ------------------------------------------------------------------------------ round trip


def round_trip(path: str | Path, model: nn.Module | None = None) -> dict[str, Any]:
    """In-memory model versus file, both ways, by digest and by forecast.

    ``model`` is a model in memory (e.g. the one a training run just used); when None it is
    loaded from the file as inference loads it. Its ``state_dict`` is serialized to bytes
    (what a save writes) and loaded into a second, freshly initialised model. File, memory and
    reloaded model must have the same ``state_digest``, and the two models the same
    forecasts, bit for bit, on a batch of validation windows.
    """
    loaded = load_for_inference(path)
    model = loaded.model if model is None else model.eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    fresh, _ = _build(loaded.cfg, loaded.datasets)
    digest_initial = state_digest(fresh.state_dict())
    buffer.seek(0)
    load_model_weights(fresh, torch.load(buffer, weights_only=True))
    fresh.eval()
    x, _ = next(eval_batches(loaded.datasets.val, loaded.cfg.data.eval_batch_size))
    with torch.no_grad():
        a, b = as_forecast(model(x)).pred, as_forecast(fresh(x)).pred
    digests = {
        "file": state_digest(load_checkpoint(path)[S.MODEL]),
        "memory": state_digest(model.state_dict()),
        "reloaded": state_digest(fresh.state_dict()),
    }
    return {
        "state_dict_bytes": buffer.getbuffer().nbytes,
        **{f"digest_{k}": v for k, v in digests.items()},
        "fresh_init_differs": digest_initial != digests["file"],
        "digests_equal": len(set(digests.values())) == 1,
        "forecast_shape": list(a.shape),
        "forecasts_equal": bool(torch.equal(a, b)),
        "max_abs_difference": float((a - b).abs().max()),
    }
