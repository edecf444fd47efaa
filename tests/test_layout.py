"""The package layout's import direction: data -> models -> training -> evaluation -> notebooks.

Imports are read with ``ast`` (function-local ones too), so a lazy import that goes the wrong
way fails here as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "timellm_lib"
# Folder -> the timellm_lib subpackages it must never import. training may use
# evaluation.metrics (validation scores windows the same way `timellm eval` does).
FORBIDDEN = {
    "data": ("models", "training", "evaluation", "notebooks", "cli"),
    "models": ("training", "evaluation", "notebooks", "cli"),
    "training": ("evaluation.inference", "notebooks", "cli"),
    "evaluation": ("notebooks", "cli"),
}
BASE_MODULES = ("config.py", "errors.py", "files.py", "yaml_input.py")


def imported_modules(path: Path) -> list[str]:
    """Every ``timellm_lib`` module a file imports, as dotted names below the package."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return [n.removeprefix("timellm_lib.") for n in names if n.startswith("timellm_lib.")]


def violations(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path.name} imports timellm_lib.{name}"
        for path in files
        for name in imported_modules(path)
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    ]


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_layers_import_downward_only(folder: str) -> None:
    files = sorted((PACKAGE / folder).rglob("*.py"))
    assert files, f"timellm_lib/{folder} has no modules"
    assert violations(files, FORBIDDEN[folder]) == []


def test_base_modules_import_no_layer() -> None:
    files = [PACKAGE / name for name in BASE_MODULES]
    layers = ("data", "models", "training", "evaluation", "notebooks", "cli")
    assert violations(files, layers) == []


def test_the_checker_sees_lazy_imports(tmp_path: Path) -> None:
    """A function-local import of the notebooks package counts (the check can fail)."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from timellm_lib.notebooks import plots\n")
    assert violations([bad], ("notebooks",)) == [
        "bad.py imports timellm_lib.notebooks",
        "bad.py imports timellm_lib.notebooks.plots",
    ]


def test_package_top_level_holds_only_the_base_modules() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == sorted(["__init__.py", "cli.py", *BASE_MODULES])
    folders = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    assert folders == ["data", "evaluation", "models", "notebooks", "training"]


def test_no_model_reads_the_run_config() -> None:
    """Models are built from their own params; only models/params.py (which builds them) and
    build_model see the run Config or its model section."""
    builders = {"params.py", "__init__.py"}
    config_types = {"timellm_lib.config.Config", "timellm_lib.config.ModelConfig"}
    readers = [
        path.name
        for path in sorted((PACKAGE / "models").glob("*.py"))
        if path.name not in builders and config_types & set(imported_modules_full(path))
    ]
    assert readers == []


def test_model_params_hold_plain_values_not_config_sections() -> None:
    """Each family's params name only what it uses: no field holds a config section."""
    import dataclasses
    import typing

    from timellm_lib.models import params

    records = [
        obj
        for obj in vars(params).values()
        if dataclasses.is_dataclass(obj) and obj.__module__ == params.__name__
    ]
    assert len(records) >= 5
    for record in records:
        assert record.__dataclass_params__.frozen, record.__name__
        for name, kind in typing.get_type_hints(record).items():
            assert "Config" not in str(kind), f"{record.__name__}.{name}: {kind}"


def imported_modules_full(path: Path) -> list[str]:
    return [f"timellm_lib.{name}" for name in imported_modules(path)]


def test_the_trainer_reads_in_one_sitting() -> None:
    """The loop's file stays short and hands no closures around (rank-0 writes are methods
    of training/saving.py's MainWriter)."""
    path = PACKAGE / "training" / "trainer.py"
    assert len(path.read_text().splitlines()) <= 450
    tree = ast.parse(path.read_text())
    nested = [
        inner.name
        for outer in ast.walk(tree)
        if isinstance(outer, ast.FunctionDef)
        for inner in ast.walk(outer)
        if inner is not outer and isinstance(inner, ast.FunctionDef)
    ]
    assert nested == []


def test_nothing_probes_a_model_for_what_its_protocol_declares() -> None:
    """The trainer, notebooks and benchmarks call the members of TrainableModel (or check
    the protocol with isinstance), never hasattr(model, member)."""
    from timellm_lib.models.protocol import TrainableModel

    members = {name for name in vars(TrainableModel) if not name.startswith("_")}
    assert {"speed_paths", "build_memory", "backbone_fingerprint"} <= members
    files = [*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "benchmarks").glob("*.py")]
    probes = [
        f"{path.name}: hasattr(..., {node.args[1].value!r})"
        for path in files
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        and getattr(node.func, "id", None) in ("hasattr", "getattr")
        and len(node.args) >= 2
        and isinstance(node.args[1], ast.Constant)
        and node.args[1].value in members
    ]
    assert probes == []
