"""Figures: what each one draws (lines, markers, traces) from real run directories and arrays."""

from __future__ import annotations

import argparse

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from IPython.core.interactiveshell import InteractiveShell
from matplotlib.container import ErrorbarContainer
from test_runs import TRAIN_STEPS, make_runs

from timellm_lib.cli import build_parser
from timellm_lib.errors import WorkbenchError
from timellm_lib.notebooks import plots
from timellm_lib.notebooks.runs import LONG_COLUMNS


@pytest.fixture
def runs(tmp_path):
    return make_runs(tmp_path / "outputs")


def test_loss_curves_mpl_draws_train_val_best_and_lr_per_run(runs):
    fig = plots.loss_curves_mpl([runs["finished"], runs["early"]], title="two runs")
    ax_loss, ax_lr = fig.axes
    assert len(ax_loss.lines) == 2 * 2 and len(ax_lr.lines) == 2
    assert fig.get_suptitle() == "two runs"
    stars = [c.get_offsets()[:, 0].tolist() for c in ax_loss.collections]
    assert stars == [[10, 20, 40], [10, 20]]  # where val improved: 0.9 0.7 (0.8) 0.6 / 0.9 0.8
    val_finished = ax_loss.lines[1]
    assert val_finished.get_xdata().tolist() == [10, 20, 30, 40]
    assert val_finished.get_ydata().tolist() == [0.9, 0.7, 0.8, 0.6]


def test_smoothing_is_a_moving_average_of_the_train_loss(runs):
    raw = plots.loss_curves_mpl(runs["finished"]).axes[0].lines[0].get_ydata()
    smooth = plots.loss_curves_mpl(runs["finished"], smooth=3).axes[0].lines[0].get_ydata()
    assert raw.tolist() == [round(2.0 / s, 5) for s in range(5, 45, 5)]
    assert smooth[0] == raw[0] and smooth[1] == pytest.approx(raw[:2].mean())
    assert smooth[5] == pytest.approx(raw[3:6].mean())
    with pytest.raises(WorkbenchError, match="smooth = 0 must be an integer >= 1"):
        plots.loss_curves_mpl(runs["finished"], smooth=0)


def test_a_resumed_run_is_drawn_once_per_step(runs):
    ax_loss, _ = plots.loss_curves_mpl(runs["resumed"]).axes
    train = ax_loss.lines[0]
    assert train.get_xdata().tolist() == [5, 10, 15, 20, 25, 30]
    assert max(train.get_ydata()) < 100  # the abandoned attempt's values are gone


def test_loss_curves_plotly_has_four_traces_per_run(runs):
    fig = plots.loss_curves_plotly([runs["finished"], runs["early"], runs["resumed"]])
    assert len(fig.data) == 3 * 4
    names = [t.name for t in fig.data[:4]]
    assert names == [
        "exp/finished train",
        "exp/finished val",
        "exp/finished best",
        "exp/finished lr",
    ]
    assert list(fig.data[2].x) == [10, 20, 40]
    assert fig.data[3].yaxis == "y2" and fig.data[0].yaxis == "y"
    assert {t.legendgroup for t in fig.data[4:8]} == {"exp/early"}


def test_forecast_mpl_has_a_panel_per_channel_with_history_truth_forecast():
    history, truth, forecast = np.zeros((24, 3)), np.ones((8, 3)), np.full((8, 3), 2.0)
    fig = plots.forecast_mpl(history, truth, forecast, channels=["HUFL", "HULL", "OT"])
    assert len(fig.axes) == 3 and fig.axes[2].get_ylabel() == "OT"
    history_line, truth_line, forecast_line = fig.axes[0].lines[:3]
    assert history_line.get_xdata().tolist() == list(range(-24, 0))
    assert forecast_line.get_xdata().tolist() == list(range(8))
    assert truth_line.get_ydata().tolist() == [1.0] * 8


def test_forecast_plotly_takes_dates_and_optional_truth():
    dates = pd.date_range("2016-07-01", periods=30, freq="h")
    fig = plots.forecast_plotly(np.arange(24.0), None, np.arange(6.0), dates=dates)
    assert [t.name for t in fig.data] == ["history", "forecast"]
    assert pd.Timestamp(fig.data[1].x[0]) == dates[24]


def test_forecast_shapes_that_do_not_fit_are_a_clear_error():
    with pytest.raises(WorkbenchError, match=r"forecast has shape \(8, 2\).*\(8, 3\)"):
        plots.forecast_mpl(np.zeros((24, 3)), None, np.zeros((8, 2)))
    with pytest.raises(WorkbenchError, match="29 dates given"):
        plots.forecast_mpl(np.zeros(24), None, np.zeros(6), dates=range(29))


