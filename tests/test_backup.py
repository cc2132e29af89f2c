"""Backups end to end: `raftcache snapshot save` from a running cluster, `snapshot restore` into
a new one, every key found again; damaged and newer-format files refused."""

import os
import subprocess
import sys

import pytest

from raftcache import backup
from raftcache.cluster import LocalCluster, free_port_block


def raftcache(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "raftcache", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A cluster with data, its backup file, and what it held."""
    base = tmp_path_factory.mktemp("backup")
    old = LocalCluster(str(base / "old"), port=free_port_block(3), storage="file-wal",
                       extra={"raft": {"snapshot_entries": 300, "snapshot_keep_entries": 10}})
    old.start()
    try:
        old.wait_for_leader()
        held = {}
        with old.client(timeout=10.0) as c:
            for i in range(400):  # past a Raft snapshot: the backup is not the log
                held[f"k{i}"] = (f"value {i}".encode() * 3, c.set(f"k{i}", f"value {i}" * 3))
            c.delete("k7")
            del held["k7"]
            held["last"] = (b"acknowledged just before the save", c.set(
                "last", "acknowledged just before the save"))
        path = str(base / "cache.rcbackup")
        saved = raftcache("snapshot", "save", path, "--endpoints", ",".join(old.endpoints()))
        assert saved.returncode == 0, saved.stderr
        assert saved.stdout.splitlines()[-1].startswith(f"saved {path}: index ")
        assert "saving" in saved.stdout  # progress lines (not a terminal)
        yield path, held, old.keyring_path(), base
    finally:
        old.stop()


def test_restore_seeds_a_new_cluster_that_finds_every_key(saved):
    path, held, keyring, base = saved
    header, _ = backup.read(path)
    assert header["index"] >= held["last"][1]  # everything acknowledged before the save
    new_dir = str(base / "new")
    restored = raftcache("snapshot", "restore", path, "--data-dir", new_dir, "--nodes", "3",
                         "--keyring", keyring)
    assert restored.returncode == 0, restored.stderr
    assert f"restored index {header['index']}" in restored.stdout
    again = raftcache("snapshot", "restore", path, "--data-dir", new_dir, "--nodes", "3")
    assert again.returncode == 2 and "not empty" in again.stderr  # never over a live cluster
    new = LocalCluster(new_dir, port=free_port_block(3), storage="file-wal")
    new.start()
    try:
        new.wait_for_leader(timeout=30)
        with new.client(timeout=10.0) as c:
            for key, (value, version) in held.items():
                assert c.get_with_version(key) == (value, version), key
            assert c.get("k7") is None
            assert c.set("after", "restore") > header["index"]  # the log goes on from there
            status = c.status()
            assert sorted(status.voters) == [1, 2, 3]
            # Its members are where its own configs say, not where the old cluster was.
            assert status.peer_addresses == {i: new.address(i) for i in (1, 2, 3)}
    finally:
        new.stop()


def test_a_damaged_or_newer_backup_is_refused(saved, tmp_path):
    path, *_ = saved
    with open(path, "rb") as f:
        data = bytearray(f.read())
    damaged, newer = tmp_path / "damaged", tmp_path / "newer"
    flipped = bytearray(data)
    flipped[-10] ^= 0xFF
    damaged.write_bytes(flipped)
    newer.write_bytes(data[:8] + bytes([backup.VERSION + 1]) + data[9:])
    for bad, message in ((damaged, "the image is damaged"),
                         (newer, f"backup format {backup.VERSION + 1} is newer than this build"),
                         (tmp_path / "missing", "No such file")):
        p = raftcache("snapshot", "restore", str(bad), "--data-dir", str(tmp_path / "d"))
        assert p.returncode == 2 and message in p.stderr, p.stderr
        assert not os.path.exists(tmp_path / "d" / "node1")
