"""Figures of runs, forecasts and ablations, each as matplotlib (static) and plotly (interactive).

The static figure is what batch outputs, PNG files and papermill-executed notebooks keep; the
plotly twin is for exploring in JupyterLab. Each pair draws the same prepared data
(:func:`loss_series`, :func:`summarize`, ...), so the two can never disagree.

Figures are made with pyplot and closed at once: closing keeps Jupyter's inline backend from
showing a figure a second time at the end of the cell, and long batch loops from piling up
open figures, while the returned Figure still displays and saves. No backend is forced:
matplotlib picks the inline backend in Jupyter and Agg on a machine without a display.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import cycle
from pathlib import Path
from typing import Any

import matplotlib.colors
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import plotly.graph_objects as go
from matplotlib.figure import Figure
from plotly.subplots import make_subplots

from timellm_lib.errors import WorkbenchError
from timellm_lib.notebooks.runs import (
    PathLike,
    best_updates,
    export_long_csv,
    load_metrics,
    run_label,
)

PALETTE = [matplotlib.colors.to_hex(c) for c in plt.get_cmap("tab10").colors]


def _subplots(*args: Any, **kwargs: Any) -> tuple[Figure, Any]:
    fig, axes = plt.subplots(*args, layout="constrained", **kwargs)
    plt.close(fig)  # see the module docstring
    return fig, axes


def _as_list(run_dirs: PathLike | Sequence[PathLike]) -> list[Path]:
    if isinstance(run_dirs, str | Path):
        return [Path(run_dirs)]
    return [Path(d) for d in run_dirs]


# ------------------------------------------------------------------------------ loss curves


@dataclass
class LossSeries:
    """What a loss-curve figure draws for one run (columns global_step plus the value)."""

    label: str
    train: pd.DataFrame  # loss, moving-averaged over `smooth` train events
    val: pd.DataFrame  # val_loss
    best: pd.DataFrame  # val_loss where EarlyStopping improved
    lr: pd.DataFrame  # lr


def loss_series(run_dirs: PathLike | Sequence[PathLike], smooth: int = 1) -> list[LossSeries]:
    if isinstance(smooth, bool) or not isinstance(smooth, int) or smooth < 1:
        raise WorkbenchError(f"smooth = {smooth!r} must be an integer >= 1 (1: no smoothing)")
    out = []
    for run_dir in _as_list(run_dirs):
        metrics = load_metrics(run_dir)
        train = metrics.loc[metrics["event"] == "train", ["global_step", "loss", "lr"]]
        val = metrics.loc[metrics["event"] == "val", ["global_step", "val_loss"]]
        out.append(
            LossSeries(
                label=run_label(run_dir),
                train=train.assign(loss=train["loss"].rolling(smooth, min_periods=1).mean()),
                val=val,
                best=best_updates(metrics)[["global_step", "val_loss"]],
                lr=train.dropna(subset=["lr"]),
            )
        )
    return out


def loss_curves_mpl(
    run_dirs: PathLike | Sequence[PathLike], smooth: int = 1, title: str | None = None
) -> Figure:
    """Train and val loss with stars where val improved (top), learning rate (bottom)."""
    fig, (ax_loss, ax_lr) = _subplots(2, 1, sharex=True, figsize=(9, 6), height_ratios=[3, 1])
    for color, s in zip(cycle(PALETTE), loss_series(run_dirs, smooth), strict=False):
        ax_loss.plot(s.train["global_step"], s.train["loss"], color=color, label=f"{s.label} train")
        ax_loss.plot(
            s.val["global_step"],
            s.val["val_loss"],
            "o--",
            ms=4,
            color=color,
            label=f"{s.label} val",
        )
        ax_loss.scatter(
            s.best["global_step"],
            s.best["val_loss"],
            marker="*",
            s=140,
            color=color,
            edgecolors="black",
            zorder=3,
            label=f"{s.label} best",
        )
        ax_lr.plot(s.lr["global_step"], s.lr["lr"], color=color, label=s.label)
    smoothing = f" (moving average of {smooth})" if smooth > 1 else ""
    ax_loss.set_ylabel(f"loss{smoothing}")
    ax_loss.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("global step")
    fig.suptitle(title or "loss curves")
    return fig


def loss_curves_plotly(
    run_dirs: PathLike | Sequence[PathLike], smooth: int = 1, title: str | None = None
) -> go.Figure:
    """Interactive twin of :func:`loss_curves_mpl`; each run is one legend group."""
    fig = make_subplots(
        rows=2, cols=1, shared_xaxes=True, row_heights=[0.75, 0.25], vertical_spacing=0.06
    )
    for color, s in zip(cycle(PALETTE), loss_series(run_dirs, smooth), strict=False):
        dashed = {"mode": "lines+markers", "line_dash": "dash"}
        star = {"mode": "markers", "marker": {"symbol": "star", "size": 13, "color": color}}
        for part, frame, column, row, style in [  # subplot row 1: losses, row 2: lr
            ("train", s.train, "loss", 1, {}),
            ("val", s.val, "val_loss", 1, dashed),
            ("best", s.best, "val_loss", 1, star),
            ("lr", s.lr, "lr", 2, {}),
        ]:
            fig.add_trace(
                go.Scatter(
                    x=frame["global_step"],
                    y=frame[column],
                    name=f"{s.label} {part}",
                    legendgroup=s.label,
                    line_color=color,
                    **style,
                ),
                row=row,
                col=1,
            )
    fig.update_yaxes(title_text="loss", row=1, col=1)
    fig.update_yaxes(title_text="lr", row=2, col=1)
    fig.update_xaxes(title_text="global step", row=2, col=1)
    fig.update_layout(title=title or "loss curves", height=550)
    return fig


# ---------------------------------------------------------------------------------- forecast


@dataclass
class ForecastData:
    history: np.ndarray  # (L, C)
    truth: np.ndarray | None  # (H, C)
    forecast: np.ndarray  # (H, C)
    channels: list[str]
    x_history: np.ndarray | pd.DatetimeIndex
    x_future: np.ndarray | pd.DatetimeIndex


def _forecast_data(
    history: Any,
    truth: Any,
    forecast: Any,
    channels: Sequence[str] | None,
    dates: Sequence[Any] | None,
) -> ForecastData:
    """Arrays as (time, channel); x is dates when given, else steps relative to the forecast."""

    def as_2d(name: str, values: Any) -> np.ndarray:
        array = np.asarray(values, dtype=float)
        array = array[:, None] if array.ndim == 1 else array
        if array.ndim != 2:
            raise WorkbenchError(f"{name} must be (time, channel) or (time,), got {array.shape}")
        return array

    history, forecast = as_2d("history", history), as_2d("forecast", forecast)
    truth = None if truth is None else as_2d("truth", truth)
    n_channels, horizon = history.shape[1], forecast.shape[0]
    for name, array in [("forecast", forecast), ("truth", truth)]:
        if array is not None and array.shape != (horizon, n_channels):
            raise WorkbenchError(
                f"{name} has shape {array.shape} but history has {n_channels} channel(s) and the "
                f"forecast {horizon} step(s); pass arrays of shape ({horizon}, {n_channels})"
            )
    channels = (
        list(channels) if channels is not None else [f"channel {i}" for i in range(n_channels)]
    )
    if len(channels) != n_channels:
        raise WorkbenchError(f"{len(channels)} channel names given for {n_channels} channel(s)")
    n_history = history.shape[0]
    if dates is None:
        x = np.arange(-n_history, horizon)
    else:
        x = pd.DatetimeIndex(pd.to_datetime(list(dates)))
        if len(x) != n_history + horizon:
            raise WorkbenchError(
                f"{len(x)} dates given; pass one per history and forecast step "
                f"({n_history} + {horizon})"
            )
    return ForecastData(history, truth, forecast, channels, x[:n_history], x[n_history:])


def forecast_mpl(
    history: Any,
    truth: Any,
    forecast: Any,
    channels: Sequence[str] | None = None,
    dates: Sequence[Any] | None = None,
    title: str | None = None,
) -> Figure:
    """One panel per channel: history, the true continuation (if known) and the forecast.

    Arrays are (time, channel) or 1-D for one channel; ``truth`` may be None.
    """
    d = _forecast_data(history, truth, forecast, channels, dates)
    fig, axes = _subplots(
        len(d.channels), 1, sharex=True, squeeze=False, figsize=(9, 1.0 + 2.0 * len(d.channels))
    )
    for i, (ax, name) in enumerate(zip(axes[:, 0], d.channels, strict=True)):
        ax.plot(d.x_history, d.history[:, i], color="0.45", label="history")
        if d.truth is not None:
            ax.plot(d.x_future, d.truth[:, i], color="black", label="truth")
        ax.plot(d.x_future, d.forecast[:, i], color=PALETTE[1], label="forecast")
        ax.axvline(d.x_future[0], color="0.7", ls=":")
        ax.set_ylabel(name)
    axes[0, 0].legend(fontsize="small", loc="upper left")
    fig.suptitle(title or "forecast")
    return fig


def forecast_plotly(
    history: Any,
    truth: Any,
    forecast: Any,
    channels: Sequence[str] | None = None,
    dates: Sequence[Any] | None = None,
    title: str | None = None,
) -> go.Figure:
    """Interactive twin of :func:`forecast_mpl`."""
    d = _forecast_data(history, truth, forecast, channels, dates)
    fig = make_subplots(rows=len(d.channels), cols=1, shared_xaxes=True, subplot_titles=d.channels)
    for i in range(len(d.channels)):
        parts = [
            ("history", d.x_history, d.history, "gray"),
            ("forecast", d.x_future, d.forecast, PALETTE[1]),
        ]
        if d.truth is not None:
            parts.insert(1, ("truth", d.x_future, d.truth, "black"))
        for name, x, values, color in parts:
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=values[:, i],
                    name=name,
                    line_color=color,
                    legendgroup=name,
                    showlegend=i == 0,
                ),
                row=i + 1,
                col=1,
            )
    fig.update_layout(title=title or "forecast", height=200 + 180 * len(d.channels))
    return fig


# ------------------------------------------------------------------ ablations and sensitivity


def summarize(df: pd.DataFrame, by: Sequence[str], metrics: Sequence[str]) -> pd.DataFrame:
    """Mean, std (0 for a single seed) and count of each metric per group, in first-seen order.

    Returns columns ``*by, metric, mean, std, n``.
    """
    missing = [c for c in [*by, *metrics] if c not in df.columns]
    if missing:
        raise WorkbenchError(
            f"the results table lacks column(s) {missing}; it has {list(df.columns)}; pass one "
            f"row per run with columns {[*by, *metrics]}"
        )
    long = df.melt(id_vars=list(by), value_vars=list(metrics), var_name="metric")
    stats = long.groupby([*by, "metric"], sort=False)["value"].agg(["mean", "std", "count"])
    stats = stats.rename(columns={"count": "n"}).reset_index()
    return stats.fillna({"std": 0.0})


def ablation_bars_mpl(
    df: pd.DataFrame,
    metrics: Sequence[str] = ("mse", "mae"),
    variant: str = "variant",
    title: str | None = None,
) -> Figure:
    """One panel per metric: a bar per variant at the mean over seeds, error bar ± std."""
    stats = summarize(df, [variant], metrics)
    fig, axes = _subplots(1, len(metrics), squeeze=False, figsize=(4.5 * len(metrics), 4))
    for ax, metric in zip(axes[0], metrics, strict=True):
        rows = stats[stats["metric"] == metric]
        ax.bar(rows[variant].astype(str), rows["mean"], yerr=rows["std"], capsize=4, color=PALETTE)
        ax.set_title(metric)
        ax.tick_params(axis="x", labelrotation=30)
    fig.suptitle(title or "ablation (mean ± std over seeds)")
    return fig


def ablation_bars_plotly(
    df: pd.DataFrame,
    metrics: Sequence[str] = ("mse", "mae"),
    variant: str = "variant",
    title: str | None = None,
) -> go.Figure:
    """Interactive twin of :func:`ablation_bars_mpl`."""
    stats = summarize(df, [variant], metrics)
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=list(metrics))
    for col, metric in enumerate(metrics, start=1):
        rows = stats[stats["metric"] == metric]
        fig.add_trace(
            go.Bar(
                x=rows[variant].astype(str),
                y=rows["mean"],
                name=metric,
                error_y={"type": "data", "array": rows["std"]},
                customdata=rows["n"],
                hovertemplate="%{x}: %{y:.4g} ± %{error_y.array:.2g} (n=%{customdata})",
            ),
            row=1,
            col=col,
        )
    fig.update_layout(title=title or "ablation (mean ± std over seeds)", showlegend=False)
    return fig


def _sensitivity_groups(
    df: pd.DataFrame, param: str, metric: str, group: str | None
) -> list[tuple[str, pd.DataFrame]]:
    """(name, rows sorted by the parameter) per group; one unnamed group without ``group``."""
    by = [group, param] if group else [param]
    stats = summarize(df, by, [metric])
    if not group:
        return [(metric, stats.sort_values(param))]
    return [(str(name), rows.sort_values(param)) for name, rows in stats.groupby(group, sort=False)]


def sensitivity_mpl(
    df: pd.DataFrame,
    param: str,
    metric: str = "mse",
    group: str | None = None,
    title: str | None = None,
) -> Figure:
    """Metric against a parameter: mean over seeds as a line, ± std as a band, per group."""
    fig, ax = _subplots(figsize=(7, 4))
    for color, (name, rows) in zip(
        cycle(PALETTE), _sensitivity_groups(df, param, metric, group), strict=False
    ):
        ax.plot(rows[param], rows["mean"], "o-", color=color, label=name)
        low, high = rows["mean"] - rows["std"], rows["mean"] + rows["std"]
        ax.fill_between(rows[param], low, high, color=color, alpha=0.2)
    ax.set_xlabel(param)
    ax.set_ylabel(metric)
    ax.legend(fontsize="small")
    fig.suptitle(title or f"sensitivity of {metric} to {param}")
    return fig


def sensitivity_plotly(
    df: pd.DataFrame,
    param: str,
    metric: str = "mse",
    group: str | None = None,
    title: str | None = None,
) -> go.Figure:
    """Interactive twin of :func:`sensitivity_mpl` (the band is one filled polygon per group)."""
    fig = go.Figure()
    for color, (name, rows) in zip(
        cycle(PALETTE), _sensitivity_groups(df, param, metric, group), strict=False
    ):
        x = rows[param].tolist()
        high, low = (rows["mean"] + rows["std"]).tolist(), (rows["mean"] - rows["std"]).tolist()
        fig.add_trace(
            go.Scatter(
                x=x + x[::-1],
                y=high + low[::-1],
                fill="toself",
                fillcolor=color,
                opacity=0.2,
                line_width=0,
                legendgroup=name,
                showlegend=False,
                hoverinfo="skip",
            )
        )
        fig.add_trace(
            go.Scatter(
                x=x,
                y=rows["mean"],
                name=name,
                mode="lines+markers",
                line_color=color,
                legendgroup=name,
            )
        )
    fig.update_layout(
        title=title or f"sensitivity of {metric} to {param}", xaxis_title=param, yaxis_title=metric
    )
    return fig


# ---------------------------------------------------------------------------------- timeline

TIMELINE_ROWS = ["interrupt / resume", "best update", "checkpoint", "validation"]
TIMELINE_MARKS = {  # legend label: (row, scatter style)
    "validation": ("validation", {"marker": "o", "color": PALETTE[0]}),
    "step checkpoint": ("checkpoint", {"marker": "s", "color": PALETTE[2]}),
    "final.pt": ("checkpoint", {"marker": "D", "color": "black"}),
    "best update": ("best update", {"marker": "*", "s": 150, "color": PALETTE[1]}),
    "resume": ("interrupt / resume", {"marker": ">", "s": 70, "color": PALETTE[2]}),
    "interrupted": ("interrupt / resume", {"marker": "x", "s": 70, "color": PALETTE[3]}),
}


def epoch_ends(metrics: pd.DataFrame) -> list[int]:
    """The step of each epoch's last validation: every epoch ends with one, and the log has
    no epoch events of its own (a val event's epoch is the epoch it closes)."""
    val = metrics[metrics["event"] == "val"].dropna(subset=["epoch"])
    return val.groupby("epoch")["global_step"].max().sort_index().astype(int).tolist()


def timeline_events(metrics: pd.DataFrame) -> dict[str, list[int]]:
    """The steps of everything a training timeline marks, by legend label."""

    def steps(event: str, kind: str | None = None) -> list[int]:
        rows = metrics[metrics["event"] == event]
        if kind is not None:
            rows = rows[rows["kind"] == kind]
        return rows["global_step"].astype(int).tolist()

    return {
        "validation": steps("val"),
        "step checkpoint": steps("save", "step"),
        "final.pt": steps("save", "final"),
        "best update": best_updates(metrics)["global_step"].astype(int).tolist(),
        "resume": steps("resume"),
        "early stop": steps("early_stop"),
        "epoch end": epoch_ends(metrics),
    }


def timeline_mpl(
    run_dirs: PathLike | Sequence[PathLike],
    labels: Sequence[str] | None = None,
    interruptions: Sequence[Sequence[int]] | None = None,
) -> Figure:
    """One row per scenario with steps on x: epoch boundaries, validations, checkpoint saves,
    best updates, early stop, resumes and the steps where a run was interrupted.

    ``interruptions`` gives, per run, the steps where it was killed (the log cannot know).
    """
    run_dirs = _as_list(run_dirs)
    labels = list(labels) if labels is not None else [run_label(d) for d in run_dirs]
    interruptions = list(interruptions) if interruptions is not None else [[]] * len(run_dirs)
    if not len(labels) == len(interruptions) == len(run_dirs):
        raise WorkbenchError(
            f"timeline of {len(run_dirs)} run(s) got {len(labels)} label(s) and "
            f"{len(interruptions)} interruption list(s); pass one of each per run"
        )
    fig, axes = _subplots(
        len(run_dirs), 1, sharex=True, squeeze=False, figsize=(10, 0.8 + 1.7 * len(run_dirs))
    )
    for ax, run_dir, label, killed in zip(axes[:, 0], run_dirs, labels, interruptions, strict=True):
        events = timeline_events(load_metrics(run_dir)) | {"interrupted": list(killed)}
        for step in events["epoch end"]:
            ax.axvline(step, color="0.75", ls=":", lw=1)
        for step in events["early stop"]:
            ax.axvline(step, color=PALETTE[3], ls="--", label="early stop")
        for name, (row, style) in TIMELINE_MARKS.items():
            y = TIMELINE_ROWS.index(row)
            ax.scatter(events[name], [y] * len(events[name]), zorder=3, label=name, **style)
        ax.set_yticks(range(len(TIMELINE_ROWS)), TIMELINE_ROWS)
        ax.set_ylim(-0.6, len(TIMELINE_ROWS) - 0.4)
        ax.set_title(label, loc="left", fontsize="medium")
    axes[-1, 0].set_xlabel("global step (dotted: epoch boundaries)")
    axes[-1, 0].set_xlim(left=0)
    handles = {}
    for ax in axes[:, 0]:
        for handle, name in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(name, handle)
    fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncols=4)
    return fig


