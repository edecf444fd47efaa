"""Prompt-as-prefix: per-series statistics of the input window, written into the text prompt.

The statistics are computed for the whole batch with tensor operations; only the final
string formatting loops over series. Two fixes over the published code: the lags exclude
lag 0 (always the largest autocorrelation) and the mirrored circular lags L-k (equal to lag
k), and the autocorrelation has the window's own length also when it is odd.
"""

from __future__ import annotations

import torch
from torch import Tensor

from timellm_lib.config import Config


@torch.no_grad()
def prompt_statistics(x_norm: Tensor, top_k_lags: int = 5) -> dict[str, Tensor]:
    """Statistics of each row of ``x_norm`` [M, L] (the normalised series).

    Returns ``min``, ``max``, ``median`` (the lower middle value for even L, as
    ``torch.median``), ``trend`` (sum of first differences; > 0 means upward), each [M], and
    ``lags`` [M, k] (long): the k = min(top_k_lags, L//2) lags in 1..L//2 with the largest
    circular autocorrelation, largest first.
    """
    length = x_norm.shape[-1]
    spectrum = torch.fft.rfft(x_norm, dim=-1)
    autocorr = torch.fft.irfft(spectrum * spectrum.conj(), n=length, dim=-1)
    k = min(top_k_lags, length // 2)
    lags = autocorr[:, 1 : length // 2 + 1].topk(k, dim=-1).indices + 1
    return {
        "min": x_norm.amin(dim=-1),
        "max": x_norm.amax(dim=-1),
        "median": x_norm.median(dim=-1).values,
        "trend": x_norm.diff(dim=-1).sum(dim=-1),
        "lags": lags,
    }


def build_prompts(stats: dict[str, Tensor], cfg: Config) -> list[str]:
    """One prompt per series, in the published Time-LLM wording.

    ``prompt_format: published`` prints each value as the published code does (``str`` of
    the float); ``compact`` keeps ``prompt_precision`` significant digits, which gives
    shorter token sequences and so a cheaper LLM pass.
    """
    m, d = cfg.model, cfg.data
    if m.prompt_format == "published":
        fmt = str
    else:
        digits = m.prompt_precision

        def fmt(value: float) -> str:
            return f"{value:.{digits}g}"

    head = (
        f"<|start_prompt|>Dataset description: {m.description}"
        f"Task description: forecast the next {d.pred_len} steps given the previous "
        f"{d.seq_len} steps information; Input statistics: "
    )
    columns = zip(
        stats["min"].tolist(),
        stats["max"].tolist(),
        stats["median"].tolist(),
        stats["trend"].tolist(),
        stats["lags"].tolist(),
        strict=True,
    )
    return [
        f"{head}min value {fmt(lo)}, max value {fmt(hi)}, median value {fmt(med)}, "
        f"the trend of input is {'upward' if trend > 0 else 'downward'}, "
        f"top {len(lags)} lags are : {lags}<|<end_prompt>|>"
        for lo, hi, med, trend, lags in columns
    ]
