"""Checkpoint files: atomic writes, safe loads with a content checksum, digests, and finding
the file to resume from. What the fields are is :mod:`timellm_lib.training.schema`.

Loads use ``torch.load(weights_only=True)`` so a file can never run code, and every way a file
can be bad becomes a :class:`CheckpointError` naming the fix. A torch file does not notice a
flipped bit inside a tensor, hence the checksum (files written before it load unchecked).
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from timellm_lib.errors import WorkbenchError
from timellm_lib.files import TMP_SUFFIX, atomic_file
from timellm_lib.training import schema
from timellm_lib.training.schema import CHECKSUM, FORMAT_VERSION, RESUME_SECTIONS

log = logging.getLogger(__name__)

STEP_PATTERN = re.compile(r"^step_(\d{8,})\.pt$")


class CheckpointError(WorkbenchError):
    """A checkpoint cannot be used: missing, damaged, unsafe, or not made for this run."""


# ------------------------------------------------------------------------------ writing


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` with its content checksum to ``path`` atomically (see the module
    docstring). It is serialized in memory first, so that a failing write (disk full, no
    permission) surfaces as the ``OSError`` that says so, not as a torch zip-writer error."""
    payload = {**payload, CHECKSUM: content_checksum(payload)}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with atomic_file(path) as f:
        f.write(buffer.getbuffer())


