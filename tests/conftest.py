"""Shared fixtures: the repository root and the real ETTh1 benchmark file beside it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def etth1_path() -> Path:
    """ETTh1.csv from ../shared (CI has it beside the clone); TIMELLM_ETTH1 overrides."""
    path = Path(
        os.environ.get("TIMELLM_ETTH1", REPO_ROOT.parent / "shared/data/ETT-small/ETTh1.csv")
    )
    assert path.is_file(), f"ETTh1.csv not found at {path}; set TIMELLM_ETTH1 to its location"
    return path
