"""GRA-M: Global Retrieval-Augmented Memory for the enhanced Time-LLM.

A forecaster sees one window at a time; GRA-M gives it a memory of training windows and what
followed them. :class:`PVDR` encodes a window by shape and by values into a key and keeps
keys, windows and futures as buffers (so the memory is in every checkpoint);
:class:`AdaptiveKnowledgeGate` gates how much of the retrieved futures enters the patches and
builds a context and a confidence token; :class:`GRAM` wires both and adds the gate losses.

``series`` given to :meth:`GRAM.forward` is ``[B*N, L]`` in the scale the memory was built
in (dataset scale, before instance normalisation). Stored futures are normalised by their own
window's statistics, so they live in the model's normalised space. Keys are re-encoded every
``refresh_every`` training passes (a counter buffer, so a resume refreshes at the same steps)
and once per evaluation, outside the state, because the encoders keep training.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from timellm_lib.models.params import GRAMParams

N_STATS = 6  # mean, std, min, max, last, slope
_MASKED = -1e4  # additive logit for masked items: exp() underflows to 0, no inf arithmetic
_NORM_EPS = 1e-5


class MemoryStateError(RuntimeError):
    """A saved GRA-M memory does not fit this module (other d_repr, capacity or seq_len)."""


def window_statistics(x: Tensor) -> Tensor:
    """Scale statistics of each window ``[..., L] -> [..., 6]``: mean, std, min, max, last, slope.

    The slope is the least-squares slope against time rescaled to [0, 1], i.e. the change
    the linear fit predicts across the whole window, so it does not depend on L.
    """
    length = x.shape[-1]
    mean = x.mean(-1)
    std = x.std(-1, correction=0)
    t = torch.linspace(0.0, 1.0, length, device=x.device, dtype=x.dtype)
    t = t - t.mean()
    slope = ((x - mean.unsqueeze(-1)) * t).sum(-1) / (t.pow(2).sum() + _NORM_EPS)
    return torch.stack([mean, std, x.amin(-1), x.amax(-1), x[..., -1], slope], dim=-1)


def _window_scale(windows: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and std ``[..., 1]`` of each window, as instance normalisation takes them.

    The pattern encoder divides them out to compare shapes, and the memory stores futures
    in the same units, so that both live in the space the model's normalised input lives in.
    """
    mean = windows.mean(-1, keepdim=True)
    std = torch.sqrt(windows.var(-1, keepdim=True, correction=0) + _NORM_EPS)
    return mean, std


def check_branch_inputs(branch: str, patch_emb: Tensor, series: Tensor) -> None:
    """The composer's convention for TAPR and GRA-M: ``patch_emb [B*N, P, d_model]`` and
    ``series [B*N, L]``, one row per channel-independent series."""
    if patch_emb.dim() != 3 or series.dim() != 2 or patch_emb.shape[0] != series.shape[0]:
        raise ValueError(
            f"{branch} needs patch_emb [B*N, P, d_model] and series [B*N, L] with the same "
            f"rows; got {tuple(patch_emb.shape)} and {tuple(series.shape)}"
        )


def query_positions_for(starts: Tensor, n_channels: int) -> Tensor:
    """``[B*N, 2]`` (channel, start) of training queries whose sample ``b`` starts at ``starts[b]``.

    Row ``b*N + n`` is channel ``n`` of sample ``b``, the channel-independent order. Starts
    are row offsets into the series given to :meth:`PVDR.build_memory` (the training split).
    """
    starts = starts.long().reshape(-1)
    channels = torch.arange(n_channels, device=starts.device)
    return torch.stack(
        [channels.repeat(starts.numel()), starts.repeat_interleave(n_channels)], dim=-1
    )


def resize_horizon(values: Tensor, width: int) -> Tensor:
    """Linear interpolation of ``[M, H']`` futures to ``[M, width]`` (first and last steps kept)."""
    if values.shape[-1] == width:
        return values
    return F.interpolate(values.unsqueeze(1), size=width, mode="linear", align_corners=True)[:, 0]


def masked_softmax(logits: Tensor, valid: Tensor) -> Tensor:
    """Softmax over the valid entries of the last dim; rows with no valid entry give all zeros."""
    return torch.softmax(logits.masked_fill(~valid, _MASKED), dim=-1) * valid