# ------------------------------------------------------------------------------ run explorer


class RunsExplorer:
    """Pick runs and a smoothing window; the plotly loss/lr figure and its static matplotlib
    twin below it redraw in place on every change.

    The figures are shown through display handles, not inside an Output widget, so their
    first drawing is an ordinary cell output that papermill keeps. Use ``.show()``.
    """

    def __init__(self, run_dirs: Sequence[PathLike], smooth: int = 1) -> None:
        import ipywidgets as widgets

        self.by_label = {run_label(d): Path(d) for d in run_dirs}
        self.picker = widgets.SelectMultiple(
            options=list(self.by_label),
            value=tuple(self.by_label),
            rows=min(8, len(self.by_label)),
            description="runs",
        )
        self.window = widgets.IntSlider(
            value=smooth, min=1, max=max(50, smooth), description="smooth"
        )
        self.controls = widgets.HBox([self.picker, self.window])
        self._handles: list[Any] = []

    def figures(self) -> tuple[go.Figure, Figure]:
        chosen = [self.by_label[label] for label in self.picker.value]
        return loss_curves_plotly(chosen, self.window.value), loss_curves_mpl(
            chosen, self.window.value
        )

    def _drawings(self) -> list[tuple[Any, bool]]:
        """(object, raw) pairs to display. A plotly figure shows itself through ``pio.show``,
        which drops display ids, so it goes out as its raw mime bundle, which a handle can
        replace."""
        plotly_fig, mpl_fig = self.figures()
        return [(plotly_fig._repr_mimebundle_(), True), (mpl_fig, False)]

    def show(self) -> None:
        from IPython.display import display

        display(self.controls)
        self._handles = [display(obj, raw=raw, display_id=True) for obj, raw in self._drawings()]
        self.picker.observe(self.redraw, "value")
        self.window.observe(self.redraw, "value")

    def redraw(self, _change: Any = None) -> None:
        if self.picker.value:  # an empty selection keeps the last drawing
            for handle, (obj, raw) in zip(self._handles, self._drawings(), strict=True):
                if raw:  # JupyterLab's plotly renderer draws once and ignores later data:
                    handle.update({"text/plain": "redrawing"}, raw=True)  # force a new one
                handle.update(obj, raw=raw)


