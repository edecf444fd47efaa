"""The benchmark scripts run and print the JSON the README's Performance section quotes.

They run as the README says (``python benchmarks/X.py``), with the fewest steps, so that a
change that breaks them fails here; their numbers are only read in the benchmarks
themselves (no timing is asserted)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import transformers


def _run_json(repo_root, script: str, *args: str) -> list[dict]:
    done = subprocess.run(
        [sys.executable, str(repo_root / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=repo_root,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_step_time_prints_a_mode_and_a_summary(repo_root):
    mode, summary = _run_json(
        repo_root, "step_time.py", "--modes", "workbench", "--steps", "2", "--eval-batches", "4,8"
    )
    assert mode["mode"] == "workbench" and mode["warm_steps"] == 2
    assert mode["step_s_min"] <= mode["step_s_median"] <= mode["step_s_max"]
    assert mode["trainable_params"] == 32_526_936  # the anchor's, as the published model's
    assert mode["llm_rows"] == 8 * 7 and mode["llm_tokens_per_step"] > 8 * 7 * 64
    assert mode["gflop_per_step"] > 0 and mode["peak_rss_mb"] > 0
    assert set(mode["eval_windows_per_s"]) == {"4", "8"}
    assert all(rate > 0 for rate in mode["eval_windows_per_s"].values())
    assert summary["step_time_ratio_to_workbench"] == {"workbench": 1.0}


@pytest.mark.slow
def test_checkpoint_size_finds_no_frozen_backbone_bytes(repo_root):
    (report,) = _run_json(repo_root, "checkpoint_size.py", "--steps", "1")
    assert report["frozen_backbone_bytes_in_best_pt"] == 0
    assert report["frozen_backbone_bytes_in_step"] == 0
    assert report["best_pt_ratio_to_trainable"] <= 1.05
    assert report["step_ratio_to_trainable_plus_optimizer"] <= 1.05
    assert report["published_state_dict_measured"] is False  # no checkout given: cited


def test_published_code_mode_needs_a_checkout(repo_root):
    done = subprocess.run(
        [sys.executable, "benchmarks/step_time.py", "--modes", "published-code"],
        capture_output=True,
        text=True,
        cwd=repo_root,
    )
    assert done.returncode == 2
    assert "needs --published-src DIR" in done.stderr


def test_the_published_models_hub_name_loads_the_packaged_minilm_only_while_building(
    repo_root, monkeypatch
):
    monkeypatch.syspath_prepend(str(repo_root / "benchmarks"))
    from published_code import HUB_NAME, _hub_name_is_minilm

    with _hub_name_is_minilm():
        config = transformers.BertConfig.from_pretrained(HUB_NAME)
        tokenizer = transformers.BertTokenizer.from_pretrained(HUB_NAME)
    assert (config.hidden_size, config.num_hidden_layers) == (384, 6)  # MiniLM, not BERT-base
    assert tokenizer("min value 0.5").input_ids[0] == tokenizer.cls_token_id
    assert "from_pretrained" not in vars(transformers.BertConfig)  # the hub loader again


def test_reprogramming_attention_prints_its_entropy_beside_the_uniform_one(repo_root, tmp_path):
    (line,) = _run_json(
        repo_root,
        "reprogramming_attention.py",
        "--config",
        "configs/smoke.yaml",
        "--set",
        f"data.path={tmp_path / 'smoke.csv'}",
        "--windows",
        "3",
    )
    assert line["windows"] == 3 and line["prototypes"] == 64  # smoke's model.num_tokens
    assert 0 < line["entropy"] <= line["uniform_entropy"] == pytest.approx(math.log(64))
    assert 1 / line["prototypes"] <= line["max_weight"] <= 1
