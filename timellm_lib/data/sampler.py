"""Resumable batches: a seeded permutation per epoch, so any batch is found by arithmetic and
a resume does not load (or index) the batches before its position.

A sample is a whole window or, with ``data.sample_unit = channel``, one channel of one window;
``batch_size`` counts samples and is the *global* batch of a distributed run.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

Batch = tuple[Tensor, Tensor]
IndexedBatch = tuple[Tensor, Tensor, Tensor]  # x, y and where the samples lie (sample_positions)


class Windows(Protocol):
    """What the loaders need from a dataset (``get_batch`` is optional)."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> Batch: ...


def mix_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (python's ``hash`` is salted for strings, and a sum
    would make (seed, epoch) and (seed + 1, epoch - 1) collide)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The order of the ``n`` training windows in ``epoch``: it depends on nothing drawn
    before, so batch ``b`` is ``perm[b * batch_size:(b + 1) * batch_size]`` at any time."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, epoch)))


def fetch_batch(dataset: Windows, idx: Tensor) -> Batch:
    """Windows ``idx`` as (x [B, seq_len, C_in], y [B, pred_len, C_out])."""
    if hasattr(dataset, "get_batch"):
        return dataset.get_batch(idx)
    items = [dataset[int(i)] for i in idx]
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


def sample_positions(dataset: Windows, idx: Tensor) -> Tensor:
    """Where samples ``idx`` lie in the split: window starts [B] (a window sample is every
    channel of one window), or (channel, start) [B, 2] for a dataset of single channels
    (``ChannelWindows.positions``)."""
    return dataset.positions(idx) if hasattr(dataset, "positions") else idx


class _BatchFetcher(TorchDataset):
    """A dataset whose items are whole batches, addressed by their index tensors."""

    def __init__(self, dataset: Windows) -> None:
        self.dataset = dataset

    def __getitem__(self, idx: Tensor) -> IndexedBatch:
        return (*fetch_batch(self.dataset, idx), sample_positions(self.dataset, idx))


class _SeedWorker:
    """``worker_init_fn``: seeds python, numpy and torch in a worker from (seed, epoch, id)."""

    def __init__(self, seed: int, epoch: int) -> None:
        self.seed = seed
        self.epoch = epoch

    def __call__(self, worker_id: int) -> None:
        worker_seed = mix_seed(self.seed, self.epoch, worker_id)
        random.seed(worker_seed)
        np.random.seed(worker_seed % 2**32)
        torch.manual_seed(worker_seed)


class ResumableLoader:
    """Training batches of a seeded per-epoch order that can start at any batch; the last
    incomplete batch is dropped, so every epoch has the same number. With ``world_size`` > 1
    each rank takes its contiguous share of every global batch, so the batches are the same
    for any number of processes."""

    def __init__(
        self,
        dataset: Windows,
        batch_size: int,
        seed: int,
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size % world_size:
            raise ValueError(
                f"batch_size {batch_size} cannot be split evenly across {world_size} processes"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.rank = rank
        self.world_size = world_size

    def __len__(self) -> int:
        """Full batches per epoch (the incomplete last one is dropped)."""
        return len(self.dataset) // self.batch_size

    def batch_indices(self, epoch: int, start: int = 0, stop: int | None = None) -> list[Tensor]:
        """Index tensors of batches ``start`` to ``stop`` (exclusive, default all) of ``epoch``
        (this rank's rows of each)."""
        perm = epoch_permutation(len(self.dataset), self.seed, epoch)
        share = self.batch_size // self.world_size
        first = self.rank * share  # this rank's first row within a global batch
        stop = len(self) if stop is None else min(stop, len(self))
        return [
            perm[b * self.batch_size + first : b * self.batch_size + first + share]
            for b in range(start, stop)
        ]

    def epoch(self, epoch: int, start: int = 0, stop: int | None = None) -> Iterator[IndexedBatch]:
        """The batches ``start`` to ``stop`` of ``epoch``, in order, with their samples'
        positions (:func:`sample_positions`; a retrieval model uses them to exclude the
        query's own neighbourhood)."""
        indices = self.batch_indices(epoch, start, stop)
        if self.num_workers == 0:
            return (
                (*fetch_batch(self.dataset, idx), sample_positions(self.dataset, idx))
                for idx in indices
            )
        loader = DataLoader(
            _BatchFetcher(self.dataset),
            batch_size=None,  # items are already batches
            sampler=indices,
            num_workers=self.num_workers,
            worker_init_fn=_SeedWorker(self.seed, epoch),
            # the base seed comes from its own generator: the global RNG (dropout) is untouched
            generator=torch.Generator().manual_seed(mix_seed(self.seed, epoch, -1)),
        )
        return iter(loader)

    def state(self, epoch: int, position: int) -> dict[str, Any]:
        """What a checkpoint stores to find the next batch: position = batches consumed."""
        return {"seed": self.seed, "epoch": epoch, "position": position}


class Shard:
    """Rank ``rank``'s contiguous block of a dataset's windows, ``[rank * n // world_size,
    (rank + 1) * n // world_size)``: each window belongs to exactly one rank."""

    def __init__(self, dataset: Windows, rank: int, world_size: int) -> None:
        n = len(dataset)
        if n < world_size:
            raise ValueError(f"{n} windows cannot be shared by {world_size} processes")
        self.dataset = dataset
        self.start = rank * n // world_size
        self.stop = (rank + 1) * n // world_size

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> Batch:
        return self.dataset[self.start + i]

    def get_batch(self, idx: Tensor) -> Batch:
        return fetch_batch(self.dataset, idx + self.start)


class Subset:
    """The windows ``indices`` (in that order) of a dataset, with a one-gather ``get_batch``."""

    def __init__(self, dataset: Windows, indices: Tensor) -> None:
        self.dataset = dataset
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Batch:
        return self.dataset[int(self.indices[i])]

    def get_batch(self, idx: Tensor) -> Batch:
        return fetch_batch(self.dataset, self.indices[idx])


def fixed_subset(dataset: Windows, n: int, seed: int) -> Windows:
    """``n`` windows of ``dataset`` drawn without replacement from ``seed`` alone, in their
    time order: the same windows whenever it is called (``n`` 0 or at least the dataset's
    length: the whole dataset). Validation on a subset costs ``n / len`` of a full pass."""
    if n <= 0 or n >= len(dataset):
        return dataset
    generator = torch.Generator().manual_seed(mix_seed(seed, len(dataset), n))
    chosen = torch.randperm(len(dataset), generator=generator)[:n]
    return Subset(dataset, chosen.sort().values)


def eval_batches(dataset: Windows, batch_size: int) -> Iterator[Batch]:
    """Every window once, in order, the last batch possibly smaller (evaluation drops none)."""
    for start in range(0, len(dataset), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(dataset)))
        yield fetch_batch(dataset, idx)
