"""Enhanced Time-LLM: the baseline plus TAPR (trend) and GRA-M (retrieval), each switchable.

Both sit between the patch embedding and the reprogramming; their tokens go before the
prompt, ``[pad..., trend, retrieval, prompt, patches]`` (padding first, so the extra tokens'
positions do not depend on padding; patches last, where the head reads them), and trend
fusion follows the channel mix. A disabled module adds no parameters, so with both off this
is the baseline, forecast for forecast. With ``y`` given, the lambda-weighted auxiliary
losses and the diagnostics come back in the :class:`Forecast`.

Leakage: the memory holds training windows only, and training batches pass ``window_index``
so that a window never retrieves an entry overlapping its own window or future (nor another
channel's over its horizon); validation and test rows lie after the training split and need
no mask.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from timellm_lib.data.windows import WindowDataset
from timellm_lib.models.gram import GRAM, GRAMOutput, query_positions_for
from timellm_lib.models.layers import RevIN, Tap, channel_rows
from timellm_lib.models.output import Forecast
from timellm_lib.models.params import EnhancedParams
from timellm_lib.models.tapr import (
    TAPR,
    TAPROutput,
    apply_trend_fusion,
    quantile_thresholds,
    training_changes,
)
from timellm_lib.models.timellm import TimeLLM

TREND_TOKENS, RETRIEVAL_TOKENS = 1, 2


class EnhancedTimeLLM(TimeLLM):
    """Time-LLM with TAPR and/or GRA-M (``model.use_tapr``, ``model.use_gram``).

    ``forward(x, y=None, window_index=None)``: ``y`` [B, pred_len, n_out] (dataset scale)
    turns on the auxiliary losses; ``window_index`` [B] (long), the window starts of a
    training batch in the training series, or [B, 2] (channel, start) for a batch of single
    channels (``data.sample_unit = channel``), masks overlapping memory entries (GRA-M).
    """

    def __init__(self, hp: EnhancedParams, n_in: int, n_out: int, target_index: int = -1) -> None:
        n_prefix = TREND_TOKENS * (hp.tapr is not None) + RETRIEVAL_TOKENS * (hp.gram is not None)
        super().__init__(hp.core, n_in, n_out, target_index, n_prefix=n_prefix)
        self.tapr_hp, self.gram_hp = hp.tapr, hp.gram
        # Registered after the baseline's stages, so those are initialised exactly as in
        # the baseline for the same seed.
        if hp.tapr is not None:
            self.tapr = TAPR.from_params(hp.tapr, self.token_dim)
            self.trend_token = Tap()
            if hp.tapr.fusion != "off":
                self.trend_fusion = Tap()
        if hp.gram is not None:
            self.gram = GRAM.from_params(hp.gram, self.token_dim)
            self.retrieval_tokens = Tap()

    @property
    def needs_window_index(self) -> bool:
        """True when training batches should pass ``window_index`` (GRA-M leakage mask)."""
        return self.gram_hp is not None

    @property
    def skips_parameters(self) -> bool:
        """True when a training step leaves some trainable parameters without a gradient:
        TAPR's fusion gate with ``model.fusion = off`` (nothing reads it), GRA-M's retriever
        and gate with an empty memory (``build_memory = false`` or ``memory_windows = 0``).
        A distributed run must then tell DDP to look for unused parameters."""
        tapr, gram = self.tapr_hp, self.gram_hp
        idle_gate = tapr is not None and tapr.fusion == "off"
        empty_memory = gram is not None and (not gram.build_memory or gram.memory_windows == 0)
        return idle_gate or empty_memory

    @property
    def fusion_active(self) -> bool:
        """Whether trend fusion is applied in the current mode (``model.fusion``)."""
        if self.tapr_hp is None:
            return False
        mode = self.tapr_hp.fusion
        return mode == "always" or (mode == "train_only" and self.training)

    # -------------------------------------------------------------------------- memory

    def build_memory(
        self, train: WindowDataset | Tensor, generator: torch.Generator | None = None
    ) -> int:
        """Fill the GRA-M memory from the training split; returns the entries stored.

        ``train`` is the training :class:`WindowDataset` (its scaled series [T, C_in]) or
        that series itself. Draws ``model.memory_windows`` (channel, start) pairs with
        ``generator``. Does nothing (returns 0) unless ``model.use_gram`` and
        ``model.build_memory``. Call it once on a fresh start only: the memory is a set of
        buffers, so a resumed run gets it back from the checkpoint.
        """
        gram = self.gram_hp
        if gram is None or not gram.build_memory:
            return 0
        series = train.series() if isinstance(train, WindowDataset) else train
        return self.gram.build_memory(series, gram.memory_windows, generator)

    def init_trend_thresholds(self, train: WindowDataset) -> tuple[float, ...] | None:
        """``model.trend_thresholds = auto``: set TAPR's thresholds to quantiles of the
        training split's labels (see :mod:`timellm_lib.models.tapr`) and return them; None
        when TAPR is off or the thresholds are configured. Call it once on a fresh start:
        the thresholds are parameters, so a resumed run gets them from the checkpoint."""
        if self.tapr_hp is None or self.tapr_hp.thresholds is not None:
            return None
        values = quantile_thresholds(training_changes(train, self.target_index))
        self.tapr.head.set_thresholds(values)
        return values

    # -------------------------------------------------------------------------- forward

    def forward(
        self, x: Tensor, y: Tensor | None = None, window_index: Tensor | None = None
    ) -> Forecast:
        """x [B, seq_len, n_in] -> Forecast(pred [B, pred_len, n_out], aux_losses, diagnostics)."""
        self._check_input(x)
        x_norm, mean, std = self.normalize(x)
        series = self.channel_series(x_norm)  # [B*N, L], instance-normalised
        tokens = self.embed_patches(series)
        prefix = []
        trend = retrieved = None
        if self.tapr_hp is not None:
            trend = self.tapr(tokens, series)
            tokens = trend.patch_out
            prefix.append(self.trend_token(trend.trend_token))
        if self.gram_hp is not None:
            positions = None
            if window_index is not None:
                positions = window_index.to(x.device)
                if positions.dim() == 1:  # window starts: every channel of each window
                    positions = query_positions_for(positions, self.n_in)
            retrieved = self.gram(tokens, channel_rows(x), positions)
            tokens = retrieved.patch_out
            prefix.append(self.retrieval_tokens(retrieved.retrieval_tokens))
        rows = self.decode(series, tokens, torch.cat(prefix, dim=1) if prefix else None)
        pred, mean, std = self.to_channels(rows, x.shape[0], mean, std)
        if trend is not None and self.fusion_active:
            adjustment = self._output_rows(trend.adjustment, x.shape[0])
            reference = None
            if self.tapr_hp.fusion_form == "reference":  # the labels' reference point
                reference = self._output_rows(series[:, -1], x.shape[0])
            pred = self.trend_fusion(apply_trend_fusion(pred, adjustment, reference))
        forecast = Forecast(pred=RevIN.denormalize(pred, mean, std))
        if y is not None:
            self._auxiliary(forecast, series, (y - mean) / std, trend, retrieved)
        return forecast

    def _output_rows(self, rows: Tensor, batch_size: int) -> Tensor:
        """The rows [B*n_out, ...] of the forecast channels among [B*n_in, ...] (MS: target)."""
        if self.n_out == self.n_in:
            return rows
        index = torch.arange(batch_size, device=rows.device) * self.n_in + self.target_index
        return rows[index]

    def _auxiliary(
        self,
        forecast: Forecast,
        series: Tensor,
        y_norm: Tensor,
        trend: TAPROutput | None,
        retrieved: GRAMOutput | None,
    ) -> None:
        """Add the lambda-weighted losses and float diagnostics of the enabled modules.

        ``y_norm`` [B, H, n_out] is the target normalised with the input's RevIN statistics,
        so TAPR's labels come from the same series it saw. For MS only the target channel
        has a true future: the TAPR loss uses the target's rows.
        """
        diagnostics = forecast.diagnostics
        if trend is not None:
            batch = y_norm.shape[0]
            own = dataclasses.replace(
                trend,
                direction_logits=self._output_rows(trend.direction_logits, batch),
                magnitude_logits=self._output_rows(trend.magnitude_logits, batch),
                regression=self._output_rows(trend.regression, batch),
                gate=self._output_rows(trend.gate, batch),
            )
            total, parts, info = self.tapr.loss(
                own,
                self._output_rows(series, batch),
                channel_rows(y_norm),
                self.tapr_hp.lambda_trend,
            )
            forecast.aux_losses["tapr"] = total
            diagnostics.update(_detached(parts) | info)
            diagnostics["tapr_adjustment_abs_mean"] = trend.adjustment.detach().abs().mean()
            active = float(self.fusion_active)  # a python bool; the tensor keeps logging uniform
            diagnostics["tapr_fusion_active"] = trend.adjustment.new_full((), active)
        if retrieved is not None:
            total, parts, info = GRAM.loss(retrieved, self.gram_hp.lambda_retrieval)
            forecast.aux_losses["gram"] = total
            diagnostics.update(_detached(parts) | info)


def _detached(values: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in values.items()}
