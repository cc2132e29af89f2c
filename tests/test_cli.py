"""The `raftcache` command as a user runs it."""

import os
import signal
import subprocess
import sys
import time

from raftcache.cluster import free_port_block


def raftcache(*args, env=None, timeout=30):
    return subprocess.run([sys.executable, "-m", "raftcache", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True).stdout
    return [int(p) for p in out.split()]


def test_up_set_get_status_and_clean_stop(tmp_path):
    port = free_port_block(3)
    up = subprocess.Popen(
        [sys.executable, "-m", "raftcache", "up", "--port", str(port), "--data-dir",
         str(tmp_path / "data")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        lines = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = up.stdout.readline()
            lines.append(line)
            if line.startswith("leader:") or not line:
                break
        out = "".join(lines)
        assert "leader: node" in out, out
        for i in range(3):
            assert f"127.0.0.1:{port + i}" in out
        nodes = children_of(up.pid)
        assert len(nodes) == 3
        env = dict(os.environ, RAFTCACHE_ENDPOINTS=",".join(
            f"127.0.0.1:{port + i}" for i in range(3)))
        assert raftcache("set", "greeting", "hello", env=env).returncode == 0
        got = raftcache("get", "greeting", env=env)
        assert (got.returncode, got.stdout) == (0, "hello\n")
        missing = raftcache("get", "nope", env=env)
        assert missing.returncode == 1 and missing.stdout == ""
        assert raftcache("append", "greeting", ", world", env=env).stdout == "12\n"
        assert raftcache("get", "greeting", env=env).stdout == "hello, world\n"
        assert raftcache("delete", "greeting", env=env).stdout.strip() == "deleted"
        status = raftcache("status", env=env)
        assert status.returncode == 0
        rows = status.stdout.strip().splitlines()
        assert rows[0].split() == ["NODE", "ADDRESS", "ROLE", "TERM", "COMMIT", "APPLIED",
                                   "LEADER"]
        roles = sorted(r.split()[2] for r in rows[1:])
        assert roles == ["follower", "follower", "leader"]
        # Operations: hand leadership over, take a node out and bring it back as a learner.
        leader = next(int(r.split()[0]) for r in rows[1:] if r.split()[2] == "leader")
        target = 3 if leader != 3 else 1
        moved = raftcache("transfer-leader", str(target), env=env)
        assert moved.returncode == 0 and moved.stdout.startswith(f"leader {target}, "), moved
        removed = raftcache("member", "remove", "2", env=env)
        assert "voters 1,3, learners -" in removed.stdout, removed
        added = raftcache("member", "add", "2", "--learner", env=env)
        assert "voters 1,3, learners 2" in added.stdout, added
        promoted = raftcache("member", "promote", "2", env=env)
        assert "voters 1,2,3, learners -" in promoted.stdout, promoted
        unknown = raftcache("member", "add", "7", env=env)
        assert unknown.returncode == 2 and "not in cluster.peers" in unknown.stderr
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(20)
    time.sleep(0.2)
    for pid in nodes:
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(
            f"/proc/{pid}/status").read().lower(), f"node process {pid} outlived `up`"


def test_serve_with_bad_config_says_one_line(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text('[node]\nid = 1\naddress = "127.0.0.1:1"\n[cluster]\npeers = { 1 = '
                    '"127.0.0.1:1" }\n[transport]\nplugin = "carrier-pigeon"\n')
    result = raftcache("serve", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"raftcache: {path}: transport.plugin: unknown transport 'carrier-pigeon' "
        "(known: tcp-tls, thrift)"
    ]


def test_client_commands_fail_cleanly_without_cluster():
    port = free_port_block(1)
    result = raftcache("get", "k", "--endpoints", f"127.0.0.1:{port}", "--timeout", "0.5")
    assert result.returncode == 2
    assert "Unavailable" in result.stderr


def test_certs_init_writes_private_keys_0600(tmp_path):
    target = tmp_path / "certs"
    result = raftcache("certs", "init", "--dir", str(target), "--nodes", "3")
    assert result.returncode == 0, result.stderr
    for name in ["ca", "node1", "node2", "node3", "client"]:
        assert (target / f"{name}.pem").exists()
        assert (target / f"{name}-key.pem").stat().st_mode & 0o777 == 0o600
    again = raftcache("certs", "init", "--dir", str(target))
    assert again.returncode == 2 and "--force" in again.stderr
