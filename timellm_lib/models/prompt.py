"""Prompt-as-prefix: per-series statistics of the input window, written into the text prompt.

The statistics are computed for the whole batch with tensor operations; only the final
string formatting loops over series. Two fixes over the published code (``model.prompt_lags
= distinct``, the default; ``published`` restores its rule): the lags exclude lag 0 (always
the largest autocorrelation) and the mirrored circular lags L-k (equal to lag k), and the
autocorrelation has the window's own length also when it is odd.

A prompt is a constant head (dataset and task, :func:`prompt_head`) and a per-series tail
(the statistics, :func:`prompt_tails`). :class:`PromptTokenizer` tokenises the head once and
each batch only the tails, giving exactly the ids of tokenising the whole texts; a causal
language model can then run the head once per batch and share its key/value cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from timellm_lib.models.params import PromptParams


@torch.no_grad()
def prompt_statistics(
    x_norm: Tensor, top_k_lags: int = 5, lags: str = "distinct"
) -> dict[str, Tensor]:
    """Statistics of each row of ``x_norm`` [M, L] (the normalised series).

    Returns ``min``, ``max``, ``median`` (the lower middle value for even L, as
    ``torch.median``), ``trend`` (sum of first differences; > 0 means upward), each [M], and
    ``lags`` [M, k] (long), largest circular autocorrelation first. ``lags = distinct``: the
    k = min(top_k_lags, L//2) lags in 1..L//2 of the autocorrelation of length L. ``lags =
    published``: the published rule, top-k over every index of ``irfft`` of the power
    spectrum at its default length (L, or L-1 for odd L), so lag 0 (always the largest) and
    the mirrored lags L-k (equal to lag k) take places of their own.
    """
    length = x_norm.shape[-1]
    spectrum = torch.fft.rfft(x_norm, dim=-1)
    power = spectrum * spectrum.conj()
    if lags == "published":
        autocorr = torch.fft.irfft(power, dim=-1)
        top = autocorr.topk(min(top_k_lags, autocorr.shape[-1]), dim=-1).indices
    else:
        autocorr = torch.fft.irfft(power, n=length, dim=-1)
        k = min(top_k_lags, length // 2)
        top = autocorr[:, 1 : length // 2 + 1].topk(k, dim=-1).indices + 1
    return {
        "min": x_norm.amin(dim=-1),
        "max": x_norm.amax(dim=-1),
        "median": x_norm.median(dim=-1).values,
        "trend": x_norm.diff(dim=-1).sum(dim=-1),
        "lags": top,
    }


def prompt_head(hp: PromptParams) -> str:
    """The part of every prompt that does not depend on the series: dataset and task.

    It ends before the space that starts the statistics, so that tokenisers which attach a
    space to the following word (byte-level BPE) split the prompt at the same place whether
    head and tail are tokenised together or apart.
    """
    return (
        f"<|start_prompt|>Dataset description: {hp.description}"
        f"Task description: forecast the next {hp.pred_len} steps given the previous "
        f"{hp.seq_len} steps information; Input statistics:"
    )


def prompt_tails(stats: dict[str, Tensor], hp: PromptParams) -> list[str]:
    """The per-series part of each prompt: the statistics of :func:`prompt_statistics`.

    ``prompt_format: published`` prints each value as the published code does (``str`` of
    the float); ``compact`` keeps ``prompt_precision`` significant digits, which gives
    shorter token sequences and so a cheaper LLM pass.
    """
    if hp.format == "published":
        fmt = str
    else:
        digits = hp.precision

        def fmt(value: float) -> str:
            return f"{value:.{digits}g}"

    columns = zip(
        stats["min"].tolist(),
        stats["max"].tolist(),
        stats["median"].tolist(),
        stats["trend"].tolist(),
        stats["lags"].tolist(),
        strict=True,
    )
    return [
        f" min value {fmt(lo)}, max value {fmt(hi)}, median value {fmt(med)}, "
        f"the trend of input is {'upward' if trend > 0 else 'downward'}, "
        f"top {len(lags)} lags are : {lags}<|<end_prompt>|>"
        for lo, hi, med, trend, lags in columns
    ]


@dataclass
class PromptIds:
    """Token ids of a batch of prompts: a ``head`` shared by every row, then per-row ids.

    ``head`` [H] holds the tokeniser's leading special tokens and the constant head text
    (empty when the tokeniser cannot split prompts, see :class:`PromptTokenizer`); ``tail``
    [M, S] the rest of each prompt including trailing special tokens, padded on the left;
    ``tail_mask`` [M, S] is 0 on that padding.
    """

    head: Tensor
    tail: Tensor
    tail_mask: Tensor

    def padded(self) -> tuple[Tensor, Tensor]:
        """Whole prompts ``[pad ; head ; tail]`` [M, H+S] and their mask: exactly what the
        tokeniser gives for the full texts with left padding."""
        rows = self.tail.shape[0]
        ids = torch.cat([self.head.expand(rows, -1), self.tail], dim=1)
        mask = torch.cat([self.tail_mask.new_ones(rows, self.head.numel()), self.tail_mask], 1)
        # [head ; pad ; tail] -> [pad ; head ; tail]: a stable sort of the mask moves each
        # row's padding to the front and keeps the order of everything else.
        mask, order = mask.sort(dim=1, stable=True)
        return ids.gather(1, order), mask


class PromptTokenizer:
    """Tokenises prompts whose head is the same for every series: the head once, at start.

    Each batch then only tokenises the short statistics tails. The split is checked once on
    a sample prompt: when ``tokenizer(head + tail)`` is not ``leading specials + ids(head) +
    ids(tail) + trailing specials`` (a tokeniser that merges across the boundary),
    ``splits`` is False and every call tokenises the whole texts (an empty ``head``).
    """

    def __init__(
        self, tokenizer: Any, head: str, sample_tail: str, own_padding_side: str = "right"
    ) -> None:
        self.tokenizer = tokenizer
        self.head_text = head
        self.own_padding_side = own_padding_side

        def plain(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        full = tokenizer(head + sample_tail)["input_ids"]
        head_ids, tail_ids = plain(head), plain(sample_tail)
        inner = head_ids + tail_ids
        start = _find(full, inner)
        self.splits = start is not None
        if self.splits:
            self.head = torch.tensor(full[:start] + head_ids, dtype=torch.long)
            self.suffix = full[start + len(inner) :]
        else:
            self.head = torch.zeros(0, dtype=torch.long)
            self.suffix = []

    def __deepcopy__(self, memo: dict) -> PromptTokenizer:
        return self  # never changes after __init__; a copied model shares the tokenizer

    def __call__(self, tails: list[str]) -> PromptIds:
        """Ids of the prompts ``head + tail`` for each tail."""
        if not self.splits:
            return self.whole([self.head_text + tail for tail in tails])
        rows = [
            ids + self.suffix
            for ids in self.tokenizer(tails, add_special_tokens=False)["input_ids"]
        ]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        tail = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        return PromptIds(self.head, tail, mask)

    def unmasked(self, tails: list[str]) -> PromptIds:
        """Ids of the prompts ``head + tail`` as the published code tokenises them
        (``model.prompt_padding = published``): whole texts, ``padding=True`` on the
        tokenizer's own side, with its eos as the pad token when it has one. It passes no
        attention mask to the LLM, so the mask is all ones: pad tokens are attended, and with
        right padding they sit between prompt and patches."""
        tok = self.tokenizer
        pad = tok.eos_token_id if tok.eos_token is not None else tok.pad_token_id
        rows = tok([self.head_text + tail for tail in tails])["input_ids"]
        width = max(len(r) for r in rows)
        if self.own_padding_side == "left":
            padded = [[pad] * (width - len(r)) + r for r in rows]
        else:
            padded = [r + [pad] * (width - len(r)) for r in rows]
        ids = torch.tensor(padded, dtype=torch.long)
        return PromptIds(torch.zeros(0, dtype=torch.long), ids, torch.ones_like(ids))

    def whole(self, prompts: list[str]) -> PromptIds:
        """Ids of whole prompt texts, tokenised as they are (the ``head`` is empty)."""
        encoded = self.tokenizer(prompts, return_tensors="pt", padding=True)
        return PromptIds(
            torch.zeros(0, dtype=torch.long), encoded["input_ids"], encoded["attention_mask"]
        )


def _find(sequence: list[int], part: list[int]) -> int | None:
    """Start of the first occurrence of ``part`` in ``sequence``, or None."""
    for start in range(len(sequence) - len(part) + 1):
        if sequence[start : start + len(part)] == part:
            return start
    return None
