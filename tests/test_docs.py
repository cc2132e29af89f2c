"""The docs name what exists: every file path, dotted module path and `Class.member` that the
README, docs/*.md and the package's docstrings put in backticks resolves against this tree.
Cheap to keep true, and it catches the usual drift: a file moved, a method renamed."""

from __future__ import annotations

import ast
import importlib
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "raftcache"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TICKED = re.compile(r"`([^`\n]+)`")
PATH = re.compile(r"^[\w./{},*-]+/[\w./{},*-]*$|^[\w-]+\.(py|md|thrift|toml|json|cfg)$")
DOTTED = re.compile(r"^raftcache(\.\w+)+$")
MEMBER = re.compile(r"^([A-Z]\w+)\.(_?[a-z]\w*)(\(\))?$")


def _expand(path: str) -> list[str]:
    """`core/{a,b}.py` -> core/a.py, core/b.py."""
    m = re.search(r"\{([^}]*)\}", path)
    if not m:
        return [path]
    return [p for alt in m.group(1).split(",")
            for p in _expand(path[:m.start()] + alt + path[m.end():])]


FILE = re.compile(r"\.(py|md|thrift|toml|json|cfg)$")


@cache
def _file_names() -> frozenset[str]:
    return frozenset(p.name for p in ROOT.rglob("*") if ".venv" not in p.parts)


def _path_exists(path: str, here: Path) -> bool:
    if "*" in path or path.startswith(("/", "~")) or "://" in path:
        return True  # a pattern or a place on someone's machine, not a name in this tree
    if re.match(r"^([A-Z][A-Z_]*|<\w+>)/", path):
        return True  # DATA_DIR/...: a place the operator chooses
    if "/" not in path:
        # A bare name: a module named by its file, found anywhere (the text says where);
        # other bare names (join.toml, bench.json) are files the product writes.
        return not path.endswith(".py") or path in _file_names()
    bases = [here, ROOT, PACKAGE, PACKAGE / "core", PACKAGE / "plugins", ROOT / "examples"]
    return all(any((b / p.rstrip("/")).exists() for b in bases) for p in _expand(path))


def _dotted_exists(name: str) -> bool:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


@cache
def _classes() -> dict[str, set[str]]:
    """Every class defined under raftcache/ -> the names it defines (methods, attributes)."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                names = found.setdefault(node.name, set())
                for item in ast.walk(node):
                    if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                        names.add(item.name)
                    elif isinstance(item, ast.Attribute) and isinstance(item.value, ast.Name):
                        names.add(item.attr)  # self.x = ...
                    elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                        names.add(item.target.id)
                    elif isinstance(item, ast.Assign):
                        names.update(t.id for t in item.targets if isinstance(t, ast.Name))
    return found


def problems(text: str, here: Path = ROOT) -> list[str]:
    """What the backticked names in `text` get wrong (`here`: the folder relative paths in
    it start from)."""
    found = []
    for token in TICKED.findall(text):
        token = token.strip()
        if (PATH.match(token) or FILE.search(token)) and not token.startswith(".") \
                and " " not in token:
            if not _path_exists(token, here):
                found.append(f"{token}: no such file")
        elif DOTTED.match(token):
            if not _dotted_exists(token):
                found.append(f"{token}: no such module or name")
        elif (m := MEMBER.match(token)) and m.group(1) in _classes():
            if m.group(2) not in _classes()[m.group(1)]:
                found.append(f"{token}: {m.group(1)} has no {m.group(2)}")
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_the_docs_name_what_exists(doc):
    assert problems(doc.read_text()) == []


def _docstrings() -> list[tuple[Path, str, str]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    out.append((path, getattr(node, "name", ""), doc))
    return out


def test_docstrings_name_what_exists():
    bad = [f"{path.relative_to(ROOT)}:{name}: {p}" for path, name, doc in _docstrings()
           for p in problems(doc, path.parent)]
    assert bad == []


def test_the_check_has_teeth():
    assert problems("`raftcache/core/node.py` and `raftcache.plugins.backend.simple` and "
                    "`Replica._drive_loop` and `Replica.no_such_method`") == [
        "raftcache/core/node.py: no such file",
        "raftcache.plugins.backend.simple: no such module or name",
        "Replica.no_such_method: Replica has no no_such_method",
    ]
