"""A model's own hyperparameters: its config section and the window it maps.

Models are built from these, never from the run config, so training, data-source and run
settings cannot reach a model; :meth:`ModelParams.from_config` is the one place that reads a
run config for a model.
"""

from __future__ import annotations

from dataclasses import dataclass

from timellm_lib.config import Config, ModelConfig


@dataclass(frozen=True)
class Window:
    """The window a model maps: ``seq_len`` steps in, ``pred_len`` out."""

    seq_len: int
    label_len: int
    pred_len: int
    features: str  # M: all -> all, S: target -> target, MS: all -> target


@dataclass(frozen=True)
class ModelParams:
    """Everything a model is built from."""

    model: ModelConfig
    window: Window

    @classmethod
    def from_config(cls, cfg: Config) -> ModelParams:
        d = cfg.data
        return cls(cfg.model, Window(d.seq_len, d.label_len, d.pred_len, d.model_features))
