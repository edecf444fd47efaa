"""The set-up contract: dependency lists in sync, CI calls the README's test command."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


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


def _lock(repo_root) -> dict[str, str]:
    """requirements.lock as {canonical name: version}."""
    pins = {}
    for line in (repo_root / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def _required(root: str, extras: frozenset[str]) -> set[str]:
    """Canonical names of every installed distribution that ``root[extras]`` needs, transitively,
    on this machine (environment markers evaluated); torch's own requirements are left to
    TORCH_SPEC, as torch is."""
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(root, extras)]
    while todo:
        name, wanted = todo.pop()
        if (canonicalize_name(name), wanted) in seen:
            continue
        seen.add((canonicalize_name(name), wanted))
        for text in [] if canonicalize_name(name) == "torch" else metadata.requires(name) or []:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in wanted | {""}):
                todo.append((req.name, frozenset(req.extras)))
    return {name for name, _ in seen}


@pytest.mark.locked_install
def test_the_installed_packages_are_exactly_the_locked_versions(repo_root):
    lock = _lock(repo_root)
    needed = _required("timellm-workbench", frozenset({"dev"})) - {"timellm-workbench", "torch"}
    assert needed - set(lock) == set(), "pyproject.toml needs packages the lock lacks: make lock"
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    wrong = {
        name: (installed[name], version)
        for name, version in lock.items()
        if name in installed and installed[name] != version
    }
    assert wrong == {}, "installed != locked (make setup installs the lock)"
    assert needed <= set(installed)


def test_the_lock_pins_every_package_once_and_leaves_torch_to_the_makefile(repo_root):
    lines = [
        line
        for line in (repo_root / "requirements.lock").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.+!-]+", line) for line in lines), lines
    pins = _lock(repo_root)
    assert len(pins) == len(lines) and "torch" not in pins
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    direct = {_name(r) for r in project["dependencies"]} - {"torch"}
    direct |= {_name(r) for group in project["optional-dependencies"].values() for r in group}
    assert {canonicalize_name(n) for n in direct} <= set(pins)


def test_environment_yml_pins_the_locked_versions(repo_root):
    env = yaml.safe_load((repo_root / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    pins = dict(r.split("==") for r in pip_section)
    lock = _lock(repo_root)
    torch_spec = re.search(r"TORCH_SPEC \?= torch==(\S+)", (repo_root / "Makefile").read_text())
    assert pins.pop("torch") == torch_spec.group(1)
    assert {canonicalize_name(n): v for n, v in pins.items()} == {
        canonicalize_name(n): lock[canonicalize_name(n)] for n in pins
    }