@pytest.fixture
def results():
    """An ablation over seeds: variant, seed, mse, mae (and a lr for sensitivity)."""
    rows = []
    for variant, base in [("baseline", 0.5), ("tapr", 0.45), ("tapr+gram", 0.4)]:
        for seed, lr in [(1, 1e-3), (2, 1e-3), (1, 1e-4), (2, 1e-4)]:
            noise = 0.02 * seed + (0.1 if lr == 1e-4 else 0.0)
            rows.append(
                {"variant": variant, "seed": seed, "lr": lr, "mse": base + noise, "mae": base}
            )
    return pd.DataFrame(rows)


def test_ablation_bars_are_means_with_std_error_bars(results):
    fig = plots.ablation_bars_mpl(results)
    mse_ax, mae_ax = fig.axes
    heights = [bar.get_height() for bar in mse_ax.patches]
    expected = results.groupby("variant", sort=False)["mse"].agg(["mean", "std"])
    assert heights == pytest.approx(expected["mean"].tolist())
    error_bar = next(c for c in mse_ax.containers if isinstance(c, ErrorbarContainer))
    error_bars = error_bar.lines[2][0].get_segments()
    assert [seg[1, 1] - seg[0, 1] for seg in error_bars] == pytest.approx(2 * expected["std"])
    assert [bar.get_height() for bar in mae_ax.patches] == pytest.approx([0.5, 0.45, 0.4])


def test_ablation_bars_plotly_carries_the_std(results):
    fig = plots.ablation_bars_plotly(results, metrics=["mse"])
    expected = results.groupby("variant", sort=False)["mse"].std().tolist()
    assert list(fig.data[0].error_y.array) == pytest.approx(expected)
    assert list(fig.data[0].x) == ["baseline", "tapr", "tapr+gram"]


def test_summarize_names_missing_columns(results):
    with pytest.raises(WorkbenchError, match=r"lacks column\(s\) \['rmse'\]"):
        plots.summarize(results, ["variant"], ["rmse"])
    single = plots.summarize(results.head(1), ["variant"], ["mse"])
    assert single[["std", "n"]].values.tolist() == [[0.0, 1]]


def test_sensitivity_draws_a_line_and_band_per_group(results):
    fig = plots.sensitivity_mpl(results, param="lr", group="variant")
    ax = fig.axes[0]
    assert len(ax.lines) == 3 and len(ax.collections) == 3
    assert ax.lines[0].get_xdata().tolist() == [1e-4, 1e-3]  # sorted by the parameter
    assert ax.lines[0].get_ydata() == pytest.approx([0.63, 0.53])
    fig = plots.sensitivity_plotly(results, param="lr")
    assert [t.fill for t in fig.data] == ["toself", None]


def test_timeline_has_a_row_per_scenario_with_its_events(runs):
    fig = plots.timeline_mpl(
        [runs["finished"], runs["resumed"]], labels=["plain", "resumed"], interruptions=[[], [17]]
    )
    assert [ax.get_title(loc="left") for ax in fig.axes] == ["plain", "resumed"]
    by_label = {c.get_label(): c.get_offsets()[:, 0].tolist() for c in fig.axes[1].collections}
    assert by_label["validation"] == [10, 20, 30]
    assert by_label["resume"] == [10] and by_label["interrupted"] == [17]
    assert by_label["best update"] == [10, 20]
    assert by_label["step checkpoint"] == [10, 20, 30]
    epoch_lines = [line.get_xdata()[0] for line in fig.axes[0].lines if line.get_linestyle() == ":"]
    assert epoch_lines == [TRAIN_STEPS * e for e in range(1, 5)]
    finished = {c.get_label(): c.get_offsets()[:, 0].tolist() for c in fig.axes[0].collections}
    assert finished["final.pt"] == [40]


def test_timeline_marks_early_stop_and_checks_its_arguments(runs):
    ax = plots.timeline_mpl(runs["early"]).axes[0]
    dashed = [line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == "--"]
    assert dashed == [40]
    with pytest.raises(WorkbenchError, match="got 1 label"):
        plots.timeline_mpl([runs["early"], runs["finished"]], labels=["only one"])


def test_runs_explorer_redraws_only_the_chosen_runs(runs, monkeypatch):
    shell = InteractiveShell.instance()
    drawings = []  # (mime types, whether it replaces an earlier drawing) of updatable displays

    def publish(data, transient=None, update=False, **_):
        if transient and "display_id" in transient:
            drawings.append((sorted(data), update))

    monkeypatch.setattr(shell.display_pub, "publish", publish)
    try:
        explorer = plots.RunsExplorer([runs["finished"], runs["early"]], smooth=2)
        explorer.show()
        plotly_fig, mpl_fig = explorer.figures()
        assert len(plotly_fig.data) == 8 and len(mpl_fig.axes[1].lines) == 2
        assert [update for _, update in drawings] == [False, False]
        assert "application/vnd.plotly.v1+json" in drawings[0][0]
        explorer.picker.value = ("exp/early",)
        # the plotly display is blanked first so JupyterLab builds a fresh plotly renderer
        assert [update for _, update in drawings[2:]] == [True, True, True]
        assert drawings[2][0] == ["text/plain"]
        assert "application/vnd.plotly.v1+json" in drawings[3][0]
        plotly_fig, mpl_fig = explorer.figures()
        assert {t.legendgroup for t in plotly_fig.data} == {"exp/early"}
        explorer.window.value = 4
        assert len(drawings) == 8
        explorer.picker.value = ()
        assert len(drawings) == 8  # nothing to draw: the last drawing stays
    finally:
        InteractiveShell.clear_instance()


