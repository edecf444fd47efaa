"""The resume walkthrough (notebook 03) on real tiny runs: every fact the notebook states is
asserted here on runs made the way the notebook makes them (mlp, 7 steps per epoch,
save_steps 3, 3 epochs)."""

from __future__ import annotations

import pytest
from trainer_helpers import tiny_overrides

from timellm_lib.data import build_datasets
from timellm_lib.notebooks import anatomy, walkthrough
from timellm_lib.notebooks.describe import describe_checkpoint
from timellm_lib.notebooks.walkthrough import Scenario, WalkthroughError, run_scenario
from timellm_lib.training.checkpoint import load_checkpoint, step_name

TRAIN_STEPS, EPOCHS, SAVE_STEPS = 7, 3, 3
FIRST, LATER = 4, 10  # inside epoch 0 after step_3; inside epoch 1 after step_9


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """Configs (main: type1 schedule; strict: only the first validation improves), the
    datasets and a walkthrough root shared by the tests of this module."""
    tmp = tmp_path_factory.mktemp("walkthrough")
    base = tiny_overrides(tmp, "train.scheduler=type1")
    cfg = walkthrough.walkthrough_config(None, base)
    strict = walkthrough.walkthrough_config(None, base, "train.delta=10", "train.patience=3")
    datasets = build_datasets(cfg.data)
    root = walkthrough.prepare_root(tmp / "root")
    return {"cfg": cfg, "strict": strict, "datasets": datasets, "root": root, "base": base}


@pytest.fixture(scope="module")
def reference(setting):
    s = setting
    return run_scenario("uninterrupted", s["root"] / "uninterrupted", s["cfg"], s["datasets"])


@pytest.fixture(scope="module")
def strict_reference(setting):
    s = setting
    return run_scenario("strict", s["root"] / "strict", s["strict"], s["datasets"])


@pytest.fixture(scope="module")
def strict_paused(setting):
    """The strict run paused (gracefully) inside epoch 1, to fork resumes from."""
    scenario = Scenario("strict paused", setting["root"] / "strict_paused", setting["datasets"])
    scenario.run(setting["strict"], stop=LATER)
    return scenario


def test_fixed_settings_win_over_overrides_and_threads_default_to_one(setting):
    cfg = walkthrough.walkthrough_config(None, [*setting["base"], "train.log_steps=5"])
    assert (cfg.train.log_steps, cfg.train.save_total_limit, cfg.train.device) == (1, 0, "cpu")
    assert cfg.train.threads == 1
    assert walkthrough.walkthrough_config(None, ["train.threads=2"]).train.threads == 2
    assert walkthrough.train_steps_of(setting["cfg"], setting["datasets"]) == TRAIN_STEPS


@pytest.mark.parametrize(
    ("crash", "resumed_from", "removed"),
    [
        (True, ["step_00000003.pt", "step_00000009.pt"], [step_name(FIRST), step_name(LATER)]),
        (False, [step_name(FIRST), step_name(LATER)], [None, None]),
    ],
)
def test_interrupted_runs_end_bit_identical(setting, reference, crash, resumed_from, removed):
    s = setting
    run = run_scenario(
        "interrupted",
        s["root"] / f"interrupted_{crash}",
        s["cfg"],
        s["datasets"],
        [FIRST, LATER],
        crash,
    )
    assert [leg.resumed_from for leg in run.legs] == [None, *resumed_from]
    assert [leg.removed for leg in run.legs] == [*removed, None]
    assert run.interruptions == [FIRST, LATER]
    assert (run.run_dir / "checkpoints" / step_name(FIRST)).exists() is not crash

    first = describe_checkpoint(run.run_dir / "checkpoints" / resumed_from[0])
    assert first["epoch"] == 0 and first["best_score"] is None and first["counter"] == 0
    assert walkthrough.logged(run.run_dir, "val", "val_loss").index.min() == TRAIN_STEPS
    assert walkthrough.resume_events(run.run_dir)["best_score"].iloc[0] is None

    assert all(walkthrough.same_run(run.run_dir, reference.run_dir).values())
    digests = walkthrough.digest_table({"a": reference.run_dir, "b": run.run_dir})
    assert digests["resume digests equal"].all() and digests["file"].iloc[-1] == "final.pt"
    val = walkthrough.side_by_side({"a": reference.run_dir, "b": run.run_dir}, "val", "val_loss")
    assert len(val) == EPOCHS and walkthrough.equal_columns(val, ["a", "b"])


