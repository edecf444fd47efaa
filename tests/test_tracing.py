"""Shape tracer: rows measured by forward hooks on one real pass, in execution order."""

from __future__ import annotations

import torch
from torch import nn

from timellm_lib.config import config_from_dict
from timellm_lib.models.layers import Tap
from timellm_lib.notebooks.tracing import format_trace, trace_model, trace_shapes


def etth1_protocol(features: str = "M"):
    """The ETTh1 protocol sizes (P = (512 - 16)//8 + 2 = 64) on the tiny random GPT-2."""
    return config_from_dict(
        {
            "data": {"seq_len": 512, "label_len": 48, "pred_len": 96, "features": features},
            "model": {"backbone": "tiny-random-gpt2", "patch_len": 16, "stride": 8,
                      "d_model": 32, "d_ff": 128},
        }
    )  # fmt: skip


def test_etth1_protocol_trace_rows():
    rng = torch.get_rng_state()
    rows = trace_shapes(etth1_protocol(), batch_size=2)
    assert torch.equal(torch.get_rng_state(), rng)
    shapes = {row["stage"]: row["shape"] for row in rows}
    llm_dim = 128
    prompt = shapes["Prompt Embedding"][1]
    assert [row["stage"] for row in rows] == [
        "Input", "Instance Norm", "Channel Independence", "Patching", "Patch Embedding",
        "Text Prototypes", "Reprogramming", "Prompt Embedding", "LLM Input", "LLM Output",
        "LLM Features", "Head", "Output",
    ]  # fmt: skip
    assert shapes["Input"] == [2, 512, 7]
    assert shapes["Channel Independence"] == [14, 512, 1]
    assert shapes["Patching"] == [14, 64, 16]
    assert shapes["Patch Embedding"] == [14, 64, 32]
    assert shapes["Text Prototypes"] == [1000, llm_dim]
    assert shapes["Reprogramming"] == [14, 64, llm_dim]
    assert shapes["LLM Input"] == shapes["LLM Output"] == [14, prompt + 64, llm_dim]
    assert shapes["LLM Features"] == [14, 64, 128]
    assert shapes["Output"] == [2, 96, 7]
    assert all(set(row) == {"stage", "module", "shape", "spread", "note"} for row in rows[:-1])
    # the output row also says which exact speed switches the run really uses
    assert rows[-1]["speed_paths"] == {
        "model.prefix_cache": "on",
        "model.last_layer_patches_only": "not applicable: implemented for BERT-style encoders only",
    }

    table = format_trace(rows)
    assert "Channel Independence" in table and "[14, 512, 1]" in table
    assert "speed path model.prefix_cache: on" in table
    assert len(table.splitlines()) == len(rows) + 2 + 2  # header, rule and two speed paths


def test_ms_and_s_traces_follow_the_features():
    ms = trace_shapes(etth1_protocol("MS"), batch_size=1, n_channels=3)
    assert [r["shape"] for r in ms if r["stage"] in ("Input", "Channel Mixing", "Output")] == [
        [1, 512, 3], [1, 96, 1], [1, 96, 1]
    ]  # fmt: skip
    s = trace_shapes(etth1_protocol("S"), batch_size=1)
    assert s[0]["shape"] == [1, 512, 1] and s[-1]["shape"] == [1, 96, 1]


class TwoStage(nn.Module):
    """A model that registers its stages the way TAPR/GRA-M will: a dict of path -> note."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Linear(3, 5)
        self.tap = Tap()

    def trace_stages(self):
        return {"expand": ("Expand", "3 -> 5"), "tap": ("Tapped", "called twice")}

    def forward(self, x):
        h = self.tap(self.expand(x))
        return self.tap(h[..., :2])


def test_trace_model_records_every_call_of_registered_stages_and_removes_its_hooks():
    model = TwoStage().train()
    rows = trace_model(model, torch.randn(4, 3))
    assert [(r["stage"], r["shape"]) for r in rows] == [
        ("Input", [4, 3]), ("Expand", [4, 5]), ("Tapped", [4, 5]), ("Tapped", [4, 2]),
        ("Output", [4, 2]),
    ]  # fmt: skip
    assert rows[1]["module"] == "expand (Linear)"
    assert model.training  # mode restored
    assert not model.expand._forward_hooks and not model.tap._forward_hooks


def test_series_spread_is_zero_for_a_stage_that_ignores_its_input_and_about_one_for_noise():
    from timellm_lib.notebooks.tracing import series_spread

    torch.manual_seed(0)
    noise = torch.randn(64, 10, 3)
    assert 0.9 < series_spread(noise) < 1.1
    same = torch.randn(1, 10, 3).expand(64, -1, -1)
    assert series_spread(same) == 0.0
    assert series_spread(same + 1e-3 * noise) < 1e-2
    assert series_spread(torch.zeros(4, 3)) is None  # undefined, not "no spread"
    assert series_spread(torch.ones(1, 3)) is None  # a single series
    assert series_spread(torch.ones(4, 3, dtype=torch.long)) is None  # token ids


def test_every_trace_row_has_its_spread_and_the_table_shows_it():
    rows = trace_shapes(etth1_protocol(), batch_size=4)
    spreads = {row["stage"]: row["spread"] for row in rows}
    assert 0.9 < spreads["Input"] < 1.1  # independent random series
    assert spreads["Text Prototypes"] is not None  # the 1,000 prototypes differ from each other
    assert all(isinstance(s, float) for s in spreads.values())
    assert "spread" in format_trace(rows).splitlines()[0]


def test_trace_of_a_checkpoint_uses_its_trained_weights_on_real_windows(tmp_path):
    """`timellm trace --checkpoint` traces the trained model on evenly spaced windows of a
    split: its rows equal trace_model on those windows and the loaded weights."""
    from trainer_helpers import tiny_config

    from timellm_lib.cli import main
    from timellm_lib.evaluation.inference import load_for_inference
    from timellm_lib.notebooks.tracing import trace_checkpoint
    from timellm_lib.training import train

    cfg = tiny_config(tmp_path, "train.epochs=1")
    train(cfg, run_dir=tmp_path / "run", progress=False)
    best = tmp_path / "run/checkpoints/best.pt"
    rows = trace_checkpoint(best, batch_size=5, split="test")
    loaded = load_for_inference(best)
    test = loaded.datasets.split("test")
    x, _ = test.get_batch(torch.linspace(0, len(test) - 1, 5).long())
    assert rows == trace_model(loaded.model, x)
    assert rows[0]["shape"][0] == 5

    assert main(["trace", "--checkpoint", str(best), "--batch-size", "5", "--split", "test"]) == 0
    assert main(["trace", "--checkpoint", str(best), "--set", "train.lr=1"]) == 2
