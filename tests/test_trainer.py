"""The training loop in-process: position arithmetic, event order, bit-identical resume for
every kind of interruption point and setting, schedules, metrics and the small models."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from trainer_helpers import assert_same_run, comparable_events, digests, tiny_config

from timellm_lib.config import load_config
from timellm_lib.data import build_datasets
from timellm_lib.evaluation.metrics import evaluate
from timellm_lib.models import TrainableModel, TrainingHooks, build_model
from timellm_lib.models.baselines import MLP, DLinear
from timellm_lib.models.layers import moving_average
from timellm_lib.models.output import Forecast
from timellm_lib.models.params import model_params
from timellm_lib.training import TrainingError, train
from timellm_lib.training import resume as resume_module
from timellm_lib.training.checkpoint import load_checkpoint, step_files
from timellm_lib.training.early_stopping import EarlyStopping
from timellm_lib.training.metrics_log import read_metrics
from timellm_lib.training.schedulers import Schedule, build_scheduler


@pytest.mark.parametrize(
    "batch_size, train_steps",
    [(48, 7), (60, 6)],  # 7 steps: not a multiple of save_steps 3; 6 steps: a multiple
)
def test_checkpoint_position_is_arithmetic_on_global_step(tmp_path, batch_size, train_steps):
    cfg = tiny_config(tmp_path, f"data.batch_size={batch_size}", "train.epochs=2")
    result = train(cfg, run_dir=tmp_path / "run", progress=False)
    assert result.global_step == 2 * train_steps and result.finished

    saved = step_files(tmp_path / "run/checkpoints")
    every_3_and_epoch_ends = [
        s for s in range(1, 2 * train_steps + 1) if s % 3 == 0 or s % train_steps == 0
    ]
    assert [step for step, _ in saved] == every_3_and_epoch_ends
    for step, path in saved:
        ckpt = load_checkpoint(path)
        epoch, in_epoch = divmod(step, train_steps)
        assert (ckpt["global_step"], ckpt["epoch"], ckpt["step_in_epoch"]) == (
            step,
            epoch,
            in_epoch,
        )
        assert ckpt["train_steps"] == train_steps
        assert ckpt["sampler"] == {"seed": cfg.train.seed, "epoch": epoch, "position": in_epoch}


def test_epoch_end_that_is_a_save_step_validates_before_saving(tmp_path):
    cfg = tiny_config(tmp_path, "data.batch_size=60", "train.epochs=1")  # 6 steps, save_steps 3
    train(cfg, run_dir=tmp_path / "run", progress=False)
    events = read_metrics(tmp_path / "run/metrics.jsonl")
    at_6 = [(e["event"], e.get("kind")) for e in events if e["global_step"] == 6]
    assert at_6[:4] == [("train", None), ("val", None), ("save", "best"), ("save", "step")]

    ckpt = load_checkpoint(tmp_path / "run/checkpoints/step_00000006.pt")
    val = next(e for e in events if e["event"] == "val")
    assert ckpt["early_stopping"]["best_score"] == -val["val_loss"]  # taken after validation
    logged = events[: ckpt["metrics_lines"]]
    assert logged[-1]["event"] == "save" and logged[-1]["path"] == "checkpoints/step_00000006.pt"


INTERRUPTIONS = {
    "inside the first epoch, before any validation": ([], 2),
    "right after a best.pt save (mid-epoch validation)": (["train.eval_steps=4"], 4),
    "inside an epoch with two loader workers": (["data.num_workers=2"], 10),
    "grad accumulation 2, cosine schedule, clipping": (
        ["data.batch_size=24", "train.grad_accum=2", "train.scheduler=cosine", "train.grad_clip=1"],
        5,
    ),
    "bf16 autocast, EMA used for evaluation, type1 schedule": (
        [
            "train.amp=bf16",
            "train.ema_decay=0.9",
            "train.eval_with_ema=true",
            "train.scheduler=type1",
        ],
        9,
    ),
    "channel samples (one channel of one window each), mid epoch 1": (
        ["data.sample_unit=channel", "data.batch_size=336"],
        10,
    ),
    "published_type1 schedule (lr/25, beta1 0.95), mid epoch 1": (
        ["train.scheduler=published_type1"],
        9,
    ),
}


@pytest.mark.parametrize("case", INTERRUPTIONS)
def test_interrupted_and_resumed_run_is_bit_identical(tmp_path, case):
    extra, stop_at = INTERRUPTIONS[case]
    cfg = tiny_config(tmp_path, *extra)
    train(cfg, run_dir=tmp_path / "reference", progress=False)

    paused = train(cfg, run_dir=tmp_path / "resumed", max_steps=stop_at, progress=False)
    assert paused.status == "paused" and paused.global_step == stop_at
    assert not (tmp_path / "resumed/checkpoints/final.pt").exists()
    assert not (tmp_path / "resumed/eval_test.json").exists()
    if "best.pt" in case:
        assert load_checkpoint(tmp_path / "resumed/checkpoints/best.pt")["global_step"] == stop_at

    resumed = train(cfg, run_dir=tmp_path / "resumed", resume="auto", progress=False)
    assert resumed.finished and resumed.resumed_from.endswith(f"step_{stop_at:08d}.pt")
    assert_same_run(tmp_path / "resumed", tmp_path / "reference")


def test_resume_without_rng_state_is_not_identical(tmp_path, monkeypatch):
    """The comparison above can fail: skip restoring the RNG (dropout masks) and it does."""
    cfg = tiny_config(tmp_path)
    train(cfg, run_dir=tmp_path / "reference", progress=False)
    train(cfg, run_dir=tmp_path / "resumed", max_steps=2, progress=False)
    monkeypatch.setattr(resume_module, "restore_rng_state", lambda state: None)
    train(cfg, run_dir=tmp_path / "resumed", resume="auto", progress=False)
    final = "checkpoints/final.pt"
    assert digests(tmp_path / "resumed" / final) != digests(tmp_path / "reference" / final)


class AuxModel(TrainingHooks, nn.Module):
    """Returns a Forecast with an aux loss and a diagnostic, and has a build_memory hook."""

    def __init__(self, seq_len: int, pred_len: int) -> None:
        super().__init__()
        self.linear = nn.Linear(seq_len, pred_len)
        self.register_buffer("memory", torch.zeros(4))
        self.memory_builds = 0

    def build_memory(self, dataset, generator: torch.Generator) -> int:
        self.memory_builds += 1
        self.memory.copy_(torch.rand(4, generator=generator))
        return 4

    def forward(self, x, y=None):
        pred = self.linear(x.transpose(1, 2)).transpose(1, 2) + self.memory.sum()
        return Forecast(pred, {"trend": 0.1 * pred.square().mean()}, {"gate": 0.5})


def test_aux_losses_warm_up_and_memory_is_built_once(tmp_path):
    cfg = tiny_config(tmp_path, "train.aux_warmup_steps=4", "train.epochs=1")
    datasets = build_datasets(cfg.data)
    first = AuxModel(48, 12)
    train(
        cfg, run_dir=tmp_path / "run", max_steps=3, progress=False, model=first, datasets=datasets
    )
    assert first.memory_builds == 1
    expected = torch.rand(4, generator=torch.Generator().manual_seed(cfg.train.seed))
    assert torch.equal(first.memory, expected)

    second = AuxModel(48, 12)
    train(
        cfg,
        run_dir=tmp_path / "run",
        resume="auto",
        progress=False,
        model=second,
        datasets=datasets,
    )
    assert second.memory_builds == 0 and torch.equal(second.memory, expected)  # from the checkpoint

    for event in [e for e in read_metrics(tmp_path / "run/metrics.jsonl") if e["event"] == "train"]:
        warmup = min(1.0, (event["global_step"] - 1) / 4)
        assert event["aux_warmup"] == warmup and event["gate"] == 0.5
        assert event["loss"] == pytest.approx(event["mse"] + warmup * event["aux_trend"], rel=1e-6)


class NaNAfter(TrainingHooks, nn.Module):
    def __init__(self, steps: int) -> None:
        super().__init__()
        self.linear = nn.Linear(48, 12)
        self.calls, self.steps = 0, steps

    def forward(self, x, y=None):
        self.calls += self.training
        pred = self.linear(x.transpose(1, 2)).transpose(1, 2)
        return pred * float("nan") if self.training and self.calls == self.steps else pred


def test_non_finite_loss_stops_or_skips_as_configured(tmp_path):
    cfg = tiny_config(tmp_path, "train.epochs=1")
    with pytest.raises(TrainingError, match="loss became nan at global_step 3"):
        train(cfg, run_dir=tmp_path / "stop", progress=False, model=NaNAfter(3))

    cfg = tiny_config(tmp_path, "train.epochs=1", "train.on_nan=skip")
    result = train(cfg, run_dir=tmp_path / "skip", progress=False, model=NaNAfter(3))
    assert result.finished
    skipped = [e for e in read_metrics(tmp_path / "skip/metrics.jsonl") if e.get("skipped")]
    assert [e["global_step"] for e in skipped] == [3]


def test_fp16_on_cpu_and_fresh_start_over_checkpoints_are_refused(tmp_path):
    with pytest.raises(TrainingError, match="fp16 needs a CUDA GPU.*bf16"):
        train(tiny_config(tmp_path, "train.amp=fp16"), run_dir=tmp_path / "fp16", progress=False)
    cfg = tiny_config(tmp_path, "train.epochs=1")
    train(cfg, run_dir=tmp_path / "run", max_steps=3, progress=False)
    with pytest.raises(TrainingError, match="already holds checkpoints.*--resume auto"):
        train(cfg, run_dir=tmp_path / "run", progress=False)


def test_schedules_follow_their_formulas():
    cfg = load_config(overrides=["train.step_size=2", "train.gamma=0.5", "train.pct_start=0.2"])

    def multipliers(kind: str, steps: list[int], origin: int = 0) -> list[float]:
        cfg.train.scheduler = kind
        schedule = Schedule(cfg.train, train_steps=10, total_steps=100 - origin, origin=origin)
        return [schedule(s) for s in steps]

    epoch_starts = [0, 10, 20, 30, 40]
    assert multipliers("constant", epoch_starts) == [1.0] * 5
    assert multipliers("type1", epoch_starts) == [1.0, 0.5, 0.25, 0.125, 0.0625]
    assert multipliers("type3", epoch_starts) == pytest.approx([1.0, 1.0, 1.0, 0.9, 0.81])
    assert multipliers("step", [0, 19, 20, 40]) == [1.0, 1.0, 0.5, 0.25]
    assert multipliers("cosine", [0, 50, 100]) == pytest.approx([1.0, 0.5, 0.0])
    assert multipliers("onecycle", [0, 20, 100]) == pytest.approx([1 / 25, 1.0, 1 / 25 / 1e4])
    # rebuilt at global step 15 (mid epoch 1): the next halving is at the epoch-2 boundary
    assert multipliers("type1", [0, 4, 5], origin=15) == [1.0, 1.0, 0.5]


def published_lr_and_beta1(lr: float, rule: str, epochs: int) -> list[tuple[float, float]]:
    """(lr, beta1) of each epoch as the published run_main.py sets them: Adam, a OneCycleLR
    built on it and never stepped, and after each epoch (0-based ``e``) its adjust rule with
    ``epoch = e + 1``, whose base lr after epoch 0 is the optimizer's lr at that moment."""
    optimizer = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=lr)
    torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, steps_per_epoch=5, epochs=epochs)
    group, base, seen = optimizer.param_groups[0], lr, []
    for e in range(epochs):
        seen.append((group["lr"], group["betas"][0]))
        if e == 0:
            base = group["lr"]
        n = e + 1
        group["lr"] = (
            base * 0.5 ** (n - 1) if rule == "type1" else base * (1.0 if n < 3 else 0.9 ** (n - 3))
        )
    return seen