def test_comparisons_can_fail(setting, reference, strict_reference):
    pair = {"main": reference.run_dir, "strict": strict_reference.run_dir}
    assert (
        walkthrough.same_run(strict_reference.run_dir, reference.run_dir)[
            "final resume_digest equal"
        ]
        is False
    )
    assert not walkthrough.digest_table(pair)["resume digests equal"].all()
    lrs = walkthrough.lr_curves(pair)
    assert walkthrough.equal_columns(lrs, ["main", "strict"])  # same schedule
    losses = walkthrough.side_by_side(pair, "val", "best_score")
    assert not walkthrough.equal_columns(losses, ["main", "strict"])


def test_crash_keeps_checkpoints_the_run_writes_anyway(setting):
    s = setting
    for stop in (6, 7):  # a save_steps multiple; an epoch end (also best.pt's companion)
        run = Scenario(f"stop {stop}", s["root"] / f"stop_{stop}", s["datasets"])
        leg = run.run(s["cfg"], stop=stop, crash=True)
        assert leg.crashed and leg.removed is None
        assert (run.run_dir / "checkpoints" / step_name(stop)).is_file()


def test_an_older_checkpoint_resumes_with_early_stopping_restarted(
    setting, strict_reference, strict_paused
):
    older = strict_paused.fork("older", setting["root"] / "older")
    path = older.run_dir / "checkpoints" / step_name(LATER)
    assert walkthrough.strip_early_stopping(path) == ["best_score", "val_loss_min", "counter"]
    assert "early_stopping" not in load_checkpoint(path)
    leg = older.run(setting["strict"])

    assert leg.status == "finished" and leg.resumed_from == step_name(LATER)
    assert any(step_name(LATER) in w and "EarlyStopping" in w for w in leg.warnings)
    resume = walkthrough.resume_events(older.run_dir).iloc[-1]
    assert resume["early_stopping_missing"] == ["best_score", "val_loss_min", "counter"]
    assert resume["best_score"] is None and resume["counter"] == 0

    pair = {"ref": strict_reference.run_dir, "older": older.run_dir}
    assert walkthrough.digest_table(pair)["state digests equal"].all()  # training unaffected
    for event, column in (("train", "loss"), ("val", "val_loss")):
        assert walkthrough.equal_columns(walkthrough.side_by_side(pair, event, column), list(pair))
    improved = walkthrough.side_by_side(pair, "val", "improved")
    assert improved.loc[2 * TRAIN_STEPS, "older"] and not improved.loc[2 * TRAIN_STEPS, "ref"]
    assert (walkthrough.best_step(older.run_dir), walkthrough.best_step(pair["ref"])) == (14, 7)
    best_scores = walkthrough.checkpoint_values(pair, "best_score")
    assert best_scores.loc[12, "older"] is None and best_scores.loc[12, "ref"] is not None


def test_global_step_positions_and_epoch_arithmetic(setting, reference):
    positions = walkthrough.position_table(reference.run_dir)
    assert positions["global_step"].tolist() == walkthrough.expected_saves(
        TRAIN_STEPS, SAVE_STEPS, EPOCHS * TRAIN_STEPS
    )
    assert positions.loc[
        positions["global_step"] == 15, ["epoch", "step_in_epoch"]
    ].values.tolist() == [[2, 1]]
    assert walkthrough.position_consistent(positions)
    tampered = positions.copy()
    tampered.loc[3, "step_in_epoch"] += 1
    assert not walkthrough.position_consistent(tampered)

    facts = walkthrough.epoch_arithmetic(setting["cfg"], setting["datasets"], reference.run_dir)
    assert facts["training windows"] == len(setting["datasets"].train)
    assert facts["train_steps = full batches // grad_accum"] == TRAIN_STEPS
    assert facts["train_steps stored in checkpoints"] == [TRAIN_STEPS]
    assert facts["optimizer steps logged per epoch"] == [TRAIN_STEPS] * EPOCHS
    assert walkthrough.saves(reference.run_dir) == [3, 6, 7, 9, 12, 14, 15, 18, 21]


