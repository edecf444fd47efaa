"""Time-LLM (Jin et al., ICLR 2024): forecasting by reprogramming a frozen language model.

Per series: instance-normalise, patch, embed, reprogram the patch tokens onto text prototypes
(so they live in the LLM's input space), prefix a prompt with the input statistics, run the
frozen LLM and map the patch positions' hidden states to the forecast; only the embedding,
prototype mapping, reprogramming and head (for MS also a channel mix) are trained. The
README's Models table lists where this differs from the published code and why none of it
changes the method; work the published code repeats per series is done once (the README's
Performance section). ``model.llm_ablation`` (Tan et al., NeurIPS 2024) replaces the LLM body
by one trainable attention layer or Transformer block (``llm2attn``/``llm2trsf``, all else
unchanged, so the comparison isolates the body) or drops LLM, reprogramming and prompt
(``no_llm``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from timellm_lib.config import ConfigError, check_llm_dim
from timellm_lib.models.backbones import Backbone, load_backbone
from timellm_lib.models.layers import (
    AttentionStandIn,
    FlattenHead,
    PatchEmbedding,
    Patching,
    ReprogrammingLayer,
    RevIN,
    Tap,
    TextPrototypes,
    TransformerStandIn,
    channel_rows,
    n_patches,
    rows_to_channels,
)
from timellm_lib.models.output import Forecast
from timellm_lib.models.params import TimeLLMParams
from timellm_lib.models.prompt import (
    PromptIds,
    PromptTokenizer,
    prompt_head,
    prompt_statistics,
    prompt_tails,
)
from timellm_lib.models.protocol import TrainingHooks

log = logging.getLogger(__name__)


class TimeLLM(TrainingHooks, nn.Module):
    """Baseline Time-LLM for ``n_in`` input and ``n_out`` output channels.

    Features M and S forecast every input channel independently (n_in == n_out). MS forecasts
    all ``n_in`` channels the same way, then a learned ``Linear(n_in -> 1)``, initialised to
    pick the target channel, mixes them into the target. The target is input column
    ``target_index``: by default the last one, as OT in the ETT files; pass its index when
    the target column comes elsewhere in the input.

    The forward pass is split into stages that subclasses reuse (the enhanced model in
    :mod:`timellm_lib.models.enhanced` puts TAPR and GRA-M between them):
    :meth:`embed_patches`, :meth:`decode` (reprogramming, prompt, LLM, head) and
    :meth:`to_channels`. ``n_prefix`` is the number of extra tokens a subclass passes to
    :meth:`decode`; it only sizes the head when there is no LLM (``no_llm``), where the head
    reads those tokens together with the patches.
    """

    def __init__(
        self, hp: TimeLLMParams, n_in: int, n_out: int, target_index: int = -1, n_prefix: int = 0
    ) -> None:
        super().__init__()
        d = hp.window
        _check_channels(d.features, n_in, n_out)
        self.hp = hp
        self.n_in, self.n_out = n_in, n_out
        self.target_index = target_index % n_in
        self.n_patch = n_patches(d.seq_len, hp.patch_len, hp.stride)
        # A plain attribute, not a submodule: see timellm_lib.models.backbones for why sharing is safe.
        self.backbone: Backbone | None = None
        if hp.llm_ablation != "no_llm":
            self.backbone = load_backbone(hp.backbone, hp.llm_layers, hp.backbone_dropout)
            check_llm_dim(hp.d_ff, hp.backbone, self.backbone.llm_dim)
            _warn_unavailable_speed_paths(self.backbone, self.speed_paths())
        # width of the tokens decode() reads: the LLM's, or d_model without an LLM
        self.token_dim = hp.d_model if self.backbone is None else self.backbone.llm_dim

        self.normalize = RevIN()
        self.channel_independence = Tap()
        self.patching = Patching(hp.patch_len, hp.stride)
        self.patch_embedding = PatchEmbedding(hp.patch_len, hp.d_model, hp.dropout)
        self.llm_standin: nn.Module | None = None
        if self.backbone is None:
            self.head = FlattenHead(hp.d_model, n_prefix + self.n_patch, d.pred_len, hp.dropout)
        else:
            vocab = self.backbone.word_embeddings.shape[0]
            self.text_prototypes = TextPrototypes(vocab, hp.num_tokens)
            self.reprogramming = ReprogrammingLayer(
                hp.d_model, hp.n_heads, hp.d_ff, self.token_dim, hp.dropout
            )
            ramp = torch.linspace(-1.0, 1.0, d.seq_len).unsqueeze(0)  # any series will do
            stats = prompt_statistics(ramp, hp.prompt.top_k_lags, hp.prompt.lags)
            self.prompt_tokenizer = PromptTokenizer(
                self.backbone.tokenizer,
                prompt_head(hp.prompt),
                prompt_tails(stats, hp.prompt)[0],
                self.backbone.own_padding_side,
            )
            self.prompt_embedding = Tap()
            self.llm_input = Tap()
            if hp.llm_ablation in ("llm2attn", "llm2trsf"):
                self.llm_standin = _standin(hp.llm_ablation, self.token_dim, hp.n_heads, hp.dropout)
            self.llm_output = Tap()
            self.llm_features = Tap()
            self.head = FlattenHead(hp.d_ff, self.n_patch, d.pred_len, hp.dropout)
        if d.features == "MS":
            self.channel_mixing = nn.Linear(n_in, 1)
            with torch.no_grad():
                self.channel_mixing.weight.zero_()
                self.channel_mixing.weight[0, self.target_index] = 1.0
                self.channel_mixing.bias.zero_()

    def speed_paths(self) -> dict[str, str]:
        """Each exact speed switch of the config -> ``on``, ``off (config)`` or why the
        backbone cannot use it (see :meth:`Backbone.speed_path`); shown by ``timellm trace``."""
        hp, b = self.hp, self.backbone
        asked = {
            "model.prefix_cache": hp.prefix_cache,
            "model.last_layer_patches_only": hp.last_layer_patches_only,
        }
        paths = {}
        for path, wanted in asked.items():
            if not wanted:
                paths[path] = "off (config)"
            elif path == "model.prefix_cache" and hp.prompt.padding == "published":
                paths[path] = (
                    "not applicable: model.prompt_padding = published (pad tokens are attended "
                    "where the tokenizer puts them; the cached head needs masked left padding)"
                )
            elif b is None or hp.llm_ablation != "none":
                paths[path] = f"not applicable: model.llm_ablation = {hp.llm_ablation}"
            else:
                status = b.speed_path(path)
                paths[path] = "on" if status == "available" else status
        return paths

    @property
    def backbone_fingerprint(self) -> str | None:
        return None if self.backbone is None else self.backbone.fingerprint

    # ------------------------------------------------------------------ module plumbing

    def _apply(self, fn: Callable, recurse: bool = True) -> TimeLLM:
        """``.to()``, ``.cuda()``, ``.double()`` also move the frozen LLM kept outside the tree."""
        super()._apply(fn, recurse)
        if self.backbone is not None:
            self.backbone.model._apply(fn, recurse)
        return self

    def train(self, mode: bool = True) -> TimeLLM:
        """The frozen LLM stays in eval mode unless ``model.backbone_dropout``."""
        super().train(mode)
        if self.backbone is not None:
            self.backbone.model.train(mode and self.hp.backbone_dropout)
        return self

    # --------------------------------------------------------------------------- forward

    def forward(self, x: Tensor, y: Tensor | None = None) -> Forecast:
        """x [B, seq_len, n_in] -> Forecast(pred [B, pred_len, n_out]); ``y`` is not used."""
        self._check_input(x)
        x_norm, mean, std = self.normalize(x)
        series = self.channel_series(x_norm)
        rows = self.decode(series, self.embed_patches(series))
        pred, mean, std = self.to_channels(rows, x.shape[0], mean, std)
        return Forecast(pred=RevIN.denormalize(pred, mean, std))

    def channel_series(self, x_norm: Tensor) -> Tensor:
        """Channel independence: normalised input [B, L, N] -> one series per row [B*N, L]."""
        return self.channel_independence(channel_rows(x_norm).unsqueeze(-1)).squeeze(-1)

    def embed_patches(self, series: Tensor) -> Tensor:
        """[B*N, L] -> patch tokens [B*N, P, d_model]."""
        return self.patch_embedding(self.patching(series))

    def decode(self, series: Tensor, tokens: Tensor, prefix: Tensor | None = None) -> Tensor:
        """Patch tokens [B*N, P, d_model] -> normalised forecast rows [B*N, pred_len].

        ``series`` [B*N, L] gives the prompt statistics; ``prefix`` [B*N, K, token_dim] are
        extra tokens put before the prompt (see :meth:`llm_inputs`). Without an LLM
        (``no_llm``) the head reads ``[prefix ; tokens]`` directly.
        """
        if self.backbone is None:
            return self.head(tokens if prefix is None else torch.cat([prefix, tokens], dim=1))
        prototypes = self.text_prototypes(self.backbone.word_embeddings)
        patches = self.reprogramming(tokens, prototypes)  # [B*N, P, llm_dim]
        p = self.hp.prompt
        tails = prompt_tails(prompt_statistics(series, p.top_k_lags, p.lags), p)
        if p.padding == "published":
            prompts = self.prompt_tokenizer.unmasked(tails)
        else:
            prompts = self.prompt_tokenizer(tails)
        if self.caches_prefix(prefix):
            hidden = self._encode_after_cached_head(prompts, patches)
        else:
            embeds, mask = self.llm_inputs(prompts, patches, prefix)
            hidden = self.llm_output(self.language_model(embeds, mask))
        return self.head(self.llm_features(hidden[:, -self.n_patch :, : self.hp.d_ff]))

    def to_channels(
        self, rows: Tensor, batch_size: int, mean: Tensor, std: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Rows [B*N, H] -> normalised forecast [B, H, n_out] and the RevIN statistics of the
        output channels (MS: the learned channel mix, with the target's statistics)."""
        pred = rows_to_channels(rows, batch_size)
        if hasattr(self, "channel_mixing"):
            t = self.target_index
            return self.channel_mixing(pred), mean[..., t : t + 1], std[..., t : t + 1]
        return pred, mean, std

    def llm_inputs(
        self, prompts: list[str] | PromptIds, patches: Tensor, prefix: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """[prefix ; prompt ; patches] embeddings [M, K+T+P, llm_dim] and attention mask.

        Prompts are padded on the left, so the patches are the last P positions of every
        row whatever the prompt lengths; padded positions are masked out. The ``prefix``
        tokens [M, K, llm_dim] go right after the padding: ``[pad..., prefix, prompt,
        patches]``. Positions are derived from the mask (``Backbone.encode``), so the first
        prefix token is position 0 in every row, padded or not. ``prompts`` are the ids of
        :attr:`prompt_tokenizer` or whole prompt texts (tokenised here). Under
        ``model.prompt_padding = published`` the ids come padded as the published code pads
        them, with a mask of ones: ``[prefix, prompt and pads, patches]``, pads attended.
        """
        if not isinstance(prompts, PromptIds):
            prompts = self.prompt_tokenizer.whole(prompts)
        ids, mask = (t.to(patches.device) for t in prompts.padded())
        words = self.prompt_embedding(self.backbone.word_embeddings[ids]).to(patches.dtype)
        if prefix is not None:
            # [prefix ; pad ; prompt] -> [pad ; prefix ; prompt]: a stable sort of the mask
            # moves each row's padding to the front and keeps the order of everything else.
            words = torch.cat([prefix.to(patches.dtype), words], dim=1)
            mask, order = torch.cat([mask.new_ones(prefix.shape[:2]), mask], 1).sort(stable=True)
            words = words.gather(1, order.unsqueeze(-1).expand_as(words))
        embeds = self.llm_input(torch.cat([words, patches], dim=1))
        return embeds, torch.cat([mask, mask.new_ones(patches.shape[:2])], dim=1)

    def language_model(self, embeds: Tensor, mask: Tensor) -> Tensor:
        """The frozen LLM (or its trainable stand-in): [M, T, llm_dim] -> [M, T, llm_dim]."""
        if self.llm_standin is not None:
            return self.llm_standin(embeds, mask)
        self._check_positions(embeds.shape[1])
        keep = self.n_patch if self.keeps_patches_only() else None
        return self.backbone.encode(embeds, mask, keep_last=keep)

    def keeps_patches_only(self) -> bool:
        """Whether the LLM's final layer runs for the patch positions alone
        (``model.last_layer_patches_only``): only they reach the head, so this is exact."""
        b = self.backbone
        return (
            self.hp.last_layer_patches_only
            and self.llm_standin is None
            and b is not None
            and b.last_layer is not None
        )

    def caches_prefix(self, prefix: Tensor | None) -> bool:
        """Whether the prompt head runs once per batch from a key/value cache
        (``model.prefix_cache``): exact, so used whenever possible. That needs a causal LLM
        (the head never attends to what follows it), no stand-in, no extra tokens before
        the head (TAPR/GRA-M put theirs there), a tokeniser that splits head and tail, and
        the LLM in eval mode (with its dropout on, every row draws its own head), and
        masked prompt padding (published padding attends pad tokens wherever the tokenizer
        puts them, before the head with left padding)."""
        b = self.backbone
        return (
            self.hp.prefix_cache
            and self.hp.prompt.padding == "masked"
            and prefix is None
            and self.llm_standin is None
            and b.can_cache_prefix
            and not b.model.training
            and self.prompt_tokenizer.splits
        )

    def _encode_after_cached_head(self, prompts: PromptIds, patches: Tensor) -> Tensor:
        """The LLM output [M, S+P, llm_dim] of ``[tail ; patches]`` after the prompt head.

        Equals the last S+P positions of the uncached ``[pad ; head ; tail ; patches]``
        (within float rounding): with causal attention and mask-derived positions, moving
        the padding behind the head changes nothing, and the head's keys and values are the
        same in every row, so they are computed once (one row of H tokens instead of M).
        """
        table = self.backbone.word_embeddings
        device, dtype = patches.device, patches.dtype
        head = table[prompts.head.to(device)].to(dtype)  # [H, llm_dim]
        words = self.prompt_embedding(table[prompts.tail.to(device)].to(dtype))
        embeds = self.llm_input(torch.cat([words, patches], dim=1))
        mask = prompts.tail_mask.to(device)
        mask = torch.cat([mask, mask.new_ones(patches.shape[:2])], dim=1)
        self._check_positions(head.shape[0] + embeds.shape[1])
        return self.llm_output(self.backbone.encode(embeds, mask, shared_prefix=head))

    def _check_positions(self, positions: int) -> None:
        limit = self.backbone.max_positions
        if limit is not None and positions > limit:
            prompt = positions - self.n_patch
            raise ValueError(
                f"the LLM input has {positions} positions ({prompt} prompt and prefix "
                f"tokens + {self.n_patch} patches) but backbone {self.backbone.name!r} takes "
                f"at most {limit}; lower data.seq_len, raise model.stride, use "
                "model.prompt_format=compact or shorten model.description"
            )

    def _check_input(self, x: Tensor) -> None:
        """Every input channel, or (features M and S, where each channel is forecast on its
        own) a single channel: the samples of ``data.sample_unit = channel``."""
        expected = (self.hp.window.seq_len, self.n_in)
        single = self.n_in == self.n_out and x.dim() == 3 and x.shape[2] == 1
        if x.dim() != 3 or (tuple(x.shape[1:]) != expected and not single):
            raise ValueError(
                f"TimeLLM expects input [batch, seq_len={expected[0]}, channels={expected[1]}], "
                f"got {list(x.shape)}; check data.seq_len and the number of input columns"
            )


_warned: set[tuple[str, str]] = set()


def _warn_unavailable_speed_paths(backbone: Backbone, paths: dict[str, str]) -> None:
    """Log once per process and backbone each speed path the config asks for that this
    backbone cannot give, so a slower run never goes unexplained."""
    for path, status in paths.items():
        if status.startswith("unavailable") and (backbone.name, path) not in _warned:
            _warned.add((backbone.name, path))
            log.warning(
                "%s is on but backbone %r cannot use it (%s); the run is exact but slower. "
                "Set %s=false to silence this, or use a transformers version that allows it",
                path,
                backbone.name,
                status.removeprefix("unavailable: "),
                path,
            )


def _standin(kind: str, width: int, n_heads: int, dropout: float) -> nn.Module:
    if width % n_heads:
        raise ConfigError(
            f"model.llm_ablation = {kind} needs llm_dim = {width} divisible by model.n_heads = "
            f"{n_heads}; choose n_heads dividing {width}"
        )
    cls = AttentionStandIn if kind == "llm2attn" else TransformerStandIn
    return cls(width, n_heads, dropout)


def _check_channels(features: str, n_in: int, n_out: int) -> None:
    if n_in < 1 or n_out < 1:
        raise ConfigError(f"n_in = {n_in} and n_out = {n_out} must be at least 1")
    if features == "S" and (n_in, n_out) != (1, 1):
        raise ConfigError(f"data.features = S maps 1 channel to 1, got n_in={n_in}, n_out={n_out}")
    if features == "M" and n_in != n_out:
        raise ConfigError(
            f"data.features = M forecasts every input channel, got n_in={n_in} != n_out={n_out}; "
            "use data.features=MS to forecast one target from several inputs"
        )
    if features == "MS" and n_out != 1:
        raise ConfigError(f"data.features = MS forecasts one target, got n_out = {n_out}")
