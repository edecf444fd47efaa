"""Where the time of one anchor training step goes: a torch.profiler summary, as JSON.

Builds the step of ``benchmarks/step_time.py`` for one mode, runs it once to warm up, then
profiles one step. Prints one JSON object: the step's seconds and GFLOP/s, the self CPU time
per operator family (matrix products, attention kernels, random numbers for dropout,
element-wise and normalisation work, optimizer, copies) and the top operators. Profile
``--mode published-code --published-src DIR`` (a checkout of KimMeen/Time-LLM) or
``--mode reference`` for where the published implementation's time goes (before) and
``--mode workbench`` for ours (after).

    python benchmarks/profile_step.py [--mode workbench|published|reference|published-code]
        [--top 15] [--batch 8] [--threads 2] [--amp off|bf16] [--published-src DIR]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from step_time import MODES, build_step
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

# operator name (without "aten::") -> family; the first family whose names match wins
FAMILIES = {
    "matmul": ("mm", "addmm", "bmm", "matmul", "linear", "baddbmm"),
    "attention": ("_scaled_dot_product", "_softmax", "softmax"),
    "dropout_rng": ("bernoulli", "native_dropout", "rand", "uniform", "random_"),
    "optimizer": ("_fused_adam", "addcdiv", "addcmul", "lerp", "sqrt", "_foreach"),
    "copies": ("copy_", "contiguous", "clone", "cat", "gather", "index"),
    "normalisation": ("layer_norm", "native_layer_norm"),
    "activation": ("gelu", "relu", "tanh"),
    "fill": ("fill_", "zero_", "zeros", "ones", "empty"),
    "convolution": ("convolution", "mkldnn_convolution", "conv"),
}


def family(op: str) -> str:
    name = op.removeprefix("aten::")
    for fam, prefixes in FAMILIES.items():
        if any(name == p or name.startswith(p) for p in prefixes):
            return fam
    return "elementwise_other"


def profile_step(
    mode: str, batch: int, threads: int, amp: str, top: int, published_src: str | None = None
) -> dict:
    torch.set_num_threads(threads)
    _, step = build_step(mode, batch, amp, published_src=published_src)
    step()
    with FlopCounterMode(display=False) as counter:
        step()
    start = time.perf_counter()
    step()
    plain_s = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total_us = sum(e.self_cpu_time_total for e in events)
    families: dict[str, float] = {}
    for e in events:
        fam = family(e.key)
        families[fam] = families.get(fam, 0.0) + e.self_cpu_time_total
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    gflop = counter.get_total_flops() / 1e9
    return {
        "mode": mode,
        "amp": amp,
        "batch": batch,
        "threads": threads,
        "step_s_unprofiled": round(plain_s, 3),
        "gflop_per_step": round(gflop, 1),
        "gflop_per_s": round(gflop / plain_s, 1),
        "profiled_self_cpu_s": round(total_us / 1e6, 3),
        "families_share": {
            k: round(v / total_us, 3) for k, v in sorted(families.items(), key=lambda kv: -kv[1])
        },
        "top_ops": [
            {
                "op": e.key,
                "self_s": round(e.self_cpu_time_total / 1e6, 3),
                "share": round(e.self_cpu_time_total / total_us, 3),
                "calls": e.count,
            }
            for e in ranked
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=list(MODES), default="workbench")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--amp", choices=["off", "bf16"], default="off")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--published-src", help="a checkout of KimMeen/Time-LLM")
    args = parser.parse_args()
    if args.mode == "published-code" and not args.published_src:
        parser.error("mode published-code needs --published-src DIR")
    result = profile_step(
        args.mode, args.batch, args.threads, args.amp, args.top, args.published_src
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
