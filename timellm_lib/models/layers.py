"""The trainable stages of Time-LLM: instance norm, patching, reprogramming, output head,
and the stand-ins that replace the language model in the LLM ablations.

Each stage is its own module so that the shape tracer (``timellm_lib.notebooks.tracing``) can hook it,
and so that the enhanced model can reuse it. Stages that are only tensor reshapes are made
visible to the tracer with :class:`Tap`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Tap(nn.Identity):
    """Returns its input unchanged; called on a tensor so that a forward hook can see it.

    Used for stages that are not modules of their own (channel independence, prompt
    embedding, the concatenated LLM input, the LLM output).
    """


class RevIN(nn.Module):
    """Reversible instance normalisation without affine parameters (Kim et al., ICLR 2022).

    Each series of each sample is shifted and scaled by its own mean and standard deviation
    over time, which removes the level shift between training and test windows; the forecast
    is mapped back with the same statistics. Stateless: the statistics are returned, not
    stored, so one module can serve any number of calls.
    """

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, L, N] -> (normalised x, mean [B, 1, N], std [B, 1, N])."""
        mean = x.mean(dim=1, keepdim=True).detach()
        std = torch.sqrt(x.var(dim=1, keepdim=True, unbiased=False) + self.eps).detach()
        return (x - mean) / std, mean, std

    @staticmethod
    def denormalize(y: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        return y * std + mean


def channel_rows(x: Tensor) -> Tensor:
    """``[B, T, N] -> [B*N, T]``: row ``b*N + n`` is channel ``n`` of sample ``b``.

    The channel-independent layout every per-series stage works in (patching, prompts,
    TAPR, GRA-M); a plain ``reshape(B*N, T)`` would mix time steps and channels.
    """
    batch, length, channels = x.shape
    return x.transpose(1, 2).reshape(batch * channels, length)


def rows_to_channels(rows: Tensor, batch_size: int) -> Tensor:
    """Inverse of :func:`channel_rows`: ``[B*N, T] -> [B, T, N]``."""
    return rows.reshape(batch_size, -1, rows.shape[-1]).transpose(1, 2)


def n_patches(seq_len: int, patch_len: int, stride: int) -> int:
    """Patches of a series padded by ``stride`` at the end: (seq_len - patch_len)//stride + 2."""
    return (seq_len - patch_len) // stride + 2


class Patching(nn.Module):
    """[M, L] -> [M, P, patch_len]: repeat the last value ``stride`` times, then slide a window.

    The padding gives the most recent values a patch of their own (PatchTST, Nie et al. 2023).
    """

    def __init__(self, patch_len: int, stride: int):
        super().__init__()
        self.patch_len, self.stride = patch_len, stride
        self.pad = nn.ReplicationPad1d((0, stride))

    def forward(self, x: Tensor) -> Tensor:
        return self.pad(x).unfold(-1, self.patch_len, self.stride)


class PatchEmbedding(nn.Module):
    """[M, P, patch_len] -> [M, P, d_model]: a circular Conv1d (kernel 3) along the patches.

    Each patch's values are the input channels of the convolution, so a patch token also
    sees its two neighbours.
    """

    def __init__(self, patch_len: int, d_model: int, dropout: float):
        super().__init__()
        self.conv = nn.Conv1d(
            patch_len, d_model, kernel_size=3, padding=1, padding_mode="circular", bias=False
        )
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_in", nonlinearity="leaky_relu")
        self.dropout = nn.Dropout(dropout)

    def forward(self, patches: Tensor) -> Tensor:
        return self.dropout(self.conv(patches.transpose(1, 2)).transpose(1, 2))


class TextPrototypes(nn.Module):
    """Frozen word embeddings [vocab, llm_dim] -> ``num_tokens`` learned mixtures [S, llm_dim].

    Reprogramming attends over a few text prototypes instead of the whole vocabulary; each
    prototype is a learned linear combination of the word embeddings.
    """

    def __init__(self, vocab_size: int, num_tokens: int):
        super().__init__()
        self.mapping = nn.Linear(vocab_size, num_tokens)

    def forward(self, word_embeddings: Tensor) -> Tensor:
        return self.mapping(word_embeddings.t()).t()


class ReprogrammingLayer(nn.Module):
    """Cross-attention of patch tokens (queries) over the text prototypes (keys and values).

    Turns each patch into a mixture of text prototypes, i.e. a vector in the LLM's input
    space. ``d_keys`` per head (Time-LLM uses d_ff), output projected to ``llm_dim``.
    """

    def __init__(
        self, d_model: int, n_heads: int, d_keys: int, llm_dim: int, dropout: float
    ) -> None:
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.query = nn.Linear(d_model, d_keys * n_heads)
        self.key = nn.Linear(llm_dim, d_keys * n_heads)
        self.value = nn.Linear(llm_dim, d_keys * n_heads)
        self.out = nn.Linear(d_keys * n_heads, llm_dim)

    def forward(self, patches: Tensor, prototypes: Tensor) -> Tensor:
        """patches [M, P, d_model], prototypes [S, llm_dim] -> [M, P, llm_dim]."""
        m, p, _ = patches.shape
        h = self.n_heads
        # The keys are the same for every series, so the series fold into the query axis:
        # one attention of M*P queries per head, without M copies of the keys.
        q = self.query(patches).reshape(m * p, h, -1).transpose(0, 1)  # [H, M*P, E]
        k = self.key(prototypes).reshape(-1, h, q.shape[-1]).transpose(0, 1)  # [H, S, E]
        v = self.value(prototypes).reshape(-1, h, q.shape[-1]).transpose(0, 1)
        attended = F.scaled_dot_product_attention(
            q,
            k,
            v,
            dropout_p=self.dropout if self.training else 0.0,
            scale=1 / math.sqrt(q.shape[-1]),
        )
        return self.out(attended.transpose(0, 1).reshape(m, p, -1))


class FlattenHead(nn.Module):
    """[M, P, d_ff] -> [M, pred_len]: flatten features x patches, one linear map, dropout."""

    def __init__(self, d_ff: int, n_patch: int, pred_len: int, dropout: float):
        super().__init__()
        self.linear = nn.Linear(d_ff * n_patch, pred_len)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: Tensor) -> Tensor:
        # feature-major flattening, as in the published head (input [.., d_ff, P])
        return self.dropout(self.linear(hidden.transpose(1, 2).flatten(1)))


