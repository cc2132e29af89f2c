"""Values encrypted at rest (docs/security.md, "Encryption at rest"): the codec and its keyring,
then real clusters over each storage and backend searched byte by byte for a plaintext canary
(and, as the teeth of that search, the same clusters with encryption off, where it is found),
key rotation with the reseal sweep under a live writer, `raftcache serve`'s refusals, the
opt-out of a route, and the file modes of everything a node and `up` create."""

from __future__ import annotations

import json
import os
import secrets
import stat
import subprocess
import sys
import threading
import time

import pymemcache
import pytest
import redis

from raftcache import errors
from raftcache.client import Client
from raftcache.cluster import LocalCluster, free_port_block, to_toml
from raftcache.core.cache.commands import put_svarint
from raftcache.core.cache.statemachine import ApplyError, StateMachine
from raftcache.node.backend import PlaintextBackend
from raftcache.node.config import private_dir
from raftcache.pluginapi import Setting, ValueCodecError
from raftcache.plugins.backend.memory import MemoryBackend
from raftcache.plugins.security.encryption import (
    BINDING_BYTES,
    LEGACY_MAGIC,
    OVERHEAD,
    EncryptionCodec,
    Keyring,
    KeyringError,
    key_id_of,
    make_keyring,
    read_keyring,
    setting_name,
)

ENV = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}


def raftcache(*args, timeout: float = 60):
    return subprocess.run([sys.executable, "-m", "raftcache", *args], capture_output=True,
                          text=True, timeout=timeout, env=ENV)


def codec_with(settings: dict | None = None, plaintext=None) -> EncryptionCodec:
    settings = {} if settings is None else settings
    return EncryptionCodec(Keyring(1, os.urandom(32), "test"), lambda: settings, plaintext)


def rotate(codec: EncryptionCodec, settings: dict, key_id: int) -> None:
    """What keys-rotate commits, applied to `settings`."""
    settings[setting_name(key_id)] = Setting(codec.wrap(key_id, os.urandom(32)), 0, key_id)


# ================================================================================================
# The codec
# ================================================================================================
def test_round_trip_with_a_random_nonce_each_time():
    codec = codec_with()
    a, b = codec.encode(b"k", b"secret"), codec.encode(b"k", b"secret")
    assert a != b and a[5:17] != b[5:17]  # a fresh nonce for every seal
    assert len(a) == len(b"secret") + OVERHEAD and key_id_of(a) == 0 and a[0] == 0xE2
    assert b"secret" not in a
    assert codec.decode(b"k", a) == codec.decode(b"k", b) == b"secret"
    assert codec.decode(b"k", codec.encode(b"k", b"")) == b""


@pytest.mark.parametrize("where", ["key id", "nonce", "ciphertext", "tag", "truncated"])
def test_an_altered_value_is_refused(where):
    codec = codec_with()
    blob = bytearray(codec.encode(b"k", b"a value of some length"))
    if where == "truncated":
        blob = blob[:20]
    else:
        blob[{"key id": 4, "nonce": 7, "ciphertext": 20, "tag": -1}[where]] ^= 1
    with pytest.raises(ValueCodecError):
        codec.decode(b"k", bytes(blob))


def test_a_value_moved_to_another_key_is_refused():
    codec = codec_with()
    with pytest.raises(ValueCodecError, match="altered, or sealed for another key"):
        codec.decode(b"other", codec.encode(b"k", b"v"))


def test_a_stored_value_is_bound_to_its_key_and_version():
    codec = codec_with()
    blob = codec.encode(b"k", b"v")
    stored = codec.bind(b"k", 7, blob)
    assert len(stored) == len(blob) + BINDING_BYTES
    assert codec.decode(b"k", codec.unbind(b"k", 7, stored)) == b"v"
    for key, version in ((b"k", 6), (b"k", 8), (b"j", 7)):  # older, newer, another key
        with pytest.raises(ValueCodecError, match="is not the one written at version"):
            codec.unbind(key, version, stored)
    with pytest.raises(ValueCodecError):  # the tag stripped: a bare blob is not a stored one
        codec.unbind(b"k", 7, blob)
    with pytest.raises(ValueCodecError):
        codec.unbind(b"k", 7, b"")


def legacy_seal(codec: EncryptionCodec, key: bytes, value: bytes) -> bytes:
    """A value as the format before the version binding sealed (and stored) it."""
    header, nonce = bytes((LEGACY_MAGIC, 0, 0, 0, 0)), os.urandom(12)
    return header + nonce + codec._aead(0).encrypt(nonce, value,
                                                  b"raftcache-value-1" + header + key)


def test_a_value_stored_before_the_binding_opens_until_the_cluster_requires_them_bound():
    settings: dict = {}
    codec = codec_with(settings)
    legacy = legacy_seal(codec, b"k", b"old")
    assert codec.decode(b"k", codec.unbind(b"k", 3, legacy)) == b"old"
    with pytest.raises(ValueCodecError):  # its associated data names the magic
        codec.decode(b"k", bytes((0xE2,)) + legacy[1:])
    settings["keys.bound"] = Setting(b"1", 0, 9)
    with pytest.raises(ValueCodecError, match="stored before values were bound"):
        codec.unbind(b"k", 3, legacy)


