"""Checkpoint anatomy (notebook 02) on real files: the field table documents every field the
trainer writes, tensor roles (GRA-M memory included), the backbone that stays out of the
file, step/best/final differences and the in-memory versus file round trip."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn
from trainer_helpers import tiny_config

from timellm_lib.data import build_datasets
from timellm_lib.evaluation.inference import load_for_inference
from timellm_lib.models import build_model
from timellm_lib.models.backbones import Backbone
from timellm_lib.models.baselines import MLP
from timellm_lib.models.params import model_params
from timellm_lib.notebooks import anatomy
from timellm_lib.notebooks.describe import describe_checkpoint
from timellm_lib.training import train
from timellm_lib.training.checkpoint import CheckpointError, load_checkpoint, state_digest


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny mlp run (best.pt at step 21 of 21) and the model object that trained it."""
    tmp = tmp_path_factory.mktemp("anatomy")
    cfg = tiny_config(tmp, "train.epochs=1")
    datasets = build_datasets(cfg.data)
    model = MLP(model_params(cfg), datasets.n_in, datasets.n_out)
    train(cfg, run_dir=tmp / "run", model=model, datasets=datasets, progress=False)
    return tmp / "run", model, datasets


def test_field_table_documents_every_field_with_its_size_and_readers(finished):
    run, _, _ = finished
    path = run / "checkpoints/step_00000007.pt"
    fields = anatomy.field_table(path)
    assert fields["field"].tolist() == list(load_checkpoint(path))
    assert fields["purpose"].str.len().gt(0).all()  # a field added to checkpoints needs a purpose
    by_name = fields.set_index("field")
    assert by_name.loc["model", "bytes"] == describe_checkpoint(path)["sections"]["model"]["bytes"]
    assert by_name["bytes"].isna().tolist() == [
        name not in describe_checkpoint(path)["sections"] for name in by_name.index
    ]
    assert by_name.index[by_name["inference"]].tolist() == list(anatomy.INFERENCE_FIELDS)
    assert by_name.loc[["optimizer", "rng", "sampler", "early_stopping"], "resume"].all()
    assert not by_name.loc[["optimizer", "rng"], "inference"].any()
    assert by_name.loc["sampler", "value"] == "{seed: 2021, epoch: 1, position: 0}"

    needs = anatomy.needs_summary(fields).set_index("needed by")
    assert needs["bytes"].sum() == fields["bytes"].sum()
    assert needs.loc["resume only", "fields"].startswith("global_step, train_steps, optimizer")
    fig = anatomy.field_bytes_figure(fields)
    assert len(fig.axes[0].patches) == fields["bytes"].notna().sum()


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (torch.zeros(2, 3), "tensor [2, 3] float32"),
        ({"a": torch.ones(2), "b": torch.ones(3)}, "2 tensors, 5 values"),
        (0.1234567, "0.123457"),
        (list(range(9)), "list of 9"),
        ({"k": "x" * 100}, "{k: '" + "x" * 20 + "...}"),  # values cut at 24 characters
    ],
)
def test_summarize(value, text):
    assert anatomy.summarize(value) == text


def test_tensor_roles_include_the_gram_memory(tmp_path):
    cfg = tiny_config(
        tmp_path,
        "model.name=timellm",
        "model.llm_ablation=no_llm",
        "model.use_gram=true",
        "model.d_repr=8",
        "model.max_memory_size=50",
        "model.memory_windows=50",
    )
    datasets = build_datasets(cfg.data)
    model = build_model(cfg, datasets.n_in, datasets.n_out)
    table = anatomy.tensor_table(model.state_dict(), model)
    roles = dict(zip(table["tensor"], table["role"], strict=True))
    assert roles["gram.retriever.memory_keys"] == "GRA-M memory buffer"
    assert roles["gram.retriever.forward_count"] == "buffer"
    assert (
        roles["head.linear.weight"] == roles["gram.retriever.shape_logit"] == "trainable parameter"
    )
    keys = table.set_index("tensor").loc["gram.retriever.memory_keys"]
    assert (keys["shape"], keys["bytes"]) == ([50, 8], 50 * 8 * 4)
    by_role = anatomy.bytes_by_role(table)
    assert by_role["bytes"].sum() == sum(
        t.numel() * t.element_size() for t in model.state_dict().values()
    )
    assert by_role.loc["GRA-M memory buffer", "tensors"] == 5


def _frozen_backbone(fingerprint: str) -> Backbone:
    body = nn.Linear(32, 32).requires_grad_(False)
    return Backbone("frozen-test", body, None, 32, 1, False, fingerprint, None, False)


