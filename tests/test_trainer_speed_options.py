"""The trainer's speed switches: fused Adam (train.fused_optimizer), torch.compile
(train.compile) and the prompt prefix cache (model.prefix_cache). They change how fast a run
is, not what it learns, so a resume may change them; the optimizer then follows the new
choice, not the checkpoint's."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from trainer_helpers import tiny_config

from timellm_lib.data import build_datasets
from timellm_lib.models import build_model
from timellm_lib.training import train
from timellm_lib.training.checkpoint import CheckpointError, load_checkpoint, step_name
from timellm_lib.training.metrics_log import read_metrics


def _fused(run: Path, step: int) -> bool:
    """Whether the optimizer saved at ``step`` ran the fused kernel."""
    ckpt = load_checkpoint(run / "checkpoints" / step_name(step))
    return bool(ckpt["optimizer"]["param_groups"][0]["fused"])


def test_a_resume_may_change_the_speed_options_and_the_optimizer_follows_the_new_choice(
    tmp_path,
):
    run = tmp_path / "run"
    unfused = tiny_config(tmp_path, "train.fused_optimizer=false")
    train(unfused, run_dir=run, max_steps=2, progress=False)
    assert not _fused(run, 2)

    wider = tiny_config(tmp_path, "train.fused_optimizer=false", "model.d_model=16")
    with pytest.raises(CheckpointError, match="model.d_model: checkpoint 32, now 16"):
        train(wider, run_dir=run, resume="auto", progress=False)

    # defaults (fused) plus the other two switches flipped; the checkpoint's optimizer was not
    # fused, and load_state_dict alone would have kept that
    faster = tiny_config(tmp_path, "train.compile=true", "model.prefix_cache=false")
    train(faster, run_dir=run, resume="auto", max_steps=4, progress=False)
    assert _fused(run, 4)
    resume = [e for e in read_metrics(run / "metrics.jsonl") if e["event"] == "resume"][-1]
    assert resume["config_changes"] == {
        "model.prefix_cache": [True, False],
        "train.compile": [False, True],
        "train.fused_optimizer": [False, True],
    }

    train(unfused, run_dir=run, resume="auto", max_steps=5, progress=False)
    assert not _fused(run, 5)


@pytest.mark.slow  # inductor compiles C++ with gcc in subprocesses
def test_compiled_run_matches_an_eager_one(tmp_path):
    """train.compile compiles the model in place: the run with EMA evaluation completes, its
    checkpoints hold the eager names (no ``_orig_mod.`` prefix) and its weights end close to
    an eager run's from the same start (no dropout: compiled masks are drawn differently)."""
    settings = ["train.epochs=1", "data.batch_size=120", "model.dropout=0"]  # 3 steps
    settings += ["train.ema_decay=0.9", "train.eval_with_ema=true"]
    eager_cfg = tiny_config(tmp_path, *settings)
    compiled_cfg = tiny_config(tmp_path, *settings, "train.compile=true")
    datasets = build_datasets(eager_cfg.data)
    eager_model = build_model(eager_cfg, datasets.n_in, datasets.n_out)
    compiled_model = copy.deepcopy(eager_model)

    runs = {}
    for name, cfg, model in [
        ("eager", eager_cfg, eager_model),
        ("compiled", compiled_cfg, compiled_model),
    ]:
        result = train(cfg, run_dir=tmp_path / name, progress=False, model=model, datasets=datasets)
        assert result.status == "finished" and result.test is not None
        runs[name] = {
            f: load_checkpoint(tmp_path / name / "checkpoints" / f) for f in ("final.pt", "best.pt")
        }
    assert eager_model._compiled_call_impl is None
    assert compiled_model._compiled_call_impl is not None  # the trainer did compile it

    eager, compiled = runs["eager"], runs["compiled"]
    assert eager["final.pt"]["optimizer"]["param_groups"][0]["fused"] is True
    for f in ("final.pt", "best.pt"):
        assert list(compiled[f]["model"]) == list(eager[f]["model"])
        for key, weight in eager[f]["model"].items():
            assert torch.allclose(compiled[f]["model"][key], weight, rtol=1e-4, atol=1e-5), key
    assert list(compiled["final.pt"]["ema"]["shadow"]) == list(eager["final.pt"]["ema"]["shadow"])


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_the_fused_update_equals_the_plain_one_within_float_rounding(tmp_path, optimizer):
    """train.fused_optimizer swaps the kernel, not the update: three steps of the same run
    with and without it end at the same weights and moments."""
    ends = {}
    for fused in (True, False):
        cfg = tiny_config(
            tmp_path,
            f"train.optimizer={optimizer}",
            "train.weight_decay=0.01",
            f"train.fused_optimizer={str(fused).lower()}",
        )
        run = tmp_path / f"{optimizer}-{fused}"
        train(cfg, run_dir=run, max_steps=3, progress=False)
        assert _fused(run, 3) is fused
        ends[fused] = load_checkpoint(run / "checkpoints" / step_name(3))
    for key, weight in ends[False]["model"].items():
        torch.testing.assert_close(ends[True]["model"][key], weight, rtol=1e-5, atol=1e-6)
    for index, state in ends[False]["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ends[True]["optimizer"]["state"][index][name], state[name])
