"""The published Time-LLM model, run on the anchor configuration beside the workbench.

``benchmarks/step_time.py --published-src DIR`` adds the mode ``published-code``: the model
class of a checkout of https://github.com/KimMeen/Time-LLM (``models/TimeLLM.py`` with its
``layers/``), imported from DIR and run unchanged, with three redirections that only make
it run offline on the anchor (none changes what it computes):

- its BERT branch loads ``google-bert/bert-base-uncased`` from the hub; here the config,
  weights and tokenizer come from the packaged MiniLM (a BERT of 6 layers, 384 wide);
- its forward casts the series to bfloat16 before the patch embedding (the published runs
  use bf16 mixed precision); the fp32 anchor casts that input back to float32;
- its training loop's optimizer is plain ``torch.optim.Adam`` over the trainable parameters,
  with the whole model (frozen LM included) in train mode, as ``run_main.py`` does.

No code of that repository is part of this one: DIR is a checkout the user makes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
import transformers
from torch import nn

from timellm_lib.config import Config
from timellm_lib.models.backbones import load_backbone, minilm_dir

HUB_NAME = "google-bert/bert-base-uncased"


def build_published_step(
    src: str | Path, cfg: Config, n_channels: int
) -> tuple[nn.Module, Callable[[], float]]:
    """The published model of the checkout ``src``, built with the sizes of ``cfg`` (the
    workbench's anchor config, MiniLM backbone) in train mode, and one training step of it
    (forward, MSE, backward, plain Adam) on a fixed random batch."""
    model_cls = _import_model_class(Path(src))
    m, d = cfg.model, cfg.data
    minilm = load_backbone("minilm", m.llm_layers)
    configs = SimpleNamespace(  # the argparse namespace of the published run_main.py
        task_name="long_term_forecast",
        pred_len=d.pred_len,
        seq_len=d.seq_len,
        d_ff=m.d_ff,
        llm_dim=minilm.llm_dim,
        patch_len=m.patch_len,
        stride=m.stride,
        llm_model="BERT",
        llm_layers=minilm.n_layers,
        prompt_domain=False,  # its built-in ETT description
        content="",
        dropout=m.dropout,
        d_model=m.d_model,
        n_heads=m.n_heads,
        enc_in=n_channels,
    )
    batch, seq_len, pred_len = d.batch_size, d.seq_len, d.pred_len
    torch.manual_seed(0)
    with _hub_name_is_minilm():
        model = model_cls(configs)
    _feed_patch_embedding_fp32(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    x = torch.randn(batch, seq_len, n_channels)
    y = torch.randn(batch, pred_len, n_channels)
    x_mark = torch.zeros(batch, seq_len, 4)
    y_mark = torch.zeros(batch, pred_len, 4)

    def step() -> float:
        out = model(x, x_mark, y, y_mark)
        loss = F.mse_loss(out, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return model, step


def llm_input_shape(model: nn.Module, batch: int, seq_len: int, n_channels: int) -> torch.Size:
    """(rows, positions, width) of what one forward feeds the published model's LM."""
    seen: list[torch.Size] = []

    def hook(_module: nn.Module, _args: tuple, kwargs: dict) -> None:
        seen.append(kwargs["inputs_embeds"].shape)

    handle = model.llm_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            x = torch.randn(batch, seq_len, n_channels)
            model(x, None, None, None)
    finally:
        handle.remove()
    return seen[0]


def _import_model_class(src: Path) -> type[nn.Module]:
    if not (src / "models" / "TimeLLM.py").is_file():
        raise SystemExit(
            f"--published-src {src}: no models/TimeLLM.py there; pass a checkout of "
            "https://github.com/KimMeen/Time-LLM"
        )
    sys.path.insert(0, str(src))  # its modules import each other as top-level packages
    from models.TimeLLM import Model

    return Model


@contextmanager
def _hub_name_is_minilm() -> Iterator[None]:
    """While the model is built, loading ``HUB_NAME`` loads the packaged MiniLM instead."""
    local = str(minilm_dir())
    classes = (transformers.BertConfig, transformers.BertModel, transformers.BertTokenizer)
    assert not any("from_pretrained" in vars(cls) for cls in classes)  # all inherit it

    def redirect(load: Callable) -> classmethod:
        def from_pretrained(_cls: type, name: str, *args: object, **kwargs: object) -> object:
            return load(local if name == HUB_NAME else name, *args, **kwargs)

        return classmethod(from_pretrained)

    for cls in classes:
        cls.from_pretrained = redirect(cls.from_pretrained)
    try:
        yield
    finally:
        for cls in classes:
            del cls.from_pretrained  # the inherited loader again


def _feed_patch_embedding_fp32(model: nn.Module) -> None:
    """Undo the published forward's bfloat16 cast of the patch-embedding input (fp32 anchor)."""
    embed = model.patch_embedding
    forward = embed.forward
    embed.forward = lambda x: forward(x.float())
