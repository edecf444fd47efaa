"""Checkpoint files and resume options: safe loading, damaged files, atomic saves, inspect
fields and digests, partial loads by name, config and backbone checks, resume from best with a
new lr, scheduler reset, counter override, older checkpoints, finished runs."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import random

import pytest
import torch
from torch import nn
from trainer_helpers import assert_same_run, tiny_config

from timellm_lib.models import TrainingHooks
from timellm_lib.models.baselines import MLP
from timellm_lib.models.params import model_params
from timellm_lib.notebooks.describe import describe_checkpoint, format_description
from timellm_lib.training import checkpoint as ckpt_module
from timellm_lib.training import train
from timellm_lib.training import trainer as trainer_module
from timellm_lib.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model_weights,
    remove_temp_files,
    save_checkpoint,
    select_resume_checkpoint,
    state_digest,
)
from timellm_lib.training.metrics_log import read_metrics


class RunsCode:
    """Unpickling this calls exec, which writes a marker file."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "marker"
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"model": RunsCode(marker)}))
    zipped = tmp_path / "zipped.pt"
    torch.save({"format_version": 1, "model": RunsCode(marker)}, zipped)
    for path in (raw, zipped):
        with pytest.raises(CheckpointError, match="refused to load .*could run code"):
            load_checkpoint(path)
    assert not marker.exists()

    pickle.loads(raw.read_bytes())  # proof that the file really runs code when unpickled
    assert marker.read_text() == "ran"


@pytest.fixture
def paused_run(tmp_path):
    """A tiny run paused at global_step 6 (step checkpoints at 3 and 6)."""
    cfg = tiny_config(tmp_path)
    train(cfg, run_dir=tmp_path / "run", max_steps=6, progress=False)
    return cfg, tmp_path / "run"


