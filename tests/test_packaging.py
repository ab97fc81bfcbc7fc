"""What a user gets from ``pip install``: declared dependencies, the tested torch range, version, licence, typing."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import warnings
from pathlib import Path

import pytest

import fx_indexcache
from fx_indexcache import _torch_version
from fx_indexcache.tools import cli

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _declared() -> dict[str, str]:
    """Distribution name -> where it is declared ("dependencies" or the extra's name)."""
    where = {_requirement_name(r): "dependencies" for r in PROJECT["dependencies"]}
    for extra, requirements in PROJECT["optional-dependencies"].items():
        for requirement in requirements:
            where.setdefault(_requirement_name(requirement), extra)
    return where


def _imported_top_level_modules() -> set[str]:
    names = set()
    for path in (ROOT / "fx_indexcache").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"fx_indexcache"}


def test_every_third_party_import_is_declared_or_comes_with_torch():
    declared = _declared()
    with_torch = {_requirement_name(r) for r in importlib.metadata.requires("torch") or []}
    distributions = importlib.metadata.packages_distributions()
    undeclared = []
    for module in sorted(_imported_top_level_modules()):
        names = {name.lower().replace("_", "-") for name in distributions.get(module, [module])}
        if not names & (set(declared) | with_torch) and module not in declared:
            undeclared.append((module, sorted(names)))
    assert not undeclared, f"imported by fx_indexcache but declared nowhere in pyproject.toml: {undeclared}"


def test_numpy_is_a_dependency_because_the_checkpoint_digest_reads_tensors_through_it():
    # Tensor.numpy() raises "Numpy is not available" without it: demo, overlap and search load the checkpoint.
    assert ".numpy()" in (ROOT / "fx_indexcache/models/reference/checkpoint.py").read_text()
    assert _declared().get("numpy") == "dependencies"


def test_plots_and_lint_are_extras():
    declared = _declared()
    assert declared.get("matplotlib") in {"plots", "test"} and "matplotlib" not in {
        _requirement_name(r) for r in PROJECT["dependencies"]}
    assert {"ruff", "mypy"} <= {_requirement_name(r) for r in PROJECT["optional-dependencies"]["lint"]}


def test_torch_requirement_states_the_tested_range():
    (low, high) = _torch_version.TESTED_TORCH_RANGE
    torch_requirements = [r for r in PROJECT["dependencies"] if _requirement_name(r) == "torch"]
    assert torch_requirements == [f"torch>={low[0]}.{low[1]},<{high[0]}.{high[1]}"]


@pytest.mark.parametrize("version", ["2.11.0+cu130", "2.12.1", "2.13.0+cpu", "2.13.0"])
def test_tested_torch_gives_no_warning(version):
    assert _torch_version.untested_torch_message(version) is None


@pytest.mark.parametrize("version", ["2.10.0", "2.14.1", "2.14.0.dev20261201+cu130", "3.0.0"])
def test_untested_torch_warns_naming_both_versions(version):
    with pytest.warns(_torch_version.UntestedTorchWarning) as caught:
        _torch_version.warn_if_untested_torch(version)
    message = str(caught[0].message)
    assert version in message and ">= 2.11 and < 2.14" in message


def test_the_running_torch_warns_only_when_untested():
    expected = _torch_version.untested_torch_message(__import__("torch").__version__)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _torch_version.warn_if_untested_torch(__import__("torch").__version__)
    assert [str(w.message) for w in caught] == ([expected] if expected else [])


def test_unreadable_torch_version_is_an_error_naming_it():
    with pytest.raises(ValueError, match="'nightly'.*MAJOR.MINOR"):
        _torch_version.torch_release("nightly")


def test_version_has_one_source_and_the_cli_prints_it(capsys):
    assert PROJECT["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fx_indexcache._version.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.dev\d+)?", fx_indexcache.__version__)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"fx-indexcache {fx_indexcache.__version__} (torch ")


def test_changelog_names_the_current_version():
    version = re.match(r"\d+\.\d+\.\d+", fx_indexcache.__version__).group(0)
    assert f"## {version}" in (ROOT / "CHANGELOG.md").read_text()


def test_licence_and_typing_marker_ship():
    assert PROJECT["license"] == "Apache-2.0" and PROJECT["license-files"] == ["LICENSE"]
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()
    assert (ROOT / "fx_indexcache/py.typed").exists()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["fx_indexcache"]
