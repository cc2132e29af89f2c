"""Backups end to end: `raftcache snapshot save` from a running cluster, `snapshot restore` into
a new one, every key found again; damaged and newer-format files refused; the backup and the
restored keyring owner-only from their first byte; a backup of sealed values refused without
the keyring that opens them."""

import os
import stat
import subprocess
import sys

import pytest

from raftcache import backup
from raftcache.cluster import LocalCluster, free_port_block
from raftcache.plugins.security.encryption import make_keyring


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
        yield path, held, old.keyring_path(), base, old
    finally:
        old.stop()


def test_restore_seeds_a_new_cluster_that_finds_every_key(saved):
    path, held, keyring, base, _old = saved
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


def test_a_backup_is_0600_from_creation_and_never_written_through_a_planted_name(saved,
                                                                                  tmp_path):
    *_, old = saved
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    out = tmp_path / "planted.rcbackup"
    os.symlink(victim, str(out) + ".tmp")  # where the backup used to be written first
    # umask 0: whatever mode the file has, it was created with
    got = subprocess.run([sys.executable, "-m", "raftcache", "snapshot", "save", str(out),
                          "--endpoints", ",".join(old.endpoints())], capture_output=True,
                         text=True, timeout=120, umask=0)
    assert got.returncode == 0, got.stderr
    assert victim.read_bytes() == b"untouched"
    assert os.readlink(str(out) + ".tmp") == str(victim)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    backup.read(str(out))  # whole
    assert sorted(os.listdir(tmp_path)) == ["planted.rcbackup", "planted.rcbackup.tmp",
                                            "victim"]


def test_the_restored_keyring_is_never_readable_by_others(saved, tmp_path, monkeypatch):
    path, _held, keyring, *_ = saved
    fsynced = []  # every regular file fsynced during the restore, and its mode then
    real = os.fsync

    def spy(fd):
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            fsynced.append((os.path.basename(os.readlink(f"/proc/self/fd/{fd}")),
                            stat.S_IMODE(st.st_mode)))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    old = os.umask(0)
    try:
        backup.restore(path, str(tmp_path / "d"), 1, keyring=keyring)
    finally:
        os.umask(old)
    # The copy went through write_private: 0600 before its first byte was fsynced.
    assert any(name.startswith(".keyring.") for name, _ in fsynced), fsynced
    assert all(mode == 0o600 for _, mode in fsynced), fsynced
    restored = tmp_path / "d" / "keyring"
    assert stat.S_IMODE(restored.stat().st_mode) == 0o600
    with open(keyring, "rb") as f:
        assert restored.read_bytes() == f.read()


def test_a_backup_of_sealed_values_needs_the_keyring_that_opens_them(saved, tmp_path):
    path, _held, keyring, *_ = saved
    target = tmp_path / "d"
    refused = raftcache("snapshot", "restore", path, "--data-dir", str(target), "--nodes", "3")
    assert refused.returncode == 2, refused
    # It names the data key and says where the master key's id is recorded (nowhere before a
    # rotation: data key 0 is derived from it).
    assert "sealed at rest with data key 0" in refused.stderr, refused.stderr
    assert "--keyring" in refused.stderr and "Unavailable" in refused.stderr
    assert not os.path.exists(target / "node1")
    other = str(tmp_path / "other-keyring")
    make_keyring(other)
    wrong = raftcache("snapshot", "restore", path, "--data-dir", str(target), "--keyring", other)
    assert wrong.returncode == 2 and "does not open" in wrong.stderr, wrong.stderr
    assert not os.path.exists(target / "node1") and not os.path.exists(target / "keyring")
    anyway = raftcache("snapshot", "restore", path, "--data-dir", str(target),
                       "--without-keyring")
    assert anyway.returncode == 0, anyway.stderr
    assert "need the old cluster's keyring" in anyway.stdout
    assert not os.path.exists(target / "keyring")


def test_a_backup_without_sealed_values_restores_without_a_keyring(tmp_path):
    plain = LocalCluster(str(tmp_path / "plain"), nodes=1, port=free_port_block(1),
                         encryption=False)
    plain.start()
    try:
        plain.wait_for_leader()
        with plain.client(timeout=10.0) as c:
            c.set("k", "plaintext")
        out = str(tmp_path / "plain.rcbackup")
        saved = raftcache("snapshot", "save", out, "--endpoints", plain.address(1))
        assert saved.returncode == 0, saved.stderr
    finally:
        plain.stop()
    restored = raftcache("snapshot", "restore", out, "--data-dir", str(tmp_path / "d"),
                         "--nodes", "1")
    assert restored.returncode == 0, restored.stderr
    assert "keyring" not in restored.stdout


def test_after_a_rotation_the_refusal_names_the_master_key_and_the_keyring_still_opens(
        saved, tmp_path):
    # Last in this module: it rotates the fixture's cluster (the backups above were saved
    # before).
    *_, keyring, _base, old = saved
    endpoints = ",".join(old.endpoints())
    rotated = raftcache("keys", "rotate", "--endpoints", endpoints)
    assert rotated.returncode == 0, rotated.stderr
    out = str(tmp_path / "rotated.rcbackup")
    assert raftcache("snapshot", "save", out, "--endpoints", endpoints).returncode == 0
    refused = raftcache("snapshot", "restore", out, "--data-dir", str(tmp_path / "d"))
    assert refused.returncode == 2
    assert "sealed at rest with data key 1, which need master key 1" in refused.stderr, \
        refused.stderr
    restored = raftcache("snapshot", "restore", out, "--data-dir", str(tmp_path / "d"),
                         "--keyring", keyring)
    assert restored.returncode == 0, restored.stderr
