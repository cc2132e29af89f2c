"""Interop from Node.js: examples/nodejs/client.js, on code generated from the IDL by Apache
Thrift's compiler and the official runtime (npm `thrift`), drives a running cluster; the Python
client then reads back what it wrote."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from raftcache.cluster import LocalCluster, free_port_block
from raftcache.wire import IDL_PATH

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "nodejs"


@pytest.fixture
def example(tmp_path):
    """A copy of examples/nodejs with its generated code and node_modules: the repository stays
    clean, and the steps are those of its README."""
    copy = tmp_path / "nodejs"
    shutil.copytree(EXAMPLE, copy, ignore=shutil.ignore_patterns("node_modules", "gen"))
    gen = copy / "gen"
    gen.mkdir()
    # with_ns drops "use strict": admin's parameter `arguments` is a syntax error in strict mode.
    subprocess.run(["thrift", "--gen", "js:node,with_ns", "-out", str(gen), IDL_PATH],
                   check=True, timeout=60)
    assert (gen / "RaftCache.js").exists()
    npm = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
                         capture_output=True, text=True, timeout=180, cwd=str(copy))
    assert npm.returncode == 0, npm.stdout + npm.stderr
    return copy


def test_nodejs_generated_client(tmp_path, example):
    cluster = LocalCluster(str(tmp_path / "cluster"), port=free_port_block(3))
    cluster.start()
    try:
        cluster.wait_for_leader()
        result = subprocess.run(
            ["node", "client.js", ",".join(cluster.endpoints())],
            capture_output=True, text=True, timeout=60, cwd=str(example),
        )
        assert result.returncode == 0, result.stdout + result.stderr
        ok = re.search(r"^nodejs ok (\d+)$", result.stdout, re.MULTILINE)
        assert ok, result.stdout + result.stderr
        assert "answered NotLeader" in result.stdout
        # What Node wrote, as Python reads it: the same bytes at the version Node was given.
        with cluster.client() as client:
            assert client.get_with_version("nodejs:greeting") == (b"hello from node", int(ok[1]))
            assert client.get("nodejs:interop") is None  # removed by Node
            assert client.incr("nodejs:counter", 1) == 42  # Node's 41, plus one
    finally:
        cluster.stop()
