"""The study harness: plans, cost columns, the results table, reuse and a resume after SIGKILL."""

from __future__ import annotations

import json
import subprocess
import time
import warnings
from pathlib import Path

import pytest
import yaml
from process_helpers import kill_tree, start, timellm, train_events_since, wait_until

from timellm_lib import cli
from timellm_lib.config import load_config
from timellm_lib.notebooks import study
from timellm_lib.notebooks.describe import describe_checkpoint
from timellm_lib.training.checkpoint import step_files

# two rows: DLinear (milliseconds) and a 1-layer tiny GPT-2 Time-LLM (42 steps of ~0.1-0.3 s)
PLAN = {
    "name": "t",
    "description": "test study",
    "config": "configs/smoke.yaml",
    "overrides": ["train.threads=1", "train.log_steps=1", "train.save_steps=5"],
    "seeds": [1, 2],
    "rows": [
        {
            "name": "dlinear",
            "overrides": ["model.name=dlinear"],
            "published": {"mse": 0.5, "mae": 0.4, "source": "ref A"},
        },
        {
            "name": "llm",
            "overrides": ["model.llm_layers=1"],
            "seeds": [3],
            "published": {"mse": 0.45, "mae": 0.5, "source": "ref B"},
        },
    ],
}


def write_plan(tmp_path: Path, plan: dict | None = None) -> Path:
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan or PLAN))
    return path


def data_override(tmp_path: Path) -> list[str]:
    return ["--set", f"data.path={tmp_path / 'smoke.csv'}"]


def accuracy(results: dict) -> dict:
    """Everything a rerun must reproduce exactly (timings aside)."""
    keys = ("status", "global_step", "val_loss_min", "test_mse", "test_mae", "best_step")
    return {
        (row["name"], run["seed"]): tuple(run.get(k) for k in keys)
        for row in results["rows"]
        for run in row["runs"]
    }