@pytest.mark.parametrize("rule", ["type1", "type3"])
def test_published_schedule_reproduces_run_main_lr_per_epoch(rule):
    """The published code trains at lr/25 with beta1 0.95 (its OneCycleLR is built, never
    stepped); published_<rule> gives that lr in every epoch, stepped like the trainer does."""
    cfg = load_config(overrides=[f"train.scheduler=published_{rule}", "train.lr=0.01"])
    optimizer = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
    scheduler = build_scheduler(optimizer, cfg.train, train_steps=5, total_steps=50)
    ours = []
    for _ in range(10):
        ours.append((optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["betas"][0]))
        for _ in range(5):
            optimizer.step()
            scheduler.step()
    published = published_lr_and_beta1(0.01, rule, 10)
    assert [b for _, b in ours] == [b for _, b in published] == [0.95] * 10
    assert [lr for lr, _ in ours] == pytest.approx([lr for lr, _ in published], rel=1e-12)
    if rule == "type1":
        assert [lr for lr, _ in ours[:4]] == pytest.approx([4e-4, 4e-4, 2e-4, 1e-4])
    plain = load_config(overrides=[f"train.scheduler={rule}", "train.lr=0.01"])
    optimizer = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=0.01)
    build_scheduler(optimizer, plain.train, train_steps=5, total_steps=50)
    assert optimizer.param_groups[0]["lr"] == 0.01  # the plain rules stay available
    assert optimizer.param_groups[0]["betas"][0] == 0.9