def test_an_epoch_end_that_is_a_save_step_validates_before_saving(setting):
    assert [walkthrough.largest_divisor(n) for n in (21, 6, 7, 1)] == [7, 3, 7, 1]
    cfg = walkthrough.walkthrough_config(None, setting["base"], "data.batch_size=60")  # 6 steps
    run = run_scenario("multiple", setting["root"] / "multiple", cfg, setting["datasets"])
    assert walkthrough.event_order(run.run_dir, 6) == ["train", "val", "save (best)", "save (step)"]
    facts = walkthrough.checkpoint_after_validation(run.run_dir, 6)
    assert facts["checkpoint best_score"] == -facts["val_loss logged"]
    assert facts["validation before the save"]
    assert facts["checkpoint keeps log lines"] == facts["val event is line"] + 2


def test_the_model_in_memory_and_on_disk(setting):
    table = walkthrough.current_model(
        setting["strict"], setting["root"] / "current", LATER, setting["datasets"]
    )
    paused, ended = table.iloc[0], table.iloc[1]
    assert paused["newest step file"].startswith(step_name(LATER))
    assert paused["memory = newest step file"] and not paused["memory = best.pt"]
    assert paused["final.pt"] == "(none yet)"
    assert ended["memory = best.pt"] and not ended["memory = final.pt"]  # best at 7, final 21


def test_inference_is_what_validation_already_did(setting, reference):
    facts = walkthrough.inference_facts(reference.run_dir)
    assert facts["val mse now"] == facts["val_loss logged at that step"]
    assert facts["test mse now"] == facts["test mse in eval_test.json"]
    assert facts["forward passes"] > 0
    assert not facts["any forward in train mode"] and not facts["any forward with gradients"]
    assert facts["weights unchanged"]
    assert facts["fields inference reads"] == list(anatomy.INFERENCE_FIELDS)


def test_resume_from_best_with_a_new_lr_or_a_reset_schedule(setting, reference):
    s = setting
    paused = Scenario("paused", s["root"] / "lr_paused", s["datasets"])
    paused.run(s["cfg"], stop=LATER)
    new_cfg = walkthrough.walkthrough_config(None, s["base"], "train.lr=5e-4")
    new_lr = paused.fork("new lr", s["root"] / "new_lr")
    new_lr.run(new_cfg, resume="best", resume_new_lr=True)
    reset = paused.fork("reset", s["root"] / "reset")
    reset.run(s["cfg"], resume="best", resume_reset_scheduler=True)

    runs = {"ref": reference.run_dir, "new": new_lr.run_dir, "reset": reset.run_dir}
    curves = walkthrough.lr_curves(runs)
    assert new_lr.legs[-1].start_step == walkthrough.best_step(paused.run_dir) == TRAIN_STEPS
    assert walkthrough.resume_events(new_lr.run_dir)["discarded"].iloc[-1] == [
        step_name(9),
        step_name(10),
    ]
    after = [step for step in curves.index if step > TRAIN_STEPS]
    assert walkthrough.equal_columns(curves.loc[:TRAIN_STEPS], list(runs))
    assert curves.loc[8, ["ref", "new", "reset"]].tolist() == [5e-4, 2.5e-4, 1e-3]
    assert walkthrough.close(
        curves.loc[after, "new"].tolist(), walkthrough.scheduled_lr(new_cfg, TRAIN_STEPS, after)
    )
    assert walkthrough.close(
        curves.loc[after, "reset"].tolist(),
        walkthrough.scheduled_lr(s["cfg"], TRAIN_STEPS, after, origin=TRAIN_STEPS),
    )
    assert not walkthrough.close(
        curves.loc[after, "ref"].tolist(), curves.loc[after, "reset"].tolist()
    )
    fig = walkthrough.lr_figure(curves, "ref", TRAIN_STEPS)
    assert [ax.get_title(loc="left") for ax in fig.axes] == ["new", "reset"]


