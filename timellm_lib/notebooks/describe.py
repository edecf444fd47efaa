"""What ``timellm inspect`` and notebook 02 show of a checkpoint: headline fields, digests and
each section's size and purpose (purposes come from the checkpoint schema)."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import torch

from timellm_lib.training import schema as S
from timellm_lib.training.checkpoint import load_checkpoint, resume_digest, state_digest


def describe_checkpoint(path: str | Path) -> dict[str, Any]:
    """The fields ``timellm inspect --json`` prints (see DESIGN.md, CLI contract)."""
    path = Path(path)
    payload = load_checkpoint(path)
    es = payload.get(S.EARLY_STOPPING) or {}
    resumable = S.OPTIMIZER in payload
    sections = {
        name: {"bytes": _section_bytes(payload[name]), "purpose": purpose}
        for name, purpose in S.SECTION_PURPOSE.items()
        if name in payload
    }
    return {
        "path": str(path),
        "format_version": payload[S.FORMAT],
        "kind": payload.get(S.KIND),
        "global_step": payload[S.GLOBAL_STEP],
        "epoch": payload.get(S.EPOCH),
        "step_in_epoch": payload.get(S.STEP_IN_EPOCH),
        "train_steps": payload.get(S.TRAIN_STEPS),
        "best_score": es.get("best_score"),
        "val_loss_min": es.get("val_loss_min", math.inf),
        "counter": es.get("counter", 0),
        "early_stopping_missing": [
            k for k in ("best_score", "val_loss_min", "counter") if k not in es
        ],
        "lr": payload.get(S.LR),
        "backbone": payload.get(S.BACKBONE),
        "bytes": path.stat().st_size,
        "state_digest": state_digest(payload[S.MODEL]),
        "resume_digest": resume_digest(payload) if resumable else None,
        "checksum": payload.get(S.CHECKSUM),  # verified by loading; None in older files
        "world_size": payload.get(S.WORLD_SIZE, 1 if resumable else None),
        "resume_from": payload.get(S.RESUME_FROM),
        "metrics_lines": payload.get(S.METRICS_LINES),
        "sections": sections,
    }


def _section_bytes(value: Any) -> int:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.tell()


def format_description(info: dict[str, Any]) -> str:
    """A checkpoint described in words, for reading and teaching."""
    kind_words = {
        "step": "a step checkpoint: everything needed to continue training exactly",
        "final": "the final checkpoint, written when training ended (resumable too)",
        "best": "the EarlyStopping best, for inference; training resumes from its companion "
        f"{info.get('resume_from')}",
    }
    lines = [
        f"{info['path']} ({_size(info['bytes'])}, format {info['format_version']})",
        f"  kind: {info['kind']}, {kind_words.get(info['kind'], 'unknown kind')}",
    ]
    step, epoch, in_epoch, steps = (
        info["global_step"],
        info["epoch"],
        info["step_in_epoch"],
        info["train_steps"],
    )
    if steps:
        lines.append(
            f"  position: global_step {step} = epoch {epoch} x {steps} steps + step_in_epoch "
            f"{in_epoch}: epoch {epoch} (counting from 0) has {in_epoch} of its {steps} "
            "optimizer steps done"
        )
    else:
        lines.append(f"  position: global_step {step} (optimizer steps done)")
    lr = info["lr"]
    lines.append(f"  learning rate at this point: {lr:.6g}" if lr is not None else "  lr: unknown")
    if info["best_score"] is None:
        es = "no validation yet (best_score None, val_loss_min inf)"
    else:
        es = (
            f"best validation loss {info['val_loss_min']:.6g} (best_score = -loss = "
            f"{info['best_score']:.6g})"
        )
    lines.append(
        f"  EarlyStopping: {es}; counter {info['counter']} (validations since the last "
        "improvement; training stops when it reaches train.patience)"
    )
    if info["early_stopping_missing"]:
        lines.append(
            f"  (older checkpoint: EarlyStopping fields {info['early_stopping_missing']} are "
            "absent and load as their fresh-start values)"
        )
    backbone = info["backbone"] or {}
    if backbone.get("fingerprint"):
        lines.append(
            f"  backbone: {backbone.get('name')} (not stored; fingerprint "
            f"{backbone['fingerprint'][:16]}...)"
        )
    else:
        lines.append("  backbone: none (the model has no frozen language model)")
    lines.append(f"  state_digest:  {info['state_digest']}")
    if info["resume_digest"]:
        lines.append(f"  resume_digest: {info['resume_digest']}")
    lines.append("  sections (serialized size, what they are for):")
    for name, section in info["sections"].items():
        lines.append(f"    {name:<15}{_size(section['bytes']):>10}  {section['purpose']}")
    return "\n".join(lines)


def _size(n: float) -> str:
    unit = "B"
    for bigger in ("kB", "MB", "GB"):
        if n < 1000:
            break
        n, unit = n / 1000, bigger
    return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