def test_early_stopping_semantics_and_state():
    stopper = EarlyStopping(patience=2, delta=0.0)
    improved = [stopper.step(v) for v in [1.0, 0.9, 0.95, 0.9]]
    assert improved == [True, True, False, False]  # equal is not better (score > best + delta)
    assert stopper.counter == 2 and stopper.should_stop and stopper.val_loss_min == 0.9

    generous = EarlyStopping(patience=2, delta=0.05)
    assert [generous.step(v) for v in [1.0, 0.97, 0.9]] == [True, False, True]

    copy = EarlyStopping(patience=2)
    assert copy.load_state_dict(stopper.state_dict()) == []
    assert copy.state_dict() == stopper.state_dict()
    assert copy.load_state_dict({}) == ["best_score", "val_loss_min", "counter"]
    assert copy.best_score is None and copy.val_loss_min == math.inf and copy.counter == 0


def test_validation_loss_weights_every_window_once(tmp_path):
    cfg = tiny_config(tmp_path)
    val = build_datasets(cfg.data).val  # 49 windows
    model = MLP(model_params(cfg), 7, 7).eval()
    x, y = val.get_batch(torch.arange(len(val)))
    with torch.no_grad():
        exact = float(((model(x).double() - y.double()) ** 2).mean())
    assert evaluate(model, val, 16)["mse"] == pytest.approx(exact, rel=1e-9)
    assert evaluate(model, val, 1000)["mse"] == pytest.approx(exact, rel=1e-9)
    assert evaluate(model, val, 16)["n_windows"] == 49

    with torch.no_grad():  # a mean of batch means over-weights the 1-window last batch
        means = [
            float(((model(x[i : i + 16]) - y[i : i + 16]) ** 2).mean()) for i in range(0, 49, 16)
        ]
    assert sum(means) / len(means) != pytest.approx(exact, rel=1e-6)


