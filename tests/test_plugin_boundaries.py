"""Plugins reach only what they are given: every use of a hook's `node` argument in the
plugins' code (built-in, the third-party example and the test-only ones) is a public name of
`NodeContext`, never a private attribute or a part of the node behind it."""

from __future__ import annotations

import ast
from pathlib import Path

import attrs
import pytest

from raftcache.pluginapi import NodeContext

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_CODE = sorted([*(ROOT / "raftcache" / "plugins").rglob("*.py"),
                      *(ROOT / "examples" / "raftcache-audit-log").rglob("*.py"),
                      ROOT / "raftcache" / "testing" / "auth_mutants.py",
                      ROOT / "raftcache" / "testing" / "slow_disk.py"])
# What NodeContext offers: its public fields and methods (read from the class, not listed).
OFFERED = ({f.name for f in attrs.fields(NodeContext) if not f.name.startswith("_")}
           | {n for n in vars(NodeContext) if not n.startswith("_")})


def reaches(source: str) -> list[str]:
    """Each place where a function taking `node` uses it for something NodeContext does
    not offer: `node.x` with x not offered, or getattr(node, "x")."""
    found = []
    for func in ast.walk(ast.parse(source)):
        if not isinstance(func, ast.FunctionDef | ast.Lambda):
            continue
        if "node" not in {a.arg for a in func.args.args + func.args.kwonlyargs}:
            continue
        for n in ast.walk(func):
            if (isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                    and n.value.id == "node" and n.attr not in OFFERED):
                found.append(f"line {n.lineno}: node.{n.attr}")
            if (isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                    and n.func.id in ("getattr", "setattr") and len(n.args) >= 2
                    and isinstance(n.args[0], ast.Name) and n.args[0].id == "node"):
                found.append(f"line {n.lineno}: {n.func.id}(node, ...)")
    return sorted(found)


def test_the_context_offers_what_plugins_need():
    assert {"id", "config", "log", "now_ms", "settings", "read_settled", "status"} <= OFFERED


@pytest.mark.parametrize("path", PLUGIN_CODE, ids=lambda p: str(p.relative_to(ROOT)))
def test_plugins_use_only_the_node_context(path):
    assert reaches(path.read_text()) == []


def test_the_check_has_teeth():
    source = ("def raftcache_admin(node, action):\n"
              "    return node._stamp(), node.sm.settings, node.settings, getattr(node, 'raw')\n")
    assert reaches(source) == ["line 2: getattr(node, ...)", "line 2: node._stamp",
                               "line 2: node.sm"]
