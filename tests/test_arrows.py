"""Arrows point inward (docs/architecture.md): the layers in setup.cfg [importlinter], which
`scripts/test` checks with `lint-imports`, hold for this tree, and a violation would be caught.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(tree: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(tree))  # this tree's `raftcache`, not the installed one
    return subprocess.run([str(LINT), "--no-cache"], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=120)


def test_the_layers_hold():
    run = _lint(ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "7 kept, 0 broken" in run.stdout


@pytest.mark.parametrize("module, line, contract", [
    ("core/raft/log.py", "import time", "The pure core does no I/O"),
    ("core/raft/rawnode.py", "import gevent", "The pure core does no I/O"),
    ("core/cache/statemachine.py", "import prometheus_client", "The pure core does no I/O"),
    ("core/cache/statemachine.py", "from raftcache.node import config",
     "The core imports nothing of raftcache outside it"),
    ("core/raft/log.py", "from raftcache.core.cache import commands", "Inside the core"),
    ("pluginapi/context.py", "from raftcache.node import host", "The plugin API imports"),
    ("plugins/security/rbac.py", "from raftcache.node import host",
     "Plugins import the plugin API and the pure core"),
    ("cluster.py", "from raftcache.testing import mutants", "Product code never imports"),
    ("plugins/transport/thrift.py", "from raftcache.plugins.storage import memory",
     "do not import each other"),
])
def test_an_outward_import_breaks_a_contract(tmp_path, module, line, contract):
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "raftcache", tree / "raftcache",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "setup.cfg", tree / "setup.cfg")
    path = tree / "raftcache" / module
    path.write_text(path.read_text() + f"\n{line}  # noqa\n")
    run = _lint(tree)
    assert run.returncode != 0, run.stdout
    assert f"{contract}" in run.stdout and "BROKEN" in run.stdout, run.stdout