def test_damaged_files_give_clear_errors(tmp_path, paused_run):
    good = (paused_run[1] / "checkpoints/step_00000006.pt").read_bytes()
    noise = bytes([0x42]) + random.Random(0).randbytes(999)  # neither zip nor pickle
    torch.save({"weights": torch.ones(2)}, tmp_path / "foreign.pt")
    cases = {
        "truncated.pt": (good[: len(good) // 2], "truncated or corrupt"),
        "noise.pt": (noise, "not a PyTorch checkpoint"),
        "empty.pt": (b"", "is empty"),
        "foreign.pt": (None, "not a timellm checkpoint"),
        "missing.pt": (None, "does not exist"),
    }
    for name, (content, words) in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=words):
            load_checkpoint(tmp_path / name)


def test_resume_auto_skips_damaged_files_and_takes_the_previous_valid(tmp_path, paused_run, caplog):
    cfg, run = paused_run
    newest = run / "checkpoints/step_00000006.pt"
    newest.write_bytes(newest.read_bytes()[:5000])  # truncated by a "crash"
    (run / "checkpoints/step_00000099.pt").write_bytes(random.Random(1).randbytes(300))
    with caplog.at_level(logging.WARNING):
        assert select_resume_checkpoint(run, "auto")[0].name == "step_00000003.pt"
    assert "step_00000099.pt" in caplog.text and "step_00000006.pt" in caplog.text

    result = train(cfg, run_dir=run, resume="auto", progress=False)
    assert result.resumed_from.endswith("step_00000003.pt") and result.finished
    train(cfg, run_dir=tmp_path / "reference", progress=False)
    assert_same_run(run, tmp_path / "reference")


def test_a_crash_during_a_save_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "step_00000001.pt"
    minimal = {"format_version": 1, "model": {}, "config": {}}  # the fields every file has
    save_checkpoint(path, {**minimal, "global_step": 1})

    def crash(payload, f):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # the process dies mid-write

    monkeypatch.setattr(ckpt_module.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {**minimal, "global_step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]

    (tmp_path / f".{path.name}.1234.tmp").write_bytes(b"left by a SIGKILL")
    assert remove_temp_files(tmp_path) == [f".{path.name}.1234.tmp"]


def test_inspect_fields_digests_and_description(paused_run):
    _, run = paused_run
    info = describe_checkpoint(run / "checkpoints/step_00000006.pt")
    contract = {
        "format_version": 1,
        "global_step": 6,
        "epoch": 0,
        "step_in_epoch": 6,
        "best_score": None,
        "val_loss_min": float("inf"),
        "counter": 0,
        "lr": 1e-3,
        "kind": "step",
        "backbone": {"name": None, "fingerprint": None},
    }
    assert {k: info[k] for k in contract} == contract
    assert info["bytes"] == (run / "checkpoints/step_00000006.pt").stat().st_size
    assert {"model", "optimizer", "rng", "sampler", "early_stopping"} <= set(info["sections"])

    payload = load_checkpoint(run / "checkpoints/step_00000006.pt")
    by_hand = hashlib.sha256()
    for name in sorted(payload["model"]):
        by_hand.update(payload["model"][name].numpy().tobytes())
    assert info["state_digest"] == by_hand.hexdigest() == state_digest(payload["model"])

    exp_avg = payload["optimizer"]["state"][0]["exp_avg"]
    exp_avg.view(-1)[0] = torch.nextafter(exp_avg.view(-1)[0], torch.tensor(1.0))  # one ulp
    save_checkpoint(run / "changed.pt", payload)
    changed = describe_checkpoint(run / "changed.pt")
    assert changed["state_digest"] == info["state_digest"]
    assert changed["resume_digest"] != info["resume_digest"]

    text = format_description(info)
    for words in ("kind: step", "has 6 of its 7 optimizer steps", "no validation yet", "sections"):
        assert words in text


def test_partial_load_reports_tensors_by_name(tmp_path):
    small = MLP(model_params(tiny_config(tmp_path)), 7, 7)
    longer = MLP(model_params(tiny_config(tmp_path, "data.pred_len=24")), 7, 7)
    state = {**small.state_dict(), "extra.weight": torch.zeros(1)}
    report = load_model_weights(longer, state, strict=False)
    assert report["loaded"] == ["net.0.weight", "net.0.bias"]
    assert report["mismatched"] == [
        ["net.3.weight", [12, 64], [24, 64]],
        ["net.3.bias", [12], [24]],
    ]
    assert report["unexpected"] == ["extra.weight"] and report["missing"] == []
    assert torch.equal(longer.net[0].weight, small.net[0].weight)
    with pytest.raises(
        CheckpointError, match=r"net\.3\.weight: checkpoint \[12, 64\] vs model \[24, 64\]"
    ):
        load_model_weights(longer, state)


class Renamed(TrainingHooks, nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(48, 12)

    def forward(self, x, y=None):
        return self.layer(x.transpose(1, 2)).transpose(1, 2)


def test_resume_refuses_other_configs_models_and_backbones(paused_run):
    cfg, run = paused_run
    other = tiny_config(run.parent, "data.seq_len=40", "model.dropout=0.2")
    with pytest.raises(CheckpointError) as err:
        train(other, run_dir=run, resume="auto", progress=False)
    assert "data.seq_len: checkpoint 48, now 40" in str(err.value)
    assert "model.dropout: checkpoint 0.1, now 0.2" in str(err.value)

    with pytest.raises(
        CheckpointError, match="missing in checkpoint.*layer.weight.*unexpected.*net.0.weight"
    ):
        train(cfg, run_dir=run, resume="auto", progress=False, model=Renamed())

    with_backbone = MLP(model_params(cfg), 7, 7)
    with_backbone.backbone_fingerprint = "0123abcd"
    with pytest.raises(CheckpointError, match="fingerprint None.*fingerprint 0123abcd"):
        train(cfg, run_dir=run, resume="auto", progress=False, model=with_backbone)

    allowed = tiny_config(run.parent, "train.patience=5", "train.log_steps=2")
    train(allowed, run_dir=run, resume="auto", max_steps=7, progress=False)
    resume = next(e for e in read_metrics(run / "metrics.jsonl") if e["event"] == "resume")
    assert resume["config_changes"] == {"train.log_steps": [1, 2], "train.patience": [3, 5]}


def test_an_older_checkpoint_without_early_stopping_resumes_and_says_so(paused_run, caplog):
    cfg, run = paused_run
    path = run / "checkpoints/step_00000006.pt"
    payload = load_checkpoint(path)
    del payload["early_stopping"]
    save_checkpoint(path, payload)
    assert describe_checkpoint(path)["early_stopping_missing"] == [
        "best_score",
        "val_loss_min",
        "counter",
    ]
    with caplog.at_level(logging.WARNING):
        train(cfg, run_dir=run, resume="auto", max_steps=7, progress=False)
    assert "no EarlyStopping fields" in caplog.text
    resume = next(e for e in read_metrics(run / "metrics.jsonl") if e["event"] == "resume")
    assert resume["early_stopping_missing"] == ["best_score", "val_loss_min", "counter"]
    assert resume["best_score"] is None


def test_resume_from_best_with_a_new_lr_keeps_the_moments(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path)
    run = tmp_path / "run"
    train(cfg, run_dir=run, max_steps=10, progress=False)  # best.pt at 7, steps 9 and 10 after
    companion = load_checkpoint(run / "checkpoints/step_00000007.pt")

    seen = {}
    original = trainer_module._optimizer_step

    def first_step(r, batches, warmup):
        seen.setdefault("lr", r.lr)
        state = r.optimizer.state_dict()["state"]
        seen.setdefault(
            "optimizer", {i: {k: v.clone() for k, v in s.items()} for i, s in state.items()}
        )
        return original(r, batches, warmup)

    monkeypatch.setattr(trainer_module, "_optimizer_step", first_step)
    new = tiny_config(tmp_path, "train.lr=5e-4")
    result = train(new, run_dir=run, resume="best", resume_new_lr=True, max_steps=8, progress=False)
    assert result.resumed_from.endswith("step_00000007.pt")
    assert seen["lr"] == 5e-4
    for index, state in companion["optimizer"]["state"].items():
        for key, tensor in state.items():
            assert torch.equal(seen["optimizer"][index][key], tensor), (index, key)
    resume = next(e for e in read_metrics(run / "metrics.jsonl") if e["event"] == "resume")
    assert (resume["lr_before"], resume["lr"], resume["resume_new_lr"]) == (1e-3, 5e-4, True)
    assert resume["discarded"] == ["step_00000009.pt", "step_00000010.pt"]
    assert resume["from"] == "checkpoints/step_00000007.pt"


def test_reset_scheduler_and_counter_override(tmp_path):
    cfg = tiny_config(tmp_path, "train.scheduler=type1", "train.epochs=4")
    run = tmp_path / "run"
    train(cfg, run_dir=run, max_steps=14, progress=False)  # epoch 2 would run at lr / 4

    changed = tiny_config(tmp_path, "train.scheduler=type1", "train.epochs=4", "train.delta=10")
    result = train(
        changed,
        run_dir=run,
        resume="last",
        resume_reset_scheduler=True,
        resume_counter=2,
        progress=False,
    )
    events = read_metrics(run / "metrics.jsonl")
    lrs = {e["global_step"]: e["lr"] for e in events if e["event"] == "train"}
    assert [lrs[s] for s in (7, 14, 15, 21)] == [1e-3, 5e-4, 1e-3, 1e-3]  # schedule starts over
    resume = next(e for e in events if e["event"] == "resume")
    assert (resume["counter_before"], resume["counter"], resume["resume_counter"]) == (0, 2, 2)
    # with counter 2 and patience 3 the next validation (no improvement: delta 10) stops the run
    assert result.stopped_early and result.global_step == 21
    assert [e["global_step"] for e in events if e["event"] == "early_stop"] == [21]


def _snapshot(run):
    return {
        p: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(run.rglob("*"))
        if p.is_file()
    }


def test_resuming_a_finished_run_changes_nothing(tmp_path):
    cfg = tiny_config(tmp_path, "train.epochs=1")
    run = tmp_path / "run"
    train(cfg, run_dir=run, progress=False)
    before = _snapshot(run)
    for mode in ("auto", "best", "last"):
        result = train(cfg, run_dir=run, resume=mode, progress=False)
        assert result.status == "already complete" and result.finished
    assert _snapshot(run) == before


def test_best_needs_its_companion_and_last_needs_a_step_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, "train.epochs=1")
    with pytest.raises(CheckpointError, match="no valid step checkpoint"):
        train(cfg, run_dir=tmp_path / "empty", resume="last", progress=False)
    with pytest.raises(CheckpointError, match="no validation has improved yet"):
        train(cfg, run_dir=tmp_path / "empty", resume="best", progress=False)
    train(cfg, run_dir=tmp_path / "run", progress=False)
    os.remove(tmp_path / "run/checkpoints/step_00000007.pt")
    with pytest.raises(CheckpointError, match="step_00000007.pt.*missing"):
        select_resume_checkpoint(tmp_path / "run", "best")


def test_rotation_never_removes_best_companion_or_newest(tmp_path):
    # delta 10: only the first validation (step 7) improves, so best.pt stays at step 7
    cfg = tiny_config(tmp_path, "train.save_total_limit=1", "train.delta=10")
    train(cfg, run_dir=tmp_path / "run", progress=False)
    names = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    assert names == ["best.pt", "final.pt", "step_00000007.pt", "step_00000021.pt"]
    assert (
        load_checkpoint(tmp_path / "run/checkpoints/best.pt")["resume_from"] == "step_00000007.pt"
    )
