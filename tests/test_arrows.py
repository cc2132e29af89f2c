"""Arrows point inward: plugins, the client, the CLI and the tools import
the core; the core never imports them. It reaches plugins only through hooks."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "raftcache"
CORE_MODULES = sorted(p.stem for p in (PACKAGE / "core").glob("*.py"))
# Outside the core, the core may use only the wire format (it is the node's protocol). The one
# exception is test-only: `[testing] mutant` loads a deliberately broken core to prove the fault
# suite catches it.
ALLOWED = {"raftcache", "raftcache.wire", "raftcache.testing.mutants"}


def _raftcache_imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.split(".")[0] == "raftcache"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] == "raftcache":
                out += [node.module] + [f"{node.module}.{a.name}" for a in node.names
                                        if node.module == "raftcache"]
    return out


@pytest.mark.parametrize("name", CORE_MODULES)
def test_core_imports_only_the_core(name):
    for module in _raftcache_imports(PACKAGE / "core" / f"{name}.py"):
        if module.startswith("raftcache.core") or module in ALLOWED:
            continue
        # `from raftcache import wire` names raftcache.wire
        pytest.fail(f"raftcache/core/{name}.py imports {module}: the core must not depend on "
                    "plugins, the client, the CLI or the tools")


def test_the_check_catches_an_outward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from raftcache.plugins.storage import file_wal\n")
    assert _raftcache_imports(bad) == ["raftcache.plugins.storage"]
    assert not "raftcache.plugins.storage".startswith("raftcache.core")
