"""The ablation study: plans, real runs (directly and through the batch driver), results."""

from __future__ import annotations

import json

import nbformat
import numpy as np
import pytest
import yaml

from timellm_lib.errors import WorkbenchError
from timellm_lib.notebooks import ablation

ALL = list(ablation.VARIANTS)


@pytest.fixture(autouse=True)
def _repo_cwd(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)  # configs/ablation is a relative path


def fast(tmp_path):
    """Overrides that make a run take well under a second (no LLM variants only)."""
    return [f"data.path={tmp_path / 'synthetic.csv'}", "train.epochs=1", "train.threads=1"]


# ------------------------------------------------------------------------------ plans


def test_a_plan_trains_each_distinct_config_once(tmp_path):
    plan = ablation.build_plan(
        ALL,
        [1, 2],
        tmp_path,
        sensitivity={"top_k": [1, 5], "lambda_trend": [0.5, 2.0]},
        fusion_modes=["always", "train_only", "off"],
    )
    entries = plan.entries
    assert len(entries) == 2 * (8 + 4 + 3)
    # per seed: 8 variants, top_k 1, lambda_trend 2.0, train_only, off; the rest is "full"
    assert len(plan.runs) == 2 * (8 + 4)
    full = entries[(entries["study"] == "variants") & (entries["variant"] == "full")]
    same = entries[entries["run"].isin(full["run"])]
    assert same["param_value"].dropna().tolist() == [5, 0.5, "always"] * 2
    assert all(name.endswith(f"-{name.split('-')[-1]}") for name in plan.runs)

    run = plan.runs[
        entries[(entries["param"] == "fusion") & (entries["param_value"] == "off")]["run"].iloc[0]
    ]
    cfg = run.resolve()
    assert cfg.model.fusion == "off" and cfg.model.use_tapr and cfg.train.seed == 1
    assert run.run_dir == tmp_path / run.name
    table = plan.table()
    assert len(table) == len(plan.runs) and not table["has results"].any()
    assert "sensitivity top_k=5" in table[table["run"] == full["run"].iloc[0]]["used as"].iloc[0]


def test_a_fusion_mode_may_name_the_fusion_form_too(tmp_path):
    plan = ablation.build_plan(["full"], [1], tmp_path, fusion_modes=["always+multiplicative"])
    fusion = plan.entries[plan.entries["study"] == "fusion"]
    cfg = plan.runs[fusion["run"].iloc[0]].resolve().model
    assert (cfg.fusion, cfg.fusion_form) == ("always", "multiplicative")
    assert len(plan.runs) == 2  # the variant itself trains with the default reference form
    with pytest.raises(WorkbenchError, match="fusion_form = 'sideways' is not allowed"):
        ablation.build_plan(["full"], [1], tmp_path, fusion_modes=["always+sideways"])


def test_variant_switches_win_over_the_study_overrides(tmp_path):
    plan = ablation.build_plan(
        ["no_llm", "tapr"],
        [3],
        tmp_path,
        overrides=["model.llm_ablation=llm2attn", "model.top_k=2"],
    )
    no_llm, tapr = (plan.runs[r].resolve() for r in plan.entries["run"])
    assert no_llm.model.llm_ablation == "no_llm" and no_llm.model.top_k == 2
    assert tapr.model.llm_ablation == "llm2attn" and tapr.model.use_tapr


def test_changing_a_setting_changes_the_run_directory(tmp_path):
    one = ablation.build_plan(["dlinear"], [1], tmp_path)
    other = ablation.build_plan(["dlinear"], [1], tmp_path, overrides=["train.lr=0.01"])
    assert set(one.runs) != set(other.runs)
    assert set(one.runs) == set(ablation.build_plan(["dlinear"], [1], tmp_path).runs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"variants": ["bigger"]}, "unknown ablation variant 'bigger'; choose from"),
        ({"seeds": []}, "seeds is empty"),
        (
            {"sensitivity": {"n_scale": [1]}},
            "sensitivity run of variant full .*n_scale=1.*unknown config key model.n_scale",
        ),
        ({"sensitivity": {"top_k": []}}, r"sensitivity\['top_k'\] must be a non-empty list"),
        ({"fusion_modes": ["always"], "fusion_variant": "gram"}, "'gram' has no TAPR"),
        ({"fusion_modes": ["sometimes"]}, "model.fusion = 'sometimes' is not allowed"),
    ],
)
def test_a_bad_plan_is_refused_before_anything_trains(tmp_path, kwargs, message):
    arguments = {"variants": ["baseline"], "seeds": [1], "output_root": tmp_path} | kwargs
    with pytest.raises(WorkbenchError, match=message):
        ablation.build_plan(**arguments)
    assert not any(tmp_path.iterdir())