def test_the_counter_continues_across_a_resume_and_can_be_overridden(
    setting, strict_reference, strict_paused
):
    resumed = strict_paused.fork("resumed", setting["root"] / "counter_resumed")
    resumed.run(setting["strict"])
    override = strict_paused.fork("override", setting["root"] / "counter_override")
    override.run(setting["strict"], resume_counter=2)

    runs = {
        "ref": strict_reference.run_dir,
        "resumed": resumed.run_dir,
        "override": override.run_dir,
    }
    counters = walkthrough.side_by_side(runs, "val", "counter")
    assert counters["ref"].tolist() == counters["resumed"].tolist() == [0, 1, 2]
    assert counters["override"].dropna().tolist() == [0, 3]
    assert walkthrough.resume_events(override.run_dir)["counter_before"].iloc[-1] == 0
    assert [walkthrough.stop_step(r) for r in runs.values()] == [None, None, 2 * TRAIN_STEPS]
    assert override.legs[-1].status == "stopped early"


def test_scenarios_table_and_timeline(setting, reference, strict_paused):
    fork = strict_paused.fork("fork", setting["root"] / "fork")
    fork.run(setting["strict"])
    table = walkthrough.scenarios_table([reference, fork])
    assert table["interrupted at"].tolist() == [[], [LATER]]
    assert table["resumed from"].tolist() == [[], [step_name(LATER)]]
    assert table["status"].tolist() == ["finished", "finished"]
    fig = walkthrough.timeline([reference, fork])
    assert [ax.get_title(loc="left") for ax in fig.axes] == ["uninterrupted", "fork"]


@pytest.mark.parametrize(
    ("steps", "crash", "counter", "words"),
    [
        ([7, 10], False, 0, "first interruption step 7 must lie inside the first epoch"),
        ([2, 10], True, 0, "a crash at step 2 leaves no step checkpoint"),
        ([4, 14], True, 0, "second interruption step 14 must lie inside a later epoch"),
        ([4, 25], True, 0, "between 7 and 21"),
        ([4, 10], True, 3, "resume_counter 3 must lie in 0 to patience - 1"),
        ([4], True, 0, "needs two steps"),
    ],
)
def test_check_parameters_refuses_what_the_questions_cannot_show(
    setting, steps, crash, counter, words
):
    with pytest.raises(WalkthroughError, match=words):
        walkthrough.check_parameters(setting["cfg"], TRAIN_STEPS, steps, crash, 3, counter)
    walkthrough.check_parameters(setting["cfg"], TRAIN_STEPS, [FIRST, LATER], True, 3, 2)


def test_prepare_root_recreates_its_own_folder_and_refuses_others(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(WalkthroughError, match="did not write"):
        walkthrough.prepare_root(foreign)
    assert (foreign / "notes.txt").is_file()

    root = walkthrough.prepare_root(tmp_path / "new")
    (root / "old_scenario" / "checkpoints").mkdir(parents=True)
    assert walkthrough.prepare_root(root) == root
    assert [p.name for p in root.iterdir()] == [walkthrough.MARKER]


def test_confirm_prints_the_claim_and_raises_when_false(capsys):
    walkthrough.confirm("digests equal", 1 == 1)
    assert capsys.readouterr().out == "✓ digests equal: True\n"
    with pytest.raises(WalkthroughError, match="'val losses equal' does not hold"):
        walkthrough.confirm("val losses equal", False)
    assert capsys.readouterr().out == "✗ val losses equal: False\n"
