"""Faults a run must survive, each with a real failure: SIGTERM to a real `timellm train`
process and SIGINT delivered in-process (a checkpoint at the current step, exit 0, a
bit-identical resume); a full disk (writes into /dev/full fail with ENOSPC) and a read-only
checkpoint folder (stop with a clear message, or train on, earlier checkpoints intact); a
non-finite loss under each ``train.on_nan`` policy; a second trainer on the same run
directory, and the stale lock a SIGKILLed one leaves; a bit flipped inside a checkpoint's
tensor, caught by its content checksum, with --resume auto walking back past it."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest
import torch
from process_helpers import run, start, timellm, train_events_since, wait_until
from trainer_helpers import assert_same_run, digests, set_args, tiny_config, tiny_overrides

from timellm_lib import files as files_module
from timellm_lib.cli import main as cli_main
from timellm_lib.config import ConfigError, load_config
from timellm_lib.models.baselines import MLP
from timellm_lib.models.params import model_params
from timellm_lib.training import TrainingError, train
from timellm_lib.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    step_files,
    step_name,
)
from timellm_lib.training.faults import StopSignals
from timellm_lib.training.lock import LOCK_NAME, RunLock, RunLockedError
from timellm_lib.training.metrics_log import read_metrics


def _steps(run_dir: Path) -> list[int]:
    return [step for step, _ in step_files(run_dir / "checkpoints")]


def _events(run_dir: Path, name: str) -> list[dict]:
    return [e for e in read_metrics(run_dir / "metrics.jsonl") if e["event"] == name]


def _bare(text: str) -> str:
    """``text`` without whitespace: the CLI wraps messages at 100 columns, also at hyphens."""
    return "".join(text.split())


# ---------------------------------------------------------------------------- stop signals


@pytest.mark.slow
def test_sigterm_saves_the_current_step_exits_0_and_resumes_bit_identically(tmp_path):
    # 15 steps per epoch, step checkpoints only at epoch ends: the one at the stop is new
    overrides = tiny_overrides(
        tmp_path, "data.batch_size=24", "train.save_steps=0", "train.epochs=10"
    )
    run_dir = tmp_path / "run"
    command = timellm("train", "--run-dir", str(run_dir), "--no-progress", *set_args(overrides))
    started = time.time()
    proc = start(command, tmp_path, tmp_path / "log")
    wait_until(lambda: train_events_since(run_dir, started) >= 4, proc)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert time.monotonic() - signalled < 20  # one step, a validation and a save at most
    output = (tmp_path / "log").read_text()
    step = int(re.search(r"interrupted at global_step (\d+)", output).group(1))
    assert "SIGTERM received" in output and "continue with --resume auto" in output
    assert step >= 4 and step in _steps(run_dir)
    assert _events(run_dir, "interrupt")[0]["signal"] == "SIGTERM"
    assert not (run_dir / LOCK_NAME).exists()  # released on the way out

    cfg = load_config(overrides=overrides)
    train(cfg, run_dir=tmp_path / "reference", progress=False)
    resumed = train(cfg, run_dir=run_dir, resume="auto", progress=False)
    assert resumed.resumed_from.endswith(step_name(step))
    assert_same_run(run_dir, tmp_path / "reference")


def test_sigint_mid_epoch_stops_after_that_step_with_a_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path)  # 7 steps per epoch, save_steps 3
    handler = signal.getsignal(signal.SIGINT)

    def interrupt(record: dict) -> None:
        if record["event"] == "train" and record["global_step"] == 4:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, or a notebook's "interrupt kernel"

    result = train(cfg, run_dir=tmp_path / "run", progress=False, on_event=interrupt)
    assert (result.status, result.global_step, result.finished) == ("interrupted", 4, False)
    assert _steps(tmp_path / "run") == [3, 4]
    assert signal.getsignal(signal.SIGINT) is handler  # restored after the run

    train(cfg, run_dir=tmp_path / "reference", progress=False)
    train(cfg, run_dir=tmp_path / "run", resume="auto", progress=False)
    assert_same_run(tmp_path / "run", tmp_path / "reference")


def test_a_signal_during_the_epoch_end_validation_stops_at_that_step(tmp_path):
    """The signal is asked for after the evaluations: one that arrives while the epoch-end
    validation runs stops the run at the end of that epoch, not one optimizer step later."""
    cfg = tiny_config(tmp_path)  # 7 steps per epoch

    def interrupt(record: dict) -> None:
        if record["event"] == "val" and record["global_step"] == 7:
            os.kill(os.getpid(), signal.SIGINT)

    result = train(cfg, run_dir=tmp_path / "run", progress=False, on_event=interrupt)
    assert (result.status, result.global_step, result.step_in_epoch) == ("interrupted", 7, 0)
    events = read_metrics(tmp_path / "run/metrics.jsonl")
    assert [e["event"] for e in events[-5:]] == ["val", "save", "save", "interrupt", "save"]
    assert events[-1]["path"] == "checkpoints/step_00000007.pt"  # again, now with the event

    train(cfg, run_dir=tmp_path / "reference", progress=False)
    train(cfg, run_dir=tmp_path / "run", resume="auto", progress=False)
    assert_same_run(tmp_path / "run", tmp_path / "reference")
    assert _events(tmp_path / "run", "interrupt")[0]["global_step"] == 7  # kept by the resume


# ---------------------------------------------------------------------------- failing saves


def _disk_full_for(ckpt_dir: Path, name: str) -> None:
    """Make this process's next save of ``name`` hit a full disk: its temporary file (named
    as files.atomic_file names it) becomes a link to /dev/full, where writes fail with
    ENOSPC."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (ckpt_dir / f".{name}.{os.getpid()}{files_module.TMP_SUFFIX}").symlink_to("/dev/full")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_full_disk_stops_the_run_with_the_path_and_cause_then_resume_works(tmp_path, capsys):
    overrides = tiny_overrides(tmp_path)
    run_dir = tmp_path / "run"
    _disk_full_for(run_dir / "checkpoints", "step_00000006.pt")
    code = cli_main(["train", "--run-dir", str(run_dir), "--no-progress", *set_args(overrides)])
    err = _bare(capsys.readouterr().err)
    assert code == 2 and "Traceback" not in err
    path = run_dir / "checkpoints/step_00000006.pt"
    assert _bare(f"could not write {path}: No space left on device [ENOSPC]") in err
    assert _bare("the earlier checkpoints are intact (newest: step_00000003.pt)") in err
    assert "--resumeauto" in err and "train.on_save_error=continue" in err
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000003.pt"]

    cfg = load_config(overrides=overrides)  # space freed: go on from step 3
    train(cfg, run_dir=run_dir, resume="auto", progress=False)
    train(cfg, run_dir=tmp_path / "reference", progress=False)
    assert_same_run(run_dir, tmp_path / "reference")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_with_on_save_error_continue_a_failed_save_is_logged_and_training_goes_on(tmp_path, caplog):
    run_dir = tmp_path / "run"
    _disk_full_for(run_dir / "checkpoints", "step_00000006.pt")
    cfg = tiny_config(tmp_path, "train.on_save_error=continue")
    with caplog.at_level(logging.WARNING):
        result = train(cfg, run_dir=run_dir, progress=False)
    assert result.finished and "training goes on" in caplog.text
    assert _steps(run_dir) == [3, 7, 9, 12, 14, 15, 18, 21]  # 6 is missing, nothing else
    [failed] = _events(run_dir, "save_error")
    assert failed["global_step"] == 6 and "No space left on device" in failed["error"]
    # a failed save changes nothing else: the run ends as one without the failure
    train(tiny_config(tmp_path), run_dir=tmp_path / "reference", progress=False)
    assert_same_run(run_dir, tmp_path / "reference")


