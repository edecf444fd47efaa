"""What rank 0 writes for a run: the checkpoint dicts (the save sites of the schema in
:mod:`~timellm_lib.training.schema`), best.pt, step and final checkpoints, eval_test.json,
each with the metrics event that goes with it."""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path
from typing import Any

from timellm_lib.files import write_text_atomic
from timellm_lib.training.checkpoint import (
    rotate_step_checkpoints,
    save_checkpoint,
    step_files,
    step_name,
)
from timellm_lib.training.distributed import from_main, on_main
from timellm_lib.training.faults import describe_write_error, write_fix
from timellm_lib.training.rng import capture_rng_state
from timellm_lib.training.schema import FORMAT_VERSION
from timellm_lib.training.state import Run, TrainingError, backbone_record, relative

log = logging.getLogger(__name__)


def checkpoint_payload(
    run: Run, kind: str, rng_states: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The checkpoint dict: flat, readable, loadable with ``torch.load(weights_only=True)``.

    ``rng_states``: every rank's RNG state in rank order (a distributed run gathers them);
    by default this process's.
    """
    rng_states = rng_states or [capture_rng_state()]
    pos = run.position
    return {
        "format_version": FORMAT_VERSION,
        "kind": kind,  # step | final
        "global_step": run.state.global_step,
        "epoch": pos.epoch,
        "step_in_epoch": pos.step_in_epoch,
        "train_steps": run.train_steps,
        "model": run.model.state_dict(),  # trainable weights + buffers, no frozen backbone
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler else None,
        "ema": run.ema.state_dict() if run.ema else None,
        "early_stopping": run.stopper.state_dict(),
        "rng": rng_states[0],
        "rng_other_ranks": rng_states[1:],
        "world_size": run.world.size,
        "sampler": {
            "seed": run.cfg.train.seed,
            "epoch": pos.epoch,
            "position": pos.step_in_epoch * run.cfg.train.grad_accum,  # micro-batches consumed
        },
        "config": run.cfg.to_dict(),
        "backbone": backbone_record(run.cfg, run.model),
        "data": run.datasets.inference_state(),  # scaler and channels: predict needs no data
        "metrics_lines": run.metrics.lines,
        "lr": run.lr,
    }


def best_payload(run: Run) -> dict[str, Any]:
    """best.pt: for inference (no optimizer); ``resume_from`` names its resumable companion."""
    weights = run.model.state_dict()
    if run.ema and run.cfg.train.eval_with_ema:
        weights = run.ema.averaged_state_dict(run.model)
    pos = run.position
    return {
        "format_version": FORMAT_VERSION,
        "kind": "best",
        "global_step": run.state.global_step,
        "epoch": pos.epoch,
        "step_in_epoch": pos.step_in_epoch,
        "train_steps": run.train_steps,
        "model": weights,
        "early_stopping": run.stopper.state_dict(),
        "config": run.cfg.to_dict(),
        "backbone": backbone_record(run.cfg, run.model),
        "data": run.datasets.inference_state(),  # scaler and channels: predict needs no data
        "lr": run.lr,
        "resume_from": step_name(run.state.global_step),
    }


class MainWriter:
    """Rank 0 writes, every rank calls the same method and waits for the outcome (so a file
    is complete and fsynced before any process goes on). Save events are logged before the
    payload is built, so a checkpoint's metrics_lines include its own save."""

    def __init__(self, run: Run) -> None:
        self.run = run

    def best(self) -> None:
        on_main(self.run.world, self._best)

    def checkpoint(self, kind: str, rng_states: list[dict[str, Any]] | None) -> bool:
        """step_<global_step>.pt (then rotation) or final.pt; False if the write failed."""
        return from_main(self.run.world, partial(self._checkpoint, kind, rng_states))

    def test_result(self, result: dict[str, Any]) -> None:
        on_main(self.run.world, partial(self._test_result, result))

    def _best(self) -> None:
        self.run.event("save", kind="best", path="checkpoints/best.pt")
        self._save(self.run.ckpt_dir / "best.pt", best_payload(self.run))

    def _checkpoint(self, kind: str, rng_states: list[dict[str, Any]] | None) -> bool:
        run = self.run
        name = step_name(run.state.global_step) if kind == "step" else "final.pt"
        steps_done = run.last_step.step_in_epoch  # train_steps at an epoch end
        run.event("save", kind=kind, path=f"checkpoints/{name}", step_in_epoch=steps_done)
        if not self._save(run.ckpt_dir / name, checkpoint_payload(run, kind, rng_states)):
            return False
        if kind == "step":
            companion = run.state.best_companion
            protect = {name} | ({companion} if companion else set())
            rotate_step_checkpoints(run.ckpt_dir, run.cfg.train.save_total_limit, protect)
        return True

    def _test_result(self, result: dict[str, Any]) -> None:
        write_text_atomic(self.run.run_dir / "eval_test.json", _json(result))
        self.run.event("test", **{k: v for k, v in result.items() if k != "split"})

    def _save(self, path: Path, payload: dict[str, Any]) -> bool:
        """Save ``payload``; on a failed write (disk full, no permission) stop with a
        TrainingError or, with ``train.on_save_error = continue``, log it and return False.
        Either way the earlier checkpoints are intact (atomic writes) and none is rotated away."""
        run = self.run
        try:
            save_checkpoint(path, payload)
            return True
        except OSError as err:
            files = step_files(run.ckpt_dir)
            intact = f"newest: {files[-1][1].name}" if files else "there are none yet"
            message = (
                f"checkpoint not saved: {describe_write_error(err, path)}; the earlier "
                f"checkpoints are intact ({intact})"
            )
            if run.cfg.train.on_save_error == "stop":
                raise TrainingError(
                    f"{message}. {write_fix(err).capitalize()}, then continue with --resume auto "
                    "(or set train.on_save_error=continue to train on when a save fails)"
                ) from err
            log.warning("%s; training goes on (train.on_save_error = continue)", message)
            run.event("save_error", path=relative(path, run.run_dir), error=str(err))
            return False


def _json(value: Any) -> str:
    return json.dumps(value, indent=2) + "\n"
