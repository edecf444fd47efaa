"""Distributed training in real processes: two CPU workers (gloo) under torchrun.

A two-process run paused with --max-steps, stopped by SIGTERM through `timellm train --nproc 2`
and SIGKILLed as a whole process group (torchrun and both workers), resumed with --resume auto
after each, ends bit-identical to an uninterrupted two-process run: same final digests, same
logged losses, same test metrics. Around it: the sampler's shard arithmetic, and a resume on
one process of a checkpoint written by two (supported: the global batch order is kept).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import signal
import sys
import time

import ddp_variants
import pytest
import torch
import torch.distributed.run as torch_run
from process_helpers import (
    kill_tree,
    run,
    start,
    timellm,
    torchrun,
    train_events_since,
    wait_until,
)
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from trainer_helpers import assert_same_run, set_args, tiny_config, tiny_overrides

from timellm_lib.cli import _torchrun_worker_args, build_parser
from timellm_lib.cli import main as cli_main
from timellm_lib.config import load_config
from timellm_lib.data import build_datasets
from timellm_lib.data.sampler import ResumableLoader, Shard
from timellm_lib.training import train
from timellm_lib.training import trainer as trainer_module
from timellm_lib.training.checkpoint import load_checkpoint, step_name
from timellm_lib.training.metrics_log import read_metrics


def test_ranks_take_their_rows_of_one_global_batch_order(tmp_path):
    """Rank r of K takes rows [r*B/K, (r+1)*B/K) of global batch b, for any K: the
    concatenated shards are the single-process batch, and a mid-epoch start is the same
    arithmetic on every rank."""
    windows = range(100)  # the loader only needs len()
    whole = ResumableLoader(windows, 12, seed=7).batch_indices(epoch=1)
    for k in (2, 3, 4):
        ranks = [ResumableLoader(windows, 12, 7, rank=r, world_size=k) for r in range(k)]
        shards = [loader.batch_indices(epoch=1) for loader in ranks]
        for b, batch in enumerate(whole):
            assert torch.equal(torch.cat([s[b] for s in shards]), batch)
        late = ranks[-1].batch_indices(epoch=1, start=5)
        assert all(torch.equal(a, b) for a, b in zip(late, shards[-1][5:], strict=True))
    with pytest.raises(ValueError, match="batch_size 12 cannot be split evenly across 5"):
        ResumableLoader(windows, 12, 7, world_size=5)

    val = build_datasets(tiny_config(tmp_path).data).val  # 49 windows
    blocks = [Shard(val, r, 2) for r in range(2)]
    assert [len(b) for b in blocks] == [24, 25]
    parts = [b.get_batch(torch.arange(len(b)))[0] for b in blocks]
    assert torch.equal(torch.cat(parts), val.get_batch(torch.arange(len(val)))[0])


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    """An uninterrupted two-process run (reference) and one paused at step 5 (run), plus a
    copy of the paused one (paused) for the world-size test."""
    tmp = tmp_path_factory.mktemp("ddp")
    # micro-batches of 24 (12 per rank), two per step: 7 steps per epoch, 42 in all
    overrides = tiny_overrides(tmp, "data.batch_size=24", "train.grad_accum=2", "train.epochs=6")
    common = ["train", "--no-progress", *set_args(overrides)]
    procs = {  # side by side: each is mostly process start-up
        name: start(
            torchrun(2, *common, "--run-dir", str(tmp / name), *extra), tmp, tmp / f"{name}.log"
        )
        for name, extra in [("reference", []), ("run", ["--max-steps", "5"])]
    }
    for name, proc in procs.items():
        assert proc.wait(timeout=300) == 0, (tmp / f"{name}.log").read_text()
    assert "paused at global_step 5" in (tmp / "run.log").read_text()
    shutil.copytree(tmp / "run", tmp / "paused")
    return tmp, overrides


@pytest.mark.slow
def test_two_processes_resume_bit_identically_after_max_steps_sigterm_and_sigkill(
    two_process_runs,
):
    tmp, overrides = two_process_runs
    run_dir = tmp / "run"
    args = ["train", "--run-dir", str(run_dir), "--resume", "auto", "--no-progress"]
    args += set_args(overrides)

    # SIGTERM to the launcher: torchrun passes it on, both workers agree on one step, save it
    # and exit 0, and so does the launcher
    started = time.time()
    proc = start(timellm(*args, "--nproc", "2"), tmp, log=tmp / "sigterm.log")
    wait_until(lambda: train_events_since(run_dir, started) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, (tmp / "sigterm.log").read_text()
    events = read_metrics(run_dir / "metrics.jsonl")
    step = next(e["global_step"] for e in events if e["event"] == "interrupt")
    assert (events[-1]["event"], events[-1]["path"]) == ("save", f"checkpoints/{step_name(step)}")
    ckpt = load_checkpoint(run_dir / "checkpoints" / step_name(step))
    assert ckpt["world_size"] == 2 and len(ckpt["rng_other_ranks"]) == 1
    assert not torch.equal(ckpt["rng"]["torch"], ckpt["rng_other_ranks"][0]["torch"])

    # SIGKILL of the whole group (torchrun and both workers) at a random moment
    started = time.time()
    proc = start(torchrun(2, *args), tmp)
    wait_until(lambda: train_events_since(run_dir, started) >= 2, proc)
    time.sleep(random.Random(6).uniform(0.0, 0.02))
    kill_tree(proc)
    assert proc.returncode == -signal.SIGKILL

    final = run(torchrun(2, *args), tmp)
    assert final.returncode == 0, final.stdout + final.stderr
    assert "resumed from" in final.stderr
    resumes = [e for e in read_metrics(run_dir / "metrics.jsonl") if e["event"] == "resume"]
    assert len(resumes) == 3 and all(e["world_size"] == 2 for e in resumes)
    assert_same_run(run_dir, tmp / "reference")


@pytest.mark.slow
def test_a_resume_on_one_process_keeps_the_global_batch_order(
    two_process_runs, monkeypatch, caplog
):
    """A checkpoint of a two-process run resumed by one process: the same global batches in
    the same order (data.batch_size is the global batch), with a warning that says the
    continuation is not bit-identical, and both world sizes in the resume event."""
    tmp, overrides = two_process_runs
    seen = []
    original = trainer_module._optimizer_step

    def record(run, batches, warmup):
        seen.append(torch.cat([idx for _, _, idx in batches]))
        return original(run, batches, warmup)

    monkeypatch.setattr(trainer_module, "_optimizer_step", record)
    cfg = load_config(overrides=overrides)
    with caplog.at_level(logging.WARNING):
        train(cfg, run_dir=tmp / "paused", resume="auto", max_steps=9, progress=False)
    assert "written by a 2-process run and this one has 1 processes" in caplog.text

    loader = ResumableLoader(build_datasets(cfg.data).train, 24, cfg.train.seed)
    micro = loader.batch_indices(0, start=10, stop=14) + loader.batch_indices(1, stop=4)
    expected = [torch.cat(micro[i : i + 2]) for i in range(0, 8, 2)]  # steps 6 to 9
    assert len(seen) == 4
    assert all(torch.equal(a, b) for a, b in zip(seen, expected, strict=True))
    resume = next(e for e in read_metrics(tmp / "paused/metrics.jsonl") if e["event"] == "resume")
    assert (resume["world_size_before"], resume["world_size"]) == (2, 1)


def test_every_variant_and_fusion_mode_trains_under_ddp_and_resumes_bit_identically(
    repo_root, tmp_path
):
    """Two processes, every ablation variant and fusion mode (TAPR's gate is unused with
    fusion off, GRA-M's retriever with no memory: DDP must know), a few steps each; the
    resumed runs end bit-identical to the uninterrupted ones (tests/ddp_variants.py)."""
    started = time.time()
    command = [
        sys.executable,
        *("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"),
        str(repo_root / "tests/ddp_variants.py"),
        *(str(repo_root), str(tmp_path)),
    ]
    result = run(command, tmp_path, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    digests = json.loads((tmp_path / "digests.json").read_text())
    assert len(digests) == len(ddp_variants.CASES)
    for name, runs in digests.items():
        assert len(set(runs.values())) == 1, f"{name}: resumed run differs: {runs}"
    logging.getLogger(__name__).info("ddp variants took %.0f s", time.time() - started)


def test_nproc_relaunches_the_same_train_command_through_torchrun(monkeypatch):
    """--nproc K forwards every other train option to the torchrun workers, and the
    launcher's exit code is rank 0's: 2 for bad input (rank 0 printed why)."""
    parser = build_parser()
    full = ["--debug", "train", "--config", "c.yaml", "--set", "train.lr=1e-4", "--run-dir", "d"]
    full += ["--resume", "auto", "--max-steps", "3", "--resume-new-lr"]
    full += ["--resume-reset-scheduler", "--resume-counter", "1", "--no-progress", "--nproc", "2"]
    given = parser.parse_args(full)
    forwarded = _torchrun_worker_args(given)
    assert "--nproc" not in forwarded
    assert vars(parser.parse_args(forwarded)) == {**vars(given), "nproc": None}

    launched = []

    def failing(args):
        launched.append(args)
        failures = {1: ProcessFailure(1, 11, 1, ""), 0: ProcessFailure(0, 10, 2, "")}
        raise ChildFailedError("timellm_lib.cli", failures)

    monkeypatch.setattr(torch_run, "run", failing)
    assert cli_main(full) == 2
    [args] = launched
    assert (args.nproc_per_node, args.standalone, args.module) == ("2", True, True)
    assert [args.training_script, *args.training_script_args] == ["timellm_lib.cli", *forwarded]