def test_the_backbone_stays_out_of_the_file_and_is_tied_by_fingerprint(tmp_path):
    cfg = tiny_config(tmp_path, "train.epochs=1", "model.backbone=frozen-test")
    datasets = build_datasets(cfg.data)
    model = MLP(model_params(cfg), datasets.n_in, datasets.n_out)
    model.backbone = _frozen_backbone("f00d")  # a plain attribute, outside the module tree
    model.backbone_fingerprint = "f00d"
    train(cfg, run_dir=tmp_path / "run", model=model, datasets=datasets, progress=False)
    path = tmp_path / "run/checkpoints/final.pt"

    report = anatomy.backbone_report(model, path)
    assert report["backbone"] == "frozen-test" and report["fingerprint_stored"] == "f00d"
    assert report["backbone_bytes"] == (32 * 32 + 32) * 4 and report["backbone_tensors"] == 2
    assert report["backbone_tensors_in_state_dict"] == 0 and not report["backbone_trainable"]
    assert report["fingerprint_equal"] and report["checkpoint_bytes"] == path.stat().st_size

    model.body = model.backbone.model  # registered as a submodule: now it would be saved
    model.backbone = _frozen_backbone("beef")
    model.backbone.model = model.body
    leaky = anatomy.backbone_report(model, path)
    assert leaky["backbone_tensors_in_state_dict"] == 2 and not leaky["fingerprint_equal"]

    with pytest.raises(CheckpointError, match="fingerprint f00d.*fingerprint None"):
        load_for_inference(path)  # what the notebook loads with: a plain mlp has no backbone


def test_models_without_a_backbone_report_none(finished):
    run, model, _ = finished
    report = anatomy.backbone_report(model, run / "checkpoints/best.pt")
    assert report == {
        "backbone": None,
        "checkpoint_bytes": (run / "checkpoints/best.pt").stat().st_size,
        "fingerprint_stored": None,
    }


def test_step_best_and_final_files(finished):
    run, _, _ = finished
    files = anatomy.checkpoint_files(run)
    assert files["file"].tolist()[-2:] == ["best.pt", "final.pt"]
    assert files["kind"].tolist() == ["step", "step", "step", "best", "final"]
    assert pd.isna(files.set_index("file").loc["best.pt", "resume_digest"])  # not resumable

    kinds = anatomy.fields_by_kind(run)
    assert kinds.columns.tolist() == [
        "step (step_00000007.pt)",
        "best (best.pt)",
        "final (final.pt)",
    ]
    missing_in_best = set(kinds.index[~kinds["best (best.pt)"]])
    assert {"optimizer", "scheduler", "rng", "sampler", "metrics_lines"} <= missing_in_best
    assert missing_in_best.isdisjoint(anatomy.INFERENCE_FIELDS)
    assert kinds.index[~kinds["step (step_00000007.pt)"]].tolist() == ["resume_from"]

    companion = anatomy.best_companion(run)
    assert companion == {
        "best_step": 7,
        "resume_from": "step_00000007.pt",
        "companion_exists": True,
        "same_step": True,
        "same_weights": True,
        "best_has_optimizer": False,
        "companion_has_optimizer": True,
    }


def test_round_trip_memory_file_and_fresh_model(finished, tmp_path):
    run, model, datasets = finished
    best = run / "checkpoints/best.pt"
    trip = anatomy.round_trip(best, model)
    assert trip["digests_equal"] and trip["forecasts_equal"] and trip["fresh_init_differs"]
    assert trip["digest_memory"] == state_digest(load_checkpoint(best)["model"])
    assert trip["max_abs_difference"] == 0.0

    loaded_only = anatomy.round_trip(best)
    assert loaded_only["digests_equal"] and loaded_only["forecasts_equal"]

    other = MLP(
        model_params(tiny_config(tmp_path)), datasets.n_in, datasets.n_out
    )  # untrained weights
    mismatch = anatomy.round_trip(best, other)
    assert not mismatch["digests_equal"] and mismatch["forecasts_equal"]  # memory vs reloaded


def test_require_checkpoints_names_the_fix(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist.*leave run_dir empty"):
        anatomy.require_checkpoints(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no step checkpoints"):
        anatomy.checkpoint_files(tmp_path / "empty")


def test_train_fresh_keeps_the_model_that_trained(tmp_path):
    overrides = [f"data.path={tmp_path / 'data.csv'}", "model.name=mlp", "train.epochs=1"]
    run, model = anatomy.train_fresh("configs/smoke.yaml", overrides, tmp_path / "out")
    assert run.parent == tmp_path / "out" / "anatomy"
    best = load_checkpoint(run / "checkpoints/best.pt")
    assert state_digest(model.state_dict()) == state_digest(best["model"])
    assert best["config"]["train"]["threads"] == 1
