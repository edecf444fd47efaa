"""Several processes, one run: the DDP side of the trainer (``torchrun --nproc-per-node K``).

Every process runs the same loop on its shard of each *global* batch and DDP averages the
gradients, so all hold the same weights; what must happen once is done by rank 0 and shared
(:func:`on_main`), what must be summed is summed (:func:`all_sum`). Without torchrun every
helper here returns its input unchanged.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from timellm_lib.errors import WorkbenchError

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the processes of a run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # index of the process on its machine (its GPU)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, metrics and outputs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


@contextmanager
def distributed_session(device: torch.device) -> Iterator[World]:
    """The :class:`World` of this process, with its process group joined for the block.

    Reads the environment torchrun sets; without it (or with WORLD_SIZE 1) nothing is
    initialised. On GPU each process uses the GPU of its LOCAL_RANK. A process group that the
    caller already initialised is used as it is and left open.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1 and not dist.is_initialized():
        yield World(device=device)
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise WorkbenchError(
                f"process {local_rank} of this machine has no GPU of its own (there are "
                f"{torch.cuda.device_count()}); start at most that many processes per machine, "
                "or train on CPU with train.device=cpu"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    world = World(dist.get_rank(), dist.get_world_size(), local_rank, device)
    try:
        yield world
        if created:
            dist.barrier()  # nobody tears down its connections while a peer still uses them
    finally:
        if created:
            dist.destroy_process_group()


def wrap_model(world: World, model: nn.Module) -> nn.Module:
    """The module the training forward pass calls: DDP's wrapper in a distributed run (its
    backward averages the gradients over the processes), else ``model`` itself.

    The frozen language model is a plain attribute, not a submodule, so DDP neither sees nor
    synchronises it: only the trainable parameters are averaged. Buffers are synchronised
    once, when wrapping, not at every forward: every process then changes them identically
    (a GRA-M memory bank would otherwise be sent at each step). A model whose configuration
    leaves parameters without a gradient (``skips_parameters``, e.g. TAPR with fusion off)
    gets DDP's search for unused parameters, which otherwise waits for their gradients and
    fails at the next step; the others are spared its cost.
    """
    if not world.distributed:
        return model
    ddp = nn.parallel.DistributedDataParallel
    # torch >= 2.13 names the option forward_sync_buffers (broadcast_buffers is deprecated)
    newer = "forward_sync_buffers" in inspect.signature(ddp).parameters
    no_buffer_sync = {"forward_sync_buffers" if newer else "broadcast_buffers": False}
    device_ids = [world.device.index] if world.device.type == "cuda" else None
    unused = model.skips_parameters
    return ddp(model, device_ids=device_ids, find_unused_parameters=unused, **no_buffer_sync)


# ---------------------------------------------------------------------------- agreement


def on_main(world: World, fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on rank 0 only, with every rank waiting for it to finish.

    Returns ``fn``'s result on rank 0 and None elsewhere. If ``fn`` raised a
    :class:`WorkbenchError` or ``OSError``, every rank raises it, so all processes stop together
    with rank 0's message. Because the others wait, a file ``fn`` wrote is complete (and
    fsynced, for checkpoints) before any process goes on.
    """
    if not world.distributed:
        return fn()
    result, error = None, None
    if world.is_main:
        try:
            result = fn()
        except (WorkbenchError, OSError) as err:
            error = err
    shared = [error]
    dist.broadcast_object_list(shared, src=0)
    if shared[0] is not None:
        raise error if world.is_main else shared[0]
    return result


def from_main(world: World, fn: Callable[[], T]) -> T:
    """Like :func:`on_main`, but every rank gets rank 0's result (it must pickle)."""
    return broadcast(world, on_main(world, fn))


def broadcast(world: World, value: T) -> T:
    """Rank 0's ``value`` on every rank."""
    if not world.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(world: World, value: Any) -> list[Any] | None:
    """Every rank's ``value`` in rank order on rank 0 (None elsewhere)."""
    if not world.distributed:
        return [value]
    gathered = [None] * world.size if world.is_main else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


# ---------------------------------------------------------------------------- sums


def all_sum(world: World, values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Element-wise float64 sum of ``values`` over all ranks (the values themselves in a
    single process). Every rank gets the very same numbers back."""
    array = np.asarray(values, dtype=np.float64)
    if not world.distributed:
        return array
    tensor = torch.from_numpy(array.copy()).to(world.device)
    dist.all_reduce(tensor)
    return tensor.cpu().numpy()


def window_mean(world: World, means: dict[str, float], windows: int) -> dict[str, float]:
    """Per-process means over ``windows`` windows -> means over every process's windows."""
    if not world.distributed:
        return means
    keys = list(means)  # the same keys, in the same order, on every rank
    *sums, total = all_sum(world, [means[k] * windows for k in keys] + [windows])
    return {k: float(s / total) for k, s in zip(keys, sums, strict=True)}


def any_rank(world: World, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one."""
    return bool(all_sum(world, [float(flag)])[0] > 0)


# ---------------------------------------------------------------------------- launching


def launch(nproc: int, cli_args: list[str]) -> int:
    """Run ``timellm <cli_args>`` as ``nproc`` processes on this machine through torchrun
    (``--standalone``: it picks a free port) and return the group's exit code: 0 on success,
    rank 0's code when a process failed (2 for bad input, whose message rank 0 printed).

    A SIGTERM or SIGINT sent to this process is forwarded by torchrun to every worker, which
    saves a checkpoint at its current step and exits; torchrun waits for that (up to
    ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` seconds, default 30) before it kills stragglers.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    argv = ["--standalone", f"--nproc-per-node={nproc}", "-m", "timellm_lib.cli", *cli_args]
    try:
        run(parse_args(argv))
    except ChildFailedError as err:
        _, first = min(err.failures.items())  # the lowest failed rank
        return first.exitcode if first.exitcode > 0 else 1
    except SignalException as err:
        log.warning("%s: the workers were asked to stop (see their messages)", err)
    return 0
