"""Training-step time, throughput and peak memory of Time-LLM on the anchor configuration.

Anchor (issue 7): CPU, fp32, 2 threads, packaged MiniLM (6 layers, 384 wide), batch 8,
7 channels, seq_len 512, pred_len 96, patch_len 16, stride 8, d_model 32, d_ff 128, n_heads 8,
num_tokens 1000, baseline model. A step is what the trainer does: forward, MSE, backward and
an Adam update of every trainable parameter (32.5 M, 30.5 M of them in the prototype mapping).

Modes (``--modes``, comma-separated):

- ``workbench``: the defaults (compact prompt, frozen LM in eval mode).
- ``published-prompt``: the defaults but the published prompt text (statistics printed at
  full float precision): the speed effect of rounding them.
- ``published``: the published prompt text (statistics printed at full float precision) and
  dropout left active inside the frozen LM, exactly as the published code computes them.
- ``reference``: ``published`` plus what the published code asks of the language model
  (eager attention, every attention map and hidden state returned) and its optimizer (the
  plain per-parameter Adam), and the final LM layer run for every position: our model with
  those known costs switched back on.
- ``published-code``: the published model class itself, from a checkout of
  https://github.com/KimMeen/Time-LLM named by ``--published-src`` (see
  ``benchmarks/published_code.py``); the yardstick when such a checkout is at hand.

The workbench modes update with the fused Adam kernel (``--adam fused``, one pass over all
parameters; the same update up to float rounding), as the trainer does, and run under
``--amp`` and ``--compile``; ``reference`` and ``published-code`` stay eager fp32 with plain
Adam.

Each mode runs in its own worker process, so its peak RSS is its own; the parent interleaves
the workers' steps round by round (rotating the order), so that load on a shared machine hits
every mode alike (all workers stay alive, so keep their total peak RSS, printed in the
summary, below the machine's memory: the anchor takes 2.7 to 5.7 GB a mode).
The published code's step was seen to slow down with more workers alive, so its ratios are
best taken two modes at a time (``--modes X,published-code``).
Compare ratios from one run: absolute seconds move with the machine's load,
which is why the current fp32 matmul rate is measured and printed too. Besides the ratio of
medians (wall and CPU seconds), ``step_time_paired_ratio`` is the median over rounds of each
round's ratio: steps of one round run seconds apart, so slow changes of load cancel out.

Evaluation: ``eval_windows_per_s`` gives the validation/test throughput (windows per second
of the trainer's evaluation forward: eval mode, no gradients, the training precision) at each
batch size of ``--eval-batches`` (the workbench modes; not measured for ``published-code``).

Prints one JSON object per mode, then a summary with the ratios to the last mode listed:

    python benchmarks/step_time.py [--modes workbench,published,reference] [--steps 5]
        [--batch 8] [--threads 2] [--amp off|bf16] [--device cpu|cuda] [--compile]
        [--adam fused|plain] [--eval-batches 8,32,64] [--eval-repeats 2]
        [--published-src DIR --modes ...,published-code]

On a GPU: ``--device cuda --amp bf16 [--compile]``, and ``--batch 24``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from published_code import build_published_step, llm_input_shape
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from timellm_lib.config import Config, load_config
from timellm_lib.evaluation.metrics import predict
from timellm_lib.models import TrainableModel, as_forecast, build_model

N_CHANNELS = 7
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
PUBLISHED = ["model.prompt_format=published", "model.backbone_dropout=true"]


@dataclass(frozen=True)
class Mode:
    overrides: tuple[str, ...] = ()
    reference: bool = False  # eager attention returning every attention map and hidden state
    published_code: bool = False  # the published model class itself (needs --published-src)

    @property
    def yardstick(self) -> bool:
        """Runs as published whatever --amp, --compile and --adam say: fp32, eager, plain Adam."""
        return self.reference or self.published_code


MODES = {
    "workbench": Mode(),
    "published-prompt": Mode((PUBLISHED[0],)),
    "published": Mode(tuple(PUBLISHED)),
    "reference": Mode((*PUBLISHED, "model.last_layer_patches_only=false"), reference=True),
    "published-code": Mode(published_code=True),
}


def anchor_config(mode: str, batch: int, extra: list[str] | None = None) -> Config:
    """The anchor configuration in ``mode`` with ``batch`` samples per step."""
    overrides = [*ANCHOR, *MODES[mode].overrides, f"data.batch_size={batch}", *(extra or [])]
    return load_config(overrides=overrides)


def use_reference_attention(model: nn.Module) -> None:
    """Make the frozen LM compute as the published code asks it to: eager attention that
    returns every layer's attention map, and every hidden state (only in a worker process:
    the backbone is shared by every model of the process)."""
    language_model = model.backbone.model
    language_model.set_attn_implementation("eager")
    language_model.config.output_attentions = True
    language_model.config.output_hidden_states = True


def build_step(
    mode: str,
    batch: int,
    amp: str = "off",
    device: str = "cpu",
    compile_model: bool = False,
    adam: str = "fused",
    extra: list[str] | None = None,
    published_src: str | None = None,
) -> tuple[nn.Module, Callable[[], float]]:
    """A model of ``mode`` in train mode and a function doing one training step on a fixed
    random batch (as the trainer does: forward under autocast, MSE, backward, Adam);
    the step returns the loss. ``adam``: ``fused`` or ``plain``; the yardstick modes are
    always plain Adam in fp32 without compilation."""
    cfg = anchor_config(mode, batch, extra)
    if MODES[mode].published_code:
        return build_published_step(published_src, cfg, N_CHANNELS)
    torch.manual_seed(0)
    model = build_model(cfg, N_CHANNELS, N_CHANNELS)
    if MODES[mode].reference:
        use_reference_attention(model)
    model.to(device).train()
    if compile_model and not MODES[mode].yardstick:
        model.compile(dynamic=True)  # in place: state_dict keys stay as they are
    params = [p for p in model.parameters() if p.requires_grad]
    fused = adam == "fused" and not MODES[mode].yardstick
    optimizer = torch.optim.Adam(params, lr=1e-3, fused=fused)
    x = torch.randn(batch, cfg.data.seq_len, N_CHANNELS, device=device)
    y = torch.randn(batch, cfg.data.pred_len, N_CHANNELS, device=device)
    dtype = None if MODES[mode].yardstick else {"off": None, "bf16": torch.bfloat16}[amp]

    def step() -> float:
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            out = as_forecast(model(x, y))
        loss = F.mse_loss(out.pred.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return model, step


def llm_tokens(mode: str, model: nn.Module, batch: int) -> dict[str, int]:
    """Language-model positions one step runs through the frozen LM (from a traced pass)."""
    if MODES[mode].published_code:
        rows, positions, _ = llm_input_shape(model, batch, model.seq_len, N_CHANNELS)
    else:
        rows, positions = _workbench_llm_input_shape(model, batch)
    return {
        "llm_rows": rows,
        "llm_positions": positions,
        "llm_tokens_per_step": rows * positions,
    }


def _workbench_llm_input_shape(model: nn.Module, batch: int) -> tuple[int, int]:
    seen: list[torch.Size] = []
    handle = model.llm_input.register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    try:
        with torch.no_grad():
            x = torch.randn(batch, model.hp.window.seq_len, N_CHANNELS, device=_device(model))
            model(x)
    finally:
        handle.remove()
    return seen[0][0], seen[0][1]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def machine_memory_mb() -> float | None:
    """MemTotal of /proc/meminfo (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as meminfo:
            kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:"))
    except (OSError, StopIteration):
        return None
    return round(kib / 1024, 1)


def matmul_gflops(
    threads: int, n: int = 2048, repeats: int = 3, dtype: torch.dtype = torch.float32
) -> float:
    """The matmul rate this machine gives right now (load from others lowers it)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return round(2 * n**3 * repeats / (time.perf_counter() - start) / 1e9, 1)


# ------------------------------------------------------------------------------ worker side


def worker(args: argparse.Namespace) -> None:
    """One mode in this process: build, count FLOPs, then one step per ``step`` line read."""
    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    model, step = build_step(
        args.worker,
        args.batch,
        args.amp,
        args.device,
        args.compile,
        args.adam,
        published_src=args.published_src,
    )
    tokens = llm_tokens(args.worker, model, args.batch)
    start = time.perf_counter()
    step()  # the first step pays for allocation (and compilation): not timed
    first_s = time.perf_counter() - start
    with FlopCounterMode(display=False) as counter:
        step()
    _send(
        {
            "ready": True,
            "first_step_s": round(first_s, 3),
            "gflop_per_step": round(counter.get_total_flops() / 1e9, 1),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            # which exact speed switches ran, and why not (the published model is no
            # TrainableModel and has none)
            "speed_paths": model.speed_paths() if isinstance(model, TrainableModel) else {},
            **tokens,
        }
    )
    for line in sys.stdin:
        if line.strip() != "step":
            break
        if cuda:
            torch.cuda.synchronize()
        start, cpu = time.perf_counter(), time.process_time()
        loss = step()
        if cuda:
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        _send({"step_s": wall, "cpu_s": cpu, "loss": loss})
    final = {"peak_rss_mb": peak_rss_mb()}
    if not MODES[args.worker].published_code:
        final["eval_windows_per_s"] = eval_rates(model, args)
    if cuda:
        final["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        final["device_name"] = torch.cuda.get_device_name()
    _send(final)


def eval_rates(model: nn.Module, args: argparse.Namespace) -> dict[str, float]:
    """Validation/test throughput, windows per second, at each of ``--eval-batches``: the
    trainer's evaluation forward (:func:`timellm_lib.evaluation.predict`: eval mode, no
    gradients, the training precision), one untimed warm-up pass then ``--eval-repeats``."""
    seq_len = model.hp.window.seq_len
    dtype = (
        None if MODES[args.worker].yardstick else {"off": None, "bf16": torch.bfloat16}[args.amp]
    )
    rates = {}
    for batch in args.eval_batches:
        x = torch.randn(batch, seq_len, N_CHANNELS)
        predict(model, x, args.device, dtype)
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.eval_repeats):
            predict(model, x, args.device, dtype)
        if args.device == "cuda":
            torch.cuda.synchronize()
        rates[str(batch)] = round(batch * args.eval_repeats / (time.perf_counter() - start), 2)
    model.train()
    return rates


def _send(message: dict) -> None:
    print(json.dumps(message), flush=True)


# ------------------------------------------------------------------------------ parent side


class Worker:
    """A worker process for one mode, driven line by line over its stdin/stdout."""

    def __init__(self, mode: str, args: argparse.Namespace) -> None:
        self.mode = mode
        command = [sys.executable, __file__, "--worker", mode, *_shared_flags(args)]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.info = self.receive()
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.losses: list[float] = []

    def receive(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"the {self.mode} worker stopped (exit {self.process.wait()})")
        return json.loads(line)

    def step(self) -> None:
        self.process.stdin.write("step\n")
        self.process.stdin.flush()
        reply = self.receive()
        self.times.append(reply["step_s"])
        self.cpu_times.append(reply["cpu_s"])
        self.losses.append(reply["loss"])

    def finish(self) -> dict:
        self.process.stdin.write("finish\n")
        self.process.stdin.flush()
        final = self.receive()
        self.process.wait()
        return final


def _shared_flags(args: argparse.Namespace) -> list[str]:
    flags = [
        f"--batch={args.batch}",
        f"--threads={args.threads}",
        f"--amp={args.amp}",
        f"--device={args.device}",
        f"--adam={args.adam}",
        f"--eval-batches={','.join(map(str, args.eval_batches))}",
        f"--eval-repeats={args.eval_repeats}",
    ]
    if args.published_src:
        flags.append(f"--published-src={args.published_src}")
    return flags + (["--compile"] if args.compile else [])


def summarise(worker: Worker, final: dict, args: argparse.Namespace) -> dict:
    times = worker.times
    median = statistics.median(times)
    info = worker.info
    return {
        "mode": worker.mode,
        "device": args.device,
        "amp": "off" if MODES[worker.mode].yardstick else args.amp,
        "compile": args.compile and not MODES[worker.mode].yardstick,
        "adam": "plain" if MODES[worker.mode].yardstick else args.adam,
        "batch": args.batch,
        "threads": args.threads,
        "step_s_median": round(median, 3),
        "step_s_min": round(min(times), 3),
        "step_s_max": round(max(times), 3),
        "step_s_spread": round(max(times) - min(times), 3),
        "step_s_all": [round(t, 3) for t in times],
        "step_cpu_s_median": round(statistics.median(worker.cpu_times), 3),
        "warm_steps": len(times),
        "first_step_s": info["first_step_s"],
        "gflop_per_step": info["gflop_per_step"],
        "gflop_per_s": round(info["gflop_per_step"] / median, 1),
        "llm_rows": info["llm_rows"],
        "llm_positions": info["llm_positions"],
        "llm_tokens_per_step": info["llm_tokens_per_step"],
        "trainable_params": info["trainable_params"],
        "speed_paths": info["speed_paths"],
        **final,
    }


def paired_ratio(times: list[float], base: list[float]) -> float:
    """Median over rounds of ``times[i] / base[i]`` (steps of one round ran back to back)."""
    return round(statistics.median(t / b for t, b in zip(times, base, strict=True)), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="workbench,published,reference")
    parser.add_argument("--steps", type=int, default=5, help="timed warm steps per mode")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--amp", choices=["off", "bf16"], default="off")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--adam", choices=["fused", "plain"], default="fused")
    parser.add_argument(
        "--eval-batches",
        type=lambda text: [int(b) for b in text.split(",")],
        default=[32],
        metavar="B1,B2",
        help="eval batch sizes whose windows per second are reported (default 32)",
    )
    parser.add_argument("--eval-repeats", type=int, default=2, help="timed eval passes")
    parser.add_argument(
        "--published-src", help="a checkout of KimMeen/Time-LLM, for the mode published-code"
    )
    parser.add_argument("--worker", choices=list(MODES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    modes = args.modes.split(",")
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    if "published-code" in modes and not args.published_src:
        parser.error(
            "mode published-code needs --published-src DIR, a checkout of "
            "https://github.com/KimMeen/Time-LLM"
        )

    peak_before = matmul_gflops(args.threads) if args.device == "cpu" else None
    workers = [Worker(mode, args) for mode in modes]  # built one after the other
    for round_ in range(args.steps):
        shift = round_ % len(workers)
        for w in workers[shift:] + workers[:shift]:
            w.step()
    results = [summarise(w, w.finish(), args) for w in workers]
    for result in results:
        print(json.dumps(result), flush=True)

    base = results[-1]
    summary = {
        "summary": True,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {platform.processor()}".strip(),
        "torch": torch.__version__,
        f"step_time_ratio_to_{base['mode']}": {
            r["mode"]: round(r["step_s_median"] / base["step_s_median"], 3) for r in results
        },
        f"step_time_paired_ratio_to_{base['mode']}": {
            r["mode"]: paired_ratio(r["step_s_all"], base["step_s_all"]) for r in results
        },
        f"step_cpu_time_ratio_to_{base['mode']}": {
            r["mode"]: round(r["step_cpu_s_median"] / base["step_cpu_s_median"], 3) for r in results
        },
        f"peak_rss_ratio_to_{base['mode']}": {
            r["mode"]: round(r["peak_rss_mb"] / base["peak_rss_mb"], 3) for r in results
        },
        # every worker stays alive until the end: near the machine's memory, timings suffer
        "workers_peak_rss_total_mb": round(sum(r["peak_rss_mb"] for r in results), 1),
        "machine_memory_mb": machine_memory_mb(),
    }
    if peak_before is not None:
        peak_after = matmul_gflops(args.threads)
        summary["matmul_fp32_gflop_per_s_now"] = [peak_before, peak_after]
        if args.amp == "bf16":
            summary["matmul_bf16_gflop_per_s_now"] = matmul_gflops(
                args.threads, dtype=torch.bfloat16
            )
        summary["fraction_of_matmul_rate"] = {
            r["mode"]: round(r["gflop_per_s"] / max(peak_before, peak_after), 3) for r in results
        }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
