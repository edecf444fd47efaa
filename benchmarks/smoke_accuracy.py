"""Accuracy effect of the switches that change what is computed, on smoke runs.

Trains ``configs/smoke.yaml`` (tiny random GPT-2, synthetic series, two short epochs) with
the trainer for each variant and several seeds:

- ``compact``: the default prompt (statistics rounded to ``model.prompt_precision`` = 3
  significant digits), fp32;
- ``published``: statistics printed at full float precision, as the published code does;
- ``bf16``: the compact prompt under bf16 autocast (``train.amp=bf16``).

Prints one JSON object: per variant the mean and standard deviation over seeds of the best
validation MSE, the test MSE and MAE, the seconds per run and the LLM positions per row
(after the prompt head, which the causal GPT-2 runs once per batch from its cache); and
each variant's mean difference from ``compact`` in units of the seed-to-seed spread (|d| < 1:
the switch changes nothing the seed does not already change more).

    python benchmarks/smoke_accuracy.py [--seeds 3] [--threads 2] [--config configs/smoke.yaml]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from timellm_lib.config import load_config
from timellm_lib.training import train

REPO_ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "compact": [],
    "published": ["model.prompt_format=published"],
    "bf16": ["train.amp=bf16"],
}


def llm_positions(cfg_path: Path, overrides: list[str]) -> int:
    """Positions per row of the LLM input for one batch of the config (a traced pass)."""
    from timellm_lib.notebooks.tracing import trace_shapes

    rows = trace_shapes(load_config(cfg_path, overrides), batch_size=8)
    return next(r["shape"][1] for r in rows if r["stage"] == "LLM Input")


def run(cfg_path: Path, overrides: list[str], seed: int, work: Path, threads: int) -> dict:
    run_dir = work / f"run_{len(list(work.glob('run_*')))}"
    cfg = load_config(
        cfg_path,
        [
            *overrides,
            f"train.seed={seed}",
            f"train.threads={threads}",
            "train.device=cpu",
            f"data.path={work / 'smoke.csv'}",
        ],
    )
    start = time.perf_counter()
    result = train(cfg, run_dir=run_dir, progress=False)
    seconds = time.perf_counter() - start
    vals = [
        json.loads(line)["val_loss"]
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["event"] == "val"
    ]
    return {
        "val_mse": min(vals),
        "test_mse": result.test["mse"],
        "test_mae": result.test["mae"],
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "smoke.yaml"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    cfg_path = Path(args.config)
    work = Path(tempfile.mkdtemp(prefix="smoke_accuracy_"))
    seeds = [2021 + i for i in range(args.seeds)]
    samples: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    try:
        for seed in seeds:  # variants interleaved per seed: machine load hits all alike
            for name, overrides in VARIANTS.items():
                samples[name].append(run(cfg_path, overrides, seed, work, args.threads))
    finally:
        shutil.rmtree(work)

    def summary(name: str) -> dict:
        out: dict = {"llm_positions_per_row": llm_positions(cfg_path, VARIANTS[name])}
        for key in ("val_mse", "test_mse", "test_mae", "seconds"):
            values = [s[key] for s in samples[name]]
            out[f"{key}_mean"] = round(statistics.mean(values), 5)
            out[f"{key}_std"] = round(statistics.stdev(values), 5) if len(values) > 1 else None
        return out

    results = {name: summary(name) for name in VARIANTS}
    for name, result in results.items():
        for key in ("val_mse", "test_mse"):
            spread = results["compact"][f"{key}_std"]
            if name != "compact" and spread:
                diff = result[f"{key}_mean"] - results["compact"][f"{key}_mean"]
                result[f"{key}_diff_in_seed_std"] = round(diff / spread, 2)
    print(
        json.dumps(
            {
                "config": cfg_path.name,
                "seeds": seeds,
                "torch": torch.__version__,
                "variants": results,
                "samples": samples,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
