"""The README's Results table says what the committed study results say: every row that
names a study row shows its n, test MSE and test MAE as benchmarks/results/<plan>/results.json
holds them, so a table edited by hand cannot drift from the runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

DEFAULT_PLAN = "etth1_10pct"  # rows that name no plan (`name`, not `plan: name`)


def results_rows(repo_root: Path) -> dict[tuple[str, str], dict]:
    rows = {}
    for path in (repo_root / "benchmarks/results").glob("*/results.json"):
        for row in json.loads(path.read_text())["rows"]:
            rows[(path.parent.name, row["name"])] = row
    return rows


def readme_table(repo_root: Path) -> list[list[str]]:
    """The cells of the Results table's rows (header and rule left out)."""
    text = (repo_root / "README.md").read_text()
    section = text.split("\n## Results\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if re.match(r"\| \d+[a-z]? \|", line)]
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]


def named_row(label: str, known: dict) -> tuple[str, str]:
    """The study row a README label names in backticks (`plan: name` or `name`), the last
    such name where it gives two (`no_llm`, first 4 epochs (`no_llm_4ep`))."""
    for plan, name in reversed(re.findall(r"`(?:(\w+): )?(\w+)`", label)):
        key = (plan or DEFAULT_PLAN, name)
        if key in known:
            return key
    raise AssertionError(f"README Results row {label!r} names no row of benchmarks/results")


def shown(mean: float | None, std: float | None) -> str:
    """How the README writes a test score: 3 decimals, with the spread over seeds."""
    return f"{mean:.3f}" + ("" if std is None else f" ± {std:.3f}")


def test_the_readme_results_table_matches_the_committed_results(repo_root):
    known = results_rows(repo_root)
    table = readme_table(repo_root)
    assert len(table) >= 12, "the Results table was not found in README.md"
    for number, label, n, mse, mae, *_ in table:
        row = known[named_row(label, known)]
        assert n == str(row["n"]), (number, n, row["n"])
        if row["n"] == 0:
            assert "not" in mse, (number, mse)  # "not run yet" / "not finished yet"
            continue
        assert mse == shown(row["test_mse_mean"], row["test_mse_std"]), (number, mse)
        assert mae == shown(row["test_mae_mean"], row["test_mae_std"]), (number, mae)