def _check_divisible(width: int, heads: int, what: str) -> None:
    if width % heads:
        raise ValueError(
            f"{what} = {width} is not divisible by {heads} attention heads; change one"
        )


# ----------------------------------------------------------------------------- encoders


class _Block(nn.Module):
    """Pre-norm Transformer block (self-attention + MLP)."""

    def __init__(self, width: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
        )

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, width = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(width, dim=-1)
        q, k, v = (t.view(batch, tokens, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, width)
        x = x + self.proj(y)
        return x + self.mlp(self.ln2(x))


class PatternEncoder(nn.Module):
    """Shape key of a window: z-normalise, resample to ``n_tokens`` segments, Transformer, CLS.

    Z-normalising removes level and scale, so two windows match on shape alone. Resampling
    to a fixed number of short segments makes the cost and the parameters independent of L.
    """

    def __init__(
        self,
        d_repr: int,
        n_tokens: int = 16,
        token_len: int = 8,
        n_layers: int = 1,
        n_heads: int = 4,
    ) -> None:
        super().__init__()
        _check_divisible(d_repr, n_heads, "d_repr")
        self.n_tokens, self.token_len = n_tokens, token_len
        self.embed = nn.Linear(token_len, d_repr)
        self.cls = nn.Parameter(torch.randn(1, 1, d_repr) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, n_tokens + 1, d_repr) * 0.02)
        self.blocks = nn.ModuleList(_Block(d_repr, n_heads) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_repr)

    def forward(self, windows: Tensor) -> Tensor:
        mean, std = _window_scale(windows)
        z = (windows - mean) / std
        z = F.adaptive_avg_pool1d(z.unsqueeze(1), self.n_tokens * self.token_len)[:, 0]
        tokens = self.embed(z.view(-1, self.n_tokens, self.token_len))
        x = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return F.normalize(self.norm(x[:, 0]), dim=-1)


class ValueEncoder(nn.Module):
    """Value key of a window from its scale statistics (asinh tames outlying magnitudes)."""

    def __init__(self, d_repr: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(N_STATS, d_repr), nn.GELU(), nn.Linear(d_repr, d_repr))

    def forward(self, windows: Tensor) -> Tensor:
        return F.normalize(self.mlp(torch.asinh(window_statistics(windows))), dim=-1)


# ----------------------------------------------------------------------------- retriever


@dataclass
class Retrieval:
    """The top-k memory items of each query; invalid slots (masked or empty memory) are zero."""

    values: Tensor  # [BN, K, H] futures, normalised by their source window's mean and std
    weights: Tensor  # [BN, K] softmax of -distance/temperature over valid items
    similarity: Tensor  # [BN, K] exp(-squared key distance) in (0, 1]; 1 = identical key
    valid: Tensor  # [BN, K] bool
    indices: Tensor  # [BN, K] memory rows, -1 where invalid