def test_the_state_machine_binds_what_it_stores_and_refuses_an_older_value_put_back():
    from raftcache.core.cache.commands import Envelope, Incr, Put, encode_envelope

    codec = codec_with()
    sm = StateMachine(MemoryBackend(), codecs=[codec])
    sm.apply(1, encode_envelope(Envelope(Put(b"n", codec.encode(b"n", b"1")), stamp_ms=1)))
    v1 = sm.read(b"n", 1)[0]
    sm.apply(2, encode_envelope(Envelope(Put(b"n", codec.encode(b"n", b"2")), stamp_ms=2)))
    stored, version = sm.read(b"n", 2)
    assert version == 2 and codec.decode(b"n", codec.unbind(b"n", 2, stored)) == b"2"
    sm.backend.apply(2, [(b"n", v1, None)])  # someone puts the older value back
    with pytest.raises(ValueCodecError, match="not the one written at version 2"):
        codec.unbind(b"n", 2, sm.read(b"n", 2)[0])
    # incr meets it as a value this replica cannot open: a miss, never the old value
    result = sm.apply(3, encode_envelope(Envelope(Incr(b"n", 1), stamp_ms=3)))
    assert isinstance(result, ApplyError) and result.kind == "OutcomeUnknown"


def test_a_sealed_incr_amount_and_the_result_its_session_keeps_open_only_with_the_keys():
    from raftcache.core.cache.commands import Append, Envelope, SealedIncr, encode_envelope
    from raftcache.core.cache.statemachine import SealedResult

    codec = codec_with()
    sm = StateMachine(MemoryBackend(), codecs=[codec])
    amount = 7_123_456_789_012_345

    def incr(index, seq, delta=b"%d" % amount):
        entry = Envelope(SealedIncr(b"n", codec.encode(b"n", delta)), "client", seq, None, index)
        assert b"%d" % amount not in entry.command.delta and svarint(amount) not in (
            encode_envelope(entry))
        return sm.apply(index, encode_envelope(entry))

    assert incr(1, 1) == amount and incr(2, 2) == 2 * amount
    kept = sm._sessions[("client", None)].results[2][1]
    assert type(kept) is SealedResult and b"%d" % (2 * amount) not in kept.blob
    image = sm.snapshot()
    assert svarint(2 * amount) not in image and b"%d" % (2 * amount) not in image
    assert incr(3, 2) == 2 * amount  # a retry: the first result, opened
    again = StateMachine(MemoryBackend(), codecs=[codec])
    again.restore(image)
    assert again.apply(3, encode_envelope(Envelope(SealedIncr(b"n", codec.encode(b"n", b"1")),
                                                   "client", 2, None, 3))) == 2 * amount
    stranger = StateMachine(MemoryBackend(), codecs=[codec_with()])  # another master key
    stranger.restore(image)
    lost = stranger.apply(3, encode_envelope(Envelope(SealedIncr(b"n", b"x"), "client", 2,
                                                      None, 3)))
    assert isinstance(lost, ApplyError) and lost.kind == "OutcomeUnknown"
    bad = incr(4, 3, delta=b"1.5")
    assert isinstance(bad, ApplyError) and bad.kind == "InvalidRequest"
    # An append's result (the new length) is kept sealed too.
    grown = Envelope(Append(b"a", codec.encode(b"a", b"x" * 300)), "client", 4, None, 5)
    assert sm.apply(5, encode_envelope(grown)) == 300
    kept = sm._sessions[("client", None)].results[4][1]
    assert type(kept) is SealedResult


def test_an_unknown_key_id_says_so():
    settings: dict = {}
    sealer = codec_with(settings)
    rotate(sealer, settings, 1)
    blob = sealer.encode(b"k", b"v")
    assert key_id_of(blob) == 1
    with pytest.raises(ValueCodecError, match=r"data key 1, which this node does not know "
                                              r"\(known: 0\)"):
        EncryptionCodec(sealer.keyring, dict).decode(b"k", blob)


def test_a_node_with_another_master_key_says_so():
    settings: dict = {}
    sealer = codec_with(settings)
    rotate(sealer, settings, 1)
    stranger = EncryptionCodec(Keyring(1, os.urandom(32), "/other/keyring"), lambda: settings)
    with pytest.raises(ValueCodecError, match="does not unwrap with this node's master key"):
        stranger.decode(b"k", sealer.encode(b"k", b"v"))
    # Key 0 is derived from the master: another master opens nothing either.
    with pytest.raises(ValueCodecError):
        stranger.decode(b"k", sealer.seal(b"k", b"v", 0))


def test_rotation_seals_new_values_with_the_new_key_and_old_ones_still_open():
    settings: dict = {}
    codec = codec_with(settings)
    old = codec.encode(b"k", b"v0")
    rotate(codec, settings, 1)
    rotate(codec, settings, 2)
    new = codec.encode(b"k", b"v2")
    assert (key_id_of(old), key_id_of(new), codec.active_id()) == (0, 2, 2)
    assert codec.decode(b"k", old) == b"v0" and codec.decode(b"k", new) == b"v2"
    # The settings hold only wrapped keys: the data key itself is nowhere in them.
    wrapped = settings[setting_name(2)].value
    assert codec.unwrap(2, wrapped) not in wrapped


