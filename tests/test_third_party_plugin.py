"""A third-party plugin as users will write one: its own package and entry point, installed
with pip, picked by name from a node's config."""

import os
import subprocess
import sys

import pytest

from raftcache.cluster import LocalCluster, free_port_block

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "raftcache-audit-log")


@pytest.fixture(scope="module")
def installed_example():
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--disable-pip-version-check", EXAMPLE],
                   check=True, capture_output=True, timeout=300)
    yield
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", "raftcache-audit-log"],
                   capture_output=True, timeout=120)


def test_cluster_runs_on_a_pip_installed_plugin(tmp_path, installed_example):
    from raftcache.pluginapi.manager import PluginSet, entry_point_names, make_manager

    assert "audit-log" in entry_point_names()
    assert "audit-memory" in PluginSet(make_manager()).names("backend")
    cluster = LocalCluster(str(tmp_path / "c"), port=free_port_block(3), backend="audit-memory")
    audit = {i: tmp_path / f"audit{i}.log" for i in (1, 2, 3)}
    cluster.write_configs()
    for i in (1, 2, 3):  # each node gets its own audit file through the plugin's options
        path = cluster.config_path(i)
        with open(path, "a") as f:
            f.write(f'[backend.options]\npath = "{audit[i]}"\n')
    for i in (1, 2, 3):
        cluster.start(i)
    try:
        cluster.wait_for_leader()
        with cluster.client() as c:
            c.set("audited", "yes")
            c.delete("audited")
            c.set("kept", "1")
            assert c.get("kept") == b"1"
    finally:
        cluster.stop()
    for i in (1, 2, 3):
        # Every replica applied the changes through the plugin. A backend gets each batch's
        # net change per key, so a set and delete that committed together may show as the
        # delete alone; the last word on each key is the same everywhere.
        actions = [line.split(" ", 2)[2].split(" ", 1) for line in
                   audit[i].read_text().splitlines()]
        last = {key: action for action, key in actions}
        assert last == {"b'audited'": "delete", "b'kept'": "set"}, actions
        assert actions[-1] == ["set", "b'kept'"]
