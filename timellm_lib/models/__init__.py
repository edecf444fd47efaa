"""Forecasting models: Time-LLM (baseline and enhanced) and small baselines."""

from __future__ import annotations

from torch import nn

from timellm_lib.config import Config
from timellm_lib.models.output import Forecast, as_forecast
from timellm_lib.models.params import ModelParams, Window
from timellm_lib.models.protocol import TrainableModel, TrainingHooks

__all__ = [
    "Forecast",
    "ModelParams",
    "TrainableModel",
    "TrainingHooks",
    "Window",
    "as_forecast",
    "build_model",
]


def build_model(cfg: Config, n_in: int, n_out: int) -> nn.Module:
    """The model named by ``cfg.model.name`` for ``n_in`` input and ``n_out`` output channels
    (each implements :class:`TrainableModel`)."""
    name, hp = cfg.model.name, ModelParams.from_config(cfg)
    if name == "timellm":
        if cfg.model.use_tapr or cfg.model.use_gram:
            from timellm_lib.models.enhanced import EnhancedTimeLLM

            return EnhancedTimeLLM(hp, n_in, n_out)
        from timellm_lib.models.timellm import TimeLLM

        return TimeLLM(hp, n_in, n_out)  # baseline, or one of its LLM ablations
    if name == "dlinear":
        from timellm_lib.models.baselines import DLinear

        return DLinear(hp, n_in, n_out)
    if name == "mlp":
        from timellm_lib.models.baselines import MLP

        return MLP(hp, n_in, n_out)
    raise ValueError(f"model.name {name!r} has no builder")  # config validation prevents this