def test_a_node_asks_for_a_new_data_key_once_it_sealed_its_budget_with_the_active_one(tmp_path):
    settings: dict = {}
    path = str(tmp_path / "seal-counts.json")
    codec = EncryptionCodec(Keyring(1, os.urandom(32), "test"), lambda: settings,
                            rotate_after=100, counts_path=path)
    for _ in range(99):
        codec.encode(b"k", b"v")
    assert codec.rotation() is None and codec.sealed.count(0) == 99
    codec.encode(b"k", b"v")
    command = codec.rotation()  # the 100th seal: a new key, wrapped, as the next id
    (name, wrapped), = command.items
    assert name == "keys.1" and len(codec.unwrap(1, wrapped)) == 32
    settings[name] = Setting(wrapped, 0, 5)  # committed: the new key seals, nothing asked
    assert codec.rotation() is None and key_id_of(codec.encode(b"k", b"v")) == 1
    assert os.stat(path).st_mode & 0o777 == 0o600
    # A restart resumes from what the file reserved: never fewer than were sealed.
    again = EncryptionCodec(codec.keyring, lambda: settings, rotate_after=100, counts_path=path)
    assert again.sealed.count(0) >= 100 and again.sealed.count(1) >= 1
    assert json.load(open(path))["sealed"]["0"] == again.sealed.count(0) < 100 + 100 // 64 + 1
    with open(path, "w") as f:  # a count it cannot read: it refuses rather than start at 0
        f.write("{garbage")
    with pytest.raises(KeyringError, match="unreadable seal counts"):
        EncryptionCodec(codec.keyring, lambda: settings, counts_path=path)


def test_a_data_key_is_written_once():
    from raftcache.core.cache.commands import Configure
    from raftcache.plugins.security.encryption import raftcache_check_command

    settings = {"keys.1": Setting(b"wrapped", 0, 5), "revoked.bob": Setting(b"", 0, 6)}
    assert raftcache_check_command(Configure((("keys.2", b"w"),)), settings) is None
    assert raftcache_check_command(Configure((("revoked.bob", None),)), settings) is None
    for value in (b"another", None):  # replaced or removed: refused
        reason = raftcache_check_command(Configure((("keys.1", value),)), settings)
        assert reason.startswith("data key 1 exists; data keys are never replaced")


def test_a_route_that_opted_out_stores_plaintext():
    codec = codec_with(plaintext=lambda key: key.startswith(b"pub:"))
    assert codec.encode(b"pub:x", b"open") == b"open" == codec.decode(b"pub:x", b"open")
    assert key_id_of(codec.encode(b"x", b"sealed")) == 0


def test_incr_on_a_value_altered_in_this_replicas_backend_is_a_miss_not_a_crash():
    codec = codec_with()
    sm = StateMachine(MemoryBackend(), codecs=[codec])
    from raftcache.core.cache.commands import Envelope, Incr, Put, encode_envelope

    sm.apply(1, encode_envelope(Envelope(Put(b"n", codec.encode(b"n", b"41")), stamp_ms=1)))
    assert sm.apply(2, encode_envelope(Envelope(Incr(b"n", 1), stamp_ms=2))) == 42
    sm.backend.apply(2, [(b"n", b"\xe1garbage" * 8, None)])  # someone writes to our backend
    result = sm.apply(3, encode_envelope(Envelope(Incr(b"n", 1), stamp_ms=3)))
    assert isinstance(result, ApplyError) and result.kind == "OutcomeUnknown"
    assert "cannot be opened on this node" in result.reason
    assert sm.read(b"n", 3) is None  # dropped here: a miss, never garbage


