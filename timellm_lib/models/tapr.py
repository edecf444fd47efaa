"""TAPR: Trend-Aware Patch Router for the enhanced Time-LLM.

Patches see short pieces of a series; the trend that decides a long forecast lives at
coarser scales. :class:`MultiScaleDecomposition` (TAPR-DM) lets each finer scale of the
patch sequence attend to the next coarser one; :class:`CoarseToFineHead` (TAPR-C2F) predicts
direction, magnitude and the relative change, which become one LLM token and a bounded
adjustment of the forecast (:func:`apply_trend_fusion`). :meth:`TAPR.loss` trains the head on
labels from the true future (:func:`trend_labels`, which defines them). Thresholds default to
quantiles of the training labels (``model.trend_thresholds = auto``,
:func:`quantile_thresholds`), since the labels' spread depends on the data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from timellm_lib.data.windows import WindowDataset
from timellm_lib.models.gram import N_STATS, check_branch_inputs, window_statistics
from timellm_lib.models.layers import moving_average
from timellm_lib.models.params import TAPRParams

UP, DOWN, FLAT = 0, 1, 2  # direction classes
STRONG_UP, WEAK_UP, WEAK_DOWN, STRONG_DOWN = 0, 1, 2, 3  # magnitude classes
# initial values until auto thresholds are set from the training data (or without data)
DEFAULT_THRESHOLDS = (-0.8, -0.3, 0.3, 0.8)
THRESHOLD_QUANTILES = (1 / 6, 1 / 3, 2 / 3, 5 / 6)
DIRECTION_NAMES = ("up", "down", "flat")
MAGNITUDE_NAMES = ("strong up", "weak up", "weak down", "strong down")
_LOG_FLOOR = 1e-6  # ordinal probabilities are floored before the log


# --------------------------------------------------------------------------- layout helpers


def future_to_series(future: Tensor) -> Tensor:
    """``[B, H, N] -> [B*N, H]``; row ``b*N + n`` is channel ``n`` of sample ``b``.

    This is the channel-independent order of the model's input series; a plain
    ``reshape(B*N, H)`` would mix time steps and channels.
    """
    batch, horizon, channels = future.shape
    return future.permute(0, 2, 1).reshape(batch * channels, horizon)


def series_to_future(rows: Tensor, batch_size: int) -> Tensor:
    """Inverse of :func:`future_to_series`: ``[B*N, H] -> [B, H, N]``."""
    return rows.reshape(batch_size, -1, rows.shape[-1]).permute(0, 2, 1)


def apply_trend_fusion(pred: Tensor, adjustment: Tensor, reference: Tensor | None = None) -> Tensor:
    """Trend fusion of ``pred [B, H, C]`` (normalised) with ``adjustment [B*C, H]`` in (-0.5, 0.5).

    With ``reference [B*C]``, the last input value of each series (the point the trend labels
    measure the change from; ``model.fusion_form = reference``):
    ``pred + adjustment * |pred - reference|``, which moves every step in the predicted
    direction by at most half its distance from the reference, more along the horizon (the
    adjustment's ramp). Without it, the design's ``pred * (1 + adjustment)``
    (``multiplicative``), which scales the forecast around 0, the window mean: an up trend
    then pushes a below-mean forecast further down.

    Pure: ``pred`` is not modified. The composer decides when to apply it (model.fusion);
    for a forecast of fewer channels than the input (features MS), select the adjustment
    and reference rows of the forecast channels first.
    """
    batch, horizon, channels = pred.shape
    if adjustment.shape != (batch * channels, horizon):
        raise ValueError(
            f"adjustment {tuple(adjustment.shape)} does not fit pred {tuple(pred.shape)}: "
            f"expected [B*C, H] = [{batch * channels}, {horizon}]"
        )
    adjustment = series_to_future(adjustment, batch)
    if reference is None:
        return pred * (1.0 + adjustment)
    level = reference.reshape(batch, 1, channels)
    return pred + adjustment * (pred - level).abs()


# --------------------------------------------------------------------------- TAPR-DM


def _to_patches(x: Tensor, length: int) -> Tensor:
    """``[R, d, T] -> [R, length, d]``, linearly interpolated when T differs."""
    if x.shape[-1] != length:
        x = F.interpolate(x, size=length, mode="linear", align_corners=False)
    return x.transpose(1, 2)


class MultiScaleDecomposition(nn.Module):
    """TAPR-DM: multi-scale trend decomposition of patch embeddings ``[BN, P, d_model]``.

    Scale s pools by ``4**s`` (ceil mode, so P shorter than the kernel still gives one
    step), refines with a depthwise-separable convolution (residual), takes a moving-average
    trend, and is interpolated back to P. From coarse to fine, each scale attends to the
    already refined next-coarser one. Softmax scale weights mix the scales.
    """

    def __init__(
        self, d_model: int, n_scales: int = 3, n_heads: int = 4, trend_kernel: int = 5
    ) -> None:
        super().__init__()
        if n_scales < 1:
            raise ValueError(f"n_scales = {n_scales} must be at least 1")
        if trend_kernel < 1 or trend_kernel % 2 == 0:
            raise ValueError(f"trend_kernel = {trend_kernel} must be odd and positive")
        if d_model % n_heads:
            raise ValueError(f"d_model = {d_model} is not divisible by n_heads = {n_heads}")
        self.kernels = tuple(4**s for s in range(n_scales))
        self.trend_kernel = trend_kernel
        self.convs = nn.ModuleList(
            nn.Sequential(
                nn.Conv1d(d_model, d_model, 3, padding=1, groups=d_model),  # depthwise
                nn.GELU(),
                nn.Conv1d(d_model, d_model, 1),  # pointwise
            )
            for _ in self.kernels
        )
        self.cross = nn.ModuleList(
            nn.MultiheadAttention(d_model, n_heads, batch_first=True) for _ in range(n_scales - 1)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(n_scales - 1))
        self.scale_logits = nn.Parameter(torch.zeros(n_scales))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Returns ``(output, weighted trend, per-scale trends)``, each ``[BN, P, d_model]``."""
        length = x.shape[1]
        features, trends = [], []
        for kernel, conv in zip(self.kernels, self.convs, strict=True):
            z = x.transpose(1, 2)
            if kernel > 1:
                z = F.avg_pool1d(z, kernel, kernel, ceil_mode=True)
            z = z + conv(z)
            features.append(_to_patches(z, length))
            trends.append(_to_patches(moving_average(z, self.trend_kernel), length))
        refined = features[-1]
        outputs = [refined]
        for s in reversed(range(len(self.cross))):  # coarse to fine
            attended, _ = self.cross[s](features[s], refined, refined, need_weights=False)
            refined = self.norms[s](features[s] + attended)
            outputs.append(refined)
        outputs.reverse()  # fine to coarse, aligned with self.kernels
        weights = torch.softmax(self.scale_logits, dim=0)
        output = sum(w * o for w, o in zip(weights, outputs, strict=True))
        trend = sum(w * t for w, t in zip(weights, trends, strict=True))
        return output, trend, trends


# --------------------------------------------------------------------------- TAPR-C2F


def _inverse_softplus(y: Tensor) -> Tensor:
    return torch.log(torch.expm1(y))


def ordinal_log_probs(
    change: Tensor, thresholds: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """Log-probabilities ``([R, 3], [R, 4])`` that ``change`` lies in each direction / magnitude bin.

    ``P(r > t) = sigmoid((r - t) / temperature)``; bins are differences of these, which are
    non-negative because the thresholds are ordered.
    """
    t1, t2, t3, t4 = thresholds
    mid = (t2 + t3) / 2

    def above(t: Tensor) -> Tensor:
        return torch.sigmoid((change - t) / temperature)

    up, not_down, strong_up, not_strong_down = (above(t) for t in (t3, t2, t4, t1))
    over_mid = above(mid)
    direction = torch.stack([up, 1 - not_down, not_down - up], -1)
    magnitude = torch.stack(
        [strong_up, over_mid - strong_up, not_strong_down - over_mid, 1 - not_strong_down], -1
    )
    return direction.clamp_min(_LOG_FLOOR).log(), magnitude.clamp_min(_LOG_FLOOR).log()


def fold_magnitude(magnitude_probs: Tensor, thresholds: Tensor) -> Tensor:
    """Magnitude distribution ``[R, 4]`` folded onto directions ``[R, 3]`` (up, down, flat).

    Strong bins go to their direction. A weak bin is split between its direction and flat in
    proportion to how much of its interval lies outside / inside the flat band (density
    assumed uniform within the bin): weak up spans ``[m, t4]`` of which ``[m, t3]`` is flat.
    """
    t1, t2, t3, t4 = thresholds.detach()
    mid = (t2 + t3) / 2
    up_share = (t4 - t3) / (t4 - mid)
    down_share = (t2 - t1) / (mid - t1)
    su, wu, wd, sd = magnitude_probs.unbind(-1)
    return torch.stack(
        [su + up_share * wu, sd + down_share * wd, (1 - up_share) * wu + (1 - down_share) * wd], -1
    )


@dataclass
class TrendPrediction:
    direction_logits: Tensor  # [BN, 3] up, down, flat
    magnitude_logits: Tensor  # [BN, 4] strong up, weak up, weak down, strong down
    regression: Tensor  # [BN] predicted relative change r_hat
    trend_token: Tensor  # [BN, 1, llm_dim]
    gate: Tensor  # [BN] fusion gate in (0, 0.5)


class CoarseToFineHead(nn.Module):
    """TAPR-C2F: direction, then magnitude, then the change conditioned on the trend class.

    The class condition is the probability-weighted mix of learned class embeddings (soft,
    so it is differentiable); the same mix under the final class probabilities is projected
    to the trend token.
    """

    def __init__(
        self,
        d_in: int,
        llm_dim: int,
        d_hidden: int = 64,
        thresholds_init: tuple[float, float, float, float] = DEFAULT_THRESHOLDS,
        ordinal_temperature: float = 0.05,
        min_gap: float = 1e-4,
        gate_bias_init: float = -2.0,
    ) -> None:
        super().__init__()
        init = torch.tensor(thresholds_init, dtype=torch.float32)
        gaps = init.diff()
        if init.numel() != 4 or bool((gaps <= min_gap).any()):
            raise ValueError(
                f"thresholds_init = {thresholds_init} must be 4 increasing values more than "
                f"{min_gap} apart"
            )
        if ordinal_temperature <= 0:
            raise ValueError(f"ordinal_temperature = {ordinal_temperature} must be positive")
        self.temperature, self.min_gap = ordinal_temperature, min_gap
        self.threshold_base = nn.Parameter(init[:1].clone())
        self.threshold_steps = nn.Parameter(_inverse_softplus(gaps - min_gap))
        self.body = nn.Sequential(
            nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_hidden), nn.GELU()
        )
        self.direction = nn.Linear(d_hidden, 3)
        self.magnitude = nn.Linear(d_hidden, 4)
        self.direction_embed = nn.Embedding(3, d_hidden)
        self.magnitude_embed = nn.Embedding(4, d_hidden)
        self.regressor = nn.Sequential(
            nn.Linear(2 * d_hidden, d_hidden), nn.GELU(), nn.Linear(d_hidden, 1)
        )
        self.to_token = nn.Linear(d_hidden, llm_dim)
        self.gate = nn.Linear(d_hidden, 1)
        nn.init.constant_(self.gate.bias, gate_bias_init)  # start with a light touch

    @property
    def thresholds(self) -> Tensor:
        """``[4]`` strictly increasing: base, then ``min_gap + softplus`` increments."""
        steps = self.min_gap + F.softplus(self.threshold_steps)
        return torch.cat([self.threshold_base, self.threshold_base + steps.cumsum(0)])

    @torch.no_grad()
    def set_thresholds(self, values: tuple[float, float, float, float]) -> None:
        """Make :attr:`thresholds` equal ``values`` (increasing, gaps above ``min_gap``)."""
        init = torch.tensor(values, dtype=self.threshold_base.dtype)
        self.threshold_base.copy_(init[:1])
        self.threshold_steps.copy_(_inverse_softplus(init.diff() - self.min_gap))

    def _class_embedding(self, direction_logits: Tensor, magnitude_logits: Tensor) -> Tensor:
        return (
            torch.softmax(direction_logits, -1) @ self.direction_embed.weight
            + torch.softmax(magnitude_logits, -1) @ self.magnitude_embed.weight
        )

    def forward(self, features: Tensor) -> TrendPrediction:
        h = self.body(features)
        free_direction, free_magnitude = self.direction(h), self.magnitude(h)
        condition = self._class_embedding(free_direction, free_magnitude)
        regression = self.regressor(torch.cat([h, condition], -1)).squeeze(-1)
        ordinal_direction, ordinal_magnitude = ordinal_log_probs(
            regression, self.thresholds, self.temperature
        )
        direction_logits = free_direction + ordinal_direction
        magnitude_logits = free_magnitude + ordinal_magnitude
        token = self.to_token(self._class_embedding(direction_logits, magnitude_logits))
        return TrendPrediction(
            direction_logits=direction_logits,
            magnitude_logits=magnitude_logits,
            regression=regression,
            trend_token=token.unsqueeze(1),
            gate=0.5 * torch.sigmoid(self.gate(h)).squeeze(-1),
        )


def fusion_adjustment(regression: Tensor, gate: Tensor, pred_len: int) -> Tensor:
    """``[BN, H]`` adjustment ``gate * tanh(r_hat) * ramp`` for :func:`apply_trend_fusion`.

    The ramp rises linearly from 0 at the first forecast step to 1 at the last (a trend
    matters more the further out one looks; a one-step horizon gets 0). With the gate below
    0.5 and tanh in (-1, 1), the adjustment stays in (-0.5, 0.5), its sign that of r_hat.
    """
    ramp = torch.linspace(0.0, 1.0, pred_len, device=regression.device, dtype=regression.dtype)
    return (gate * torch.tanh(regression)).unsqueeze(-1) * ramp


# --------------------------------------------------------------------------- labels and loss


@dataclass
class TrendLabels:
    change: Tensor  # [BN] relative change r
    direction: Tensor  # [BN] long, UP / DOWN / FLAT
    magnitude: Tensor  # [BN] long, STRONG_UP / WEAK_UP / WEAK_DOWN / STRONG_DOWN


def relative_change(
    series: Tensor, future: Tensor, eps: float = 1e-5, clip: float = 10.0
) -> Tensor:
    """``(mean(future) - last) / (mean absolute deviation of the window + eps)``, clipped."""
    deviation = (series - series.mean(-1, keepdim=True)).abs().mean(-1)
    change = (future.mean(-1) - series[:, -1]) / (deviation + eps)
    return change.clamp(-clip, clip)


def trend_labels(series: Tensor, future: Tensor, thresholds: Tensor) -> TrendLabels:
    """Direction and magnitude labels of ``series [BN, L]`` / ``future [BN, H]``.

    ``r = (mean(future) - last input) / (mean |input - mean(input)| + eps)``, clipped to
    [-10, 10]: the change in units of the window's own variability, so it neither explodes
    when a normalised series crosses zero nor depends on the per-window normalisation. With
    ``t1 < t2 < t3 < t4`` and ``m = (t2 + t3) / 2``: direction up ``r > t3``, down ``r < t2``,
    else flat; magnitude strong up ``r > t4``, weak up ``m <= r <= t4``, weak down
    ``t1 <= r < m``, strong down ``r < t1``."""
    if series.dim() != 2 or future.dim() != 2 or series.shape[0] != future.shape[0]:
        raise ValueError(
            f"trend labels need series [B*N, L] and future [B*N, H] with the same rows; got "
            f"{tuple(series.shape)} and {tuple(future.shape)} (convert a [B, H, N] future with "
            "future_to_series)"
        )
    return classify_change(relative_change(series, future), thresholds)


def classify_change(r: Tensor, thresholds: Tensor) -> TrendLabels:
    """Direction and magnitude labels of changes ``r [BN]`` (see :func:`trend_labels`)."""
    t1, t2, t3, t4 = torch.as_tensor(thresholds).detach()
    mid = (t2 + t3) / 2
    direction = torch.full_like(r, FLAT, dtype=torch.long)
    direction[r > t3] = UP
    direction[r < t2] = DOWN
    magnitude = torch.full_like(r, WEAK_UP, dtype=torch.long)
    magnitude[r > t4] = STRONG_UP
    magnitude[(r < mid) & (r >= t1)] = WEAK_DOWN
    magnitude[r < t1] = STRONG_DOWN
    return TrendLabels(r, direction, magnitude)


def training_changes(train: WindowDataset, target_index: int = -1, chunk: int = 1024) -> Tensor:
    """The label ``r`` of every training series: each window's forecast channels (features
    M and S: all; MS: the input channel ``target_index`` against the target), in dataset
    scale (``r`` does not depend on the per-window normalisation)."""
    changes = []
    for start in range(0, len(train), chunk):
        x, y = train.get_batch(torch.arange(start, min(start + chunk, len(train))))
        if x.shape[-1] != y.shape[-1]:
            t = target_index % x.shape[-1]
            x = x[..., t : t + 1]
        changes.append(relative_change(future_to_series(x), future_to_series(y)))
    return torch.cat(changes)


def quantile_thresholds(changes: Tensor, gap: float = 1e-3) -> tuple[float, float, float, float]:
    """The :data:`THRESHOLD_QUANTILES` of ``changes``, pushed apart by at least ``gap`` where
    ties (e.g. constant series) make them equal."""
    q = torch.quantile(changes.double(), torch.tensor(THRESHOLD_QUANTILES, dtype=torch.float64))
    values = [float(q[0])]
    for v in q[1:].tolist():
        values.append(max(v, values[-1] + gap))
    return tuple(values)  # type: ignore[return-value]


def class_frequencies(changes: Tensor, thresholds: Tensor) -> dict[str, dict[str, float]]:
    """Share of ``changes`` in each direction and magnitude class under ``thresholds``."""
    labels = classify_change(changes, thresholds)
    n = max(changes.numel(), 1)

    def shares(values: Tensor, names: tuple[str, ...]) -> dict[str, float]:
        counts = torch.bincount(values, minlength=len(names)).tolist()
        return {name: c / n for name, c in zip(names, counts, strict=True)}

    return {
        "direction": shares(labels.direction, DIRECTION_NAMES),
        "magnitude": shares(labels.magnitude, MAGNITUDE_NAMES),
    }


@dataclass
class TAPROutput:
    patch_out: Tensor  # [BN, P, d_model]
    trend: Tensor  # [BN, P, d_model] scale-weighted trend
    scale_trends: list[Tensor]  # per scale, [BN, P, d_model], finest first
    trend_token: Tensor  # [BN, 1, llm_dim]
    direction_logits: Tensor  # [BN, 3]
    magnitude_logits: Tensor  # [BN, 4]
    regression: Tensor  # [BN]
    gate: Tensor  # [BN]
    adjustment: Tensor  # [BN, H]; use apply_trend_fusion


class TAPR(nn.Module):
    """TAPR-DM on the patch embeddings, then TAPR-C2F on pooled features and window statistics.

    The head reads the mean of the DM output over patches, the trend at the last patch and
    the statistics of the input series (last value, slope, ...), because the label is a
    change relative to the last input value.
    """

    def __init__(
        self,
        d_model: int,
        llm_dim: int,
        pred_len: int,
        n_scales: int = 3,
        n_heads: int = 4,
        d_hidden: int = 64,
        trend_kernel: int = 5,
        thresholds_init: tuple[float, float, float, float] = DEFAULT_THRESHOLDS,
        lambda_dir: float = 0.3,
        lambda_mag: float = 0.3,
        lambda_hcl: float = 0.1,
        lambda_reg: float = 0.1,
        label_smoothing: float = 0.1,
    ) -> None:
        super().__init__()
        self.pred_len = pred_len
        self.loss_weights = {
            "direction": lambda_dir,
            "magnitude": lambda_mag,
            "hierarchy": lambda_hcl,
            "regression": lambda_reg,
        }
        self.label_smoothing = label_smoothing
        self.decomposition = MultiScaleDecomposition(d_model, n_scales, n_heads, trend_kernel)
        self.head = CoarseToFineHead(2 * d_model + N_STATS, llm_dim, d_hidden, thresholds_init)

    @classmethod
    def from_params(cls, hp: TAPRParams, llm_dim: int) -> TAPR:
        """TAPR as the enhanced model builds it (thresholds learned from the data:
        placeholders until ``init_trend_thresholds`` sees the training split)."""
        return cls(
            hp.d_model,
            llm_dim,
            hp.pred_len,
            n_scales=hp.n_scales,
            n_heads=hp.n_heads,
            thresholds_init=DEFAULT_THRESHOLDS if hp.thresholds is None else hp.thresholds,
        )

    @property
    def thresholds(self) -> Tensor:
        return self.head.thresholds

    def forward(self, patch_emb: Tensor, series: Tensor) -> TAPROutput:
        check_branch_inputs("TAPR", patch_emb, series)
        output, trend, scale_trends = self.decomposition(patch_emb)
        stats = torch.asinh(window_statistics(series))
        prediction = self.head(torch.cat([output.mean(1), trend[:, -1], stats], -1))
        return TAPROutput(
            patch_out=output,
            trend=trend,
            scale_trends=scale_trends,
            trend_token=prediction.trend_token,
            direction_logits=prediction.direction_logits,
            magnitude_logits=prediction.magnitude_logits,
            regression=prediction.regression,
            gate=prediction.gate,
            adjustment=fusion_adjustment(prediction.regression, prediction.gate, self.pred_len),
        )

    def loss(
        self, out: TAPROutput, series: Tensor, future: Tensor, lambda_trend: float = 1.0
    ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """``(lambda_trend * weighted sum, raw parts, diagnostics)`` from the true future.

        ``future`` is ``[B*N, H]`` in the same order and scale as ``series`` (use
        :func:`future_to_series` on a ``[B, H, N]`` target). Parts: label-smoothed
        cross-entropies of direction and magnitude, the hierarchical consistency
        ``KL(fold(magnitude) || direction)`` and a Huber loss of the regressed change.
        """
        labels = trend_labels(series, future, self.thresholds)
        smooth = self.label_smoothing
        log_direction = torch.log_softmax(out.direction_logits, -1)
        folded = fold_magnitude(torch.softmax(out.magnitude_logits, -1), self.thresholds)
        parts = {
            "direction": F.cross_entropy(
                out.direction_logits, labels.direction, label_smoothing=smooth
            ),
            "magnitude": F.cross_entropy(
                out.magnitude_logits, labels.magnitude, label_smoothing=smooth
            ),
            "hierarchy": F.kl_div(log_direction, folded, reduction="batchmean"),
            "regression": F.huber_loss(out.regression, labels.change),
        }
        total = lambda_trend * sum(self.loss_weights[name] * value for name, value in parts.items())
        t = self.thresholds.detach()
        diagnostics = {
            "tapr_direction_accuracy": _accuracy(out.direction_logits, labels.direction),
            "tapr_magnitude_accuracy": _accuracy(out.magnitude_logits, labels.magnitude),
            "tapr_flat_fraction": (labels.direction == FLAT).float().mean(),
            "tapr_gate_mean": out.gate.detach().mean(),
            **{f"tapr_threshold_{i + 1}": v for i, v in enumerate(t)},
        }
        return total, {f"tapr_{k}": v for k, v in parts.items()}, diagnostics


def _accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    return (logits.detach().argmax(-1) == labels).float().mean()
