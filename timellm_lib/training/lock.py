"""One trainer per run directory: ``train.lock``, held for as long as a trainer runs.

Two trainers on one run directory would interleave their checkpoints and metrics and delete
each other's "newer" files on resume. So the trainer (rank 0 of a distributed run) takes an
exclusive ``flock`` on ``<run_dir>/train.lock`` and writes its pid, host and start time into
it; a second trainer finds the lock taken and is refused with those details.

The operating system releases a ``flock`` when its process ends, however it ends: after a
crash or a SIGKILL the file is still there but nobody holds it, so the next trainer
recognises it as stale (and says whose it was) and takes it over. On a clean exit the file is
removed. Locks work on local filesystems and on NFSv4, where ``flock`` is emulated with
byte-range locks.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from timellm_lib.errors import WorkbenchError

log = logging.getLogger(__name__)

LOCK_NAME = "train.lock"


class RunLockedError(WorkbenchError):
    """Another trainer holds the run directory."""


class RunLock:
    """``RunLock(run_dir).acquire()`` claims ``run_dir`` until :meth:`release` (or the end of
    a ``with`` block, or of the process)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`RunLockedError` naming its holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd, created = _open_or_create(self.path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunLockedError(
                    f"{self.path.parent} is in use by another trainer ({_who(holder)}); wait "
                    "for it to finish or stop it, or train into another --run-dir"
                ) from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the holder removed the file between our open and lock: try again
        stale = _read_holder(fd)
        if stale:
            log.warning(
                "taking over the stale lock %s of %s: that process ended without releasing "
                "it (a crash or a kill)",
                self.path,
                _who(stale),
            )
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
            os.fsync(fd)
        except OSError as err:  # a full disk: leave no empty lock file behind
            if created:
                self.path.unlink(missing_ok=True)
            os.close(fd)
            raise OSError(err.errno, err.strerror, str(self.path)) from err  # name the file
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the file, then let go (in that order, so nobody can lock a file that is
        about to disappear)."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.release()


def _open_or_create(path: Path) -> tuple[int, bool]:
    """A read-write descriptor of ``path`` and whether this call created the file."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
    except FileExistsError:
        pass
    try:
        return os.open(path, os.O_RDWR), False
    except FileNotFoundError:  # removed by its holder in between: create it after all
        return _open_or_create(path)


def _read_holder(fd: int) -> dict[str, Any] | None:
    """What the holder wrote into the lock file; None for an empty or unreadable one."""
    try:
        return json.loads(os.pread(fd, 4096, 0).decode())
    except (OSError, ValueError):
        return None


def _who(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "unknown process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"pid {holder.get('pid')} on host {holder.get('host')}, since {since}"


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False
