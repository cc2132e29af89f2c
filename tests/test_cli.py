"""The `raftcache` command as a user runs it."""

import argparse
import base64
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from local_up import up as start_up

from raftcache import cli
from raftcache.client import Client
from raftcache.cluster import free_port_block
from raftcache.core.operations import OPERATIONS


def raftcache(*args, env=None, timeout=30):
    return subprocess.run([sys.executable, "-m", "raftcache", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


# The module's shared `cluster` (tests/conftest.py): three nodes with small limits, so that the
# error paths are cheap to reach.
CLUSTER = {"extra": {"node": {"max_key_bytes": 32, "max_value_bytes": 64, "max_batch_keys": 4}}}


@pytest.fixture
def rc(cluster):
    """`raftcache ARGS...` against the cluster."""
    endpoints = ",".join(cluster.endpoints())
    return lambda *args: raftcache(*args, "--endpoints", endpoints)


def test_every_operation_has_a_cli_command_and_a_client_method():
    def commands(parser):  # every (sub)command, nested ones too (snapshot save)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for p in action.choices.values():
                    yield p
                    yield from commands(p)

    covered = {p.get_default("operation") for p in commands(cli.build_parser())} - {None}
    assert covered == set(OPERATIONS)
    # The Client's methods for the operations it splits or names for Python callers.
    methods = {"snapshot": ["snapshot_part"],
               "change_member": ["add_member", "remove_member", "update_member_address"]}
    for op in OPERATIONS:
        for name in methods.get(op, [OPERATIONS[op].client_name]):
            assert callable(getattr(Client, name, None)), f"Client lacks {name} ({op})"


def test_get_with_version_and_cas(rc):
    version = int(rc("set", "k", "hello world").stdout)
    got = rc("get", "k", "--with-version")
    assert (got.returncode, got.stdout) == (0, f"{version} hello world\n")
    swapped = rc("cas", "k", str(version), "bye")
    assert (swapped.returncode, swapped.stdout) == (0, "swapped\n"), swapped  # thrift: a bool
    stale = rc("cas", "k", str(version), "again")
    assert stale.returncode == cli.EXIT_CAS_FAILED == 1
    assert stale.stderr == (f"raftcache: VersionMismatch: 'k' is not at version {version}; "
                            "nothing was written\n")
    assert rc("get", "k").stdout == "bye\n"
    assert rc("cas", "fresh", "0", "new").returncode == 0  # version 0: the key is missing
    assert "exit 1" in rc("cas", "--help").stdout


def test_incr(rc):
    assert rc("incr", "n").stdout == "1\n"
    assert rc("incr", "n", "41").stdout == "42\n"
    assert rc("incr", "n", "-50").stdout == "-8\n"
    rc("set", "word", "abc")
    bad = rc("incr", "word")
    assert bad.returncode == 2
    assert bad.stderr == "raftcache: InvalidRequest: the value of b'word' is not an integer\n"


def test_mset_and_mget(rc):
    version = int(rc("mset", "a", "1", "b", "two words").stdout)
    got = rc("mget", "a", "b")
    assert (got.returncode, got.stdout) == (0, "1\ntwo words\n")
    partial = rc("mget", "b", "zz", "a", "--with-version")
    assert partial.returncode == 1  # a key is missing: as get
    assert partial.stdout == f"{version} two words\n0 \n{version} 1\n"
    odd = rc("mset", "a", "1", "b")
    assert odd.returncode == 2 and "expected KEY VALUE pairs" in odd.stderr
    assert rc("get", "b").stdout == "two words\n"  # nothing written
    too_many = rc("mget", "a", "b", "c", "d", "e")
    assert too_many.returncode == 2
    assert too_many.stderr == ("raftcache: InvalidRequest: mget of 5 keys; "
                               "node.max_batch_keys is 4\n")


def test_invalidate(rc):
    rc("mset", "p:1", "x", "p:2", "y", "q:1", "z")
    assert rc("invalidate", "p:").stdout == "2\n"
    assert rc("mget", "p:1", "p:2", "q:1").stdout == "\n\nz\n"
    everything = rc("invalidate")  # an empty prefix only with --all
    assert everything.returncode == 2 and "--all" in everything.stderr
    assert rc("get", "q:1").stdout == "z\n"
    assert int(rc("invalidate", "--all").stdout) >= 1
    assert rc("get", "q:1").returncode == 1


def test_keys_and_values_beyond_the_configured_limits(rc):
    long_key = rc("set", "k" * 33, "v")
    assert long_key.returncode == 2
    assert long_key.stderr == ("raftcache: InvalidRequest: a key of 33 bytes; "
                               "node.max_key_bytes is 32\n")
    big = rc("append", "big", "v" * 65)
    assert big.stderr == ("raftcache: InvalidRequest: a value of 65 bytes; "
                          "node.max_value_bytes is 64\n")
    prefix = rc("invalidate", "p" * 33)
    assert prefix.stderr == ("raftcache: InvalidRequest: a prefix of 33 bytes; "
                             "node.max_key_bytes is 32\n")
    assert rc("get", "big").returncode == 1  # nothing applied


def test_status_json(rc, cluster):
    status = rc("status", "--json")
    assert status.returncode == 0, status.stderr
    rows = [json.loads(line) for line in status.stdout.splitlines()]
    assert [r["address"] for r in rows] == cluster.endpoints()
    assert sorted(r["id"] for r in rows) == [1, 2, 3]
    assert sorted(r["role"] for r in rows) == ["follower", "follower", "leader"]
    leader = next(r["id"] for r in rows if r["role"] == "leader")
    for r in rows:
        assert r["leader"] == leader and r["voters"] == [1, 2, 3] and r["learners"] == []
        assert r["applied"] <= r["commit"] and r["term"] >= 1
    gone = f"127.0.0.1:{free_port_block(1)}"
    mixed = raftcache("status", "--json", "--timeout", "0.5", "--endpoints",
                      f"{cluster.address(1)},{gone}")
    # a health check: a node that does not answer makes it fail, saying which
    assert mixed.returncode == 2
    assert mixed.stderr == f"raftcache: unhealthy: {gone} unreachable\n"
    answered, unreachable = (json.loads(line) for line in mixed.stdout.splitlines())
    assert answered["id"] == 1
    assert unreachable["address"] == gone and "error" in unreachable and "id" not in unreachable
    nobody = raftcache("status", "--json", "--timeout", "0.5", "--endpoints", gone)
    assert nobody.returncode == 2 and json.loads(nobody.stdout)["address"] == gone
    assert nobody.stderr == f"raftcache: unhealthy: {gone} unreachable; no leader\n"


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True).stdout
    return [int(p) for p in out.split()]


def test_up_set_get_status_and_clean_stop(tmp_path):
    up, port, out = start_up(tmp_path)
    try:
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
        assert unknown.returncode == 2 and "node 7 has no known address" in unknown.stderr
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(20)
    time.sleep(0.2)
    for pid in nodes:
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(
            f"/proc/{pid}/status").read().lower(), f"node process {pid} outlived `up`"


def test_up_fails_fast_when_a_node_cannot_start(tmp_path):
    port = free_port_block(3)
    started = time.monotonic()
    result = raftcache("up", "--storage", "nope", "--port", str(port), "--metrics-port", "0",
                       "--data-dir", str(tmp_path / "data"), timeout=20)
    assert time.monotonic() - started < 10
    assert result.returncode == 1
    # Which node (the first to go, or several), and why: its own last error line.
    reported = re.findall(r"^raftcache: node (\d) exited with code 2: (.*)$", result.stderr,
                          re.MULTILINE)
    assert reported, result.stderr
    for i, reason in reported:
        assert reason.startswith(f"{tmp_path}/data/node{i}.toml: storage.plugin: unknown "
                                 "storage 'nope' (known: "), reason


def test_up_without_a_leader_in_time_exits_non_zero(tmp_path):
    config = tmp_path / "slow.toml"
    config.write_text("[raft]\ntick_ms = 60000\n")  # no election for minutes
    result = raftcache("up", "--config", str(config), "--leader-timeout", "2", "--metrics-port",
                       "0", "--port", str(free_port_block(3)), "--data-dir",
                       str(tmp_path / "data"))
    assert result.returncode == 1
    assert f"raftcache: no leader after 2 s; see the node logs in {tmp_path}/data" in (
        result.stderr)


def test_serve_with_bad_config_says_one_line(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text('[node]\nid = 1\naddress = "127.0.0.1:1"\n[cluster]\npeers = { 1 = '
                    '"127.0.0.1:1" }\n[transport]\nplugin = "carrier-pigeon"\n'
                    '[encryption]\nenabled = false\n')
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


def _one_page_pipe() -> tuple[int, int]:
    """A pipe that holds one page: a few KiB of output fill it, so the writer is still
    writing when its reader goes away, however fast the reader is."""
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    return read_end, write_end


def _token(claims: dict) -> str:
    """A well-formed token, not signed (inspect prints it all the same)."""
    def b64(obj) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()
    return f"{b64({'alg': 'EdDSA', 'typ': 'JWT'})}.{b64(claims)}.c2ln"


@pytest.mark.skipif(not hasattr(fcntl, "F_SETPIPE_SZ"), reason="Linux pipes only")
@pytest.mark.parametrize("command, reader, status", [
    # Its output, buffered, meets the closed pipe at the last flush.
    (["token", "inspect", _token({"sub": "someone"})], "gone before the command writes", 141),
    # More than a page of JSON: the command is still writing when the reader goes.
    (["token", "inspect", _token({"sub": "someone", "pad": "p" * 5500})],
     "closes after one line", 141),
    # argparse writes the help itself and ignores a failed write: it exits 0.
    (["--help"], "gone before the command writes", 0),
])
def test_a_pipe_closed_early_ends_the_command_quietly(command, reader, status):
    read_end, write_end = _one_page_pipe()
    if reader == "gone before the command writes":
        os.close(read_end)
    proc = subprocess.Popen([sys.executable, "-m", "raftcache", *command], stdout=write_end,
                            stderr=subprocess.PIPE)
    os.close(write_end)
    if reader == "closes after one line":  # `| head -1`
        # Exactly the line, unbuffered: the rest stays in the pipe, so the command cannot
        # finish writing before the reader is gone.
        assert os.read(read_end, 2) == b"{\n"
        os.close(read_end)
    try:
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    # No traceback, no "Exception ignored ... BrokenPipeError": nothing at all, and the
    # status a shell reports for a tool that SIGPIPE ended (128 + 13).
    assert stderr.decode() == ""
    assert proc.returncode == status
    assert cli.EXIT_BROKEN_PIPE == 141
