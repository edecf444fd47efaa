"""Shared by the trainer, checkpoint and resume tests: a tiny run and ways to compare runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from timellm_lib.config import Config, load_config
from timellm_lib.notebooks.describe import describe_checkpoint
from timellm_lib.training.metrics_log import read_metrics

REPO_ROOT = Path(__file__).resolve().parents[1]

# 600 synthetic rows -> 361 training windows; batch 48 -> 7 optimizer steps per epoch.
TINY = [
    "data.source=synthetic",
    "data.synthetic_rows=600",
    "data.seq_len=48",
    "data.label_len=24",
    "data.pred_len=12",
    "data.batch_size=48",
    "data.eval_batch_size=64",
    "model.name=mlp",
    "model.dropout=0.1",
    "model.patch_len=8",
    "model.stride=4",
    "train.epochs=3",
    "train.save_steps=3",
    "train.save_total_limit=0",
    "train.log_steps=1",
    "train.patience=3",
    "train.aux_warmup_steps=0",
    "train.threads=1",
    "train.device=cpu",
]


def tiny_overrides(tmp_path: Path, *extra: str) -> list[str]:
    """TINY with the synthetic CSV kept inside ``tmp_path``, then ``extra``."""
    return [*TINY, f"data.path={tmp_path / 'synthetic.csv'}", *extra]


def tiny_config(tmp_path: Path, *extra: str) -> Config:
    return load_config(overrides=tiny_overrides(tmp_path, *extra))


def comparable_events(run_dir: Path) -> list[dict]:
    """train/val/test/early_stop events without wall-clock times: what must match exactly
    between an uninterrupted run and an interrupted-and-resumed one."""
    events = read_metrics(Path(run_dir) / "metrics.jsonl")
    keep = {"train", "val", "test", "early_stop"}
    return [{k: v for k, v in e.items() if k != "time"} for e in events if e["event"] in keep]


def digests(checkpoint: Path) -> tuple[str, str]:
    info = describe_checkpoint(checkpoint)
    return info["state_digest"], info["resume_digest"]


def assert_same_run(resumed: Path, reference: Path) -> None:
    """Final weights, full resume state and every logged loss are bit-identical."""
    assert digests(resumed / "checkpoints/final.pt") == digests(reference / "checkpoints/final.pt")
    assert comparable_events(resumed) == comparable_events(reference)
    assert (resumed / "eval_test.json").read_text() == (reference / "eval_test.json").read_text()


def cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the real ``timellm`` command in a fresh python process."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "timellm_lib.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def set_args(overrides: list[str]) -> list[str]:
    """``--set`` arguments for a list of overrides."""
    return [a for item in overrides for a in ("--set", item)]
