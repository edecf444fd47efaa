"""Fault injection: SIGKILLs at random moments, then --resume auto, until the run ends; the
result must be bit-identical to the same run never interrupted.

Two scenarios, one after the other: a single-process `timellm train`, and a two-process run
under torchrun (CPU, gloo), where a kill takes down torchrun and both workers at once. Each
saves a checkpoint after every step (keeping two, so rotation runs too). In a seeded loop a
process is started with --resume auto and killed at a random moment: during start-up, after
a random number of steps, or the moment a checkpoint's temporary file appears (inside a
save). After every kill all step checkpoints must load (atomic saves: a kill never leaves a
damaged one); then, now and then, the newest is damaged on purpose by flipping one bit inside
a tensor (what a bad disk does), which only its content checksum can notice: the next
--resume auto must skip it. A last process runs to the end, and its final.pt digests,
logged losses and test metrics are compared with an uninterrupted run's. A run that reaches
its end before the kills are used up is compared too, and the next kills go to a new run.

Then two file-system faults on real mounts (a tmpfs; as root, else reported as skipped
with the reason): a full disk when a paused run resumes (the space is then freed and the
resume must go on), and a read-only file system holding the run, met by train (resume and
a fresh run directory), eval and predict. Each command must exit 2 with a message and no
traceback, and leave every file as it was.

Prints one JSON object: kills (per scenario and per kind of moment), kills that landed
inside a save, resumes, stale locks taken over, checkpoints damaged on purpose and corrupt
checkpoints skipped, damaged checkpoints found after kills (must be 0), runs, and runs that
ended bit-identical to the uninterrupted one (must be all), the file-system faults (exit
code, traceback, files unchanged, the message), plus details and the wall time. A scenario
given 0 kills is left out.

    python benchmarks/fault_injection.py [--seed 0] [--kills-single 15] [--kills-ddp 10]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))  # the test suite's process and run helpers

from fs_helpers import MountUnavailable, fill, remount_read_only, snapshot, tmpfs  # noqa: E402
from process_helpers import (  # noqa: E402
    kill_tree,
    run,
    start,
    timellm,
    torchrun,
    train_events_since,
)
from trainer_helpers import comparable_events, digests, set_args, tiny_overrides  # noqa: E402

from timellm_lib.training.checkpoint import CheckpointError, load_checkpoint, step_files  # noqa: E402

EXTRA = [
    "data.batch_size=24",  # 15 steps per epoch (12 windows per rank with two processes)
    "train.epochs=6",
    "train.save_steps=1",  # a checkpoint after every step: many kills land inside a save
    "train.save_total_limit=2",
]
MOMENTS = ("start-up", "steps", "inside a save")


def command(nproc: int, args: list[str]) -> list[str]:
    return torchrun(nproc, *args) if nproc > 1 else timellm(*args)


def scenario(root: Path, name: str, nproc: int, kills: int, rng: random.Random) -> dict:
    """An uninterrupted reference run, then interrupted runs of the same config (each in a
    run directory of its own, killed until it ends or the kills are used up) until ``kills``
    kills are made; returns the counts summed over the runs."""
    args = ["train", "--no-progress", *set_args(tiny_overrides(root, *EXTRA))]
    reference = root / f"{name}-reference"
    done = start(command(nproc, [*args, "--run-dir", str(reference)]), root, root / "ref.log")
    assert done.wait() == 0, (root / "ref.log").read_text()
    runs = []
    while sum(r["kills"] for r in runs) < kills:
        run = root / f"{name}-{len(runs)}"
        left = kills - sum(r["kills"] for r in runs)
        runs.append(interrupted_run(run, reference, command(nproc, args), left, rng))
    totals = {key: sum(r[key] for r in runs) for key in runs[0] if key != "matches"}
    return {**totals, "runs": len(runs), "runs_matching": sum(r["matches"] for r in runs)}


def interrupted_run(
    run: Path, reference: Path, train: list[str], kills: int, rng: random.Random
) -> dict:
    """Start ``train`` with --resume auto in ``run`` and kill it at a random moment, again and
    again (at most ``kills`` times), then let it finish and compare it with ``reference``."""
    resume = [*train, "--run-dir", str(run), "--resume", "auto"]
    counts = {"kills": 0, "inside_save": 0, "damaged_on_purpose": 0, "damaged_after_kill": 0}
    counts.update(dict.fromkeys(MOMENTS, 0))
    logs, ended = [], False
    while counts["kills"] < kills and not ended:
        logs.append(run.with_name(f"{run.name}-{len(logs)}.log"))
        leftovers = temp_files(run)  # of earlier kills; the next resume removes them
        started = time.time()
        proc = start(resume, run.parent, logs[-1])
        moment = rng.choice(MOMENTS)
        if not wait_for(moment, proc, run, started, rng):  # it ran to the end first
            assert proc.wait() == 0, logs[-1].read_text()
            ended = True
            continue
        kill_tree(proc)
        counts["kills"] += 1
        counts[moment] += 1
        counts["inside_save"] += bool(temp_files(run) - leftovers)
        counts["damaged_after_kill"] += count_damaged(run)
        if rng.random() < 0.25 and damage_newest(run):
            counts["damaged_on_purpose"] += 1
    if not ended:
        logs.append(run.with_name(f"{run.name}-final.log"))
        final = start(resume, run.parent, logs[-1])
        assert final.wait() == 0, logs[-1].read_text()
    text = "".join(log.read_text() for log in logs)
    return {
        **counts,
        "resumes": text.count("INFO: resumed from"),
        "corrupt_skipped": text.count("skipping checkpoint"),
        "stale_locks_taken_over": text.count("taking over the stale lock"),
        "matches": digests(run / "checkpoints/final.pt")
        == digests(reference / "checkpoints/final.pt")
        and comparable_events(run) == comparable_events(reference)
        and (run / "eval_test.json").read_text() == (reference / "eval_test.json").read_text(),
    }


def wait_for(moment: str, proc, run: Path, started: float, rng: random.Random) -> bool:
    """Wait for the chosen kind of moment; False when the process ended first."""
    if moment == "start-up":
        deadline = time.monotonic() + rng.uniform(0.5, 4.0)  # importing, joining, loading
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            time.sleep(0.01)
        return True
    steps = rng.randint(1, 5)
    while train_events_since(run, started) < steps:
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    if moment == "steps":
        time.sleep(rng.uniform(0.0, 0.02))
        return proc.poll() is None
    while not temp_files(run):
        if proc.poll() is not None:
            return False
        time.sleep(0.0005)
    return True


def temp_files(run: Path) -> set[Path]:
    """Temporary files of checkpoint saves in progress (or cut off by a kill)."""
    return set((run / "checkpoints").glob(".*.tmp"))


def count_damaged(run: Path) -> int:
    """Step checkpoints that do not load (atomic saves should make this 0)."""
    damaged = 0
    for _, path in step_files(run / "checkpoints"):
        try:
            load_checkpoint(path)
        except CheckpointError:
            damaged += 1
    return damaged


def damage_newest(run: Path) -> bool:
    """Flip one bit inside a weight tensor of the newest step checkpoint (torch still loads
    the file; only the checksum tells)."""
    files = step_files(run / "checkpoints")
    if not files:
        return False
    path = files[-1][1]
    weights = next(iter(load_checkpoint(path)["model"].values()))
    raw = bytearray(path.read_bytes())
    raw[raw.find(weights.numpy().tobytes()[:64]) + 3] ^= 0x10
    path.write_bytes(raw)
    return True


def filesystem_faults(root: Path) -> dict:
    """A full disk at resume, then the resume once space is freed; a read-only file system
    under train, eval and predict. See the module docstring."""
    args = ["--no-progress", *set_args(tiny_overrides(root, *EXTRA))]
    paused = root / "fs-paused"  # past the first validation: best.pt exists
    done = run(timellm("train", *args, "--run-dir", str(paused), "--max-steps", "16"), root)
    assert done.returncode == 0, done.stderr
    try:
        with tmpfs(root / "full") as disk:
            run_dir = shutil.copytree(paused, disk / "run")
            resume = timellm("train", *args, "--run-dir", str(run_dir), "--resume", "auto")
            filler = fill(disk)
            before = snapshot(disk)
            full = outcome(run(resume, root), snapshot(disk) == before)
            filler.unlink()
            full["resume_after_freeing_space_exit_code"] = run(resume, root).returncode
        with tmpfs(root / "read-only") as folder:
            run_dir = shutil.copytree(paused, folder / "run")
            remount_read_only(folder)
            before = snapshot(folder)
            best = str(run_dir / "checkpoints/best.pt")
            commands = {
                "train_resume": ["train", *args, "--run-dir", str(run_dir), "--resume", "auto"],
                "train_fresh_subdirectory": ["train", *args, "--run-dir", str(folder / "a/b")],
                "eval": ["eval", "--ckpt", best],
                "predict": ["predict", "--ckpt", best, "--out", str(folder / "p.csv")],
            }
            read_only = {}
            for name, command in commands.items():
                read_only[name] = outcome(run(timellm(*command), root), snapshot(folder) == before)
    except MountUnavailable as why:
        return {"skipped": str(why)}
    return {"full_disk_at_resume": full, "read_only": read_only}


def outcome(done, unchanged: bool) -> dict:
    """What a command that met a file-system fault did."""
    return {
        "exit_code": done.returncode,
        "traceback": "Traceback" in done.stderr,
        "files_unchanged": unchanged,
        "message": " ".join(done.stderr.split())[-400:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kills-single", type=int, default=15)
    parser.add_argument("--kills-ddp", type=int, default=10)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    began = time.monotonic()
    plan = {"single_process": (1, args.kills_single), "two_processes": (2, args.kills_ddp)}
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            name: scenario(Path(tmp), name, nproc, kills, rng)
            for name, (nproc, kills) in plan.items()
            if kills > 0
        }
        filesystem = filesystem_faults(Path(tmp))
    runs = list(results.values())

    def total(key: str) -> int:
        return sum(r[key] for r in runs)

    summary = {
        "seed": args.seed,
        "kills": total("kills"),
        "kills_by_scenario": {k: r["kills"] for k, r in results.items()},
        "kills_by_moment": {m: total(m) for m in MOMENTS},
        "kills_inside_save": total("inside_save"),
        "resumes": total("resumes"),
        "stale_locks_taken_over": total("stale_locks_taken_over"),
        "checkpoints_damaged_on_purpose": total("damaged_on_purpose"),
        "corrupt_checkpoints_skipped": total("corrupt_skipped"),
        "damaged_checkpoints_after_kills": total("damaged_after_kill"),
        "runs": total("runs"),
        "runs_matching_uninterrupted": total("runs_matching"),
        "scenarios": results,
        "filesystem_faults": filesystem,
        "seconds": round(time.monotonic() - began, 1),
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
