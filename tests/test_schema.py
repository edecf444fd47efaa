"""The checkpoint schema is the one definition of a checkpoint: the files the trainer writes,
the section lists and `timellm inspect`'s descriptions all follow it, and no module outside
training/ reads a checkpoint key by its string."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import get_type_hints

import pytest
from trainer_helpers import tiny_config

from timellm_lib.notebooks.describe import describe_checkpoint
from timellm_lib.training import schema as S
from timellm_lib.training import train
from timellm_lib.training.checkpoint import load_checkpoint, step_files

PACKAGE = Path(__file__).resolve().parents[1] / "timellm_lib"
KEYS = {f.key for f in S.FIELDS}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("schema")
    return train(
        tiny_config(tmp, "train.epochs=1", f"run.output_dir={tmp}"), progress=False
    ).run_dir


def test_written_files_have_exactly_the_schema_fields(run_dir: Path) -> None:
    ckpt_dir = run_dir / "checkpoints"
    step = load_checkpoint(step_files(ckpt_dir)[-1][1], peek=True)
    final = load_checkpoint(ckpt_dir / "final.pt", peek=True)
    best = load_checkpoint(ckpt_dir / "best.pt", peek=True)
    assert list(step) == list(final) and set(step) == set(S.STEP_FIELDS)
    assert set(best) == set(S.BEST_FIELDS)
    assert (step[S.KIND], final[S.KIND], best[S.KIND]) == ("step", "final", "best")


def test_inspect_describes_every_section_from_the_schema(run_dir: Path) -> None:
    info = describe_checkpoint(run_dir / "checkpoints/final.pt")
    purposes = {name: s["purpose"] for name, s in info["sections"].items()}
    assert purposes == {k: v for k, v in S.SECTION_PURPOSE.items() if k in purposes}
    assert set(purposes) == {f.key for f in S.FIELDS if f.section and f.step}


def test_typed_definitions_match_the_field_table() -> None:
    checksum = {S.CHECKSUM}  # added by save_checkpoint, not by the trainer
    assert set(get_type_hints(S.StepCheckpoint)) | checksum == set(S.STEP_FIELDS)
    assert set(get_type_hints(S.BestCheckpoint)) | checksum == set(S.BEST_FIELDS)
    assert all(f.purpose and "\n" not in f.purpose for f in S.FIELDS)


def test_section_lists_keep_their_published_order() -> None:
    """resume_digest hashes RESUME_SECTIONS in this order: digests of older files stay equal."""
    assert S.RESUME_SECTIONS == (
        "global_step", "model", "optimizer", "scheduler", "scaler", "ema", "early_stopping",
        "rng", "sampler", "world_size", "rng_other_ranks",
    )  # fmt: skip
    assert S.OPTIONAL_SECTIONS == ("early_stopping", "world_size", "rng_other_ranks")
    assert S.REQUIRED_FIELDS == ("format_version", "global_step", "model", "config")


def string_key_reads(source: str) -> list[str]:
    """``payload["key"]`` / ``payload.get("key")`` on a value that ``load_checkpoint`` returned
    (directly, or through a name bound to its result), for any checkpoint key."""
    tree = ast.parse(source)

    def loads(node: ast.AST) -> bool:
        func = node.func if isinstance(node, ast.Call) else None
        name = getattr(func, "id", None) or getattr(func, "attr", None)
        return name == "load_checkpoint"

    bound = {
        t.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and loads(node.value)
        for t in node.targets
        if isinstance(t, ast.Name)
    }

    def is_payload(node: ast.AST) -> bool:
        return loads(node) or (isinstance(node, ast.Name) and node.id in bound)

    found = []
    for node in ast.walk(tree):
        key = None
        if isinstance(node, ast.Subscript) and is_payload(node.value):
            key = node.slice
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("get", "pop")
            and is_payload(node.func.value)
            and node.args
        ):
            key = node.args[0]
        if isinstance(key, ast.Constant) and key.value in KEYS:
            found.append(f"line {node.lineno}: {key.value!r}")
    return found


def test_no_module_outside_training_reads_checkpoint_keys_by_string() -> None:
    outside = [p for p in PACKAGE.rglob("*.py") if "training" not in p.relative_to(PACKAGE).parts]
    found = {
        str(p.relative_to(PACKAGE)): hits
        for p in outside
        if (hits := string_key_reads(p.read_text()))
    }
    assert found == {}


def test_the_key_read_check_can_fail() -> None:
    source = 'p = load_checkpoint(x)\na = p["global_step"]\nb = load_checkpoint(y).get("model")\n'
    assert string_key_reads(source) == ["line 2: 'global_step'", "line 3: 'model'"]
