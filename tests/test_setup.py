"""The set-up contract: dependency lists in sync, CI calls the README's test command."""

from __future__ import annotations

import re
import tomllib

import yaml


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower()


def test_environment_yml_lists_the_same_packages_as_pyproject(repo_root):
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"]}
    wanted |= {_name(r) for group in project["optional-dependencies"].values() for r in group}
    env = yaml.safe_load((repo_root / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda_names = {_name(d) for d in env["dependencies"] if isinstance(d, str)} - {"python", "pip"}
    assert {_name(r) for r in pip_section} | conda_names == wanted


def test_ci_runs_the_readme_test_command(repo_root):
    assert "make test" in (repo_root / ".ci/run").read_text()
    readme = (repo_root / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("##", 1)[0]
    assert re.findall(r"^make \w+$", quick_start, flags=re.M) == ["make demo", "make test"]


def test_torch_is_pinned_to_the_local_cpu_wheel(repo_root):
    assert "TORCH_SPEC ?= torch==2.13.0" in (repo_root / "Makefile").read_text()