# -------------------------------------------------------------------------------- timellm plot


def run_plot(args: argparse.Namespace) -> int:
    """Draw the loss curves of the runs to a PNG and export their metrics in long format."""
    fig = loss_curves_mpl(args.run_dirs, smooth=args.smooth, title=args.title)
    out_png = Path(args.out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    out_csv = export_long_csv(args.run_dirs, args.out_csv)
    print(f"wrote {out_png} and {out_csv}")
    return 0


class LiveLossPlot:
    """A ``train(on_event=...)`` callback that redraws the train and val loss in place.

    The figure is a static matplotlib image updated through a display handle, so it shows
    live in JupyterLab and its last state is kept in papermill's executed notebook.
    """

    def __init__(self, every: int = 1, title: str | None = None) -> None:
        self.every = every
        self.title = title
        self.train: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []
        self.handle: Any = None  # IPython display handle (None outside IPython)
        self.draws = 0

    def __call__(self, record: dict[str, Any]) -> None:
        if record["event"] == "train":
            self.train.append((record["global_step"], record["loss"]))
            if len(self.train) % self.every:
                return
        elif record["event"] == "val":
            self.val.append((record["global_step"], record["val_loss"]))
        else:
            return
        self.draw()

    def figure(self) -> Figure:
        fig, ax = _subplots(figsize=(7, 3.2))
        for points, label, style in [(self.train, "train loss", "-"), (self.val, "val loss", "o-")]:
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, style, label=label)
        ax.set_xlabel("global_step")
        ax.set_ylabel("MSE (scaled)")
        ax.set_title(self.title or "training (live)")
        ax.legend(loc="upper right")
        return fig

    def draw(self) -> None:
        from IPython.display import display

        fig = self.figure()
        self.draws += 1
        if self.handle is None:
            self.handle = display(fig, display_id=True)
        else:
            self.handle.update(fig)