def remove_temp_files(folder: str | Path) -> list[str]:
    """Delete leftovers of saves that were interrupted; returns their names."""
    removed = []
    for tmp in Path(folder).glob(f".*{TMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp.name)
    return removed


# ------------------------------------------------------------------------------ loading


def load_checkpoint(path: str | Path, peek: bool = False) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` and verify its checksum; any problem is a
    CheckpointError.

    ``peek`` memory-maps the file so reading a few fields does not read the tensors (and so
    skips the checksum, which needs them all): use it only to look, never to resume.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist; check the path (run directories keep them in "
            "checkpoints/: step_<global_step>.pt, best.pt, final.pt)"
        )
    if path.stat().st_size == 0:
        raise CheckpointError(
            f"checkpoint {path} is empty (0 bytes), probably cut off by a crash; use an "
            "earlier checkpoint (--resume auto skips damaged files)"
        )
    try:
        with (
            warnings.catch_warnings()
        ):  # torch's note on a raw pickle's protocol: our error says more
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=peek)
    except Exception as err:  # torch raises several unrelated types for bad files
        raise CheckpointError(_explain_load_failure(path, err)) from None
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise CheckpointError(
            f"{path} is a PyTorch file but not a timellm checkpoint (no format_version); "
            "pass a file written by `timellm train`"
        )
    _check_schema(payload, path)
    if payload["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {payload['format_version']}, newer than the "
            f"{FORMAT_VERSION} this version reads; upgrade timellm_lib"
        )
    if not peek and CHECKSUM in payload:
        computed = content_checksum(payload)
        if computed != payload[CHECKSUM]:
            raise CheckpointError(
                f"checkpoint {path} fails its content checksum (stored "
                f"{str(payload[CHECKSUM])[:16]}..., content {computed[:16]}...): its bytes "
                "changed after it was written (a disk or copy error); use an earlier "
                "checkpoint (--resume auto skips damaged files)"
            )
    return payload


def _check_schema(payload: dict[str, Any], path: Path) -> None:
    """Refuse a dict that is not shaped like a checkpoint (crafted, or written by other
    code), naming the first missing or mistyped field, so that no reader meets a KeyError."""
    for field in schema.FIELDS:
        if field.key not in payload:
            problem = f"has no field {field.key!r} ({field.wanted})" if field.required else None
        else:
            problem = schema.problem_with(field.key, payload[field.key])
        if problem:
            raise CheckpointError(
                f"{path} is not a valid timellm checkpoint: it {problem}; it was made or "
                "changed by something other than `timellm train`. Pass a checkpoint written "
                "by `timellm train`"
            )


def _explain_load_failure(path: Path, err: Exception) -> str:
    with open(path, "rb") as f:
        head = f.read(4)
    text = str(err)
    unsafe = re.search(r"GLOBAL (\S+)", text)
    if unsafe or head.startswith(b"\x80"):
        what = f" (it asks for {unsafe.group(1)})" if unsafe else ""
        return (
            f"refused to load {path}: it contains pickled Python objects{what} that could run "
            "code when loaded. Checkpoints are read with weights_only=True and may hold only "
            "tensors and plain values; do not use this file, use a checkpoint written by "
            "`timellm train`"
        )
    if head.startswith(b"PK"):
        return (
            f"checkpoint {path} is truncated or corrupt (its zip archive is incomplete), "
            "probably cut off by a crash or a partial copy; use an earlier checkpoint "
            "(--resume auto skips damaged files)"
        )
    return (
        f"{path} is not a PyTorch checkpoint (its bytes are neither a torch zip archive nor a "
        "pickle); pass a .pt file written by `timellm train`"
    )


def load_model_weights(
    model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True
) -> dict[str, list]:
    """Load ``state`` into ``model`` by tensor name, never by position.

    Returns ``{"loaded", "missing", "unexpected", "mismatched"}`` (names; mismatched entries are
    ``[name, checkpoint shape, model shape]``). With ``strict`` any missing, unexpected or
    mismatched tensor raises a CheckpointError listing them; without it the tensors that
    match are loaded and the rest reported.
    """
    expected = model.state_dict()
    mismatched = [
        [name, list(state[name].shape), list(t.shape)]
        for name, t in expected.items()
        if name in state and state[name].shape != t.shape
    ]
    bad = {m[0] for m in mismatched}
    report = {
        "loaded": [n for n in expected if n in state and n not in bad],
        "missing": [n for n in expected if n not in state],
        "unexpected": [n for n in state if n not in expected],
        "mismatched": mismatched,
    }
    if strict and (report["missing"] or report["unexpected"] or mismatched):
        raise CheckpointError(
            "the checkpoint's weights do not fit this model (was it made with another "
            f"model.name or sizes?): {describe_mismatch(report)}. Use the config the "
            "checkpoint was trained with"
        )
    model.load_state_dict({n: state[n] for n in report["loaded"]}, strict=False)
    return report


def describe_mismatch(report: dict[str, list]) -> str:
    parts = []
    if report["missing"]:
        parts.append(f"missing in checkpoint {report['missing']}")
    if report["unexpected"]:
        parts.append(f"unexpected (not in model) {report['unexpected']}")
    if report["mismatched"]:
        shapes = [f"{n}: checkpoint {a} vs model {b}" for n, a, b in report["mismatched"]]
        parts.append(f"shape mismatch {shapes}")
    return "; ".join(parts) or "all tensors match"


# ------------------------------------------------------------------------------ finding


def step_name(global_step: int) -> str:
    return f"step_{global_step:08d}.pt"


def step_files(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """Step checkpoints of a folder as (global_step, path), oldest first."""
    found = []
    for path in Path(ckpt_dir).glob("step_*.pt"):
        match = STEP_PATTERN.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def select_resume_checkpoint(run_dir: str | Path, mode: str) -> tuple[Path, dict] | None:
    """The checkpoint to resume from and its payload, or None (auto with nothing valid).

    ``auto``: the newest valid one by global_step among step_*.pt and final.pt (final.pt wins a
    tie); ``last``: the newest valid step checkpoint; ``best``: best.pt's companion step
    checkpoint (named in its ``resume_from``); anything else is a path (a best.pt given as a
    path is followed to its companion too). Damaged files are skipped with a warning naming
    them; they are never used.
    """
    ckpt_dir = Path(run_dir) / "checkpoints"
    if mode in ("auto", "last"):
        candidates = [(step, 1, path) for step, path in step_files(ckpt_dir)]
        final = ckpt_dir / "final.pt"
        if mode == "auto" and final.is_file():
            final_step = _peek_step(final)
            if final_step is not None:
                candidates.append((final_step, 2, final))
        for _, _, path in sorted(candidates, reverse=True):
            try:
                return path, _resumable(load_checkpoint(path), path)
            except CheckpointError as err:
                log.warning("skipping checkpoint %s: %s", path.name, err)
        if mode == "last":
            raise CheckpointError(
                f"no valid step checkpoint in {ckpt_dir}; train first, or use --resume auto "
                "to start from scratch when there is none"
            )
        return None
    path = ckpt_dir / "best.pt" if mode == "best" else Path(mode)
    if mode == "best" and not path.is_file():
        raise CheckpointError(
            f"{path} does not exist: no validation has improved yet in {run_dir}; use "
            "--resume last or --resume auto"
        )
    if not path.is_file():
        raise CheckpointError(
            f"--resume {mode}: checkpoint {path} does not exist; check the path (run "
            "directories keep them in checkpoints/) or use --resume auto to take the newest "
            "valid one of --run-dir"
        )
    payload = load_checkpoint(path)
    if payload.get("kind") == "best":
        companion = path.parent / payload["resume_from"]
        if not companion.is_file():
            raise CheckpointError(
                f"{path.name} names {companion.name} as its resumable companion, but that file "
                "is missing (deleted by hand?); resume with --resume last or --resume auto"
            )
        path, payload = companion, load_checkpoint(companion)
    return path, _resumable(payload, path)


def _peek_step(path: Path) -> int | None:
    try:
        return int(load_checkpoint(path, peek=True)["global_step"])
    except CheckpointError as err:
        log.warning("skipping checkpoint %s: %s", path.name, err)
        return None


def _resumable(payload: dict, path: Path) -> dict:
    missing = [k for k in RESUME_SECTIONS if k not in payload and k not in schema.OPTIONAL_SECTIONS]
    if missing:
        raise CheckpointError(
            f"{path} lacks {missing} and cannot be resumed from (kind {payload.get('kind')!r}); "
            "resume from a step or final checkpoint"
        )
    return payload


def rotate_step_checkpoints(ckpt_dir: str | Path, keep: int, protect: set[str]) -> list[str]:
    """Delete the oldest step checkpoints beyond ``keep`` (0 keeps all), never those named in
    ``protect`` (best.pt's companion, the newest). Returns the names removed."""
    if keep == 0:
        return []
    files = step_files(ckpt_dir)
    removed = []
    for _, path in files[: max(len(files) - keep, 0)]:
        if path.name not in protect:
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


# ------------------------------------------------------------------------------ digests


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def state_digest(model_state: dict[str, torch.Tensor]) -> str:
    """sha256 over the model tensors' raw bytes, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(model_state):
        h.update(_tensor_bytes(model_state[name]))
    return h.hexdigest()


def _feed(h: Any, value: Any) -> None:
    """Hash a nested value canonically (dict keys sorted, tensors by dtype, shape, bytes)."""
    if isinstance(value, torch.Tensor):
        h.update(f"T{value.dtype}{tuple(value.shape)}".encode())
        h.update(_tensor_bytes(value))
    elif isinstance(value, dict):
        h.update(b"{")
        for key in sorted(value, key=str):
            _feed(h, str(key))
            _feed(h, value[key])
        h.update(b"}")
    elif isinstance(value, list | tuple):
        h.update(b"[")
        for item in value:
            _feed(h, item)
        h.update(b"]")
    else:
        h.update(f"{type(value).__name__}:{value!r};".encode())


def content_checksum(payload: dict[str, Any]) -> str:
    """sha256 over every field of a checkpoint except the checksum itself."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k != CHECKSUM})
    return h.hexdigest()


def resume_digest(payload: dict[str, Any]) -> str:
    """sha256 over everything a resume restores (RESUME_SECTIONS)."""
    h = hashlib.sha256()
    for section in RESUME_SECTIONS:
        _feed(h, section)
        _feed(h, payload.get(section))
    return h.hexdigest()
