"""Real training processes for the distributed and fault tests and for
benchmarks/fault_injection.py: torchrun command lines, waiting for a run to reach a point,
and SIGKILL of a whole process tree.

torchrun starts every worker in a session of its own, so killing torchrun's process group
would leave the workers running; :func:`kill_tree` finds them through /proc (Linux) instead.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from timellm_lib.training.metrics_log import read_metrics

REPO_ROOT = Path(__file__).resolve().parents[1]


def torchrun(nproc: int, *args: str) -> list[str]:
    """``python -m torch.distributed.run`` on this machine (a free port is picked by
    ``--standalone``) running ``timellm <args>`` in ``nproc`` processes."""
    return [
        sys.executable,
        *("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)),
        *("-m", "timellm_lib.cli", *args),
    ]


def timellm(*args: str) -> list[str]:
    return [sys.executable, "-m", "timellm_lib.cli", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


def run(command: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``command`` to its end with the repository importable; output captured."""
    return subprocess.run(
        command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def start(command: list[str], cwd: Path, log: Path | None = None) -> subprocess.Popen:
    """Start ``command`` with the repository importable; stdout and stderr go to ``log``
    (default: discarded), so a chatty process can never block on a full pipe."""
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(command, cwd=cwd, env=_env(), stdout=out, stderr=subprocess.STDOUT)


def children(pid: int) -> list[int]:
    """All descendants of ``pid`` (children first), read from /proc."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and every process below it, all at once, and reap ``proc``."""
    for pid in [proc.pid, *children(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def train_events_since(run_dir: Path, since: float) -> int:
    """How many train events ``run_dir``'s metrics.jsonl has logged since ``since``."""
    metrics = Path(run_dir) / "metrics.jsonl"
    if not metrics.exists():
        return 0
    return sum(1 for e in read_metrics(metrics) if e["event"] == "train" and e["time"] >= since)


def wait_until(
    condition: Callable[[], bool], proc: subprocess.Popen, timeout: float = 120.0
) -> None:
    """Poll ``condition`` until true; fail if ``proc`` ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, "the training process ended before the awaited moment"
        assert time.monotonic() < deadline, "timed out waiting for the training process"
        time.sleep(0.005)
