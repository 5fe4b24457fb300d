"""Rules of the test suite itself (issue 27): shared helpers live in ``_helpers.py``, shared fixtures in
``conftest.py``; no test module imports another test module or ``conftest`` (pytest loads conftest on its own)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
TEST_MODULES = sorted(TESTS.glob("test_*.py"))
FORBIDDEN = {p.stem for p in TEST_MODULES} | {"conftest"}


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, top-level module)`` of every import in ``tree``, at any depth (inside functions too)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # ``from . import test_x`` / ``from .conftest import y``
                found += [(node.lineno, (node.module or alias.name).split(".")[0]) for alias in node.names]
            elif node.module:
                found.append((node.lineno, node.module.split(".")[0]))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in
              ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value.split(".")[0]))
    return found


def test_the_suite_has_test_modules():
    assert len(TEST_MODULES) > 10 and (TESTS / "_helpers.py").exists() and (TESTS / "conftest.py").exists()


@pytest.mark.parametrize("path", TEST_MODULES, ids=lambda p: p.name)
def test_no_test_module_imports_another_test_module_or_conftest(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = [f"{path.name}:{line} imports {mod}" for line, mod in _imported_modules(tree) if mod in FORBIDDEN]
    assert not bad, "shared helpers go to tests/_helpers.py, shared fixtures to tests/conftest.py: " + "; ".join(bad)


def _fixtures(tree: ast.AST) -> list[str]:
    def is_fixture(dec: ast.expr) -> bool:
        dec = dec.func if isinstance(dec, ast.Call) else dec
        return (isinstance(dec, ast.Attribute) and dec.attr == "fixture") or (
            isinstance(dec, ast.Name) and dec.id == "fixture")

    return [node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and any(is_fixture(d) for d in node.decorator_list)]


def test_helpers_hold_no_fixtures_and_import_no_test_module():
    """A fixture in ``_helpers`` would have to be imported by name into each module to be found; conftest's are not."""
    tree = ast.parse((TESTS / "_helpers.py").read_text())
    assert _fixtures(tree) == []
    assert [mod for _, mod in _imported_modules(tree) if mod in FORBIDDEN] == []


def test_the_rule_catches_an_import_of_a_test_module_and_of_conftest():
    """The check above is not vacuous: each kind of forbidden import is seen."""
    src = ("import test_cli\nfrom conftest import x\ndef f():\n    from test_moe import _model\n"
           "import importlib\nimportlib.import_module('test_export')\nfrom _helpers import tiny_overrides\n")
    mods = [mod for _, mod in _imported_modules(ast.parse(src))]
    assert sorted(m for m in mods if m in FORBIDDEN) == ["conftest", "test_cli", "test_export", "test_moe"]
