"""EarlyStopping with the semantics of the Time-LLM / Informer code, and a resumable state.

``score = -val_loss``. The first validation always counts as an improvement; later ones
improve only when ``score > best_score + delta``. Every other validation adds one to
``counter`` and training stops once ``counter >= patience``. An improvement resets the
counter and is the moment the trainer writes ``best.pt``.

The whole state is three numbers (``best_score``, ``val_loss_min``, ``counter``); they go into
every checkpoint so a resumed run stops at exactly the validation the uninterrupted one did.
"""

from __future__ import annotations

import math
from typing import Any

FIELDS = ("best_score", "val_loss_min", "counter")


class EarlyStopping:
    def __init__(self, patience: int, delta: float = 0.0) -> None:
        self.patience = patience
        self.delta = delta
        self.best_score: float | None = None  # None until the first validation
        self.val_loss_min = math.inf
        self.counter = 0

    def step(self, val_loss: float) -> bool:
        """Record one validation loss; return True when it is an improvement."""
        score = -val_loss
        if self.best_score is None or score > self.best_score + self.delta:
            self.best_score = score
            self.val_loss_min = val_loss
            self.counter = 0
            return True
        self.counter += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.counter >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_score": self.best_score,
            "val_loss_min": self.val_loss_min,
            "counter": self.counter,
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> list[str]:
        """Restore the state; fields an older checkpoint lacks keep their fresh-start values
        (best_score None, val_loss_min inf, counter 0). Returns the names of those fields."""
        state = state or {}
        missing = [name for name in FIELDS if name not in state]
        self.best_score = state.get("best_score")
        self.val_loss_min = float(state.get("val_loss_min", math.inf))
        self.counter = int(state.get("counter", 0))
        return missing

    def __repr__(self) -> str:
        return (
            f"EarlyStopping(patience={self.patience}, delta={self.delta}, best_score="
            f"{self.best_score}, val_loss_min={self.val_loss_min}, counter={self.counter})"
        )
