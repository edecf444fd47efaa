"""Real file-system faults for the tests and benchmarks/fault_injection.py: a small tmpfs
that fills up (a full disk) and one remounted read-only.

Permission bits cannot make a folder read-only for root, and an unprivileged user cannot
mount; so these need root and a kernel that lets it mount (a container may not). Where that
is impossible :func:`tmpfs` raises :class:`MountUnavailable` saying why, and callers skip.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class MountUnavailable(Exception):
    """A tmpfs cannot be mounted here; the message says why."""


@contextmanager
def tmpfs(folder: Path, size: str = "16m") -> Iterator[Path]:
    """A fresh tmpfs of ``size`` mounted on ``folder`` (created) for the block."""
    if os.geteuid() != 0:
        raise MountUnavailable("mounting a tmpfs needs root, and these tests run as a user")
    folder.mkdir(parents=True, exist_ok=True)
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]
    done = subprocess.run(mount, capture_output=True, text=True)
    if done.returncode:
        raise MountUnavailable(f"`{' '.join(mount)}` failed: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def remount_read_only(folder: Path) -> None:
    """Make the tmpfs at ``folder`` read-only (EROFS for every writer, root included)."""
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)


def fill(folder: Path) -> Path:
    """Write a file into ``folder`` until its file system is full; returns the file."""
    filler = folder / "filler"
    chunk = b"\0" * (1 << 16)
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as err:
            assert err.errno == errno.ENOSPC, err
    return filler


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder`` by relative path: equal snapshots, same files."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
