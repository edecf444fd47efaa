"""Enhanced Time-LLM: the baseline plus TAPR (trend) and GRA-M (retrieval), each switchable.

The baseline's stages are reused unchanged (:class:`~timellm_lib.models.timellm.TimeLLM`);
the two module families sit between the patch embedding and the reprogramming:

1. RevIN, channel independence, patching, patch embedding  -> tokens [B*N, P, d_model]
2. TAPR (``model.use_tapr``): multi-scale decomposition of the tokens and a coarse-to-fine
   trend head on the instance-normalised series -> refined tokens, one trend token
3. GRA-M (``model.use_gram``): retrieval of similar *training* windows on the series in
   dataset scale (the scale the memory is built in), gated fusion of their futures
   -> refined tokens, two retrieval tokens (context, confidence)
4. reprogramming, prompt, LLM (or its ablation), head on the last P positions. The LLM input
   is ``[pad..., trend, retrieval, prompt, patches]``: padding first, so the mask-derived
   positions of the extra tokens and the prompt do not depend on how much a row is padded,
   and the patches stay the last P positions (1 + 2 + prompt + P tokens with both on).
5. channel mix (MS), then trend fusion in normalised space (``model.fusion_form``:
   ``reference``, the default, moves the forecast in the predicted direction by at most half
   its distance from the last input value, the trend labels' reference; ``multiplicative``,
   the design's ``pred * (1 + adjustment)``), then de-normalisation. ``model.fusion``:
   ``always`` (default), ``train_only`` (the published design: only while training, so
   train-mode and eval-mode forecasts of the same weights differ), ``off``. With fusion off the TAPR gate gets no gradient (nothing reads it).

The LLM ablations (``model.llm_ablation``, see :mod:`timellm_lib.models.timellm`) combine
with both modules: ``llm2attn``/``llm2trsf`` read the same token sequence as the LLM; with
``no_llm`` the tokens are d_model wide and the linear head reads ``[trend ; retrieval ;
patches]``, so every module still has a consumer.

With ``y`` given, the lambda-weighted auxiliary losses ``tapr`` and ``gram`` and float
diagnostics come back in the :class:`Forecast`; the trainer adds ``warmup * sum(aux)`` to
the MSE. A disabled module adds no parameters: with both off this model has exactly the
baseline's parameters and gives the baseline's forecasts.

Leakage: the memory holds windows and futures of the training split only. Training batches
pass ``window_index`` (their window starts in the training series) so that a training window
never retrieves an entry overlapping its own window or future, nor an entry of any channel
overlapping its forecast horizon (correlated channels share the dates' future). Validation and test batches
pass none and need none: every row they forecast lies after the training split, so no memory
entry contains their targets. Validation windows whose history reaches back into the last
training rows may retrieve entries whose futures are part of that history, which the model
sees as input anyway.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from timellm_lib.data.windows import WindowDataset
from timellm_lib.models.gram import GRAM, GRAMOutput, query_positions_for
from timellm_lib.models.layers import RevIN, Tap, channel_rows
from timellm_lib.models.output import Forecast
from timellm_lib.models.params import ModelParams
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

    def __init__(self, hp: ModelParams, n_in: int, n_out: int, target_index: int = -1) -> None:
        m = hp.model
        n_prefix = TREND_TOKENS * m.use_tapr + RETRIEVAL_TOKENS * m.use_gram
        super().__init__(hp, n_in, n_out, target_index, n_prefix=n_prefix)
        # Registered after the baseline's stages, so those are initialised exactly as in
        # the baseline for the same seed.
        if m.use_tapr:
            self.tapr = TAPR.from_params(hp, self.token_dim)
            self.trend_token = Tap()
            if m.fusion != "off":
                self.trend_fusion = Tap()
        if m.use_gram:
            self.gram = GRAM.from_params(hp, self.token_dim)
            self.retrieval_tokens = Tap()

    @property
    def needs_window_index(self) -> bool:
        """True when training batches should pass ``window_index`` (GRA-M leakage mask)."""
        return self.hp.model.use_gram

    @property
    def skips_parameters(self) -> bool:
        """True when a training step leaves some trainable parameters without a gradient:
        TAPR's fusion gate with ``model.fusion = off`` (nothing reads it), GRA-M's retriever
        and gate with an empty memory (``build_memory = false`` or ``memory_windows = 0``).
        A distributed run must then tell DDP to look for unused parameters."""
        m = self.hp.model
        idle_gate = m.use_tapr and m.fusion == "off"
        empty_memory = m.use_gram and (not m.build_memory or m.memory_windows == 0)
        return idle_gate or empty_memory

    @property
    def fusion_active(self) -> bool:
        """Whether trend fusion is applied in the current mode (``model.fusion``)."""
        mode = self.hp.model.fusion
        return self.hp.model.use_tapr and (
            mode == "always" or (mode == "train_only" and self.training)
        )

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
        m = self.hp.model
        if not (m.use_gram and m.build_memory):
            return 0
        series = train.series() if isinstance(train, WindowDataset) else train
        return self.gram.build_memory(series, m.memory_windows, generator)

    def init_trend_thresholds(self, train: WindowDataset) -> tuple[float, ...] | None:
        """``model.trend_thresholds = auto``: set TAPR's thresholds to quantiles of the
        training split's labels (see :mod:`timellm_lib.models.tapr`) and return them; None
        when TAPR is off or the thresholds are configured. Call it once on a fresh start:
        the thresholds are parameters, so a resumed run gets them from the checkpoint."""
        if not (self.hp.model.use_tapr and self.hp.model.trend_thresholds == "auto"):
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
        if self.hp.model.use_tapr:
            trend = self.tapr(tokens, series)
            tokens = trend.patch_out
            prefix.append(self.trend_token(trend.trend_token))
        if self.hp.model.use_gram:
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
            if self.hp.model.fusion_form == "reference":  # the labels' reference point
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
        m = self.hp.model
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
                own, self._output_rows(series, batch), channel_rows(y_norm), m.lambda_trend
            )
            forecast.aux_losses["tapr"] = total
            diagnostics.update(_detached(parts) | info)
            diagnostics["tapr_adjustment_abs_mean"] = trend.adjustment.detach().abs().mean()
            diagnostics["tapr_fusion_active"] = float(self.fusion_active)  # a python bool
        if retrieved is not None:
            total, parts, info = GRAM.loss(retrieved, m.lambda_retrieval)
            forecast.aux_losses["gram"] = total
            diagnostics.update(_detached(parts) | info)


def _detached(values: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in values.items()}
