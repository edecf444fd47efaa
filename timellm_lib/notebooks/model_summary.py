"""What a config builds: tensor shapes stage by stage and parameter counts per module.

Time-LLM trains a few small layers around a large frozen language model, so "how big is the
model" has two very different answers: the trainable parameters (what the optimizer updates
and checkpoints store) and the frozen backbone (loaded by name, never stored). The tables
here keep the two apart, per top-level module, and :class:`ShapeExplorer` redraws them (and
the shape trace of :mod:`timellm_lib.notebooks.tracing`) as sizes and module switches change.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch
from torch import nn

from timellm_lib.config import Config, load_config
from timellm_lib.errors import WorkbenchError
from timellm_lib.models import build_model
from timellm_lib.notebooks.tracing import trace_shapes, trend_classes

PARAMETER_COLUMNS = ["module", "type", "trainable", "frozen", "buffers", "in_checkpoint"]
SHAPE_COLUMNS = ["stage", "module", "shape", "note"]


def channel_counts(cfg: Config, n_channels: int) -> tuple[int, int]:
    """(n_in, n_out) for ``n_channels`` data columns: M maps all to all, MS all to the
    target, S the target to itself (the same rule as :func:`timellm_lib.notebooks.tracing.trace_shapes`)."""
    features = cfg.data.model_features
    return (1 if features == "S" else n_channels), (n_channels if features == "M" else 1)


def build_for_summary(cfg: Config, n_channels: int = 7) -> nn.Module:
    """The model of ``cfg`` for ``n_channels`` columns, initialised from seed 0 without
    touching the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_model(cfg, *channel_counts(cfg, n_channels))


def parameter_table(model: nn.Module) -> pd.DataFrame:
    """Parameters per top-level module: trainable, frozen, buffer elements, and whether the
    module is saved in checkpoints; then the frozen backbone (kept outside the module tree,
    so never saved) and a total row. Modules without tensors (taps, reshapes) are left out.
    """
    rows = []
    for name, module in model.named_children():
        params = list(module.parameters())
        buffers = sum(b.numel() for b in module.buffers())
        if not params and not buffers:
            continue
        trainable = sum(p.numel() for p in params if p.requires_grad)
        rows.append(
            {
                "module": name,
                "type": type(module).__name__,
                "trainable": trainable,
                "frozen": sum(p.numel() for p in params) - trainable,
                "buffers": buffers,
                "in_checkpoint": True,
            }
        )
    backbone = getattr(model, "backbone", None)
    if backbone is not None:
        rows.append(
            {
                "module": f"backbone: {backbone.name}",
                "type": f"{type(backbone.model).__name__} (frozen, {backbone.n_layers} layers)",
                "trainable": 0,
                "frozen": sum(p.numel() for p in backbone.model.parameters()),
                "buffers": sum(b.numel() for b in backbone.model.buffers()),
                "in_checkpoint": False,
            }
        )
    table = pd.DataFrame(rows, columns=PARAMETER_COLUMNS)
    total = {
        "module": "total",
        "type": "",
        **{c: int(table[c].sum()) for c in ("trainable", "frozen", "buffers")},
        "in_checkpoint": "",
    }
    return pd.concat([table, pd.DataFrame([total])], ignore_index=True)


def shape_table(cfg: Config, batch_size: int = 32, n_channels: int = 7) -> pd.DataFrame:
    """The stage-by-stage trace of one real forward pass as a table (shapes as text)."""
    rows = trace_shapes(cfg, batch_size=batch_size, n_channels=n_channels)
    table = pd.DataFrame(rows, columns=SHAPE_COLUMNS)
    table["shape"] = table["shape"].map(lambda s: "[" + ", ".join(map(str, s)) + "]")
    return table


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    """A validated copy of ``cfg`` with dotted ``overrides`` applied."""
    return load_config(extra=cfg.to_dict(), overrides=overrides)


class ShapeExplorer:
    """Sliders for batch, seq_len, pred_len and channels and switches for TAPR, GRA-M and the
    LLM ablation; the shape and parameter tables under them redraw on every change.

    The tables are shown through display handles (not inside an Output widget), so their
    first drawing is an ordinary cell output that papermill keeps. Use ``.show()``.
    """

    def __init__(self, cfg: Config, batch_size: int = 32, n_channels: int = 7) -> None:
        import ipywidgets as widgets

        self.cfg = cfg
        d, m = cfg.data, cfg.model
        style = {"description_width": "initial"}
        self.batch = widgets.BoundedIntText(batch_size, min=1, max=4096, description="batch")
        self.seq_len = widgets.BoundedIntText(d.seq_len, min=1, max=8192, description="seq_len")
        self.pred_len = widgets.BoundedIntText(d.pred_len, min=1, max=4096, description="pred_len")
        self.channels = widgets.BoundedIntText(n_channels, min=1, max=512, description="channels")
        self.use_tapr = widgets.Checkbox(m.use_tapr, description="use_tapr", style=style)
        self.use_gram = widgets.Checkbox(m.use_gram, description="use_gram", style=style)
        self.llm_ablation = widgets.Dropdown(
            options=["none", "no_llm", "llm2attn", "llm2trsf"],
            value=m.llm_ablation,
            description="llm_ablation",
            style=style,
        )
        self.inputs = [
            self.batch,
            self.seq_len,
            self.pred_len,
            self.channels,
            self.use_tapr,
            self.use_gram,
            self.llm_ablation,
        ]
        self.controls = widgets.VBox(
            [
                widgets.HBox([self.batch, self.seq_len, self.pred_len, self.channels]),
                widgets.HBox([self.use_tapr, self.use_gram, self.llm_ablation]),
            ]
        )
        self._handles: list[Any] = []

    def current_config(self) -> Config:
        return with_overrides(
            self.cfg,
            [
                f"data.seq_len={self.seq_len.value}",
                f"data.pred_len={self.pred_len.value}",
                f"model.use_tapr={str(self.use_tapr.value).lower()}",
                f"model.use_gram={str(self.use_gram.value).lower()}",
                f"model.llm_ablation={self.llm_ablation.value}",
            ],
        )

    def tables(self) -> list[Any]:
        """The shape table and the parameter table, or one message saying what is wrong with
        the chosen settings (e.g. seq_len shorter than patch_len) and a blank second slot."""
        try:
            cfg = self.current_config()
            shapes = shape_table(cfg, self.batch.value, self.channels.value)
            params = parameter_table(build_for_summary(cfg, self.channels.value))
        except (WorkbenchError, ValueError) as err:
            return [f"these settings cannot be built: {err}", ""]
        return [shapes, params]

    def show(self) -> None:
        from IPython.display import display

        display(self.controls)
        self._handles = [display(table, display_id=True) for table in self.tables()]
        for widget in self.inputs:
            widget.observe(self.redraw, "value")

    def redraw(self, _change: Any = None) -> None:
        for handle, table in zip(self._handles, self.tables(), strict=True):
            handle.update(table)


def trend_class_table(cfg: Config) -> pd.DataFrame:
    """TAPR's trend classes on the training split: one row per class with its share of the
    training series under the thresholds training starts from (empty when TAPR is off)."""
    if not cfg.model.use_tapr:
        return pd.DataFrame(columns=["head", "class", "share", "thresholds"])
    classes = trend_classes(cfg)
    thresholds = f"{classes['source']}: " + ", ".join(f"{t:.3g}" for t in classes["thresholds"])
    return pd.DataFrame(
        [
            {"head": head, "class": name, "share": round(share, 4), "thresholds": thresholds}
            for head in ("direction", "magnitude")
            for name, share in classes[head].items()
        ]
    )
