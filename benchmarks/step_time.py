"""Training-step time, throughput and peak memory of Time-LLM on the anchor configuration.

Anchor (issue 7): CPU, fp32, 2 threads, packaged MiniLM (6 layers, 384 wide), batch 8,
7 channels, seq_len 512, pred_len 96, patch_len 16, stride 8, d_model 32, d_ff 128, n_heads 8,
num_tokens 1000, baseline model. A step is forward + backward + Adam on a random batch.

Modes: ``workbench`` (the defaults: compact prompt, frozen LM in eval mode) and ``published``
(the published prompt text and dropout left active inside the frozen LM). Prints one JSON
object per mode. Run: ``python benchmarks/step_time.py [--steps 6] [--batch 8] [--amp bf16]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from timellm_lib.config import load_config
from timellm_lib.models import as_forecast, build_model

ANCHOR = [
    "model.backbone=minilm",
    "data.seq_len=512",
    "data.pred_len=96",
    "model.patch_len=16",
    "model.stride=8",
    "model.d_model=32",
    "model.d_ff=128",
    "model.n_heads=8",
    "model.num_tokens=1000",
]
MODES = {
    "workbench": [],
    "published": ["model.prompt_format=published", "model.backbone_dropout=true"],
}


def measure(mode: str, batch: int, steps: int, amp: str) -> dict:
    cfg = load_config(overrides=ANCHOR + MODES[mode] + [f"data.batch_size={batch}"])
    torch.manual_seed(0)
    model = build_model(cfg, 7, 7)
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(batch, cfg.data.seq_len, 7)
    y = torch.randn(batch, cfg.data.pred_len, 7)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16")

    def step() -> None:
        with autocast:
            loss = torch.nn.functional.mse_loss(as_forecast(model(x)).pred.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    warm = times[1:] if len(times) > 2 else times
    median = statistics.median(warm)
    tokens = getattr(model, "last_llm_tokens", None)
    return {
        "mode": mode,
        "amp": amp,
        "batch": batch,
        "threads": torch.get_num_threads(),
        "step_s_median": round(median, 4),
        "step_s_min": round(min(warm), 4),
        "step_s_max": round(max(warm), 4),
        "warm_steps": len(warm),
        "gflop_per_step": round(flops / 1e9, 1),
        "gflop_per_s": round(flops / 1e9 / median, 1),
        "llm_tokens_per_step": tokens,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "machine": platform.processor() or platform.machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--amp", choices=["off", "bf16"], default="off")
    parser.add_argument("--mode", choices=[*MODES, "both"], default="both")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for mode in MODES if args.mode == "both" else [args.mode]:
        print(json.dumps(measure(mode, args.batch, args.steps, args.amp)), flush=True)


if __name__ == "__main__":
    main()
