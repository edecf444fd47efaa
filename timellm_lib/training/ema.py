"""Exponential moving average of the weights, kept beside the model and checkpointed.

After every optimizer step ``shadow = decay * shadow + (1 - decay) * weight`` for each
trainable parameter. Evaluating with the averaged weights is often smoother than with the
last ones; the shadow is part of the checkpoint, so a resumed run continues the very same
average. Buffers are not averaged: they are state, not weights (the GRA-M memory bank and
its keys are built and refreshed in place, and an average that starts before the memory is
built would shrink it towards zero), so the averaged model always uses the live buffers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def _tracked(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors the average follows: the trainable parameters, by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class EMA:
    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {n: t.detach().clone() for n, t in _tracked(model).items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, tensor in _tracked(model).items():
            self.shadow[name].lerp_(tensor.detach(), 1.0 - self.decay)

    def averaged_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``model.state_dict()`` with the averaged tensors in place of the current ones."""
        state = model.state_dict()
        return {n: self.shadow[n].clone() if n in self.shadow else t for n, t in state.items()}

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """Run the block with the averaged weights in the model, then put the current ones back
        (bit for bit: values are copied, never recomputed)."""
        tracked = _tracked(model)
        saved = {n: t.detach().clone() for n, t in tracked.items()}
        with torch.no_grad():
            for name, tensor in tracked.items():
                tensor.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, tensor in tracked.items():
                    tensor.copy_(saved[name])

    def state_dict(self) -> dict[str, object]:
        return {"decay": self.decay, "shadow": {n: t.clone() for n, t in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """The averages of this model's parameters (an older checkpoint's averaged buffers
        are ignored: the live ones are used)."""
        shadow = state["shadow"]
        for name, tensor in self.shadow.items():
            tensor.copy_(shadow[name])  # type: ignore[index]
