"""Resume through real processes: the `timellm` CLI paused with --max-steps and resumed, a
run SIGKILLed at random moments (some inside a save) and resumed with --resume auto each
time, and the CLI's answer to bad input. Every resumed run must end bit-identical to an
uninterrupted one (same final digests, same logged losses, same test metrics)."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import random
import signal
import time
from functools import partial
from pathlib import Path

import pytest
from trainer_helpers import (
    assert_same_run,
    cli,
    comparable_events,
    digests,
    set_args,
    tiny_overrides,
)

from timellm_lib.cli import main as cli_main
from timellm_lib.config import load_config
from timellm_lib.training import train
from timellm_lib.training.checkpoint import load_checkpoint, select_resume_checkpoint, step_files
from timellm_lib.training.metrics_log import read_metrics

pytestmark = pytest.mark.slow


def _reference(tmp_path: Path, overrides: list[str]) -> Path:
    train(load_config(overrides=overrides), run_dir=tmp_path / "reference", progress=False)
    return tmp_path / "reference"


def test_cli_pause_inside_the_first_epoch_then_resume(tmp_path):
    overrides = tiny_overrides(tmp_path)  # 7 steps per epoch, save_steps 3
    reference = _reference(tmp_path, overrides)
    run = tmp_path / "run"
    paused = cli(
        "train",
        "--run-dir",
        str(run),
        "--max-steps",
        "2",
        "--no-progress",
        *set_args(overrides),
        cwd=tmp_path,
    )
    assert paused.returncode == 0, paused.stderr
    assert "paused at global_step 2 (epoch 0, step 2)" in paused.stdout
    assert [p.name for _, p in step_files(run / "checkpoints")] == ["step_00000002.pt"]

    refused = cli(
        "train", "--run-dir", str(run), "--resume", "auto", "--set", "data.seq_len=40", cwd=tmp_path
    )
    assert refused.returncode == 2
    assert "data.seq_len: checkpoint 48, now 40" in " ".join(refused.stderr.split())
    assert "Traceback" not in refused.stderr

    # no --config and no --set: the run's own config.yaml is used
    resumed = cli("train", "--run-dir", str(run), "--resume", "auto", "--no-progress", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert (
        "resumed from" in resumed.stderr
        and "finished at global_step 21 (after 3 epochs)" in resumed.stdout
    )
    assert_same_run(run, reference)


def test_cli_pause_at_an_epoch_end_that_is_a_save_step(tmp_path):
    overrides = tiny_overrides(tmp_path, "data.batch_size=60")  # 6 steps per epoch, save_steps 3
    reference = _reference(tmp_path, overrides)
    run = tmp_path / "run"
    args = ["train", "--run-dir", str(run), "--no-progress", *set_args(overrides)]
    assert cli(*args, "--max-steps", "6", cwd=tmp_path).returncode == 0

    shown = cli("inspect", str(run / "checkpoints/step_00000006.pt"), "--json", cwd=tmp_path)
    info = json.loads(shown.stdout)
    assert (info["global_step"], info["epoch"], info["step_in_epoch"]) == (6, 1, 0)
    assert info["best_score"] is not None  # written after the epoch's validation

    assert cli(*args, "--resume", "auto", cwd=tmp_path).returncode == 0
    vals = [e["global_step"] for e in comparable_events(run) if e["event"] == "val"]
    assert vals == [6, 12, 18]  # the validation at step 6 neither repeated nor skipped
    assert_same_run(run, reference)

    again = cli(*args, "--resume", "auto", cwd=tmp_path)
    assert again.returncode == 0 and "already complete" in again.stdout


def test_cli_bad_input_is_one_paragraph_and_exit_code_2(tmp_path):
    noise = tmp_path / "noise.pt"
    noise.write_bytes(b"\x42" + random.Random(0).randbytes(500))
    result = cli("inspect", str(noise), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("timellm inspect: error:")
    assert "not a PyTorch checkpoint" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr and "\n\n" not in result.stderr.strip()


def _wait_until(condition, proc, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.is_alive(), "the training process ended before it could be killed"
        assert time.monotonic() < deadline, "timed out waiting for the training process"
        time.sleep(0.001)


def _train_events_since(metrics: Path, since: float) -> int:
    if not metrics.exists():
        return 0
    return sum(1 for e in read_metrics(metrics) if e["event"] == "train" and e["time"] >= since)


def test_sigkill_at_random_moments_then_resume_auto(tmp_path):
    """Ten SIGKILLs of a training process (half of them the moment a checkpoint's temporary
    file appears, i.e. inside a save), each followed by --resume auto; the run then finishes
    bit-identical to one never interrupted. Processes are forked from a forkserver that has
    already imported torch, so each restart costs milliseconds instead of seconds."""
    overrides = tiny_overrides(
        tmp_path, "data.batch_size=24", "train.save_steps=1", "train.save_total_limit=2"
    )  # 15 steps per epoch, 45 in all, a checkpoint after every step
    reference = _reference(tmp_path, overrides)
    run = tmp_path / "run"
    argv = [
        "train",
        "--run-dir",
        str(run),
        "--resume",
        "auto",
        "--no-progress",
        *set_args(overrides),
    ]
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["timellm_lib.cli", "timellm_lib.training", "timellm_lib.data"])
    rng = random.Random(20240611)
    in_save = 0
    for _ in range(10):
        had_checkpoint = bool(step_files(run / "checkpoints"))
        started = time.time()
        proc = ctx.Process(target=cli_main, args=(argv,))
        proc.start()
        steps = rng.randint(1, 3)
        trained = partial(_train_events_since, run / "metrics.jsonl", started)
        _wait_until(lambda: trained() >= steps, proc)  # noqa: B023 (called right here)
        if rng.random() < 0.5:
            _wait_until(lambda: any((run / "checkpoints").glob(".*.tmp")), proc)
        else:
            time.sleep(rng.uniform(0.0, 0.03))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        assert proc.exitcode == -signal.SIGKILL
        in_save += any((run / "checkpoints").glob(".*.tmp"))
        for _, path in step_files(run / "checkpoints"):
            load_checkpoint(path)  # never a damaged step file, whenever the kill landed
        if had_checkpoint:
            assert select_resume_checkpoint(run, "auto") is not None

    final = ctx.Process(target=cli_main, args=(argv,))
    final.start()
    final.join(timeout=120)
    assert final.exitcode == 0
    print("kills inside a save:", in_save)
    assert in_save >= 1, "no kill landed inside a save"
    resumes = [e for e in read_metrics(run / "metrics.jsonl") if e["event"] == "resume"]
    assert resumes, "the final process did not resume"
    assert not list((run / "checkpoints").glob(".*.tmp"))  # leftovers removed on resume
    assert_same_run(run, reference)


@pytest.mark.parametrize(
    "extra",
    [["train.scheduler=published_type1"], ["train.scheduler=type1", "data.sample_unit=channel"]],
    ids=["published_type1", "type1-channel-samples"],
)
def test_a_finished_run_continued_with_more_epochs_is_the_longer_run(tmp_path, extra):
    """train.epochs may change on resume: where the schedule depends on the epoch only, a
    finished 2-epoch run continued to 4 epochs ends bit-identical to a 4-epoch run (a study
    may extend a run instead of training it again)."""
    overrides = tiny_overrides(tmp_path, "train.patience=10", *extra)
    short = load_config(overrides=[*overrides, "train.epochs=2"])
    long = load_config(overrides=[*overrides, "train.epochs=4"])
    assert train(short, run_dir=tmp_path / "extended", progress=False).finished
    result = train(long, run_dir=tmp_path / "extended", resume="auto", progress=False)
    assert result.finished and result.resumed_from.endswith("final.pt")
    assert result.global_step == train(long, tmp_path / "reference", progress=False).global_step

    extended, reference = tmp_path / "extended", tmp_path / "reference"
    assert digests(extended / "checkpoints/final.pt") == digests(reference / "checkpoints/final.pt")
    assert (extended / "eval_test.json").read_text() == (reference / "eval_test.json").read_text()
    steps = [e for e in comparable_events(extended) if e["event"] != "test"]
    assert steps == [e for e in comparable_events(reference) if e["event"] != "test"]


def test_more_epochs_on_resume_make_a_cosine_schedule_span_the_new_length(tmp_path, caplog):
    """Cosine spans the whole run: continued from 2 to 4 epochs, it follows the 4-epoch
    schedule from the resume on (the lr jumps there, and the log says so)."""
    overrides = tiny_overrides(tmp_path, "train.patience=10", "train.scheduler=cosine")
    train(load_config(overrides=[*overrides, "train.epochs=2"]), tmp_path / "a", progress=False)
    long = load_config(overrides=[*overrides, "train.epochs=4"])
    with caplog.at_level(logging.WARNING, logger="timellm_lib"):
        train(long, run_dir=tmp_path / "a", resume="auto", progress=False)
    assert "the cosine schedule now spans 28 steps" in caplog.text
    train(long, run_dir=tmp_path / "b", progress=False)

    def lrs_after_resume(run_dir):
        events = read_metrics(run_dir / "metrics.jsonl")
        return [(e["global_step"], e["lr"]) for e in events if e["event"] == "train"][14:]

    extended, reference = lrs_after_resume(tmp_path / "a"), lrs_after_resume(tmp_path / "b")
    assert extended == reference and len(extended) == 14
