"""Is the data pipeline ever the bottleneck? Time to load a training batch vs a training step.

Loads the real ETTh1 (``../shared/data/ETT-small/ETTh1.csv`` from the repository root, or
``--csv``) with the anchor's data settings (seq_len 512, pred_len 96, batch 8, features M),
then times, interleaved, fetching batches the way the trainer does (``ResumableLoader``:
seeded permutation, one gather per batch) and the anchor training step of
``benchmarks/step_time.py``. Prints one JSON object: median milliseconds to fetch a batch
(also ``WindowDataset.get_batch`` alone and the one-off cost of building the datasets), the
median step seconds, and ``fetch_share_of_step`` (target: below 0.02).

    python benchmarks/data_pipeline.py [--steps 3] [--batches 200] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from step_time import build_step

from timellm_lib.config import load_config
from timellm_lib.data import build_datasets
from timellm_lib.data.sampler import ResumableLoader

REPO_ROOT = Path(__file__).resolve().parents[1]
ETTH1 = REPO_ROOT.parent / "shared" / "data" / "ETT-small" / "ETTh1.csv"


def fetch_times(loader: ResumableLoader, epoch: int, count: int) -> list[float]:
    """Seconds to produce each of ``count`` batches of ``epoch``; the first also pays for
    the epoch's seeded permutation."""
    times = []
    start = time.perf_counter()
    batches = loader.epoch(epoch)
    for _ in range(count):
        next(batches)
        now = time.perf_counter()
        times.append(now - start)
        start = now
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", default=str(ETTH1), help="the ETTh1 CSV")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps")
    parser.add_argument("--batches", type=int, default=200, help="timed batch fetches per round")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not Path(args.csv).is_file():
        raise SystemExit(f"ETTh1 not found at {args.csv}; pass --csv PATH/ETTh1.csv")

    data = load_config(
        overrides=[
            "data.source=ett",
            f"data.path={args.csv}",
            "data.seq_len=512",
            "data.pred_len=96",
            f"data.batch_size={args.batch}",
        ]
    ).data
    start = time.perf_counter()
    datasets = build_datasets(data)
    build_s = time.perf_counter() - start
    loader = ResumableLoader(datasets.train, args.batch, seed=2021)

    _, step = build_step("workbench", args.batch)
    step()  # warm-up
    fetch, gather, steps = [], [], []
    for epoch in range(args.steps):  # interleaved: machine load hits both alike
        fetch += fetch_times(loader, epoch, args.batches)
        for idx in loader.batch_indices(epoch, 0, args.batches):
            start = time.perf_counter()
            datasets.train.get_batch(idx)
            gather.append(time.perf_counter() - start)
        start = time.perf_counter()
        step()
        steps.append(time.perf_counter() - start)

    fetch_s, step_s = statistics.median(fetch), statistics.median(steps)
    print(
        json.dumps(
            {
                "csv": Path(args.csv).name,
                "train_windows": len(datasets.train),
                "batch": args.batch,
                "threads": args.threads,
                "build_datasets_s": round(build_s, 3),
                "fetch_batch_ms_median": round(fetch_s * 1e3, 4),
                "fetch_batch_ms_p95": round(sorted(fetch)[int(0.95 * len(fetch))] * 1e3, 4),
                "fetch_batch_ms_max": round(max(fetch) * 1e3, 4),
                "get_batch_ms_median": round(statistics.median(gather) * 1e3, 4),
                "step_s_median": round(step_s, 3),
                "fetch_share_of_step": round(fetch_s / step_s, 6),
                "worst_fetch_share_of_step": round(max(fetch) / step_s, 6),
                "fetches_timed": len(fetch),
                "steps_timed": len(steps),
            }
        )
    )


if __name__ == "__main__":
    main()
