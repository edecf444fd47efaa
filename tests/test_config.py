"""Config: YAML + dotted overrides, rejection of bad keys, types and combinations."""

from __future__ import annotations

import re

import pytest
import yaml

from timellm_lib.config import (
    Config,
    ConfigError,
    check_llm_dim,
    checkpoint_config,
    load_config,
    parse_override,
)


def test_defaults_file_then_overrides_take_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"lr": 0.01, "epochs": 4}, "model": {"d_ff": 64}}))
    cfg = load_config(path, ["train.lr=5e-4", "model.use_tapr=true", "data.split=[0.6,0.2,0.2]"])
    assert cfg.train.lr == 5e-4 and cfg.train.epochs == 4  # override beats file, file beats default
    assert cfg.model.d_ff == 64 and cfg.model.use_tapr is True
    assert cfg.data.split == (0.6, 0.2, 0.2)
    assert cfg.data.seq_len == Config().data.seq_len


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(overrides=["train.lr=0.002", "run.experiment=x"])
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.lrr=1", ["train.lrr", "allowed keys", "lr"]),
        ("trian.lr=1", ["trian", "allowed sections"]),
        ("train.lr=abc", ["train.lr", "number"]),
        ("train.epochs=2.5", ["train.epochs", "integer"]),
        ("model.use_tapr=yes please", ["model.use_tapr", "true or false"]),
        ("model.fusion=sometimes", ["model.fusion", "train_only", "always", "off"]),
        ("data.pred_len=0", ["data.pred_len", "at least 1"]),
        ("data.seq_len=8", ["data.seq_len", "model.patch_len"]),
        ("model.stride=32", ["model.stride", "patch_len"]),
        ("data.split=[0.5,0.1,0.1]", ["data.split", "add up to 1"]),
        ("run.experiment=../x", ["run.experiment", "plain name"]),
        ("lr=1", ["section.key"]),
    ],
)
def test_bad_values_name_the_key_and_the_allowed_values(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    for word in words:
        assert word in str(err.value)


def test_d_ff_larger_than_the_backbone_width_is_rejected():
    cfg = load_config(overrides=["model.d_ff=512"])
    with pytest.raises(ConfigError, match="d_ff = 512 exceeds the backbone width llm_dim = 384"):
        check_llm_dim(cfg.model.d_ff, cfg.model.backbone, 384)
    check_llm_dim(384, "minilm", 384)


def test_override_values_are_read_as_yaml():
    assert parse_override("train.lr=5e-4") == ("train.lr", 5e-4)
    assert parse_override("model.use_gram=false") == ("model.use_gram", False)
    assert parse_override("model.description=hello world") == ("model.description", "hello world")


def test_missing_and_malformed_files_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize(
    "text, where",
    [
        ("train:\n  epochs: 2\ntrain:\n  lr: 0.1\n", "'train' appears twice (lines 1 and 3)"),
        ("train:\n  epochs: 2\n  lr: 0.1\n  epochs: 3\n", "'epochs' appears twice (lines 2 and 4)"),
        ("train: {epochs: 2, epochs: 3}\n", "'epochs' appears twice (lines 1 and 1)"),
    ],
)
def test_a_key_given_twice_is_refused_not_silently_dropped(tmp_path, text, where):
    """PyYAML keeps the last of two equal keys: a second `train:` section would drop the
    first one's settings without a word."""
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(where) + ".*merge the two into one"):
        load_config(path)


def test_shipped_configs_load(repo_root):
    configs = repo_root / "configs"
    paths = sorted([*configs.glob("*.yaml"), *configs.glob("ablation/*.yaml")])
    assert {"default.yaml", "smoke.yaml", "etth1_512_96.yaml"} <= {p.name for p in paths}
    for path in paths:  # configs/notebooks/ holds papermill parameters, not configs
        load_config(path)
    protocol = load_config(repo_root / "configs/etth1_512_96.yaml")
    d, m = protocol.data, protocol.model
    assert (d.seq_len, d.label_len, d.pred_len, d.features) == (512, 48, 96, "M")
    assert (m.patch_len, m.stride, m.d_model, m.d_ff) == (16, 8, 32, 128)
    # run_main.py's lr as it really runs (its lradj=type1 trains at lr/25, see schedulers)
    assert (protocol.train.lr, protocol.train.scheduler) == (0.01, "published_type1")
    # the published batches: 8 processes x 24 (window, channel) pairs = 192 series a step
    assert (d.sample_unit, d.batch_size) == ("channel", 192)


def test_yaml_1_1_boolean_words_stay_strings_only_true_false_are_booleans():
    assert load_config(overrides=["model.fusion=off"]).model.fusion == "off"
    assert parse_override("model.use_tapr=true") == ("model.use_tapr", True)


def test_a_checkpoint_config_without_fusion_form_keeps_the_form_it_was_trained_with():
    """Checkpoints written before model.fusion_form fused multiplicatively."""
    old = load_config(extra=checkpoint_config({"model": {"use_tapr": True}}))
    assert old.model.fusion_form == "multiplicative"
    assert load_config().model.fusion_form == "reference"
    new = checkpoint_config({"model": {"fusion_form": "reference"}})
    assert load_config(extra=new).model.fusion_form == "reference"


def test_a_config_builds_on_its_base_file_merged_deeply(tmp_path):
    """`base:` is resolved relative to the including file; nested keys merge, the file wins."""
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared/root.yaml").write_text(
        "data:\n  seq_len: 64\n  pred_len: 16\ntrain:\n  lr: 0.01\n  epochs: 4\n"
    )
    (tmp_path / "shared/middle.yaml").write_text("base: root.yaml\ntrain:\n  epochs: 2\n")
    (tmp_path / "variant.yaml").write_text("base: shared/middle.yaml\ndata:\n  pred_len: 8\n")
    cfg = load_config(tmp_path / "variant.yaml", overrides=["train.lr=0.5"])
    assert (cfg.data.seq_len, cfg.data.pred_len) == (64, 8)
    assert (cfg.train.epochs, cfg.train.lr) == (2, 0.5)
    assert "base" not in cfg.to_dict()


def test_a_missing_or_circular_base_names_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"nowhere.yaml does not exist, named as base by"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("base: c.yaml\n")
    (tmp_path / "c.yaml").write_text("base: b.yaml\n")
    with pytest.raises(ConfigError, match="in a circle"):
        load_config(tmp_path / "b.yaml")
    (tmp_path / "d.yaml").write_text("base: [1]\n")
    with pytest.raises(ConfigError, match="base must be a file name"):
        load_config(tmp_path / "d.yaml")


def test_ablation_variants_state_only_what_differs_from_the_baseline(repo_root):
    for variant in ("tapr", "gram", "full"):
        raw = yaml.safe_load((repo_root / f"configs/ablation/{variant}.yaml").read_text())
        assert raw.pop("base") == "baseline.yaml"
        assert set(raw) == {"model", "run"} and set(raw["run"]) == {"experiment"}
        assert set(raw["model"]) <= {"use_tapr", "use_gram"}
