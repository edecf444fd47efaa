"""Faults a run meets from outside: a request to stop, and a write that fails.

**Stop requests.** Clusters send SIGTERM shortly before they preempt a job, and a user presses
Ctrl-C (SIGINT). Dying on the spot would lose every step since the last checkpoint, so
:class:`StopSignals` only records the request. The loop finishes the optimizer step in
progress (with the validation and saves that step triggers), all processes of a distributed
run agree to stop after that same step, a step checkpoint is written at it, and ``train``
returns with status ``interrupted``: the process exits 0 after at most one step, one
validation and one save. Resuming from that checkpoint is bit-identical to never having
stopped. Further signals while this happens are ignored (torchrun forwards one of its own on
top of the user's); SIGKILL still ends a process at once, and the atomic checkpoint writes
keep every earlier checkpoint intact.

**Failing writes.** A full disk or a missing permission raises ``OSError`` in the middle of a
run. :func:`describe_write_error` turns one into a sentence naming the file and the cause; the
trainer then stops cleanly or, for checkpoint saves with ``train.on_save_error = continue``,
logs it and trains on.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import tempfile
import threading
from pathlib import Path
from types import FrameType, TracebackType

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """While active (``with StopSignals() as stop:``), SIGTERM and SIGINT set
    ``stop.received`` (the first signal's name) instead of ending the process.

    Signal handlers can only be installed from the main thread; elsewhere (a training thread
    of some application) the block runs with the process's handlers unchanged.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            log.warning(
                "%s received: stopping after the current optimizer step, with a checkpoint",
                name,
            )
        else:
            log.warning("%s received: already stopping after the current step", name)

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
