"""The examples run from an installed package: they import only fx_indexcache's public names, never tests/."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import fx_indexcache

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))
#: modules a user imports: the package and the one vLLM configs name
PUBLIC = {"fx_indexcache": set(fx_indexcache.__all__) | {"VllmIndexCachePass", "vllm_index_cache_pass"},
          "fx_indexcache.vllm_pass": {"VllmIndexCachePass", "vllm_index_cache_pass", "check_vllm_compiles"}}


def _imports(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield from ((node.module, alias.name) for alias in node.names)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_uses_only_the_public_api(path):
    tree = ast.parse(path.read_text(), str(path))
    for module, name in _imports(tree):
        if module.split(".")[0] == "fx_indexcache":
            assert module in PUBLIC, f"{path.name} imports {module}, not a public module"
            assert name is None or name in PUBLIC[module], f"{path.name} imports {module}.{name}, not a public name"
        else:
            assert module.split(".")[0] not in {"hf_oracle", "conftest", "capture"}, f"{path.name} imports tests/"
    attributes = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                  and isinstance(node.value, ast.Name) and node.value.id == "fx_indexcache"}
    assert attributes <= PUBLIC["fx_indexcache"], f"{path.name} uses {attributes - PUBLIC['fx_indexcache']}"
    assert "sys.path" not in path.read_text(), f"{path.name} edits sys.path: it would not run from an install"


def test_public_names_the_examples_use_exist():
    import fx_indexcache.vllm_pass as vllm_pass  # noqa: F401  (imports no vLLM until used)

    for module, names in PUBLIC.items():
        imported = __import__(module, fromlist=["*"])
        missing = [name for name in names if not hasattr(imported, name)]
        assert not missing, (module, missing)