class PVDR(nn.Module):
    """Pattern-value dual retriever with a memory bank of keys and futures (buffers).

    Keys are unit-norm mixtures ``w * pattern + (1 - w) * value`` with ``w = sigmoid(shape_logit)``,
    so squared distances lie in [0, 4] and the temperature has a fixed meaning.

    Buffers (preallocated at capacity ``max_memory_size``; rows ``[0, memory_size)`` are
    filled): ``memory_keys [cap, d_repr]``, ``memory_values [cap, pred_len]``,
    ``memory_windows [cap, seq_len]`` (raw windows, for key refreshes), ``memory_positions
    [cap, 3]`` (channel, start, end) with ``[start, end)`` the rows of the training series
    the entry used (window and future), ``memory_size`` and ``forward_count`` (scalars).
    Both scalars are mirrored as Python ints, set when the memory is built or loaded, so
    retrieval never reads a device tensor back to the host.
    """

    def __init__(
        self,
        seq_len: int,
        pred_len: int,
        d_repr: int = 64,
        top_k: int = 5,
        max_memory_size: int = 10000,
        temperature: float = 0.1,
        refresh_every: int = 50,
        encoder_layers: int = 1,
        encoder_heads: int = 4,
    ) -> None:
        super().__init__()
        if min(seq_len, pred_len, d_repr, top_k, max_memory_size) < 1:
            raise ValueError("seq_len, pred_len, d_repr, top_k and max_memory_size must be >= 1")
        if temperature <= 0:
            raise ValueError(f"temperature = {temperature} must be positive")
        self.seq_len, self.pred_len, self.top_k = seq_len, pred_len, top_k
        self.temperature, self.refresh_every = temperature, refresh_every
        self.pattern = PatternEncoder(d_repr, n_layers=encoder_layers, n_heads=encoder_heads)
        self.value = ValueEncoder(d_repr)
        self.shape_logit = nn.Parameter(torch.zeros(()))
        cap = max_memory_size
        self.register_buffer("memory_keys", torch.zeros(cap, d_repr))
        self.register_buffer("memory_values", torch.zeros(cap, pred_len))
        self.register_buffer("memory_windows", torch.zeros(cap, seq_len))
        self.register_buffer("memory_positions", torch.zeros(cap, 3, dtype=torch.long))
        self.register_buffer("memory_size", torch.zeros((), dtype=torch.long))
        self.register_buffer("forward_count", torch.zeros((), dtype=torch.long))
        self._eval_keys: Tensor | None = None  # keys of the current encoders, eval mode only
        self._size, self._passes = 0, 0  # memory_size and forward_count, on the host

    @property
    def capacity(self) -> int:
        return self.memory_keys.shape[0]

    @property
    def size(self) -> int:
        return self._size

    @property
    def shape_weight(self) -> Tensor:
        return torch.sigmoid(self.shape_logit)

    def encode(self, windows: Tensor) -> Tensor:
        """Keys ``[M, d_repr]`` of raw windows ``[M, seq_len]``."""
        w = self.shape_weight
        return w * self.pattern(windows) + (1 - w) * self.value(windows)

    # -- building the memory

    def train(self, mode: bool = True) -> PVDR:
        """Switching modes drops the evaluation keys: the next evaluation encodes anew."""
        self._eval_keys = None
        return super().train(mode)

    def clear_memory(self) -> None:
        self._eval_keys = None
        for buf in (
            self.memory_keys,
            self.memory_values,
            self.memory_windows,
            self.memory_positions,
        ):
            buf.zero_()
        self.memory_size.zero_()
        self._size = 0

    @torch.no_grad()
    def add_to_memory(self, windows: Tensor, futures: Tensor, positions: Tensor) -> None:
        """Append entries: windows ``[n, seq_len]`` and futures ``[n, H']`` in dataset scale,
        positions ``[n, 2]`` (channel, start) in the training series.

        Futures of another horizon ``H' != pred_len`` are resized by linear interpolation,
        with a warning. The entry's extent ``[start, start + seq_len + H')`` is stored for
        the leakage mask.
        """
        n = windows.shape[0]
        if n == 0:
            return
        if windows.shape[-1] != self.seq_len or futures.shape[0] != n or positions.shape != (n, 2):
            raise ValueError(
                f"add_to_memory needs windows [n, {self.seq_len}], futures [n, H] and positions "
                f"[n, 2]; got {tuple(windows.shape)}, {tuple(futures.shape)}, {tuple(positions.shape)}"
            )
        start = self.size
        if start + n > self.capacity:
            raise ValueError(
                f"memory holds {start} of {self.capacity} entries and cannot take {n} more; "
                "raise max_memory_size or add fewer windows"
            )
        windows = windows.to(self.memory_windows)
        futures = futures.to(self.memory_values)
        extent = self.seq_len + futures.shape[-1]
        if futures.shape[-1] != self.pred_len:
            warnings.warn(
                f"GRA-M memory futures have {futures.shape[-1]} steps but pred_len is "
                f"{self.pred_len}; resizing them by linear interpolation (rebuild the memory "
                "with the model's pred_len for exact futures)",
                stacklevel=2,
            )
            futures = resize_horizon(futures, self.pred_len)
        mean, std = _window_scale(windows)
        rows = slice(start, start + n)
        self.memory_windows[rows] = windows
        self.memory_values[rows] = (futures - mean) / std
        positions = positions.to(self.memory_positions)
        self.memory_positions[rows] = torch.cat([positions, positions[:, 1:] + extent], dim=-1)
        self.memory_keys[rows] = self._encode_chunked(windows)
        self.memory_size.fill_(start + n)
        self._size = start + n
        self._eval_keys = None

    @torch.no_grad()
    def build_memory(
        self,
        series: Tensor,
        n_windows: int,
        generator: torch.Generator | None = None,
        pred_len: int | None = None,
    ) -> int:
        """Replace the memory by ``n_windows`` random windows of the training series ``[T, C]``.

        Every channel is a separate series; (channel, start) pairs are drawn without
        replacement with ``generator``. ``pred_len`` (default: the module's) is the future
        length read from the data; another value is resized with a warning. Windows always
        have the module's seq_len, because the stored windows are re-encoded by the same
        encoders. Returns the number of entries stored.
        """
        pred_len = pred_len or self.pred_len
        series = torch.as_tensor(series).to(self.memory_windows)
        if series.dim() != 2:
            raise ValueError(
                f"build_memory needs the training series as [T, C], got {tuple(series.shape)}"
            )
        if n_windows > self.capacity:
            raise ValueError(
                f"n_windows = {n_windows} exceeds the memory capacity {self.capacity}; "
                "lower memory_windows or raise max_memory_size"
            )
        rows, channels = series.shape
        extent = self.seq_len + pred_len
        n_starts = rows - extent + 1
        if n_starts < 1:
            raise ValueError(
                f"the training series has {rows} rows, fewer than seq_len + pred_len = {extent}; "
                "use a longer training split or shorter windows"
            )
        n = min(n_windows, n_starts * channels)
        picks = torch.randperm(n_starts * channels, generator=generator)[:n].sort().values
        picks = picks.to(series.device)
        channel, start = picks // n_starts, picks % n_starts
        segments = series[
            start[:, None] + torch.arange(extent, device=series.device), channel[:, None]
        ]
        self.clear_memory()
        self.add_to_memory(
            segments[:, : self.seq_len],
            segments[:, self.seq_len :],
            torch.stack([channel, start], -1),
        )
        return n

    @torch.no_grad()
    def refresh_keys(self) -> None:
        """Re-encode the stored windows with the current encoders."""
        n = self.size
        if n:
            self.memory_keys[:n] = self._encode_chunked(self.memory_windows[:n])

    def _encode_chunked(self, windows: Tensor, chunk: int = 1024) -> Tensor:
        return torch.cat([self.encode(part) for part in windows.split(chunk)])

    # -- retrieval

    def retrieve(self, series: Tensor, query_positions: Tensor | None = None) -> Retrieval:
        """Top-k memory items for each query window ``[BN, seq_len]``.

        ``query_positions [BN, 2]`` (channel, start) marks training queries, and masks
        *before* top-k every memory entry that overlaps the query's forecast horizon
        ``[start + seq_len, start + seq_len + pred_len)`` in any channel (channels of one
        series move together, so another channel's future of the same dates leaks the
        target), and every entry of the query's own channel that overlaps its window or
        horizon (a shifted copy of itself).
        """
        rows, k = series.shape[0], self.top_k
        if self.training and self.refresh_every > 0 and self.size:
            self.forward_count += 1
            self._passes += 1
            if self._passes % self.refresh_every == 0:
                self.refresh_keys()
        if self.size == 0:
            zeros = series.new_zeros(rows, k)
            return Retrieval(
                values=series.new_zeros(rows, k, self.pred_len),
                weights=zeros,
                similarity=zeros,
                valid=torch.zeros(rows, k, dtype=torch.bool, device=series.device),
                indices=torch.full((rows, k), -1, dtype=torch.long, device=series.device),
            )
        query = self.encode(series)
        keys = self._current_keys()
        dist = (
            query.pow(2).sum(-1, keepdim=True) + keys.pow(2).sum(-1) - 2 * query @ keys.T
        ).clamp_min(0)
        if query_positions is not None:
            dist = dist.masked_fill(self._overlaps(query_positions), math.inf)
        top_dist, indices = torch.topk(dist, min(k, self.size), dim=-1, largest=False)
        if top_dist.shape[1] < k:  # fewer entries than k: pad with invalid slots
            pad = k - top_dist.shape[1]
            top_dist = F.pad(top_dist, (0, pad), value=math.inf)
            indices = F.pad(indices, (0, pad), value=0)
        valid = torch.isfinite(top_dist)
        top_dist = torch.where(valid, top_dist, torch.zeros_like(top_dist))
        indices = torch.where(valid, indices, torch.full_like(indices, -1))
        return Retrieval(
            values=self.memory_values[indices.clamp_min(0)] * valid.unsqueeze(-1),
            weights=masked_softmax(-top_dist / self.temperature, valid),
            similarity=torch.exp(-top_dist) * valid,
            valid=valid,
            indices=indices,
        )

    def _current_keys(self) -> Tensor:
        """Training: the stored keys (refreshed every ``refresh_every`` passes, part of the
        resumable state). Evaluation: the stored windows encoded by the current encoders,
        once per evaluation (see the module docstring)."""
        if self.training:
            return self.memory_keys[: self.size]
        if self._eval_keys is None or self._eval_keys.device != self.memory_windows.device:
            with torch.no_grad():
                self._eval_keys = self._encode_chunked(self.memory_windows[: self.size])
        return self._eval_keys

    def _overlaps(self, query_positions: Tensor) -> Tensor:
        """``[BN, M]`` True where memory entry m overlaps query q's horizon (any channel) or
        its window (same channel)."""
        if query_positions.dim() != 2 or query_positions.shape[1] != 2:
            raise ValueError(
                f"query_positions must be [B*N, 2] (channel, start), got {tuple(query_positions.shape)}; "
                "build it with gram.query_positions_for(starts, n_channels)"
            )
        q = query_positions.to(self.memory_positions)
        q_channel, q_start = q[:, :1], q[:, 1:]
        q_end = q_start + self.seq_len + self.pred_len
        m = self.memory_positions[: self.size]
        m_channel, m_start, m_end = m[:, 0], m[:, 1], m[:, 2]
        reaches_end = m_start < q_end
        into_horizon = reaches_end & (q_start + self.seq_len < m_end)
        return into_horizon | ((q_channel == m_channel) & reaches_end & (q_start < m_end))

    # -- checkpoints

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        """Refuse a memory of another geometry loudly; resize only futures of another horizon."""
        hints = {
            "memory_keys": "d_repr or max_memory_size differ",
            "memory_values": "max_memory_size differs",
            "memory_windows": "seq_len or max_memory_size differ",
            "memory_positions": "max_memory_size differs",
        }
        for name, hint in hints.items():
            key = prefix + name
            if key not in state_dict:
                continue
            got, want = tuple(state_dict[key].shape), tuple(getattr(self, name).shape)
            if got == want:
                continue
            if name == "memory_values" and len(got) == 2 and got[0] == want[0]:
                warnings.warn(
                    f"{key} holds futures of {got[1]} steps but pred_len is {want[1]}; resizing "
                    "them by linear interpolation (rebuild the memory for exact futures)",
                    stacklevel=2,
                )
                state_dict[key] = resize_horizon(state_dict[key], want[1])
                continue
            raise MemoryStateError(
                f"cannot load GRA-M memory buffer {key!r}: the state dict has shape {got} but this "
                f"module has {want} ({hint}); build the module with the checkpoint's settings or "
                "rebuild the memory"
            )
        self._eval_keys = None  # new weights or memory: evaluation encodes anew
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # the one host read of the scalars: at load time, not in every forward
        self._size, self._passes = int(self.memory_size), int(self.forward_count)


