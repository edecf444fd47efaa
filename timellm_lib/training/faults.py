"""Faults a run meets and the policy for each: a stop request, a failing write, a non-finite
loss.

- SIGTERM/SIGINT (:class:`StopSignals`) only record the request: every process stops after the
  same optimizer step, with a checkpoint, so a preempted job loses nothing and resumes
  bit-identically. Further signals are ignored; SIGKILL still ends a process at once.
- A failed write (``OSError``) becomes a sentence naming the file and the cause
  (:func:`describe_write_error`); a failed checkpoint save stops or trains on as
  ``train.on_save_error`` says.
- A non-finite loss is handled as ``train.on_nan`` says (:func:`on_non_finite`).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import tempfile
import threading
from functools import partial
from pathlib import Path
from types import FrameType, TracebackType

from timellm_lib.training.checkpoint import load_checkpoint, select_resume_checkpoint, step_files
from timellm_lib.training.distributed import from_main
from timellm_lib.training.resume import restore
from timellm_lib.training.state import Run, TrainingError, relative

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """While active (``with StopSignals() as stop:``), SIGTERM and SIGINT set
    ``stop.received`` (the first signal's name) instead of ending the process.

    Signal handlers can only be installed from the main thread; elsewhere (a training thread
    of some application) the block runs with the process's handlers unchanged.
    """

    def __init__(
        self, stopping: str = "stopping after the current optimizer step, with a checkpoint"
    ) -> None:
        self.stopping = stopping  # what the holder does on a signal, for the log
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            log.warning("%s received: %s", name, self.stopping)
        else:
            log.warning("%s received: already %s", name, self.stopping)
        enclosing = self._previous.get(signum)
        if isinstance(getattr(enclosing, "__self__", None), StopSignals):
            # e.g. a study around its runs: it must stop too, even if this run then fails
            enclosing(signum, frame)  # type: ignore[operator]

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()


def describe_write_error(err: OSError, target: Path | None = None) -> str:
    """``could not write <file>: <cause> [<ERRNO>]`` for a failed write (``target``: the file
    meant, when ``err`` names a temporary file beside it)."""
    path = target if target is not None else err.filename
    code = errno.errorcode.get(err.errno or 0)
    cause = err.strerror or str(err)
    return f"could not write {path}: {cause}" + (f" [{code}]" if code else "")


def write_fix(err: OSError) -> str:
    """What to do about a failed write, by its cause."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free space there"
    if err.errno == errno.EROFS:
        return "that file system is read-only: remount it writable or use a writable folder"
    if err.errno in (errno.EACCES, errno.EPERM):
        return "fix the permissions there or use a folder you may write to"
    return "free space or fix the permissions there"


def unwritable(folder: Path) -> OSError | None:
    """The error creating a file in ``folder`` meets (read-only, no permission, not a
    folder), or None when it can be written.

    A command that writes its results at the end checks this first, so a read-only or
    forbidden folder costs nothing. A folder that does not exist yet is judged by its
    nearest existing parent, where it would be created; nothing is left behind either way.
    """
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return NotADirectoryError(errno.ENOTDIR, "it is a file, not a folder", str(folder))
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".timellm-probe.", suffix=".tmp")
    except OSError as err:
        return err
    os.close(fd)
    os.unlink(probe)
    return None


# ---------------------------------------------------------------------------- non-finite loss


def on_non_finite(run: Run, loss: float) -> dict[str, float] | None:
    """``train.on_nan``: ``stop`` raises (naming the step and the last good checkpoint);
    ``skip`` drops the update (the schedule still advances, staying aligned with
    global_step); ``reload`` goes back to the newest valid step checkpoint, exactly as a
    resume from it with ``--resume-new-lr`` would, the base lr multiplied by
    ``train.on_nan_lr_factor`` once more at every reload (returns None). The log is rewound
    with the rest, so its resume event (``reason``) is the trace of the reload."""
    t = run.cfg.train
    step = run.state.global_step + 1
    run.optimizer.zero_grad(set_to_none=True)
    if t.on_nan == "skip":
        log.warning("loss %s at step %d: update skipped", loss, step)
        run.scheduler.step()
        return {"loss": loss, "skipped": 1.0}
    what = f"the loss became {loss} at global_step {step}"
    if t.on_nan == "stop" or run.state.nan_reloads >= t.on_nan_max_reloads:
        if t.on_nan == "reload":
            what += f" again after {run.state.nan_reloads} reloads (train.on_nan_max_reloads)"
        raise TrainingError(f"{what}; {_what_now(run)}")
    path = from_main(run.world, partial(_newest_step_checkpoint, run))
    if path is None:
        raise TrainingError(
            f"{what} and train.on_nan = reload, but there is no checkpoint to reload yet; use "
            "train.on_nan = skip or stop"
        )
    base_lr = run.scheduler.base_lrs[0] * t.on_nan_lr_factor  # lower again at each reload
    run.state.nan_reloads += 1
    log.warning("%s: reloading %s with base lr %g", what, path.name, base_lr)
    reason = (
        f"{what} (train.on_nan = reload {run.state.nan_reloads} of at most "
        f"{t.on_nan_max_reloads}, lr x {t.on_nan_lr_factor})"
    )
    ckpt = load_checkpoint(path)
    restore(run, path, ckpt, changes={}, base_lr=base_lr, reason=reason)
    return None


def _newest_step_checkpoint(run: Run) -> Path | None:
    if not step_files(run.ckpt_dir):
        return None
    return select_resume_checkpoint(run.run_dir, "last")[0]


def _what_now(run: Run) -> str:
    """After a non-finite loss: the last good checkpoint and how to go on."""
    files = step_files(run.ckpt_dir)
    if not files:
        return (
            "no checkpoint was written yet. Lower train.lr or set train.grad_clip, or set "
            "train.on_nan to skip"
        )
    return (
        f"the last good checkpoint is {relative(files[-1][1], run.run_dir)}. Continue from "
        "it with a lower lr (--resume auto --resume-new-lr --set train.lr=...), or set "
        "train.on_nan to skip or reload"
    )