# ------------------------------------------------- stand-ins for the LLM (Tan et al., 2024)


class AttentionStandIn(nn.Module):
    """LLM2Attn: one randomly initialised, trainable multi-head self-attention layer
    (with residual and LayerNorm) in place of the frozen language model.

    Same interface as ``Backbone.encode``: embeddings [M, T, width] and attention mask
    [M, T] (0 = padding) -> hidden states [M, T, width]. Attention is bidirectional and there
    are no position embeddings, as in the ablation of Tan et al. (NeurIPS 2024).
    """

    def __init__(self, width: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(width, n_heads, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(width)

    def forward(self, embeds: Tensor, mask: Tensor) -> Tensor:
        padding = mask == 0
        attended, _ = self.attention(
            embeds, embeds, embeds, key_padding_mask=padding, need_weights=False
        )
        return self.norm(embeds + self.dropout(attended))


class TransformerStandIn(nn.Module):
    """LLM2Trsf: one randomly initialised, trainable Transformer encoder block (attention and
    a 4x-wide GELU MLP, post-norm) in place of the frozen language model.

    Same interface as :class:`AttentionStandIn`.
    """

    def __init__(self, width: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.block = nn.TransformerEncoderLayer(
            width, n_heads, 4 * width, dropout, activation="gelu", batch_first=True
        )

    def forward(self, embeds: Tensor, mask: Tensor) -> Tensor:
        return self.block(embeds, src_key_padding_mask=mask == 0)


def moving_average(x: Tensor, kernel: int) -> Tensor:
    """Centred moving average over the last dimension of ``x [R, C, T]``; the ends repeat the
    first and last values so the length stays T (the DLinear paper's padding)."""
    if kernel == 1:
        return x
    padded = F.pad(x, ((kernel - 1) // 2, kernel // 2), mode="replicate")
    return F.avg_pool1d(padded, kernel, stride=1)
