"""The enhanced variants train with the real trainer: aux losses logged, no retrieval leakage
warning (the trainer passes window indices), and the full model resumes bit-identically."""

from __future__ import annotations

import warnings

import pytest

from timellm_lib.config import load_config
from timellm_lib.runs import load_metrics
from timellm_lib.training import train
from timellm_lib.training.checkpoint import describe_checkpoint

FAST = ["train.epochs=1", "train.eval_steps=10", "train.log_steps=1", "train.save_steps=5"]


def _cfg(repo_root, variant: str, *extra: str):
    return load_config(repo_root / f"configs/ablation/{variant}.yaml", [*FAST, *extra])


@pytest.mark.parametrize("variant", ["baseline", "tapr", "gram", "full"])
def test_every_variant_trains_and_logs_its_aux_losses(repo_root, tmp_path, variant):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. GRA-M without query positions would leak
        result = train(_cfg(repo_root, variant), run_dir=tmp_path / variant, progress=False)
    assert result.finished and result.test["n_windows"] > 0
    steps = load_metrics(tmp_path / variant).query("event == 'train'")
    cfg = _cfg(repo_root, variant).model
    for name, enabled in [("aux_tapr", cfg.use_tapr), ("aux_gram", cfg.use_gram)]:
        if enabled:
            early = steps[name].iloc[:5]
            assert (early > 1e-3).all(), f"{name} should be clearly above zero early: {early}"
        else:
            assert name not in steps.columns
    if cfg.use_tapr:
        assert steps["tapr_direction_accuracy"].between(0, 1).all()


@pytest.mark.parametrize(
    "sampling", [[], ["data.sample_unit=channel", "data.batch_size=56"]], ids=["window", "channel"]
)
def test_the_full_model_resumes_bit_identically_memory_included(repo_root, tmp_path, sampling):
    cfg = _cfg(repo_root, "full", *sampling)
    whole = train(cfg, run_dir=tmp_path / "whole", progress=False)
    paused = train(cfg, run_dir=tmp_path / "cut", max_steps=7, progress=False)
    assert paused.status == "paused"
    resumed = train(cfg, run_dir=tmp_path / "cut", resume="auto", progress=False)
    assert resumed.finished and resumed.global_step == whole.global_step
    a = describe_checkpoint(tmp_path / "whole/checkpoints/final.pt")
    b = describe_checkpoint(tmp_path / "cut/checkpoints/final.pt")
    assert (a["state_digest"], a["resume_digest"]) == (b["state_digest"], b["resume_digest"])

    def losses(run):
        m = load_metrics(tmp_path / run)
        keep = m[m.event.isin(["train", "val", "test"])]
        return keep[["event", "global_step", "loss", "val_loss", "mse"]].reset_index(drop=True)

    assert losses("whole").equals(losses("cut"))
