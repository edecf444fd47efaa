"""Forecasting models: Time-LLM (baseline and enhanced) and small baselines."""

from __future__ import annotations

from torch import nn

from timellm_lib.config import Config
from timellm_lib.models.output import Forecast, as_forecast
from timellm_lib.models.params import (
    EnhancedParams,
    ModelParams,
    TimeLLMParams,
    model_params,
)
from timellm_lib.models.protocol import TrainableModel, TrainingHooks

__all__ = [
    "Forecast",
    "ModelParams",
    "TrainableModel",
    "TrainingHooks",
    "as_forecast",
    "build_model",
    "model_params",
]


def build_model(cfg: Config, n_in: int, n_out: int) -> nn.Module:
    """The model named by ``cfg.model.name`` for ``n_in`` input and ``n_out`` output channels
    (each implements :class:`TrainableModel`)."""
    hp = model_params(cfg)
    if isinstance(hp, EnhancedParams):
        from timellm_lib.models.enhanced import EnhancedTimeLLM

        return EnhancedTimeLLM(hp, n_in, n_out)
    if isinstance(hp, TimeLLMParams):
        from timellm_lib.models.timellm import TimeLLM

        return TimeLLM(hp, n_in, n_out)  # baseline, or one of its LLM ablations
    from timellm_lib.models.baselines import MLP, DLinear

    return {"dlinear": DLinear, "mlp": MLP}[cfg.model.name](hp, n_in, n_out)
