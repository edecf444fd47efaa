"""Random-number-generator state: seed everything once, capture it, restore it exactly.

Dropout masks (and anything else a model draws) come from the global python, numpy and torch
generators. A checkpoint stores their full state so that the run continued from it draws the
very same numbers the uninterrupted run drew at that point. Python's and numpy's states are
tuples holding ints and arrays; they are stored as tensors and plain values so a checkpoint
loads with ``torch.load(weights_only=True)``.

In a distributed run every process seeds with the same number first (so all build the same
model), then ranks above 0 switch to a stream of their own (:func:`seed_rank`) so their
dropout masks differ; a checkpoint stores each rank's state and each rank restores its own.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from timellm_lib.data.sampler import mix_seed

RANK_STREAM = -2  # tags the per-rank seeds apart from sampler and worker seeds


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy and torch (all devices) from one number."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_rank(seed: int, rank: int, global_step: int = 0) -> None:
    """Give process ``rank`` its own stream, derived from (seed, rank, global_step): at a
    fresh start (global_step 0), and for a rank a checkpoint holds no state for (a run resumed
    on more processes than it was saved with)."""
    seed_everything(mix_seed(seed, RANK_STREAM, rank, global_step))


def capture_rng_state() -> dict[str, Any]:
    """The state of every global generator, in a form ``weights_only`` loading accepts."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {
            "version": version,
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put every generator back exactly as :func:`capture_rng_state` found it."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["kind"],
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