# ----------------------------------------------------------------------------- gating


@dataclass
class KnowledgeFusion:
    patch_out: Tensor  # [BN, P, d_model]
    retrieval_tokens: Tensor  # [BN, 2, llm_dim] (context, confidence)
    gate: Tensor  # [BN] knowledge gate in [0, 1); 0 where nothing was retrieved
    item_weights: Tensor  # [BN, K] how much each retrieved item is used; 0 where invalid
    confidence: Tensor  # [BN] top similarity, 0 where nothing was retrieved


class AdaptiveKnowledgeGate(nn.Module):
    """Fuse retrieved futures into the patch embeddings, as much as they deserve.

    A match scorer rates each retrieved item against a summary of the current patches (on
    top of its retrieval weight), a gate network decides how much retrieved knowledge enters
    at all, and the patches cross-attend to the items with the match weights as a log-prior.
    The result is added as a gated residual, so a gate of 0 leaves the patches unchanged.
    """

    def __init__(
        self,
        d_model: int,
        pred_len: int,
        llm_dim: int,
        n_heads: int = 4,
        gate_bias_init: float = -2.0,
    ) -> None:
        super().__init__()
        _check_divisible(d_model, n_heads, "d_model")
        self.n_heads = n_heads
        self.current = nn.Sequential(
            nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, d_model)
        )
        self.item = nn.Sequential(
            nn.Linear(pred_len + 1, d_model), nn.GELU(), nn.Linear(d_model, d_model)
        )
        self.match = nn.Sequential(
            nn.Linear(2 * d_model, d_model), nn.GELU(), nn.Linear(d_model, 1)
        )
        self.gate = nn.Sequential(
            nn.Linear(2 * d_model + 1, d_model), nn.GELU(), nn.Linear(d_model, 1)
        )
        nn.init.constant_(self.gate[-1].bias, gate_bias_init)  # retrieved knowledge starts faint
        self.query = nn.Linear(d_model, d_model)
        self.key_value = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.context_token = nn.Linear(d_model, llm_dim)
        self.confidence_token = nn.Linear(2, llm_dim)

    def forward(self, patch_emb: Tensor, retrieval: Retrieval) -> KnowledgeFusion:
        rows, patches, width = patch_emb.shape
        valid = retrieval.valid
        found = valid.any(-1).to(patch_emb.dtype)  # [BN]
        confidence = retrieval.similarity[:, 0]  # top-1 is first; 0 when invalid
        summary = self.current(patch_emb.mean(1))  # [BN, d]
        items = self.item(torch.cat([retrieval.values, retrieval.similarity.unsqueeze(-1)], -1))
        pair = torch.cat([summary.unsqueeze(1).expand_as(items), items], -1)
        match = self.match(pair).squeeze(-1) + torch.log(retrieval.weights + 1e-9)
        item_weights = masked_softmax(match, valid)
        pooled = (item_weights.unsqueeze(-1) * items).sum(1)  # [BN, d]
        gate_in = torch.cat([summary, pooled, confidence.unsqueeze(-1)], -1)
        gate = torch.sigmoid(self.gate(gate_in)).squeeze(-1) * found

        heads = self.n_heads
        q = self.query(patch_emb).view(rows, patches, heads, -1).transpose(1, 2)
        k, v = self.key_value(items).split(width, dim=-1)
        k, v = (t.view(rows, -1, heads, width // heads).transpose(1, 2) for t in (k, v))
        prior = torch.log(item_weights + 1e-9).masked_fill(~valid, _MASKED)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=prior[:, None, None, :])
        attended = self.out(attended.transpose(1, 2).reshape(rows, patches, width))
        patch_out = patch_emb + gate[:, None, None] * attended

        tokens = torch.stack(
            [
                self.context_token(pooled),
                self.confidence_token(torch.stack([confidence, gate], -1)),
            ],
            dim=1,
        )
        return KnowledgeFusion(patch_out, tokens, gate, item_weights, confidence)


def gate_losses(item_weights: Tensor, valid: Tensor, top_weight: Tensor) -> dict[str, Tensor]:
    """Raw gate losses over queries with at least two valid items.

    With H the entropy of the item weights normalised by log(n_valid) to [0, 1]:
    ``gate_entropy = mean(1 - H)`` rewards spreading weight over several items (diversity),
    ``gate_consistency = mean((H - (1 - c))^2)`` asks for a decisive, low-entropy choice when
    the best match stands out and a spread-out one when it does not. The confidence c is the
    retrieval weight of the top item (detached): its similarity *relative to the other
    candidates* at the retrieval temperature. The absolute top similarity is not used here
    because it is uncalibrated (with freshly initialised encoders every pair looks alike).
    Both losses are zero (but still in the graph) when no query has two valid items.
    """
    n_valid = valid.sum(-1)
    usable = (n_valid >= 2).to(item_weights.dtype)  # a mask, not an index: no host read
    p = item_weights
    # p * log(p) with log clamped: masked items have p = 0, where xlogy's gradient is 0/0
    plogp = p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))
    # rows with fewer than two items are masked out below; clamping keeps them finite
    entropy = -plogp.sum(-1) / torch.log(n_valid.clamp_min(2).to(p.dtype))
    target = 1.0 - top_weight.detach()
    rows = usable.sum().clamp_min(1.0)
    return {
        "gate_entropy": ((1.0 - entropy) * usable).sum() / rows,
        "gate_consistency": ((entropy - target).pow(2) * usable).sum() / rows,
    }