def test_baselines_shapes_and_decomposition(tmp_path):
    cfg = tiny_config(tmp_path)
    x = torch.randn(5, 48, 7)
    for cls in (DLinear, MLP):
        assert cls(model_params(cfg), 7, 7)(x).shape == (5, 12, 7)
        ms = cls(model_params(cfg), 7, 1).eval()
        assert ms(x).shape == (5, 12, 1)
        assert torch.equal(ms(x), ms(x[..., -1:]))  # MS forecasts the last (target) channel
    dropouts = [m for m in MLP(model_params(cfg), 7, 7).modules() if isinstance(m, nn.Dropout)]
    assert [d.p for d in dropouts] == [0.1]
    level = torch.full((2, 3, 48), 4.0)  # [rows, channels, time]
    assert torch.allclose(moving_average(level, 25), level)

    result = train(
        tiny_config(tmp_path, "model.name=dlinear", "train.epochs=1"),
        run_dir=tmp_path / "d",
        progress=False,
    )
    assert result.finished and result.test["n_windows"] == 109
    assert comparable_events(tmp_path / "d")[-1]["event"] == "test"


class Bare(nn.Module):
    """A forecaster that does not declare what the trainer may ask of it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(48, 12)

    def forward(self, x, y=None):
        return self.linear(x.transpose(1, 2)).transpose(1, 2)


def test_a_model_without_the_trainer_protocol_is_refused_by_name(tmp_path):
    cfg = tiny_config(tmp_path, "train.epochs=1")
    with pytest.raises(TrainingError, match=r"\(Bare\) lacks.*TrainableModel.*TrainingHooks"):
        train(cfg, run_dir=tmp_path / "bare", progress=False, model=Bare())
    for model in (build_model(cfg, 7, 7), NaNAfter(3), AuxModel(48, 12)):
        assert isinstance(model, TrainableModel)


def test_step_values_are_read_from_the_device_at_once_and_exactly():
    from timellm_lib.training.trainer import _host_values

    parts = {
        "loss": torch.tensor(0.1234567, dtype=torch.float32),
        "one_element": torch.tensor([0.5]),
        "python": 2.0,
        "bf16": torch.tensor(0.3, dtype=torch.bfloat16),
    }
    assert _host_values(parts) == {
        "loss": float(parts["loss"]),
        "one_element": 0.5,
        "python": 2.0,
        "bf16": float(parts["bf16"]),
    }
