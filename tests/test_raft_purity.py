"""The pure core (every module under raftcache/core, found by walking the folder) draws no
randomness but from the generator it is handed, and calls no I/O builtin. What it may import
is checked by import-linter (setup.cfg, contract "The pure core does no I/O";
tests/test_arrows.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parent.parent / "raftcache" / "core"
IO_BUILTINS = {"open", "print", "input", "exec", "eval", "compile", "__import__", "breakpoint"}


def _modules(root: Path) -> list[Path]:
    return sorted(root.rglob("*.py"))


def _problems(path: Path) -> list[str]:
    """Each use of `random` other than as the injected generator's type, and each call of an
    I/O builtin, in the module at `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module == "random":
            if [a.name for a in node.names] != ["Random"]:
                found.append("imports from random other than Random")
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id == "random" and node.attr != "Random":
                found.append(f"uses random.{node.attr}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id in IO_BUILTINS:
                found.append(f"calls {node.func.id}()")
    return found


def test_the_walk_finds_the_protocol_and_the_cache():
    names = {p.relative_to(CORE).as_posix() for p in _modules(CORE)}
    assert {"raft/rawnode.py", "raft/log.py", "cache/statemachine.py"} <= names


@pytest.mark.parametrize("path", _modules(CORE), ids=lambda p: p.relative_to(CORE).as_posix())
def test_no_randomness_or_io_builtins(path):
    assert _problems(path) == []


def test_the_check_has_teeth(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import random\nx = random.random()\nprint(x)\nopen('f')\n")
    assert sorted(_problems(bad)) == ["calls open()", "calls print()", "uses random.random"]
