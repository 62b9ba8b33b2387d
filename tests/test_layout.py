"""The project's shape: dvc.yaml's code deps cover what each stage imports, imports run one way, every parameter
is documented, and the README's links resolve."""

from __future__ import annotations

import ast
import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml
from conftest import PROJECT_ROOT

from pipeline.params import PER_CONFIG_SETTINGS, Params, SAEConfig

PACKAGES = ("pipeline", "stages")


def project_modules(root: Path = PROJECT_ROOT) -> dict[str, Path]:
    """Every module of the packages a stage can import, by dotted name (a package by its __init__)."""
    found = {}
    for package in PACKAGES:
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(path: Path, modules: dict[str, Path], top_level_only: bool = False) -> set[str]:
    """The project modules `path` imports, anywhere in it (imports inside functions run when they are called) or
    only at its top level; with every package above each (importing a.b.c runs a and a.b first). A string
    `package.module:Name` counts as an import of that module (pipeline/saes's registry imports its classes so)."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"[\w.]+:\w+", node.value):
            names.add(node.value.split(":")[0])
    return {prefix for name in names for prefix in _prefixes(name) if prefix in modules}


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def stage_closure(stage: str, modules: dict[str, Path]) -> set[Path]:
    """Every project file `pipeline <stage>` runs: the CLI as it loads, the stage module, what they import, and the
    data files shipped beside those modules (e.g. the browser's page)."""
    cli = imports_of(modules["pipeline.cli"], modules, top_level_only=True)  # its other commands' imports aside
    seen, todo = {"pipeline", "pipeline.cli"}, [*cli, *_prefixes(f"stages.{stage}")]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += imports_of(modules[module], modules)
    files = {modules[module] for module in seen}
    data = {p for f in files for p in f.parent.iterdir() if p.is_file() and p.suffix not in (".py", ".pyc")}
    return files | data


def dvc_stages(root: Path = PROJECT_ROOT) -> dict[str, list[str]]:
    """dvc.yaml's stages: the `pipeline` subcommand each runs -> its deps."""
    found = {}
    for name, stage in yaml.safe_load((root / "dvc.yaml").read_text())["stages"].items():
        body = stage.get("do", stage)
        subcommand = body["cmd"].split()[1]
        found[name] = (subcommand, body["deps"])
    return found


def uncovered(stage: str, deps: list[str], root: Path = PROJECT_ROOT) -> list[str]:
    """Project files the stage runs that no dep of it covers (a dep covers itself and everything below it)."""
    covered = [root / dep for dep in deps if "${" not in dep]
    needed = stage_closure(stage, project_modules(root))
    missing = [f for f in needed if not any(f == dep or dep in f.parents for dep in covered)]
    return sorted(str(f.relative_to(root)) for f in missing)


@pytest.mark.parametrize("name", list(dvc_stages()))
def test_dvc_deps_cover_every_module_the_stage_runs(name):
    subcommand, deps = dvc_stages()[name]
    assert uncovered(subcommand, deps) == [], f"dvc.yaml stage {name!r} misses these deps"


def test_the_deps_check_finds_a_removed_dependency():
    subcommand, deps = dvc_stages()["evaluate"]
    assert uncovered(subcommand, [d for d in deps if d != "pipeline/synth"]) == [
        "pipeline/synth/__init__.py",
        "pipeline/synth/generator.py",
    ]
    subcommand, deps = dvc_stages()["analyze"]
    assert "pipeline/analyze/browser.html" in uncovered(subcommand, [d for d in deps if d != "pipeline/analyze"])


def test_imports_run_one_way():
    """core imports nothing else of ours; nothing in pipeline/ imports a stage; no import cycle at load time."""
    modules = project_modules()
    # A module's own packages are loaded before it, not by it: no edge to them.
    graph = {
        name: imports_of(path, modules, top_level_only=True) - set(_prefixes(name)) for name, path in modules.items()
    }
    for name, path in modules.items():
        everything = imports_of(path, modules)
        if name.startswith("pipeline."):
            assert not any(m.startswith("stages") for m in everything), f"{name} imports a stage"
        if name.startswith("pipeline.core"):
            outside = {m for m in everything if not m.startswith("pipeline.core") and m != "pipeline"}
            assert not outside, f"{name} imports {outside}"
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for child in graph[name]:
            assert state.get(child) != 1, f"import cycle: {' -> '.join([*path, child])}"
            if child not in state:
                visit(child, [*path, child])
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def params_keys() -> list[str]:
    """Every key of the params file, as `section.key` (`sae.<key>.<setting>` for the per-config sections)."""
    keys = [f"sae.<key>.{field.name}" for field in dataclasses.fields(SAEConfig)]
    for section, kind in typing.get_type_hints(Params).items():
        if dataclasses.is_dataclass(kind):
            keys += [f"{section}.{field.name}" for field in dataclasses.fields(kind)]
    return keys


def test_every_params_key_is_documented():
    text = (PROJECT_ROOT / "docs" / "params.md").read_text()
    documented = set(re.findall(r"`([\w<>]+\.[\w<>.]+)`", text))
    assert set(params_keys()) - documented == set()
    assert {f"sae.<key>.{name}" for name in PER_CONFIG_SETTINGS} <= documented


def test_params_yaml_holds_the_defaults():
    """params.yaml restates the typed defaults (DVC reads its values from there): they must not drift apart."""
    from pipeline.params import load_params, params_to_dict

    loaded, defaults = params_to_dict(load_params(PROJECT_ROOT / "params.yaml")), params_to_dict(Params())
    for section in defaults:
        if section != "command":
            assert loaded[section] == defaults[section], section


def test_the_readme_is_short_and_its_links_resolve():
    text = (PROJECT_ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for link in re.findall(r"\]\((?!https?://|#)([^)#]+)", text):
        assert (PROJECT_ROOT / link).exists(), link


def test_every_test_the_fault_matrix_names_exists():
    """docs/faults.md cites tests as `test_file.py::test_name` (or `::test_name`, in the file cited before it)."""
    text = (PROJECT_ROOT / "docs" / "faults.md").read_text()
    cited, file = [], None
    for match in re.finditer(r"`(test_\w+\.py)?::(test_\w+)`", text):
        file = match.group(1) or file
        cited.append((file, match.group(2)))
    assert len(cited) > 30
    for file, name in cited:
        assert f"def {name}(" in (PROJECT_ROOT / "tests" / file).read_text(), f"{file}::{name}"