def _make_read_only(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real read-only folder. Root ignores permission bits, so when the folder is still
    writable the atomic file writer is made to raise what the kernel raises for anyone else."""
    folder.chmod(0o555)
    probe = folder / ".probe"
    try:
        probe.touch()
    except PermissionError:
        return
    probe.unlink()

    def denied(path, *args, **kwargs):
        if Path(path).parent == folder:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(files_module, "open", denied, raising=False)


def test_a_permission_error_stops_the_run_and_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path)
    run_dir = tmp_path / "run"
    ckpt_dir = run_dir / "checkpoints"

    def lock_down(record: dict) -> None:
        if record["event"] == "train" and record["global_step"] == 4:
            _make_read_only(ckpt_dir, monkeypatch)

    try:
        with pytest.raises(TrainingError) as raised:
            train(cfg, run_dir=run_dir, progress=False, on_event=lock_down)
    finally:
        ckpt_dir.chmod(0o755)
    text = str(raised.value)
    assert f"could not write {ckpt_dir / 'step_00000006.pt'}: Permission denied [EACCES]" in text
    assert "intact (newest: step_00000003.pt)" in text
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["step_00000003.pt"]
    load_checkpoint(ckpt_dir / "step_00000003.pt")
    assert not (run_dir / LOCK_NAME).exists()


# ---------------------------------------------------------------------------- non-finite loss


class NaNAt(MLP):
    """An MLP whose training forward returns NaN at the given calls (one call per step here),
    or at every call from ``from_call`` on."""

    def __init__(self, cfg, calls=(), from_call: int | None = None) -> None:
        super().__init__(model_params(cfg), 7, 7)
        self.bad, self.from_call, self.calls = set(calls), from_call, 0

    def forward(self, x, y=None):
        out = super().forward(x, y)
        if self.training:
            self.calls += 1
            if self.calls in self.bad or (self.from_call and self.calls >= self.from_call):
                return out * float("nan")
        return out


def _seeded(cls, cfg, *args, **kwargs):
    torch.manual_seed(0)  # the same initial weights for every model built here
    return cls(cfg, *args, **kwargs)


def test_a_nan_loss_stops_skips_or_reloads_as_configured(tmp_path):
    stop = tiny_config(tmp_path)
    with pytest.raises(TrainingError) as raised:
        train(stop, run_dir=tmp_path / "stop", progress=False, model=_seeded(NaNAt, stop, [5]))
    assert "the loss became nan at global_step 5; the last good checkpoint is " in str(raised.value)
    assert "checkpoints/step_00000003.pt. Continue from it with a lower lr" in str(raised.value)

    skip = tiny_config(tmp_path, "train.on_nan=skip")
    result = train(skip, run_dir=tmp_path / "skip", progress=False, model=_seeded(NaNAt, skip, [5]))
    assert result.finished
    assert [e["global_step"] for e in _events(tmp_path / "skip", "train") if e.get("skipped")] == [
        5
    ]

    # reload: back to step 3 with lr x 0.5, exactly like resuming from step 3 with that lr
    reload = tiny_config(tmp_path, "train.on_nan=reload")
    nan_run = tmp_path / "reload"
    train(reload, run_dir=nan_run, progress=False, model=_seeded(NaNAt, reload, [5]))
    [resume] = _events(nan_run, "resume")
    assert resume["from"] == "checkpoints/step_00000003.pt" and resume["lr"] == 5e-4
    assert "nan at global_step 5 (train.on_nan = reload 1 of at most 3" in resume["reason"]
    plain = tiny_config(tmp_path)
    by_hand = tmp_path / "by_hand"
    train(
        plain,
        run_dir=by_hand,
        max_steps=3,
        progress=False,
        model=_seeded(MLP, model_params(plain), 7, 7),
    )
    lower = tiny_config(tmp_path, "train.lr=5e-4")
    train(lower, run_dir=by_hand, resume="auto", resume_new_lr=True, progress=False)
    assert_same_run(nan_run, by_hand)


def test_reload_gives_up_after_on_nan_max_reloads(tmp_path):
    cfg = tiny_config(tmp_path, "train.on_nan=reload", "train.on_nan_max_reloads=2")
    with pytest.raises(TrainingError) as raised:
        train(cfg, run_dir=tmp_path / "run", progress=False, model=NaNAt(cfg, from_call=5))
    assert "nan at global_step 4 again after 2 reloads (train.on_nan_max_reloads)" in str(
        raised.value
    )
    [resume] = _events(tmp_path / "run", "resume")  # the log is rewound at each reload
    assert resume["lr"] == 2.5e-4 and "reload 2 of at most 2, lr x 0.5" in resume["reason"]


def test_a_real_divergence_under_the_cli_names_the_step_and_the_last_good_checkpoint(
    tmp_path, capsys
):
    overrides = tiny_overrides(tmp_path, "train.lr=1e20", "train.save_steps=1")  # Adam: +-1e20
    code = cli_main(["train", "--run-dir", str(tmp_path / "run"), *set_args(overrides)])
    err = _bare(capsys.readouterr().err)
    assert code == 2
    assert _bare("loss became inf at global_step 2; the last good checkpoint is") in err
    assert "checkpoints/step_00000001.pt" in err


def test_the_new_fault_settings_are_validated():
    with pytest.raises(ConfigError, match=r"on_nan_lr_factor = 0.0 must be in \(0, 1\]"):
        load_config(overrides=["train.on_nan_lr_factor=0"])
    with pytest.raises(ConfigError, match="on_save_error = 'ignore' is not allowed"):
        load_config(overrides=["train.on_save_error=ignore"])
    with pytest.raises(ConfigError, match="on_nan_max_reloads = 0 must be at least 1"):
        load_config(overrides=["train.on_nan_max_reloads=0"])


# ---------------------------------------------------------------------------- the lock


@pytest.mark.slow
def test_a_second_trainer_is_refused_and_a_killed_ones_lock_is_taken_over(tmp_path, caplog):
    overrides = tiny_overrides(tmp_path, "train.epochs=1000", "train.patience=1000")  # endless
    run_dir = tmp_path / "run"
    args = ["train", "--run-dir", str(run_dir), "--resume", "auto", "--no-progress"]
    args += set_args(overrides)
    started = time.time()
    first = start(timellm(*args), tmp_path)
    wait_until(lambda: train_events_since(run_dir, started) >= 1, first)
    holder = json.loads((run_dir / LOCK_NAME).read_text())
    assert (holder["pid"], holder["host"]) == (first.pid, socket.gethostname())

    second = run(timellm(*args), tmp_path)
    err = _bare(second.stderr)
    assert second.returncode == 2, err
    assert (
        _bare(f"in use by another trainer (pid {first.pid} on host {socket.gethostname()}") in err
    )
    assert first.poll() is None  # the first one trains on, undisturbed

    first.send_signal(signal.SIGKILL)
    first.wait()
    assert (run_dir / LOCK_NAME).exists()  # a crash leaves the file, but nobody holds it
    cfg = load_config(overrides=overrides)
    resume_at = _steps(run_dir)[-1] if _steps(run_dir) else 0
    with caplog.at_level(logging.WARNING):
        result = train(cfg, run_dir=run_dir, resume="auto", max_steps=resume_at + 1, progress=False)
    assert result.global_step == resume_at + 1
    assert f"taking over the stale lock {run_dir / LOCK_NAME} of pid {first.pid}" in caplog.text
    assert not (run_dir / LOCK_NAME).exists()

    with RunLock(run_dir), pytest.raises(RunLockedError, match=f"pid {os.getpid()} on host"):
        train(cfg, run_dir=run_dir, resume="auto", progress=False)


# ---------------------------------------------------------------------------- checksums


@pytest.mark.slow
def test_a_flipped_bit_fails_the_checksum_and_resume_auto_walks_back(tmp_path):
    overrides = tiny_overrides(tmp_path)
    cfg = load_config(overrides=overrides)
    run_dir = tmp_path / "run"
    train(cfg, run_dir=run_dir, max_steps=6, progress=False)  # step checkpoints 3 and 6
    newest = run_dir / "checkpoints/step_00000006.pt"
    weight = load_checkpoint(newest)["model"]["net.0.weight"]
    raw = bytearray(newest.read_bytes())
    raw[raw.find(weight.numpy().tobytes()[:64]) + 5] ^= 0x01  # bit rot inside a tensor
    newest.write_bytes(raw)
    loaded = torch.load(newest, weights_only=True)  # torch itself does not notice
    assert not torch.equal(loaded["model"]["net.0.weight"], weight)
    with pytest.raises(CheckpointError, match="fails its content checksum"):
        load_checkpoint(newest)

    command = timellm("train", "--run-dir", str(run_dir), "--resume", "auto", "--no-progress")
    resumed = run([*command, *set_args(overrides)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    err = _bare(resumed.stderr)
    assert _bare("skipping checkpoint step_00000006.pt") in err
    assert _bare("fails its content checksum") in err
    assert _bare("resumed from") in err and "step_00000003.pt" in err
    train(cfg, run_dir=tmp_path / "reference", progress=False)
    assert_same_run(run_dir, tmp_path / "reference")

    # a file written before checksums existed loads, unchecked
    older = load_checkpoint(run_dir / "checkpoints/step_00000003.pt")
    del older["checksum"]
    torch.save(older, tmp_path / "older.pt")
    assert digests(tmp_path / "older.pt") == digests(run_dir / "checkpoints/step_00000003.pt")


def test_a_failed_write_outside_checkpoints_ends_the_call_with_the_fix_and_frees_the_run(
    tmp_path,
):
    """An OSError from a write the trainer does not handle itself (here config.yaml, with a
    directory in the way) becomes a TrainingError that says what to do, and the run
    directory's lock is released for the next call."""
    run = tmp_path / "run"
    (run / "config.yaml").mkdir(parents=True)
    with pytest.raises(TrainingError, match="free space or fix the permissions there"):
        train(tiny_config(tmp_path), run_dir=run, max_steps=1, progress=False)
    (run / "config.yaml").rmdir()
    result = train(tiny_config(tmp_path), run_dir=run, resume="auto", max_steps=1, progress=False)
    assert result.global_step == 1


def test_a_signal_inside_nested_stop_blocks_reaches_the_enclosing_one_too():
    """A study holds StopSignals around its runs and each run holds its own: a SIGTERM during
    a run must stop the study as well, even when that run then fails instead of reporting
    the interrupt (its checkpoint save hit a full disk)."""
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals("the study stops after the current run") as study:
        with StopSignals() as run:
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.monotonic() + 5
            while run.received is None and time.monotonic() < deadline:
                time.sleep(0.01)  # the handler runs between bytecodes of the main thread
        assert run.received == "SIGTERM"
        assert study.received == "SIGTERM"
        with StopSignals() as later:  # a later run starts with no request of its own
            assert later.received is None
    assert signal.getsignal(signal.SIGTERM) == before