# ------------------------------------------------------------------ study: accuracy and cost

COST_AXES = {
    "s_per_step_mean": ("seconds per optimizer step", "log"),
    "trainable_params": ("trainable parameters", "log"),
}


def study_points(results: dict[str, Any], metric: str = "mse") -> pd.DataFrame:
    """One line per study row with at least one finished run (a study's results.json read
    as a dict): ``name``, ``n``, the test ``metric``'s ``mean`` and ``std`` (0 for one seed),
    every seed's value (``seeds``), the cost columns and the ``published`` value (NaN when
    the row has none)."""
    lines = []
    for row in results["rows"]:
        values = [r[f"test_{metric}"] for r in row["runs"] if r.get(f"test_{metric}") is not None]
        if not values:
            continue
        lines.append(
            {
                "name": row["name"],
                "n": len(values),
                "mean": float(np.mean(values)),
                "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                "seeds": values,
                **{key: row.get(key) for key in COST_AXES},
                "published": row["published"].get(metric, np.nan),
            }
        )
    return pd.DataFrame(
        lines, columns=["name", "n", "mean", "std", "seeds", *COST_AXES, "published"]
    )


def accuracy_cost_mpl(results: dict[str, Any], metric: str = "mse") -> Figure:
    """Test ``metric`` against cost, one panel per cost (seconds per optimizer step,
    trainable parameters; log scale): a point per row at its mean over seeds with a ± std
    bar and its seeds as small dots, and the published value as a hollow star at the same
    cost (the published models' own cost was not measured here) joined to it by a line."""
    points = study_points(results, metric)
    fig, axes = _subplots(1, len(COST_AXES), figsize=(6 * len(COST_AXES), 4.5), squeeze=False)
    for ax, (cost, (label, scale)) in zip(axes[0], COST_AXES.items(), strict=True):
        for (_, p), color in zip(points.iterrows(), cycle(PALETTE), strict=False):
            if p[cost] is None or pd.isna(p[cost]):
                continue
            ax.errorbar(
                p[cost], p["mean"], yerr=p["std"], fmt="o", color=color, capsize=4,
                label=f"{p['name']} (n={p['n']})",
            )  # fmt: skip
            ax.scatter([p[cost]] * len(p["seeds"]), p["seeds"], s=10, color=color, alpha=0.5)
            if not pd.isna(p["published"]):
                ax.plot([p[cost]] * 2, [p["mean"], p["published"]], ":", color=color)
                ax.scatter(p[cost], p["published"], marker="*", s=140, facecolors="none",
                           edgecolors=color, gid="published")  # fmt: skip
        ax.set_xscale(scale)
        ax.set_xlabel(label)
        ax.set_ylabel(f"test {metric.upper()}")
        ax.grid(alpha=0.3)
    if len(points):
        axes[0][0].scatter([], [], marker="*", s=140, facecolors="none", edgecolors="grey",
                           label="published")  # fmt: skip
        axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{results['study']}: accuracy against cost (mean ± std over seeds)")
    return fig