# ================================================================================================
# The keyring file
# ================================================================================================
def test_keyring_is_made_0600_and_read_back(tmp_path):
    path = str(tmp_path / "keyring")
    made = make_keyring(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    body = json.loads(open(path).read())
    assert body["format"] == "raftcache-keyring" and body["version"] == 1
    read = read_keyring(path)
    assert (read.master_id, read.master_key) == (made.master_id, made.master_key)
    with pytest.raises(FileExistsError):  # never replaced
        make_keyring(path)


def test_a_keyring_readable_by_others_is_refused(tmp_path):
    path = str(tmp_path / "keyring")
    make_keyring(path)
    os.chmod(path, 0o644)
    with pytest.raises(KeyringError, match=r"readable by others \(mode 0644\); chmod 600"):
        read_keyring(path)


def test_a_missing_or_malformed_keyring_says_what_to_do(tmp_path):
    with pytest.raises(KeyringError, match="no such keyring file .*raftcache keys init"):
        read_keyring(str(tmp_path / "nope"))
    bad = tmp_path / "bad"
    bad.write_text('{"format": "raftcache-keyring", "version": 1, "master": {"id": 1, '
                   '"key": "c2hvcnQ="}}')
    os.chmod(bad, 0o600)
    with pytest.raises(KeyringError, match="malformed keyring"):
        read_keyring(str(bad))


def test_keys_init_command(tmp_path):
    path = tmp_path / "ring"
    result = raftcache("keys", "init", str(path))
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = raftcache("keys", "init", str(path))
    assert again.returncode == 2 and "never replaced" in again.stderr


# ================================================================================================
# raftcache serve: on by default, refusals, opt-out
# ================================================================================================
def node_config(tmp_path, port: int, **sections) -> str:
    data = {"node": {"id": 1, "address": f"127.0.0.1:{port}",
                     "data_dir": str(tmp_path / "node1")},
            "cluster": {"peers": {"1": f"127.0.0.1:{port}"}}, **sections}
    path = tmp_path / "node.toml"
    path.write_text(to_toml(data))
    return str(path)


def test_serve_without_an_encryption_section_exits_2_with_one_line(tmp_path):
    path = node_config(tmp_path, free_port_block(1))
    result = raftcache("serve", "--config", path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"raftcache: {path}: encryption.keyring: missing: values are encrypted at rest by "
        "default; name a keyring file (`raftcache keys init FILE` makes one) or set "
        "enabled = false in [encryption]"]
    assert not os.path.exists(tmp_path / "node1")  # refused before anything was made


def test_serve_refuses_a_keyring_readable_by_others(tmp_path):
    keyring = str(tmp_path / "keyring")
    make_keyring(keyring)
    os.chmod(keyring, 0o640)
    path = node_config(tmp_path, free_port_block(1), encryption={"keyring": keyring})
    result = raftcache("serve", "--config", path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"raftcache: {path}: encryption.keyring: {keyring}: the keyring is readable by "
        f"others (mode 0640); chmod 600 {keyring}"]


def serve_until_it_answers(path: str, port: int):
    log = open(os.path.join(os.path.dirname(path), "serve.log"), "wb")
    p = subprocess.Popen([sys.executable, "-m", "raftcache", "serve", "--config", path],
                         stdout=log, stderr=subprocess.STDOUT, env=ENV)
    deadline = time.monotonic() + 20
    with Client([f"127.0.0.1:{port}"], timeout=1.0) as c:
        while True:
            try:
                c.set("probe", "1")
                return p
            except (errors.RaftCacheError, OSError):
                if p.poll() is not None or time.monotonic() > deadline:
                    p.kill()
                    raise AssertionError(open(log.name).read()) from None
                time.sleep(0.1)


def test_serve_with_enabled_false_runs_and_says_values_are_plaintext(tmp_path):
    port = free_port_block(1)
    path = node_config(tmp_path, port, encryption={"enabled": False})
    p = serve_until_it_answers(path, port)
    p.terminate()
    p.wait(10)
    assert "encryption at rest is off ([encryption] enabled = false)" in (
        open(tmp_path / "serve.log").read())


def test_a_route_that_opted_out_stores_plaintext_there_and_the_node_says_so(tmp_path):
    from raftcache.servers import RedisServer

    keyring = str(tmp_path / "keyring")
    make_keyring(keyring)
    port = free_port_block(1)
    with RedisServer(str(tmp_path / "redis"), appendonly=False) as server:
        backend = {"plugin": "hybrid", "options": {
            "default": "local", "routes": [{"match": "pub:", "to": "farm"}],
            "instances": {"farm": {"plugin": "redis", "url": server.url,
                                   "encrypt_values": False},
                          "local": {"plugin": "memory"}}}}
        path = node_config(tmp_path, port, backend=backend, encryption={"keyring": keyring},
                           storage={"plugin": "memory"})
        p = serve_until_it_answers(path, port)
        try:
            with Client([f"127.0.0.1:{port}"]) as c:
                c.set("pub:greeting", "hello, application")
                c.set("secret", "sealed")
                assert c.get("pub:greeting") == b"hello, application"
                assert c.get("secret") == b"sealed"
            with redis.Redis.from_url(server.url) as r:
                assert r.get("pub:greeting") == b"hello, application"
        finally:
            p.terminate()
            p.wait(10)
    log = open(tmp_path / "serve.log").read()
    assert ("encryption at rest: values routed to backend.options.instances.farm are stored "
            "in plaintext (encrypt_values = false)") in log
    assert "WARNING" in log.split("backend.options.instances.farm")[0].splitlines()[-1]


def test_encrypt_values_must_be_a_boolean():
    from raftcache.node.backend import make_backend
    from raftcache.node.config import ConfigError
    from raftcache.pluginapi.manager import PluginSet, make_manager

    plugins = PluginSet(make_manager())
    plaintext: list = []
    backend = make_backend(plugins, "memory", 1, {"encrypt_values": False}, plaintext=plaintext)
    assert isinstance(backend, PlaintextBackend) and backend.stores_plaintext(b"any")
    assert plaintext == ["backend.options"]
    with pytest.raises(ConfigError, match="backend.options.encrypt_values: expected true or "
                                          "false"):
        make_backend(plugins, "memory", 1, {"encrypt_values": "no"})


# ================================================================================================
# The plaintext search: every byte a cluster keeps, for a canary written every way
# ================================================================================================
HYBRID = {"default": "local",
          "routes": [{"match": "rd/", "to": "rd"}, {"match": "mc/", "to": "mc"}],
          "instances": {"rd": {"plugin": "redis"}, "mc": {"plugin": "memcached"},
                        "local": {"plugin": "memory"}}}
PREFIXES = {"memory": [""], "redis": [""], "memcached": [""], "hybrid": ["rd/", "mc/", "lo/"]}


def write_canaries(c: Client, prefix: str, canary: bytes, number: int) -> dict:
    """The canary through set, mset, cas, append and incr; what each key must read."""
    expect = {}
    c.set(prefix + "set", canary + b"-set")
    expect[prefix + "set"] = canary + b"-set"
    c.mset({prefix + "mset1": canary + b"-mset1", prefix + "mset2": canary + b"-mset2"})
    expect[prefix + "mset1"] = canary + b"-mset1"
    expect[prefix + "mset2"] = canary + b"-mset2"
    assert c.cas(prefix + "cas", 0, canary + b"-cas") is True
    expect[prefix + "cas"] = canary + b"-cas"
    c.set(prefix + "app", b"start-")
    c.append(prefix + "app", canary + b"-appended")
    expect[prefix + "app"] = b"start-" + canary + b"-appended"
    assert c.incr(prefix + "ctr", number) == number
    expect[prefix + "ctr"] = b"%d" % number
    return expect


def redis_servers(cluster: LocalCluster) -> list:
    return [s for servers in cluster.servers.values() for s in servers.values()
            if hasattr(s, "url")]


def search(cluster: LocalCluster, needles: list[bytes]) -> dict[str, list[str]]:
    """Where any needle shows: files under the data dir (WAL, snapshots, configs, logs, the
    servers' AOF and RDB files after a SAVE), raw values in every Redis (SCAN, then each key's
    value whatever its type) and in every Memcached (get by the keys written)."""
    hits: dict[str, list[str]] = {"files": [], "redis": [], "memcached": []}
    for server in redis_servers(cluster):
        with redis.Redis.from_url(server.url) as r:
            r.config_set("rdbcompression", "no")  # else LZF could hide a needle in the RDB
            r.save()
            for key in r.scan_iter(count=1000):
                kind = r.type(key)
                values = {b"string": lambda k: [r.get(k)],
                          b"hash": lambda k: [*r.hgetall(k).keys(), *r.hgetall(k).values()],
                          b"list": lambda k: r.lrange(k, 0, -1),
                          b"set": lambda k: list(r.smembers(k)),
                          b"zset": lambda k: r.zrange(k, 0, -1)}[kind](key)
                if any(n in (v or b"") for v in values for n in needles):
                    hits["redis"].append(f"{server.url} {key!r}")
    for root, _dirs, files in os.walk(cluster.data_dir):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                data = f.read()
            if any(n in data for n in needles):
                hits["files"].append(os.path.relpath(path, cluster.data_dir))
    return hits


def search_memcached(cluster: LocalCluster, keys, needles) -> list[str]:
    found = []
    for servers in cluster.servers.values():
        for server in servers.values():
            if hasattr(server, "url"):
                continue
            c = pymemcache.Client(server.address)  # host:port, or up's /path/memcached.sock
            try:
                for key in keys:
                    value = c.get(key)
                    if value is not None and any(n in value for n in needles):
                        found.append(f"{server.address} {key}")
            finally:
                c.close()
    return found


COMBOS = [("file-wal", "memory"), ("redis-aof", "redis"), ("file-wal", "memcached"),
          ("redis-aof", "hybrid")]


@pytest.mark.parametrize("encrypted", [True, False], ids=["encrypted", "teeth-plaintext"])
@pytest.mark.parametrize("storage,backend", COMBOS, ids=[f"{s}+{b}" for s, b in COMBOS])
def test_no_plaintext_at_rest_anywhere(tmp_path, storage, backend, encrypted):
    extra = {"raft": {"snapshot_entries": 8, "snapshot_keep_entries": 2}}
    if backend == "hybrid":
        extra["backend"] = {"options": HYBRID}
    cluster = LocalCluster(str(tmp_path / "c"), nodes=1, port=free_port_block(1),
                           storage=storage, backend=backend, extra=extra, encryption=encrypted)
    canary = b"PLAINTEXT-CANARY-" + secrets.token_hex(8).encode()
    number = 7_000_000_000_000_000 + secrets.randbelow(10**15)  # 16 digits to look for
    needles = [canary, b"%d" % number]
    try:
        cluster.start()
        cluster.wait_for_leader()
        expect = {}
        with cluster.client() as c:
            for prefix in PREFIXES[backend]:
                expect.update(write_canaries(c, prefix, canary, number))
            for i in range(30):  # past several snapshots
                c.set(f"filler{i % 3}", f"{i}")
            for prefix in PREFIXES[backend]:  # and some in the log after the last one
                c.set(prefix + "tail", canary + b"-tail")
                expect[prefix + "tail"] = canary + b"-tail"
            assert c.mget(list(expect)) == list(expect.values())
        if storage == "file-wal":
            node_dir = os.path.join(cluster.data_dir, "node1")
            assert any(name.startswith("snap") for name in os.listdir(node_dir)), (
                os.listdir(node_dir))
        hits = search(cluster, needles)
        hits["memcached"] = search_memcached(cluster, list(expect), needles)
        assert not cluster.failures()
    finally:
        cluster.stop()
    print(f"{storage}+{backend} encrypted={encrypted}: {hits}")
    if encrypted:
        assert hits == {"files": [], "redis": [], "memcached": []}
        return
    # Teeth: the same search finds the canary when values are stored as written, in each
    # place this combination keeps them.
    if storage == "file-wal":  # the log's segments and the snapshot file
        assert any(h.startswith("node1/wal/") for h in hits["files"]), hits
        assert "node1/snapshot" in hits["files"], hits
    else:  # the storage's Redis: its AOF and RDB files, and its keys
        assert any(h.startswith("node1/storage-redis-aof/appendonlydir/") for h in
                   hits["files"]), hits
        assert "node1/storage-redis-aof/dump.rdb" in hits["files"], hits
    if backend in ("redis", "hybrid"):
        assert any("backend" in h and h.endswith("dump.rdb") for h in hits["files"]), hits
    if backend in ("redis", "hybrid") or storage == "redis-aof":
        assert hits["redis"], hits
    if backend in ("memcached", "hybrid"):
        assert hits["memcached"], hits


def svarint(n: int) -> bytes:
    out = bytearray()
    put_svarint(out, n)
    return bytes(out)


@pytest.mark.parametrize("encrypted", [True, False], ids=["encrypted", "teeth-plaintext"])
def test_incr_amounts_and_the_results_sessions_keep_are_sealed_in_the_log_snapshots_and_backups(
        tmp_path, encrypted):
    """An incr's amount travels in its log entry, and its result (and an append's length) is
    kept in the client's session, which snapshots and backups hold: searched for in every
    encoding the log and the snapshots use (decimal, and the zigzag varint of ints)."""
    cluster = LocalCluster(str(tmp_path / "c"), nodes=1, port=free_port_block(1),
                           storage="file-wal", backend="memory", encryption=encrypted,
                           extra={"raft": {"snapshot_entries": 16, "snapshot_keep_entries": 2}})
    first = (1 << 52) + secrets.randbelow(1 << 50)  # distinctive in 8 bytes of any encoding
    second = (1 << 51) + secrets.randbelow(1 << 49)
    tail = (1 << 50) + secrets.randbelow(1 << 48)
    grown = b"%s-appended" % secrets.token_hex(4000).encode()  # an append's length: 8010+
    numbers = [first, second, first + second, tail, len(b"start-") + len(grown)]
    # The append's length is searched for as a decimal only: its varint is 2 bytes, which
    # random ciphertext holds by chance (one run in a few); that its session result is kept
    # sealed is checked on the state machine (the test above).
    needles = [b"%d" % n for n in numbers] + [svarint(n) for n in numbers[:4]]
    backup = str(tmp_path / "c" / "cache.rcbackup")
    try:
        cluster.start()
        cluster.wait_for_leader()
        with cluster.client() as c:
            assert c.incr("ctr", first) == first
            assert c.incr("ctr", second) == first + second
            c.set("app", b"start-")
            assert c.append("app", grown) == numbers[4]
            for i in range(20):  # past a snapshot (every 16 entries): the sessions are in it
                c.set(f"filler{i % 3}", f"{i}")
            assert c.incr("tail", tail) == tail  # and one in the log before the next
        saved = raftcache("snapshot", "save", backup, "--endpoints",
                          ",".join(cluster.endpoints()))
        assert saved.returncode == 0, saved.stderr
        hits = search(cluster, needles)["files"]
        assert not cluster.failures()
    finally:
        cluster.stop()
    print(f"encrypted={encrypted}: {hits}")
    if encrypted:
        assert hits == []
        return
    # Teeth: stored as written, the amounts are in the log and the results in the snapshot
    # and the backup, where this search finds them.
    assert any(h.startswith("node1/wal/") for h in hits), hits
    assert "node1/snapshot" in hits and "cache.rcbackup" in hits, hits


# ================================================================================================
# Rotation and the reseal sweep, with a writer that keeps writing
# ================================================================================================
def raw_key_ids(cluster: LocalCluster, keys) -> dict[int, dict[str, int | None]]:
    """Node -> key -> the data key id of the blob its Redis holds."""
    out = {}
    for node, servers in cluster.servers.items():
        with redis.Redis.from_url(servers["backend"].url) as r:
            blobs = r.mget(keys)
        out[node] = {k: (key_id_of(b) if b is not None else None)
                     for k, b in zip(keys, blobs, strict=True)}
    return out


def test_rotation_while_writing_loses_nothing_and_the_sweep_reseals_every_old_value(tmp_path):
    cluster = LocalCluster(str(tmp_path / "c"), nodes=3, port=free_port_block(3),
                           storage="file-wal", backend="redis",
                           extra={"raft": {"snapshot_entries": 200}})
    old_keys = [f"old{i}" for i in range(300)]  # more than one reseal page
    written: dict[str, bytes] = {}
    stop = threading.Event()
    problems: list = []

    def writer():
        n = 0
        with cluster.client(timeout=5.0) as c:
            while not stop.is_set():
                key, value = f"live{n % 50}", f"v{n}".encode()
                try:
                    c.set(key, value)
                    written[key] = value
                except errors.OutcomeUnknown:
                    problems.append(f"unknown outcome for {key}")  # none expected here
                n += 1

    try:
        cluster.start()
        cluster.wait_for_leader()
        endpoints = ",".join(cluster.endpoints())
        with cluster.client() as c:
            c.mset({k: f"value of {k}" for k in old_keys[:150]})
            for k in old_keys[150:]:
                c.set(k, f"value of {k}")
            c.incr("counter", 41)
        assert {i for ids in raw_key_ids(cluster, old_keys).values()
                for i in ids.values()} == {0}
        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        time.sleep(0.5)
        started = time.monotonic()
        result = raftcache("keys", "rotate", "--endpoints", endpoints, timeout=120)
        rotate_s = time.monotonic() - started
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.startswith("data key 1 is active (was 0)"), result.stdout
        assert "done: no value is sealed under an older data key than 1" in result.stdout
        time.sleep(0.3)
        stop.set()
        thread.join(30)
        with cluster.client() as c:
            c.set("after", "rotation")
            assert c.incr("counter", 1) == 42
            # Every old value and every acknowledged write reads back.
            assert c.mget(old_keys) == [f"value of {k}".encode() for k in old_keys]
            assert c.mget(list(written)) == list(written.values())
            status = c.admin("keys-status")
        assert status["active"] == 1 and status["known"] == [0, 1]
        assert set(status["values"]) == {"1"}, status
        printed = raftcache("keys", "status", "--endpoints", endpoints)
        assert printed.returncode == 0, printed.stderr
        assert json.loads(printed.stdout)["values"] == status["values"]
        # Each replica's Redis: nothing under key 0 any more, new writes under key 1.
        def resealed():
            ids = raw_key_ids(cluster, [*old_keys, "after", "counter", *written])
            return all(set(per_node.values()) == {1} for per_node in ids.values())
        deadline = time.monotonic() + 10
        while not resealed():
            assert time.monotonic() < deadline, raw_key_ids(cluster, old_keys[:5])
            time.sleep(0.1)
        assert not problems, problems[:5]
        assert len(written) == 50
        assert not cluster.failures()
        print(f"keys rotate (300 old values, a writer running): {rotate_s:.2f} s")
    finally:
        stop.set()
        cluster.stop()


def test_a_value_altered_in_one_nodes_redis_is_unavailable_there_and_read_elsewhere(tmp_path):
    cluster = LocalCluster(str(tmp_path / "c"), nodes=3, port=free_port_block(3),
                           storage="memory", backend="redis")
    try:
        cluster.start()
        cluster.wait_for_leader()
        with cluster.client() as c:
            c.set("k", "the value")
            c.set("moved", "another")
        deadline = time.monotonic() + 10
        with Client([cluster.address(1)]) as one:
            while one.get("moved", consistency="stale") is None:  # node 1 applied both
                assert time.monotonic() < deadline
                time.sleep(0.05)
            with redis.Redis.from_url(cluster.servers[1]["backend"].url) as r:
                r.set("k", r.get("moved"))  # a sealed value copied under another key
            with pytest.raises(errors.Unavailable, match="this node cannot open a stored value: "
                                                         "the stored value of b'k' is not the "
                                                         "one written at version"):
                one.get("k", consistency="stale")
        with cluster.client() as c:  # the client tries another node
            leader = cluster.wait_for_leader()
            if leader != 1:
                assert c.get("k") == b"the value"
        assert not cluster.failures()
    finally:
        cluster.stop()
    assert "a stored value cannot be opened: the stored value of b'k'" in (
        open(cluster.log_path(1)).read())


def test_an_older_value_put_back_in_redis_or_one_moved_from_another_key_is_refused(tmp_path):
    """Someone with access to a node's Redis keeps the bytes of a value, and after it is
    overwritten puts them back (or copies another key's bytes over it): the read is refused
    as tampered, never answered with the old value."""
    cluster = LocalCluster(str(tmp_path / "c"), nodes=1, port=free_port_block(1),
                           storage="memory", backend="redis")
    try:
        cluster.start()
        cluster.wait_for_leader()
        with redis.Redis.from_url(cluster.servers[1]["backend"].url) as r, \
                Client([cluster.address(1)]) as c:
            c.set("k", "version one")
            v1 = r.get("k")
            c.set("k", "version two")
            c.set("other", "another key's value")
            assert c.get("k") == b"version two"
            r.set("k", v1)  # the older value put back
            with pytest.raises(errors.Unavailable, match="this node cannot open a stored value: "
                                                         "the stored value of b'k' is not the "
                                                         "one written at version"):
                c.get("k")
            r.set("k", r.get("other"))  # another key's value moved here
            with pytest.raises(errors.Unavailable, match="cannot open a stored value"):
                c.get("k")
            assert c.get("other") == b"another key's value"
            c.set("k", "version three")  # a new write is read again
            assert c.get("k") == b"version three"
        assert not cluster.failures()
    finally:
        cluster.stop()


def test_the_leader_rotates_the_data_key_when_a_node_has_sealed_its_budget(tmp_path):
    """With the budget lowered to 40 seals per data key, writes move the cluster through new
    keys by themselves (through the log, like `keys rotate`), and every value still reads."""
    cluster = LocalCluster(str(tmp_path / "c"), nodes=3, port=free_port_block(3),
                           storage="file-wal", backend="memory",
                           extra={"encryption": {"rotate_after": 40}})
    try:
        cluster.start()
        cluster.wait_for_leader()
        with cluster.client() as c:
            assert c.admin("keys-status")["active"] == 0
            written = {}
            deadline = time.monotonic() + 60
            i = 0
            while c.admin("keys-status")["active"] < 2:
                assert time.monotonic() < deadline, c.admin("keys-status")
                for _ in range(10):
                    written[f"k{i}"] = b"value %d" % i
                    c.set(f"k{i}", written[f"k{i}"])
                    i += 1
                c.incr("counter", 1)  # sealed again inside apply, on every replica
            status = c.admin("keys-status")
            assert status["known"][:3] == [0, 1, 2], status
            assert status["rotate_after"] == 40, status
            assert c.mget(list(written)) == list(written.values())
        assert not cluster.failures()
    finally:
        cluster.stop()
    for node in (1, 2, 3):
        counts = json.load(open(os.path.join(cluster.data_dir, f"node{node}",
                                             "seal-counts.json")))
        assert counts["master"] == 1 and counts["sealed"]["0"] >= 1, counts


def test_values_stored_before_the_binding_open_until_the_sweep_binds_them_then_are_refused(
        tmp_path):
    """A value stored by the format before the version binding (unbound) still reads; `keys
    rotate` reseals it bound and then requires every value bound, so that same unbound copy
    put back is refused."""
    cluster = LocalCluster(str(tmp_path / "c"), nodes=1, port=free_port_block(1),
                           storage="memory", backend="redis")
    try:
        cluster.start()
        cluster.wait_for_leader()
        old = EncryptionCodec(read_keyring(cluster.keyring_path()), dict)  # key 0, as before
        with redis.Redis.from_url(cluster.servers[1]["backend"].url) as r, \
                Client([cluster.address(1)]) as c:
            c.set("legacy", "placeholder")
            unbound = legacy_seal(old, b"legacy", b"stored before the upgrade")
            r.set("legacy", unbound)
            assert c.get("legacy") == b"stored before the upgrade"  # teeth: it is accepted
            status = c.admin("keys-status")
            assert status["values"] == {"0-unbound": 1} and status["bound"] is False, status
            with pytest.raises(errors.InvalidRequest, match="1 values are still stored unbound"):
                c.admin("keys-require-bound")
            result = raftcache("keys", "rotate", "--endpoints", cluster.endpoints()[0])
            assert result.returncode == 0, result.stderr
            status = c.admin("keys-status")
            assert status["values"] == {"1": 1} and status["bound"] is True, status
            assert c.get("legacy") == b"stored before the upgrade"
            r.set("legacy", unbound)  # the unbound copy put back
            with pytest.raises(errors.Unavailable, match="was stored before values were bound"):
                c.get("legacy")
        assert not cluster.failures()
    finally:
        cluster.stop()


# ================================================================================================
# File modes
# ================================================================================================
def test_private_dir_makes_every_missing_level_0700(tmp_path):
    old = os.umask(0o022)
    try:
        made = private_dir(str(tmp_path / "a" / "b"))
    finally:
        os.umask(old)
    assert made == str(tmp_path / "a" / "b")
    for d in (tmp_path / "a", tmp_path / "a" / "b"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700


@pytest.mark.parametrize("storage,backend", [("file-wal", "redis"), ("redis-aof", "memcached")])
def test_everything_a_cluster_creates_is_owner_only(tmp_path, storage, backend):
    cluster = LocalCluster(str(tmp_path / "c"), nodes=1, port=free_port_block(1),
                           storage=storage, backend=backend,
                           extra={"raft": {"snapshot_entries": 5}})
    old = os.umask(0o022)  # a permissive umask: the modes must not depend on it
    try:
        cluster.start()
        cluster.wait_for_leader()
        with cluster.client() as c:
            for i in range(20):
                c.set(f"k{i}", "v")
        for server in redis_servers(cluster):
            with redis.Redis.from_url(server.url) as r:
                r.save()
    finally:
        os.umask(old)
        cluster.stop()
    loose = []
    for root, dirs, files in os.walk(cluster.data_dir):
        for name in dirs + files:
            mode = stat.S_IMODE(os.lstat(os.path.join(root, name)).st_mode)
            if mode & 0o077:
                loose.append(f"{os.path.relpath(os.path.join(root, name), cluster.data_dir)} "
                             f"{mode:04o}")
    assert stat.S_IMODE(os.stat(cluster.data_dir).st_mode) == 0o700
    assert not loose, loose
    assert os.path.exists(os.path.join(cluster.data_dir, "keyring"))


def test_file_wal_dirs_are_0700_and_files_0600_whatever_the_umask(tmp_path):
    from raftcache.core.raft.messages import ConfState, Entry, HardState, Snapshot, SnapshotMeta
    from raftcache.plugins.storage.file_wal import FileWALStorage

    old = os.umask(0o022)
    try:
        store = FileWALStorage(1, str(tmp_path / "data" / "node1"), {})
        store.load()
        store.save(HardState(1, 1, 3), [Entry(1, i, data=b"x") for i in (1, 2, 3)], None, True)
        store.compact(Snapshot(SnapshotMeta(index=3, term=1,
                                            conf_state=ConfState(voters=frozenset({1}))),
                               b"image"))
        store.save(HardState(1, 1, 4), [Entry(1, 4, data=b"y")], None, True)
        store.close()
    finally:
        os.umask(old)
    modes = {}
    for root, dirs, files in os.walk(tmp_path / "data"):
        for name in dirs + files:
            path = os.path.join(root, name)
            modes[os.path.relpath(path, tmp_path)] = stat.S_IMODE(os.stat(path).st_mode)
    assert {"data/node1/snapshot", "data/node1/hardstate"} <= set(modes), modes
    assert any(p.startswith("data/node1/wal/") for p in modes), modes
    assert {p: m for p, m in modes.items()
            if m != (0o700 if os.path.isdir(tmp_path / p) else 0o600)} == {}


def test_local_cluster_gives_every_node_the_same_keyring_or_says_enabled_false(tmp_path):
    on = LocalCluster(str(tmp_path / "on"), port=free_port_block(3))
    on.write_configs()
    configs = [on.node_config(i)["encryption"] for i in (1, 2, 3)]
    assert configs == [{"keyring": os.path.join(on.data_dir, "keyring")}] * 3
    assert stat.S_IMODE(os.stat(configs[0]["keyring"]).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(on.data_dir).st_mode) == 0o700
    first = open(configs[0]["keyring"]).read()
    assert LocalCluster(on.data_dir).keyring_path() and open(configs[0]["keyring"]).read() == first
    off = LocalCluster(str(tmp_path / "off"), port=free_port_block(3), encryption=False)
    off.write_configs()
    assert stat.S_IMODE(os.stat(off.config_path(1)).st_mode) == 0o600
    assert off.node_config(1)["encryption"] == {"enabled": False}
    assert not os.path.exists(os.path.join(off.data_dir, "keyring"))


def test_keys_commands_against_a_cluster_without_encryption_say_so(tmp_path):
    cluster = LocalCluster(str(tmp_path / "c"), nodes=1, port=free_port_block(1),
                           encryption=False)
    try:
        cluster.start()
        cluster.wait_for_leader()
        result = raftcache("keys", "rotate", "--endpoints", cluster.endpoints()[0])
        assert result.returncode == 2
        assert result.stderr.strip() == ("raftcache: InvalidRequest: encryption at rest is off "
                                         "on this node (no [encryption] keyring)")
    finally:
        cluster.stop()