def test_plan_is_resolved_and_checked_before_anything_runs(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    plan = study.load_plan(write_plan(tmp_path), ["train.epochs=1"])
    dlinear, llm = plan.rows
    assert dlinear.seeds == (1, 2) and llm.seeds == (3,)
    cfg = llm.configs[3]
    # precedence: row config < plan overrides < row overrides < --set; the seed last
    assert (cfg.model.llm_layers, cfg.train.save_steps, cfg.train.epochs) == (1, 5, 1)
    assert (cfg.train.seed, dlinear.configs[2].model.name) == (3, "dlinear")

    bad = {**PLAN, "rows": [{"name": "x", "overrides": ["train.lr=-1"]}]}
    with pytest.raises(study.StudyError, match=r"row 1 \(x, seed 1\).*train.lr"):
        study.load_plan(write_plan(tmp_path, bad))
    typo = {**PLAN, "rows": [{"name": "x", "publshed": {}}]}
    with pytest.raises(study.StudyError, match="unknown key.*publshed"):
        study.load_plan(write_plan(tmp_path, typo))
    twice = write_plan(tmp_path)
    twice.write_text(twice.read_text() + "seeds: [5]\n")  # a second top-level `seeds`
    with pytest.raises(study.StudyError, match="not valid YAML: the key 'seeds' appears twice"):
        study.load_plan(twice)


def test_bad_plan_exits_2_with_one_paragraph(tmp_path, repo_root, monkeypatch, capsys):
    monkeypatch.chdir(repo_root)
    dup = {**PLAN, "rows": [{"name": "a"}, {"name": "a"}]}
    assert cli.main(["study", str(write_plan(tmp_path, dup))]) == 2
    assert "name 'a' must be unique" in " ".join(capsys.readouterr().err.split())
    assert cli.main(["study", str(write_plan(tmp_path)), "--rows", "nope"]) == 2
    assert "--rows ['nope'] not in the plan" in " ".join(capsys.readouterr().err.split())


def test_cost_columns_from_the_event_log():
    def ev(event, step, t, **kw):
        return {"event": event, "global_step": step, "time": t, **kw}

    events = [
        ev("train", 2, 100.0),
        ev("train", 4, 101.0),  # 0.5 s/step
        ev("val", 4, 105.0),
        ev("save", 4, 105.5, kind="best"),
        ev("train", 6, 107.0),  # after a validation: not a training interval
        ev("train", 8, 108.0),  # 0.5 s/step
        ev("resume", 6, 500.0),  # the study was not running for ~400 s
        ev("train", 8, 501.2),  # 0.6 s/step
        ev("save", 8, 502.0, kind="best"),
    ]
    assert study.seconds_per_step(events) == 0.5
    assert study.active_seconds(events) == pytest.approx([0, 1, 5, 5.5, 7, 8, 8, 9.2, 10])
    # the two steps before the first event are added at 0.5 s each
    assert study.wall_seconds_to_best(events, 0.5) == pytest.approx(11.0)
    assert study.wall_seconds_to_best(events[:3]) is None


def test_table_mean_std_published_and_difference(tmp_path):
    results = {
        "study": "s",
        "description": "d",
        "command": "timellm study p.yaml",
        "date": "2026-11-28",
        "machine": {
            "cpu": "cpu",
            "cores": 2,
            "torch_threads": 2,
            "torch": "t",
            "transformers": "x",
        },
        "rows": [
            {
                "name": "a",
                "n": 3,
                "published": {"mse": 0.375, "mae": 0.399, "source": "Zeng"},
                "test_mse_mean": 0.371,
                "test_mse_std": 0.002,
                "test_mae_mean": 0.392,
                "test_mae_std": None,
                "mse_diff": -0.004,
                "mae_diff": -0.007,
                "trainable_params": 64512,
                "total_params": 64512,
                "s_per_step_mean": 0.0123,
                "wall_s_to_best_mean": 41.2,
                "gflop_per_step": 0.0124,
            }
        ],
    }
    table = study.markdown_table(results)
    assert "| a | 3 | 0.371 ± 0.002 | 0.392 | 0.375 / 0.399 | -0.004 | -0.007 | 64,512 |" in table
    assert "| 0.0123 | 41 | 0.0124 | Zeng |" in table
    assert "timellm study p.yaml" in table and "2 cores" in table


def test_study_killed_mid_run_finishes_with_the_uninterrupted_numbers(tmp_path, repo_root):
    """A real `timellm study` process SIGKILLed inside the Time-LLM row's run and started
    again ends with the same numbers (and final checkpoints) as a study never interrupted;
    a third invocation reuses every run."""
    plan = write_plan(tmp_path)
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    args = ["study", str(plan), *data_override(tmp_path), "--no-progress"]

    proc = start(timellm(*args, "--out", str(killed)), repo_root, tmp_path / "killed.log")
    run_dir = killed / "runs/llm/seed3"
    wait_until(lambda: train_events_since(run_dir, 0) >= 12, proc, timeout=240)
    kill_tree(proc)
    assert step_files(run_dir / "checkpoints") and not (run_dir / "eval_test.json").exists()

    assert cli.main([*args, "--out", str(clean)]) == 0  # uninterrupted, in this process
    resumed = start(timellm(*args, "--out", str(killed)), repo_root, tmp_path / "resumed.log")
    assert resumed.wait(timeout=240) == 0, (tmp_path / "resumed.log").read_text()
    assert "resumed from" in (tmp_path / "resumed.log").read_text()

    a = json.loads((clean / "results.json").read_text())
    b = json.loads((killed / "results.json").read_text())
    assert accuracy(a) == accuracy(b)
    assert all(r["n"] == len(r["seeds"]) for r in b["rows"])
    for row, seed in [("dlinear", 1), ("dlinear", 2), ("llm", 3)]:
        digests = [
            describe_checkpoint(d / f"runs/{row}/seed{seed}/checkpoints/final.pt")["resume_digest"]
            for d in (clean, killed)
        ]
        assert digests[0] == digests[1]
    llm = b["rows"][1]
    assert llm["trainable_params"] < llm["total_params"] and llm["gflop_per_step"] > 0
    assert llm["s_per_step_mean"] > 0 and llm["wall_s_to_best_mean"] > 0
    assert b["machine"]["cores"] >= 1 and b["command"].startswith("timellm study ")
    head = subprocess.run(
        ["git", "-C", str(repo_root), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    assert b["code"] and head.stdout.startswith(b["code"].removesuffix("-dirty"))
    assert f"Code: {b['code']}" in (killed / "results.md").read_text()
    assert b["rows"][0]["runs"][0]["run_dir"] == "runs/dlinear/seed1"
    assert "| llm | 1 |" in (killed / "results.md").read_text()

    before = (killed / "runs/llm/seed3/metrics.jsonl").read_text()
    began = time.time()
    assert cli.main([*args, "--out", str(killed)]) == 0
    assert (killed / "runs/llm/seed3/metrics.jsonl").read_text() == before  # reused, untouched
    assert train_events_since(killed / "runs/llm/seed3", began) == 0


def test_committed_plans_resolve(repo_root, monkeypatch):
    """Every plan under configs/studies resolves (configs checked, data not read)."""
    monkeypatch.chdir(repo_root)
    plans = sorted((repo_root / "configs/studies").glob("*.yaml"))
    assert {"etth1_full.yaml", "etth1_10pct.yaml", "smoke.yaml"} <= {p.name for p in plans}
    for path in plans:
        plan = study.load_plan(path)
        for row in plan.rows:
            assert set(row.configs) == set(row.seeds)
            if path.stem.startswith("etth1"):
                cfg = row.configs[row.seeds[0]]
                assert cfg.data.path == "data/ETT-small/ETTh1.csv" and cfg.data.pred_len == 96
                published = row.name in {"dlinear_336", "dlinear_512", "timellm_minilm"}
                assert ("mse" in row.published) == published, row.name


def test_cost_of_a_step_counts_the_series_the_trainer_draws(tmp_path, repo_root, monkeypatch):
    """With channel samples, data.batch_size counts single-channel series: 7 of them cost what
    one window of 7 channels costs (Time-LLM is channel-independent; prompt lengths differ a
    little with the series), not 7 windows."""
    monkeypatch.chdir(repo_root)
    base = [f"data.path={tmp_path / 'smoke.csv'}"]
    per_window = study.measure_cost(load_config("configs/smoke.yaml", [*base, "data.batch_size=1"]))
    per_series = study.measure_cost(
        load_config("configs/smoke.yaml", [*base, "data.sample_unit=channel", "data.batch_size=7"])
    )
    assert per_series["gflop_per_step"] == pytest.approx(per_window["gflop_per_step"], rel=0.05)
    assert per_series["trainable_params"] == per_window["trainable_params"]


def test_cost_of_a_retrieval_model_step_is_measured_as_the_trainer_trains_it(
    tmp_path, repo_root, monkeypatch
):
    """GRA-M gets the samples' positions (as from the trainer), so it never retrieves a
    window's own future and warns of nothing."""
    monkeypatch.chdir(repo_root)
    cfg = load_config(
        "configs/smoke.yaml",
        [f"data.path={tmp_path / 'smoke.csv'}", "model.use_gram=true", "data.sample_unit=channel"],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cost = study.measure_cost(cfg)
    assert cost["gflop_per_step"] > 0


def continued_plan(**longer: object) -> dict:
    """DLinear for 1 epoch, the same for 3 epochs starting from it, and 3 epochs from scratch."""
    common = ["model.name=dlinear", "train.scheduler=type1", "train.patience=10"]
    return {
        **PLAN,
        "seeds": [1],
        "rows": [
            {"name": "long", "overrides": ["train.epochs=3"], "continues": "short", **longer},
            {"name": "short", "overrides": ["train.epochs=1"]},
            {"name": "reference", "overrides": ["train.epochs=3"]},
        ],
        "overrides": [*PLAN["overrides"], *common],
    }


def test_a_row_that_continues_a_shorter_one_starts_from_its_finished_run(tmp_path, repo_root):
    """`continues: short` trains after `short`, starts from its finished run (checkpoints
    hard-linked, log copied) and resumes it with more epochs: the numbers of training the long row from scratch, at a fraction of the cost,
    and the short row's run is left as it was."""
    plan = continued_plan()
    plan["overrides"].append("train.save_total_limit=100")  # the long run keeps short's too
    args = ["study", str(write_plan(tmp_path, plan)), *data_override(tmp_path)]
    out = tmp_path / "out"
    short = out / "runs/short/seed1"
    subprocess.run(
        timellm(*args, "--out", str(out), "--rows", "short", "--no-progress"),
        cwd=repo_root,
        check=True,
        capture_output=True,
        timeout=240,
    )
    short_files = {p: p.read_bytes() for p in short.rglob("*") if p.is_file()}
    done = subprocess.run(
        timellm(*args, "--out", str(out), "--no-progress"),
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    assert "starts from short's finished run" in done.stdout
    assert done.stdout.index("] short seed 1") < done.stdout.index("] long seed 1")
    results = json.loads((out / "results.json").read_text())
    by_row = {row: values for (row, _seed), values in accuracy(results).items()}
    assert by_row["long"] == by_row["reference"] != by_row["short"]
    runs = out / "runs"
    final = [
        describe_checkpoint(runs / f"{r}/seed1/checkpoints/final.pt") for r in ("long", "reference")
    ]
    assert final[0]["resume_digest"] == final[1]["resume_digest"]
    short_final = describe_checkpoint(runs / "short/seed1/checkpoints/final.pt")
    assert short_final["global_step"] < final[0]["global_step"]
    assert {p: p.read_bytes() for p in short.rglob("*") if p.is_file()} == short_files
    # the checkpoints the long run kept from the short one are shared, not copied
    shared = [
        p.name
        for p in (short / "checkpoints").glob("step_*.pt")
        if (runs / "long/seed1/checkpoints" / p.name).is_file()
    ]
    assert shared
    for name in shared:
        assert (runs / "long/seed1/checkpoints" / name).stat().st_ino == (
            short / "checkpoints" / name
        ).stat().st_ino


@pytest.mark.parametrize(
    "longer, why",
    [
        ({"continues": "nope"}, "must name another row"),
        ({"overrides": ["train.epochs=3", "train.lr=0.5"]}, "differ from it only by more"),
        ({"overrides": ["train.epochs=1"]}, "differ from it only by more"),
        ({"overrides": ["train.epochs=3", "train.scheduler=cosine"]}, "epoch only"),
    ],
)
def test_continues_is_refused_unless_the_row_is_the_same_run_with_more_epochs(
    tmp_path, repo_root, monkeypatch, longer, why
):
    monkeypatch.chdir(repo_root)
    with pytest.raises(study.StudyError, match=why):
        study.load_plan(write_plan(tmp_path, continued_plan(**longer)))
