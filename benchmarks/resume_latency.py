"""Resume latency early vs late in a long epoch: does resuming cost more the further in it is?

A run with one long epoch (thousands of tiny MLP steps) is paused early and late in that
epoch with --max-steps. Each checkpoint is then resumed in a fresh `timellm train` process
that takes one optimizer step and stops; the time from process start to that first step is
read from metrics.jsonl (the trainer logs a wall-clock ``time`` on every event). Because a
mid-epoch resume finds its batch by index arithmetic on a seeded permutation instead of
replaying the batches before it, the two times should be about equal (ratio ~1).

Prints one JSON object: early_s, late_s (median seconds from process start to the first
resumed step), ratio (late / early), the split into start-up (process start to the resume
event) and resume-to-first-step, the steps involved and every sample.

    python benchmarks/resume_latency.py [--repeats 3] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from timellm_lib.training.checkpoint import load_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]

OVERRIDES = [
    "data.source=synthetic",  # 17,420 rows: ~8,600 training windows
    "data.seq_len=48",
    "data.label_len=24",
    "data.pred_len=12",
    "model.name=mlp",
    "model.patch_len=8",
    "model.stride=4",
    "train.epochs=1",
    "train.save_steps=0",
    "train.save_total_limit=0",
    "train.log_steps=1",
    "train.threads=1",
    "train.device=cpu",
]


def timellm(args: list[str], cwd: Path) -> float:
    """Run `timellm` in a fresh process; return the wall-clock time it was started."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    started = time.time()
    done = subprocess.run(
        [sys.executable, "-m", "timellm_lib.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"timellm {' '.join(args[:3])} failed:\n{done.stderr}")
    return started


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def measure(run_dir: Path, step: int, work: Path, sets: list[str]) -> dict[str, float]:
    """Resume a copy of ``run_dir`` from step_<step>.pt for one step; time the phases."""
    copy = work / f"resume_{step}"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(run_dir, copy)
    checkpoint = copy / f"checkpoints/step_{step:08d}.pt"
    args = ["train", "--run-dir", str(copy), "--resume", str(checkpoint), "--no-progress"]
    started = timellm([*args, "--max-steps", str(step + 1), *sets], work)
    log = events(copy)
    resume = [e for e in log if e["event"] == "resume"][-1]  # this process's resume
    first = next(e for e in log if e["event"] == "train" and e["global_step"] == step + 1)
    return {
        "start_to_first_step_s": first["time"] - started,
        "start_to_resume_s": resume["time"] - started,
        "resume_to_first_step_s": first["time"] - resume["time"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workdir", help="where to build the run (default: a temporary folder)")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="resume_latency_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    sets = [
        a
        for item in [
            *OVERRIDES,
            f"data.batch_size={args.batch_size}",
            f"data.path={work / 'synthetic.csv'}",
        ]
        for a in ("--set", item)
    ]
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    early = 10
    timellm(
        ["train", "--run-dir", str(run_dir), "--max-steps", str(early), "--no-progress", *sets],
        work,
    )
    train_steps = load_checkpoint(run_dir / f"checkpoints/step_{early:08d}.pt", peek=True)[
        "train_steps"
    ]
    late = train_steps - 10  # late in the same (only) epoch
    build = time.time()
    timellm(
        [
            "train",
            "--run-dir",
            str(run_dir),
            "--resume",
            "auto",
            "--max-steps",
            str(late),
            "--no-progress",
            *sets,
        ],
        work,
    )
    build_s = time.time() - build

    samples: dict[str, list[dict[str, float]]] = {"early": [], "late": []}
    for _ in range(args.repeats):  # interleaved, so drifting machine load hits both alike
        samples["early"].append(measure(run_dir, early, work, sets))
        samples["late"].append(measure(run_dir, late, work, sets))

    def median(which: str, key: str) -> float:
        return round(statistics.median(s[key] for s in samples[which]), 4)

    early_s = median("early", "start_to_first_step_s")
    late_s = median("late", "start_to_first_step_s")
    print(
        json.dumps(
            {
                "early_s": early_s,
                "late_s": late_s,
                "ratio": round(late_s / early_s, 3),
                "early_resume_to_first_step_s": median("early", "resume_to_first_step_s"),
                "late_resume_to_first_step_s": median("late", "resume_to_first_step_s"),
                "early_start_to_resume_s": median("early", "start_to_resume_s"),
                "late_start_to_resume_s": median("late", "start_to_resume_s"),
                "early_step": early,
                "late_step": late,
                "train_steps": train_steps,
                "batch_size": args.batch_size,
                "repeats": args.repeats,
                "build_late_checkpoint_s": round(build_s, 2),
                "samples": samples,
            },
            indent=2,
        )
    )
    if not args.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