def test_timellm_plot_writes_png_and_long_csv(runs, tmp_path, capsys):
    out_png, out_csv = tmp_path / "figs" / "loss.png", tmp_path / "figs" / "loss.csv"
    args = build_parser().parse_args(
        ["plot", str(runs["finished"]), str(runs["resumed"]), "--smooth", "2"]
        + ["--out-png", str(out_png), "--out-csv", str(out_csv), "--title", "t"]
    )
    assert plots.run_plot(args) == 0
    assert matplotlib.image.imread(out_png).shape[2] in (3, 4)
    long = pd.read_csv(out_csv)
    assert list(long.columns) == LONG_COLUMNS
    assert set(long["run"]) == {"exp/finished", "exp/resumed"}
    assert str(out_png) in capsys.readouterr().out


def test_timellm_plot_refuses_a_folder_that_is_not_a_run(runs, tmp_path):
    args = argparse.Namespace(
        run_dirs=[str(tmp_path / "outputs")],
        smooth=1,
        title=None,
        out_png=str(tmp_path / "x.png"),
        out_csv=str(tmp_path / "x.csv"),
    )
    with pytest.raises(WorkbenchError, match=f"{tmp_path / 'outputs'} has no metrics.jsonl"):
        plots.run_plot(args)
    assert not (tmp_path / "x.png").exists()


def test_live_loss_plot_collects_train_and_val_events_and_redraws_in_place():
    live = plots.LiveLossPlot(every=2)
    events = [
        {"event": "train", "global_step": 1, "loss": 1.0},
        {"event": "train", "global_step": 2, "loss": 0.8},
        {"event": "save", "global_step": 2},
        {"event": "val", "global_step": 2, "val_loss": 0.9},
        {"event": "train", "global_step": 3, "loss": 0.7},
    ]
    for record in events:
        live(record)
    assert live.train == [(1, 1.0), (2, 0.8), (3, 0.7)] and live.val == [(2, 0.9)]
    assert live.draws == 2  # at the 2nd train event (every=2) and at the val event
    lines = live.figure().axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["train loss", "val loss"]
    assert list(lines[0].get_ydata()) == [1.0, 0.8, 0.7]


def _study_results() -> dict:
    def row(name, values, published, s_per_step, params):
        return {
            "name": name,
            "published": published,
            "runs": [{"seed": i, "test_mse": v} for i, v in enumerate(values)]
            + [{"seed": 9, "status": "incomplete"}],
            "s_per_step_mean": s_per_step,
            "trainable_params": params,
        }

    return {
        "study": "s",
        "rows": [
            row("dlinear", [0.37, 0.38, 0.372], {"mse": 0.375}, 0.01, 64_704),
            row("llm", [0.45], {}, 3.0, 32_526_936),
            row("not_run", [], {"mse": 0.4}, None, None),
        ],
    }


def test_study_points_one_per_finished_row_with_seed_spread():
    points = plots.study_points(_study_results())
    assert points["name"].tolist() == ["dlinear", "llm"]
    dlinear, llm = points.to_dict("records")
    assert dlinear["n"] == 3 and dlinear["mean"] == pytest.approx(0.374)
    assert dlinear["std"] == pytest.approx(np.std([0.37, 0.38, 0.372], ddof=1))
    assert (llm["n"], llm["std"], np.isnan(llm["published"])) == (1, 0.0, True)


def test_accuracy_cost_figure_marks_published_numbers():
    fig = plots.accuracy_cost_mpl(_study_results())
    axes = fig.axes
    assert [ax.get_xlabel() for ax in axes] == [
        "seconds per optimizer step",
        "trainable parameters",
    ]
    assert all(ax.get_xscale() == "log" for ax in axes)
    for ax, x in zip(axes, ([0.01, 3.0], [64_704, 32_526_936]), strict=True):
        bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        assert [b.lines[0].get_xdata()[0] for b in bars] == x
        assert [b.lines[0].get_ydata()[0] for b in bars] == pytest.approx([0.374, 0.45])
        stars = [c for c in ax.collections if c.get_gid() == "published"]
        assert [tuple(s.get_offsets()[0]) for s in stars] == [(x[0], 0.375)]  # one published
    legend = {t.get_text() for t in axes[0].get_legend().get_texts()}
    assert legend == {"dlinear (n=3)", "llm (n=1)", "published"}
