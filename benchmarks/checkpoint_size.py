"""Checkpoint sizes of the anchor model: only trainable tensors, never the frozen backbone.

Trains the anchor configuration of ``benchmarks/step_time.py`` (MiniLM, d_model 32, d_ff 128,
num_tokens 1000, batch 8, seq_len 512, pred_len 96, 7 channels) for ``--steps`` steps with
the real trainer on a short synthetic ETT-like series, validating at the last step so that
``best.pt`` is written too. Then compares the files with what they must hold:

- ``best.pt`` (inference) at most 1.05 x the bytes of the trainable tensors;
- a step checkpoint at most 1.05 x (trainable tensors + optimizer state);
- zero bytes of the frozen backbone: every tensor in both files is compared with every
  backbone weight of the same shape.

The published implementation saves the whole ``state_dict`` (frozen backbone included):
with ``--published-src DIR`` (a checkout of KimMeen/Time-LLM, see
``benchmarks/published_code.py``) its model is built and its state_dict saved and measured;
without, the issue's figure for it (221 MB) is printed, marked as cited. Prints one JSON
object.

    python benchmarks/checkpoint_size.py [--steps 2] [--threads 2] [--keep DIR]
        [--published-src DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from published_code import build_published_step
from step_time import ANCHOR, N_CHANNELS

from timellm_lib.config import Config, load_config
from timellm_lib.models.backbones import load_backbone
from timellm_lib.training import train
from timellm_lib.training.checkpoint import load_checkpoint

CITED_PUBLISHED_STATE_DICT_BYTES = 221_000_000  # issue 7's figure for the anchor
MB = 1e6


def tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside nested dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from tensors(item)


def nbytes(value: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors(value))


def backbone_bytes_in(payload: dict, frozen: list[torch.Tensor]) -> int:
    """Bytes of tensors in ``payload`` equal to a frozen backbone weight."""
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for weight in frozen:
        by_shape.setdefault(tuple(weight.shape), []).append(weight)
    return sum(
        t.numel() * t.element_size()
        for t in tensors(payload)
        if any(torch.equal(t, w) for w in by_shape.get(tuple(t.shape), []))
    )


def published_state_dict_bytes(src: str, cfg: Config, work: Path) -> int:
    """Bytes of the file the published code's checkpointing writes:
    ``torch.save(model.state_dict(), path)``."""
    model, _ = build_published_step(src, cfg, N_CHANNELS)
    path = work / "published_checkpoint.pth"
    torch.save(model.state_dict(), path)
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", help="keep the run directory here (default: temporary)")
    parser.add_argument("--published-src", help="a checkout of KimMeen/Time-LLM to measure")
    args = parser.parse_args()

    work = Path(args.keep or tempfile.mkdtemp(prefix="checkpoint_size_")).resolve()
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load_config(
        overrides=[
            *ANCHOR,
            "data.source=synthetic",
            f"data.path={work / 'synthetic.csv'}",
            "data.synthetic_rows=1200",  # csv fractions: 840 train rows, a 25-window val split
            "data.batch_size=8",
            "train.epochs=1",
            f"train.eval_steps={args.steps}",  # validate at the last step: best.pt is written
            "train.log_steps=1",
            f"train.threads={args.threads}",
            "train.device=cpu",
        ]
    )
    result = train(cfg, run_dir=run_dir, max_steps=args.steps, progress=False)

    ckpt_dir = run_dir / "checkpoints"
    step_path = ckpt_dir / f"step_{result.global_step:08d}.pt"
    best_path = ckpt_dir / "best.pt"
    step, best = load_checkpoint(step_path), load_checkpoint(best_path)
    trainable = nbytes(step["model"])
    optimizer = nbytes(step["optimizer"])
    frozen = list(load_backbone(cfg.model.backbone).model.state_dict().values())
    best_bytes, step_bytes = best_path.stat().st_size, step_path.stat().st_size
    if args.published_src:
        published = published_state_dict_bytes(args.published_src, cfg, work)
    else:
        published = CITED_PUBLISHED_STATE_DICT_BYTES
    print(
        json.dumps(
            {
                "steps": result.global_step,
                "trainable_tensor_bytes": trainable,
                "trainable_params": sum(t.numel() for t in tensors(step["model"])),
                "optimizer_state_bytes": optimizer,
                "best_pt_bytes": best_bytes,
                "step_checkpoint_bytes": step_bytes,
                "best_pt_ratio_to_trainable": round(best_bytes / trainable, 4),
                "step_ratio_to_trainable_plus_optimizer": round(
                    step_bytes / (trainable + optimizer), 4
                ),
                "frozen_backbone_bytes_in_best_pt": backbone_bytes_in(best, frozen),
                "frozen_backbone_bytes_in_step": backbone_bytes_in(step, frozen),
                "frozen_backbone_bytes_in_memory": nbytes(frozen),
                "published_state_dict_bytes": published,
                "published_state_dict_measured": bool(args.published_src),
                "best_pt_ratio_to_published": round(best_bytes / published, 3),
                "best_pt_mb": round(best_bytes / MB, 1),
                "step_checkpoint_mb": round(step_bytes / MB, 1),
            }
        )
    )
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