def test_unknown_runner_is_refused():
    with pytest.raises(WorkbenchError, match="runner 'slurm' is unknown"):
        ablation.check_runner("slurm")


# ------------------------------------------------------------------------------ running


def test_runs_train_directly_and_are_reused(tmp_path):
    plan = ablation.build_plan(
        ["dlinear", "no_llm"], [1], tmp_path / "study", overrides=fast(tmp_path)
    )
    first = ablation.execute(plan, "direct", progress=False)
    assert list(first["status"]) == ["finished", "finished"]
    again = ablation.execute(plan, "direct", progress=False)
    assert list(again["status"]) == ["already complete", "already complete"]
    results = ablation.collect(plan)
    assert results["finished"].all() and (results["mse"] > 0).all()
    for run in plan.runs.values():
        saved = json.loads((run.run_dir / "eval_test.json").read_text())
        assert results[results["run"] == run.name]["mse"].iloc[0] == saved["mse"]
        assert yaml.safe_load((run.run_dir / "config.yaml").read_text())["train"]["seed"] == 1


def test_a_failing_run_is_reported_and_the_others_still_run(tmp_path):
    plan = ablation.build_plan(
        ["dlinear", "no_llm"], [1], tmp_path / "study", overrides=fast(tmp_path)
    )
    broken = next(iter(plan.runs.values()))  # its config file disappears after planning
    plan.runs[broken.name] = ablation.PlannedRun(
        broken.name, "configs/ablation/missing.yaml", broken.overrides, 1, broken.run_dir
    )
    executed = ablation.execute(plan, "direct", progress=False)
    assert list(executed["status"]) == ["failed", "finished"]
    assert "missing.yaml does not exist" in executed["error"].iloc[0]
    assert ablation.collect(plan)["finished"].tolist() == [False, True]


