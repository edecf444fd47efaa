"""What a researcher watches: progress bars of training, validation and test, and the epoch
and lr of the metrics.jsonl events written at an epoch end."""

from __future__ import annotations

from trainer_helpers import tiny_config

from timellm_lib.training import train
from timellm_lib.training.metrics_log import read_metrics

TRAIN_STEPS = 7  # the tiny run: 361 windows, batch 48


def test_epoch_end_events_name_the_epoch_that_ended_and_its_lr(tmp_path):
    cfg = tiny_config(tmp_path, "train.scheduler=type1", "train.lr=0.004", "train.save_steps=0")
    train(cfg, run_dir=tmp_path / "run", progress=False)
    events = read_metrics(tmp_path / "run/metrics.jsonl")
    trained = {e["global_step"]: e for e in events if e["event"] == "train"}
    for epoch, lr in enumerate([0.004, 0.002, 0.001]):  # type1 halves every epoch
        end = (epoch + 1) * TRAIN_STEPS
        assert trained[end]["lr"] == lr and trained[end]["epoch"] == epoch
        at_end = [e for e in events if e["global_step"] == end and e["event"] != "train"]
        kinds = [(e["event"], e.get("kind")) for e in at_end]
        assert kinds[0] == ("val", None) and ("save", "step") in kinds
        for e in at_end:
            if e["event"] == "test":
                continue
            assert (e["epoch"], e["lr"]) == (epoch, lr), e  # not the next epoch's 0.5 x lr
            if e["event"] == "save" and e["kind"] == "step":
                assert e["step_in_epoch"] == TRAIN_STEPS  # all steps of the epoch done
    test = next(e for e in events if e["event"] == "test")
    assert (test["epoch"], test["lr"]) == (2, 0.001)


def test_resumed_test_event_keeps_the_last_steps_lr(tmp_path):
    """A run resumed from its end (eval_test.json lost) writes the test event with the lr
    its last step used, as the uninterrupted run did."""
    cfg = tiny_config(tmp_path, "train.scheduler=type1", "train.lr=0.004")
    run = tmp_path / "run"
    train(cfg, run_dir=run, progress=False)
    before = next(e for e in read_metrics(run / "metrics.jsonl") if e["event"] == "test")
    (run / "eval_test.json").unlink()
    train(cfg, run_dir=run, resume="auto", progress=False)
    after = next(e for e in read_metrics(run / "metrics.jsonl") if e["event"] == "test")
    assert (after["epoch"], after["lr"]) == (before["epoch"], before["lr"]) == (2, 0.001)


def test_validation_and_test_have_bars_and_a_resumed_bar_shows_its_total(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    run = tmp_path / "run"
    train(cfg, run_dir=run, max_steps=10, progress=False)
    capsys.readouterr()
    train(cfg, run_dir=run, resume="auto", progress=True)
    err = capsys.readouterr().err
    total = 3 * TRAIN_STEPS
    assert "train (ETA excl. eval):" in err and f"10/{total} [" in err
    assert f"{total}/{total} [" in err
    val_windows = next(
        e["n_windows"] for e in read_metrics(run / "metrics.jsonl") if e["event"] == "val"
    )
    # windows, rate and ETA (a bar this fast is closed before it shows 100%)
    assert f"val:   0%|          | 0/{val_windows} [00:00<?, ?win/s]" in err
    assert "test:   0%|" in err
