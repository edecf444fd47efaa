"""The enhanced variants train with the real trainer: aux losses logged, no retrieval leakage
warning (the trainer passes window indices), and the full model resumes bit-identically."""

from __future__ import annotations

import warnings

import pytest
import torch

from timellm_lib.config import load_config
from timellm_lib.notebooks.describe import describe_checkpoint
from timellm_lib.notebooks.runs import load_metrics
from timellm_lib.training import train
from timellm_lib.training.checkpoint import load_checkpoint

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


def test_ema_averages_trainable_weights_only_and_keeps_the_live_gram_memory(repo_root, tmp_path):
    """The GRA-M memory (buffers) is state, not a weight: best.pt written with EMA weights
    holds the real memory and its keys, not an average that started at zero."""
    ema = ["train.ema_decay=0.9", "train.eval_with_ema=true", "train.eval_steps=2"]
    cfg = _cfg(repo_root, "gram", *ema)
    train(cfg, run_dir=tmp_path / "run", max_steps=4, progress=False)
    ckpts = tmp_path / "run/checkpoints"
    step, best = load_checkpoint(ckpts / "step_00000004.pt"), load_checkpoint(ckpts / "best.pt")
    trainable = {k for k in step["model"] if not k.startswith("gram.retriever.memory_")}
    assert set(step["ema"]["shadow"]) <= trainable  # no buffer is averaged
    memory = [k for k in step["model"] if k.startswith("gram.retriever.memory_")]
    assert memory and step["model"]["gram.retriever.memory_values"].abs().sum() > 0
    for name in memory:  # no refresh happened between best.pt and this step
        assert torch.equal(best["model"][name], step["model"][name]), name