def train_notebook(path):
    """A stand-in for notebooks/01_train.ipynb with the same parameters (and no plots)."""
    parameters = "\n".join(
        [
            'config: str = ""  # config file',
            "overrides: list = []  # dotted overrides",
            'run_dir: str = ""  # run directory',
            'resume: str = ""  # resume mode',
            "max_steps: int = 0  # step limit",
            "seed: int = 2021  # train.seed",
        ]
    )
    body = (
        "from timellm_lib.config import load_config\n"
        "from timellm_lib.training import train\n\n"
        'cfg = load_config(config, [*overrides, f"train.seed={seed}"])\n'
        "train(cfg, run_dir=run_dir, resume=resume or None, progress=False)"
    )
    cells = [
        nbformat.v4.new_code_cell(parameters, metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(body),
    ]
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata.kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


@pytest.mark.slow
def test_runs_go_through_the_batch_driver(tmp_path):
    notebook = train_notebook(tmp_path / "train.ipynb")
    plan = ablation.build_plan(["dlinear"], [7], tmp_path / "study", overrides=fast(tmp_path))
    executed = ablation.execute(plan, "batch", notebook=notebook, progress=False)
    assert list(executed["status"]) == ["ok"], executed["error"].tolist()
    run = next(iter(plan.runs.values()))
    assert json.loads((run.run_dir / "eval_test.json").read_text())["n_windows"] > 0
    assert yaml.safe_load((run.run_dir / "config.yaml").read_text())["train"]["seed"] == 7
    assert len(list((tmp_path / "study/notebooks").glob("train__*.ipynb"))) == 1


# ------------------------------------------------------------------------------ results


def fake_run(run_dir, mse=None, model=None, train_events=()):
    """A run directory as training leaves it: config, metrics and (finished) eval_test.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": model or {"name": "dlinear"}}))
    lines = [
        {"event": "train", "global_step": i + 1, "epoch": 0, **e}
        for i, e in enumerate(train_events)
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    if mse is not None:
        (run_dir / "eval_test.json").write_text(json.dumps({"mse": mse, "mae": mse / 2}))


def test_results_are_collected_and_summarised_over_seeds(tmp_path):
    plan = ablation.build_plan(
        ["baseline", "dlinear"], [1, 2, 3], tmp_path, sensitivity={"n_scales": [1, 2]}
    )
    scores = {
        ("baseline", 1): 0.5,
        ("baseline", 2): 0.7,
        ("dlinear", 1): 1.0,
    }  # the rest unfinished
    for entry in plan.entries.itertuples():
        fake_run(plan.runs[entry.run].run_dir, scores.get((entry.variant, entry.seed)))
    for entry in plan.entries[plan.entries["study"] == "sensitivity"].itertuples():
        fake_run(plan.runs[entry.run].run_dir, 0.1 * entry.param_value + entry.seed)

    results = ablation.collect(plan)
    assert results["finished"].sum() == 3 + 6
    assert results[~results["finished"]]["mse"].isna().all()
    summary = ablation.summary_table(results)
    assert summary["label"].tolist() == ["baseline", "DLinear"]
    assert summary["n"].tolist() == [2, 1]
    assert summary["mse_mean"].tolist() == pytest.approx([0.6, 1.0])
    assert summary["mse_std"].tolist() == pytest.approx([np.std([0.5, 0.7], ddof=1), 0.0])
    assert summary["mse"].tolist() == ["0.6000 ± 0.1414", "1.0000 ± 0.0000"]
    assert summary["mae"].iloc[0] == "0.3000 ± 0.0707"

    curves = ablation.sensitivity_frames(results)
    assert list(curves) == ["n_scales"]
    assert curves["n_scales"]["n_scales"].tolist() == [1, 2, 1, 2, 1, 2]
    by_value = ablation.summary_table(results, "sensitivity")
    assert by_value["param_value"].tolist() == [1, 2]
    assert by_value["mse_mean"].tolist() == pytest.approx([2.1, 2.2])


def test_aux_losses_and_trend_accuracy_are_read_from_the_logs(tmp_path):
    plan = ablation.build_plan(["tapr", "gram", "dlinear"], [1], tmp_path)
    runs = dict(zip(plan.entries["variant"], plan.entries["run"], strict=True))
    steps = [
        {"mse": 1.0, "aux_warmup": 0.0, "aux_tapr": 0.5, "tapr_direction_accuracy": 0.2,
         "tapr_magnitude_accuracy": 0.1, "tapr_flat_fraction": 0.3},
        {"mse": 1.0, "aux_warmup": 0.5, "aux_tapr": 0.3, "tapr_direction_accuracy": 0.4,
         "tapr_magnitude_accuracy": 0.2, "tapr_flat_fraction": 0.3},
        {"mse": 0.8, "aux_warmup": 1.0, "aux_tapr": 0.2, "tapr_direction_accuracy": 0.8,
         "tapr_magnitude_accuracy": 0.6, "tapr_flat_fraction": 0.3},
    ]  # fmt: skip
    fake_run(plan.runs[runs["tapr"]].run_dir, 0.9, {"name": "timellm", "use_tapr": True}, steps)
    fake_run(
        plan.runs[runs["gram"]].run_dir,
        0.9,
        {"name": "timellm", "use_gram": True},
        [{"mse": 1.0, "aux_gram": 1e-4}, {"mse": 1.0, "aux_gram": 1e-4}],
    )
    fake_run(plan.runs[runs["dlinear"]].run_dir, 1.0, None, [{"mse": 1.0}])
    results = ablation.collect(plan)

    aux = ablation.aux_loss_check(plan, results, early_events=2, min_ratio=0.01)
    assert aux[["variant", "term", "steps", "ok"]].values.tolist() == [
        ["+TAPR", "aux_tapr", "1-2", True],
        ["+GRA-M", "aux_gram", "1-2", False],  # 1e-4 of the MSE: trains nothing
    ]
    assert aux["aux / mse"].tolist() == pytest.approx([0.4, 1e-4])

    # GRA-M's total can pass while one of its parts stays ~0 the whole run: that is said
    events = [
        {"mse": 1.0, "aux_gram": 0.014, "gram_gate_entropy": 7e-4, "gram_gate_consistency": 0.045},
        {"mse": 0.8, "aux_gram": 0.013, "gram_gate_entropy": 9e-4, "gram_gate_consistency": 0.04},
    ]
    fake_run(plan.runs[runs["gram"]].run_dir, 0.9, {"name": "timellm", "use_gram": True}, events)
    gram = ablation.aux_loss_check(plan, ablation.collect(plan), 2, 0.01).query(
        "variant == '+GRA-M'"
    )
    assert gram[["term", "ok", "note"]].values.tolist() == [
        ["aux_gram", True, ""],
        ["gram_gate_entropy x lambda_retrieval", False, "near zero throughout the run"],
        ["gram_gate_consistency x lambda_retrieval", True, ""],
    ]
    summary = ablation.aux_check_summary(gram, 0.01)
    assert summary.startswith("2 of 3 auxiliary terms")
    assert "gram_gate_entropy x lambda_retrieval is near zero throughout the run" in summary

    trend = ablation.trend_accuracy(plan, results, events_per_end=1)
    assert len(trend) == 1
    row = trend.iloc[0]
    assert (row["direction acc. early"], row["direction acc. late"]) == (0.2, 0.8)
    assert (row["early steps"], row["late steps"]) == ("1-1", "3-3")
    assert row["chance"] == pytest.approx(1 / 3)
    figure = ablation.diagnostics_mpl(plan, results)
    left, right = figure.axes
    assert len(left.lines) == 2 and len(right.lines) == 2  # tapr and gram ratios; tapr + chance
