"""The pure core does no I/O, reads no clock, starts no thread and draws no randomness itself.

Checked statically: every import of the pure modules is within an allow-list, `random` is used
only as the type of the injected generator, and no I/O builtin is called. Other modules under
raftcache/core (the gevent driver, plugins) are deliberately out of scope.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parent.parent / "raftcache" / "core"
PURE = ("messages", "raft", "log", "progress", "quorum", "validate", "tracker", "read_only")
ALLOWED = {"__future__", "attrs", "enum", "json", "collections", "typing", "random"}
IO_BUILTINS = {"open", "print", "input", "exec", "eval", "compile", "__import__", "breakpoint"}


def _tree(name: str) -> ast.Module:
    path = CORE / f"{name}.py"
    assert path.is_file(), f"pure core module {path} is missing"
    return ast.parse(path.read_text(), filename=str(path))


def test_every_pure_module_exists():
    for name in PURE:
        assert (CORE / f"{name}.py").is_file(), name


@pytest.mark.parametrize("name", PURE)
def test_imports_are_within_the_allow_list(name):
    for node in ast.walk(_tree(name)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                assert top in ALLOWED, f"{name}.py imports {alias.name}"
                assert alias.name in ALLOWED or alias.name == "collections.abc", alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: only other pure modules
                mods = [node.module] if node.module else [a.name for a in node.names]
                for mod in mods:
                    assert mod.split(".")[0] in PURE, f"{name}.py imports .{mod}"
            else:
                top = node.module.split(".")[0]
                if top == "raftcache":
                    parts = node.module.split(".")
                    assert parts[:2] == ["raftcache", "core"] and parts[2] in PURE, node.module
                else:
                    assert top in ALLOWED, f"{name}.py imports from {node.module}"
                    assert node.module in ALLOWED or node.module == "collections.abc"
                if node.module == "random":
                    assert [a.name for a in node.names] == ["Random"], "random only as a type"


@pytest.mark.parametrize("name", PURE)
def test_random_is_only_the_injected_generators_type(name):
    tree = _tree(name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id == "random":
                assert node.attr == "Random", f"{name}.py uses random.{node.attr}"
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                assert func.value.id != "random", f"{name}.py calls random.{func.attr}()"


@pytest.mark.parametrize("name", PURE)
def test_no_io_builtins_are_called(name):
    for node in ast.walk(_tree(name)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id not in IO_BUILTINS, f"{name}.py calls {node.func.id}()"


def test_the_checks_would_catch_a_forbidden_import(tmp_path, monkeypatch):
    # Guard against a vacuous test: a module importing time must be rejected.
    bad = tmp_path / "raft.py"
    bad.write_text("import time\nimport random\nx = random.random()\n")
    for name in PURE:
        if name != "raft":
            (tmp_path / f"{name}.py").write_text("")
    monkeypatch.setitem(globals(), "CORE", tmp_path)
    with pytest.raises(AssertionError):
        test_imports_are_within_the_allow_list("raft")
    with pytest.raises(AssertionError):
        test_random_is_only_the_injected_generators_type("raft")