# ----------------------------------------------------------------------------- wrapper


@dataclass
class GRAMOutput:
    patch_out: Tensor  # [BN, P, d_model]
    retrieval_tokens: Tensor  # [BN, 2, llm_dim]
    gate: Tensor  # [BN]
    similarity: Tensor  # [BN, K] retrieval similarities, best first
    item_weights: Tensor  # [BN, K]
    retrieval: Retrieval
    losses: dict[str, Tensor] = field(default_factory=dict)  # raw (unweighted) gate losses
    diagnostics: dict[str, Tensor] = field(default_factory=dict)


class GRAM(nn.Module):
    """Retrieve similar training windows and fuse their futures: PVDR, then AKG.

    ``n_heads`` is the AKG's cross-attention. ``retriever_options`` (``d_repr``, ``top_k``,
    ``max_memory_size``, ``temperature``, ``refresh_every``, ...) go to :class:`PVDR` as
    they are, so their defaults are stated once, there.
    """

    def __init__(
        self,
        seq_len: int,
        pred_len: int,
        d_model: int,
        llm_dim: int,
        *,
        n_heads: int = 4,
        **retriever_options: Any,
    ) -> None:
        super().__init__()
        self.retriever = PVDR(seq_len, pred_len, **retriever_options)
        self.akg = AdaptiveKnowledgeGate(d_model, pred_len, llm_dim, n_heads)

    @classmethod
    def from_params(cls, hp: GRAMParams, llm_dim: int) -> GRAM:
        return cls(
            seq_len=hp.seq_len,
            pred_len=hp.pred_len,
            d_model=hp.d_model,
            llm_dim=llm_dim,
            d_repr=hp.d_repr,
            top_k=hp.top_k,
            max_memory_size=hp.max_memory_size,
            n_heads=hp.n_heads,
        )

    def build_memory(
        self,
        series: Tensor,
        n_windows: int,
        generator: torch.Generator | None = None,
        pred_len: int | None = None,
    ) -> int:
        """See :meth:`PVDR.build_memory`."""
        return self.retriever.build_memory(series, n_windows, generator, pred_len)

    def forward(
        self, patch_emb: Tensor, series: Tensor, query_positions: Tensor | None = None
    ) -> GRAMOutput:
        check_branch_inputs("GRAM", patch_emb, series)
        if self.training and query_positions is None and self.retriever.size:
            warnings.warn(
                "GRA-M runs in training mode without query_positions: a training window may "
                "retrieve its own future from the memory; pass gram.query_positions_for(starts, N)",
                stacklevel=2,
            )
        retrieval = self.retriever.retrieve(series, query_positions)
        fused = self.akg(patch_emb, retrieval)
        found = retrieval.valid.any(-1)
        # detached tensors: the trainer reads them all at once (no device sync per value here)
        size = self.retriever.memory_size.float()
        diagnostics = {
            "gram_gate_mean": fused.gate.detach().mean(),
            "gram_top_similarity": _mean_where(fused.confidence.detach(), found),
            "gram_top_weight": _mean_where(retrieval.weights.detach()[:, 0], found),
            "gram_found_fraction": found.float().mean(),
            "gram_memory_size": size,
            "gram_memory_empty": (size == 0).float(),
            "gram_shape_weight": self.retriever.shape_weight.detach(),
        }
        return GRAMOutput(
            patch_out=fused.patch_out,
            retrieval_tokens=fused.retrieval_tokens,
            gate=fused.gate,
            similarity=retrieval.similarity,
            item_weights=fused.item_weights,
            retrieval=retrieval,
            losses=gate_losses(fused.item_weights, retrieval.valid, retrieval.weights[:, 0]),
            diagnostics=diagnostics,
        )

    @staticmethod
    def loss(
        out: GRAMOutput, lambda_retrieval: float = 0.3
    ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """``(lambda_retrieval * (entropy + consistency), raw parts, diagnostics)``."""
        total = lambda_retrieval * sum(out.losses.values())
        return total, {f"gram_{k}": v for k, v in out.losses.items()}, dict(out.diagnostics)


def _mean_where(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` holds, 0 where it never does (no host sync)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)
