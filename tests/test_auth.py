"""Signed-token access control (the `rbac` plugin): tokens, the one decision function, the
state machine's verdict by stamps, and real node processes with `[auth] required`.

Every cluster here runs on 127.0.0.1 on free ports, with bounded timeouts; the teeth tests run a
deliberately broken rbac (raftcache.testing.auth_mutants) on one node and assert the same
scenario that passes on the real plugin catches it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
import subprocess
import sys
import time

import attrs
import jwt
import pluggy
import pytest
from local_up import up as start_up

from raftcache import errors, pluginapi
from raftcache.client import SESSION_REUSE_S, Client, _Session
from raftcache.core import api
from raftcache.core.cache.commands import (
    COMMAND_TYPES,
    Append,
    Caller,
    Cas,
    Configure,
    Envelope,
    Incr,
    Invalidate,
    MSet,
    Put,
    Remove,
    Reseal,
    Sweep,
    Writes,
    command,
    decode_envelope,
    encode_envelope,
    sample_command,
)
from raftcache.core.cache.statemachine import (
    MAX_SESSIONS_PER_IDENTITY,
    SESSION_EVICTABLE_MS,
    ApplyError,
    Setting,
    StateMachine,
)
from raftcache.pluginapi.manager import entry_point_names, make_manager
from raftcache.plugins.backend.memory import MemoryBackend
from raftcache.plugins.security import rbac, tokens

WAIT = 5.0
HOUR_MS = 3_600_000


# ================================================================================================
# Tokens
# ================================================================================================
@pytest.fixture(scope="module")
def key():
    return tokens.generate_key()


@pytest.fixture(scope="module")
def keys(key):
    return {tokens.key_id(key.public_key()): key.public_key()}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_entry_point_registers_rbac():
    assert "rbac" in entry_point_names(), ("the rbac entry point is missing: reinstall "
                                           "(pip install -e .) or run setup.py egg_info")
    assert make_manager().get_plugin("rbac") is rbac


def test_a_token_round_trips_with_its_claims(key, keys):
    token = tokens.issue(key, "alice", {"user:": "rw", "": "r"}, roles=["ops"], ttl=60,
                         now=1_700_000_000.123)
    header, claims = tokens.unverified(token)
    assert header == {"alg": "EdDSA", "typ": "JWT", "kid": tokens.key_id(key.public_key())}
    assert len(header["kid"]) == 16
    caller = tokens.verify(token, keys)
    assert caller == Caller("alice", header["kid"], issued_ms=1_700_000_000_123,
                            not_before_ms=1_700_000_000_123, expires_ms=1_700_000_060_123,
                            grants=((b"", "r"), (b"user:", "rw")), roles=("ops",),
                            jti=claims["jti"])
    assert len(claims["jti"]) == 32 and claims["iat"] == 1_700_000_000.123
    # No expiry: 0. Times are not judged by verify (a token from 1970 still verifies).
    old = tokens.verify(tokens.issue(key, "bob", {"": "admin"}, now=1.0), keys)
    assert old.expires_ms == 0 and old.issued_ms == 1000


def _forgeries(key, keys):
    """name -> a token that must be refused."""
    kid = next(iter(keys))
    good = tokens.issue(key, "alice", {"user:": "r"})
    h, p, s = good.split(".")
    claims = dict(tokens.unverified(good)[1], grants={"": "admin"})
    other = tokens.generate_key()
    pem = tokens.public_pem(key.public_key())
    none_header = b64(json.dumps({"alg": "none", "kid": kid}).encode())

    def hs256(secret: bytes) -> str:
        head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
        body = b64(json.dumps(claims).encode())
        sig = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
        return f"{head}.{body}.{b64(sig)}"

    return {
        "other key, same kid": jwt.encode(claims, other, algorithm="EdDSA",
                                          headers={"kid": kid}),
        "payload edited": f"{h}.{b64(json.dumps(claims).encode())}.{s}",
        "alg none": jwt.encode(claims, None, algorithm="none", headers={"kid": kid}),
        "alg none, empty signature": f"{none_header}.{p}.",
        "HS256 keyed with the public key PEM": hs256(pem),
        "HS256 keyed with the raw public key": hs256(key.public_key().public_bytes_raw()),
        "unknown kid": jwt.encode(claims, other, algorithm="EdDSA",
                                  headers={"kid": tokens.key_id(other.public_key())}),
        "no kid": jwt.encode(claims, key, algorithm="EdDSA"),
        "extra header field": jwt.encode(claims, key, algorithm="EdDSA",
                                         headers={"kid": kid, "jku": "http://x"}),
        "signature cut": f"{h}.{p}.{s[:-4]}",
        "garbage": "not a token at all",
        "garbage with dots": "a.b.c",
        "empty parts": "..",
        "non-ascii": good[:-1] + "é",
        "oversized": f"{h}.{b64(b'x' * 9000)}.{s}",
        "bad perms": jwt.encode({**claims, "grants": {"": "root"}}, key, algorithm="EdDSA",
                                headers={"kid": kid}),
        "grants not an object": jwt.encode({**claims, "grants": [""]}, key,
                                           algorithm="EdDSA", headers={"kid": kid}),
        "too many grants": jwt.encode({**claims, "grants": {str(i): "r" for i in range(65)}},
                                      key, algorithm="EdDSA", headers={"kid": kid}),
        "no subject": jwt.encode({k: v for k, v in claims.items() if k != "sub"}, key,
                                 algorithm="EdDSA", headers={"kid": kid}),
        "no iat": jwt.encode({k: v for k, v in claims.items() if k != "iat"}, key,
                             algorithm="EdDSA", headers={"kid": kid}),
        "iat a string": jwt.encode({**claims, "iat": "now"}, key, algorithm="EdDSA",
                                   headers={"kid": kid}),
        "exp beyond range": jwt.encode({**claims, "exp": 1e300}, key, algorithm="EdDSA",
                                       headers={"kid": kid}),
        "roles not names": jwt.encode({**claims, "roles": [1]}, key, algorithm="EdDSA",
                                      headers={"kid": kid}),
    }


def test_forged_and_malformed_tokens_are_refused(key, keys):
    for name, token in _forgeries(key, keys).items():
        with pytest.raises(tokens.TokenError):
            tokens.verify(token, keys)
            pytest.fail(f"{name}: accepted")
    with pytest.raises(tokens.TokenError):
        tokens.verify(None, keys)
    with pytest.raises(tokens.TokenError):
        tokens.verify(b"bytes", keys)


def test_grants_parse_and_issue_refuses_what_nodes_would(key):
    assert tokens.parse_grant("user:=rw") == ("user:", "rw")
    assert tokens.parse_grant("=admin") == ("", "admin")
    assert tokens.parse_grant("a=b=r") == ("a=b", "r")
    for bad in ("user:", "user:=x", "user:=RW", ""):
        with pytest.raises(ValueError):
            tokens.parse_grant(bad)
    with pytest.raises(ValueError):
        tokens.issue(key, "", {"": "r"})
    with pytest.raises(ValueError):
        tokens.issue(key, "a", {"": "r"}, ttl=0)


def test_signing_key_files(tmp_path):
    paths = tokens.init_auth_dir(str(tmp_path / "auth"))
    assert stat.S_IMODE(os.stat(tmp_path / "auth").st_mode) == 0o700
    for name in ("signing.key", "admin.token"):
        assert stat.S_IMODE(os.stat(paths[name]).st_mode) == 0o600, name
    key = tokens.load_private_key(paths["signing.key"])
    admin = tokens.verify(open(paths["admin.token"]).read().strip(),
                          tokens.load_public_keys([paths["signing.pub"]]))
    assert (admin.subject, admin.grants) == ("admin", ((b"", "admin"),))
    assert admin.expires_ms - admin.issued_ms == tokens.ADMIN_TTL * 1000  # 7 days
    # Kept across restarts: the same key, the same admin token...
    before = {n: open(p, "rb").read() for n, p in paths.items()}
    tokens.init_auth_dir(str(tmp_path / "auth"), now=time.time() + 5 * 24 * 3600)
    assert {n: open(p, "rb").read() for n, p in paths.items()} == before
    assert tokens.key_id(key.public_key()) == admin.key_id
    # ... until it has less than a day left: then a new one, with the same key.
    later = time.time() + 6.5 * 24 * 3600
    tokens.init_auth_dir(str(tmp_path / "auth"), now=later)
    renewed = tokens.verify(open(paths["admin.token"]).read().strip(),
                            tokens.load_public_keys([paths["signing.pub"]]))
    assert renewed.expires_ms == round((later + tokens.ADMIN_TTL) * 1000)
    assert stat.S_IMODE(os.stat(paths["admin.token"]).st_mode) == 0o600
    assert open(paths["signing.key"], "rb").read() == before["signing.key"]
    os.chmod(paths["signing.key"], 0o644)
    with pytest.raises(tokens.TokenError, match="chmod 600"):
        tokens.load_private_key(paths["signing.key"])


def test_a_node_verifies_each_token_once_in_a_bounded_cache(key, keys, monkeypatch):
    verifier = rbac._Verifier([])
    verifier.keys = keys
    calls = []
    real = tokens.verify
    monkeypatch.setattr(tokens, "verify", lambda t, k: calls.append(t) or real(t, k))
    good = tokens.issue(key, "a", {"": "r"})
    assert verifier.verify(good) == verifier.verify(good) == real(good, keys)
    forged = jwt.encode({"sub": "a", "iat": 1, "grants": {"": "admin"}}, tokens.generate_key(),
                        algorithm="EdDSA", headers={"kid": next(iter(keys))})
    for _ in range(3):
        with pytest.raises(pluginapi.Unauthorized):
            verifier.verify(forged)
    assert calls == [good, forged]  # one verification each
    with pytest.raises(pluginapi.Unauthorized):
        verifier.verify("x" * (tokens.MAX_TOKEN_BYTES + 1))
    monkeypatch.setattr(rbac, "CACHE_SIZE", 8)
    for i in range(20):
        verifier.verify(tokens.issue(key, f"s{i}", {"": "r"}))
    assert len(verifier.accepted) == 8


def junk(keys, i: int) -> str:
    """A distinct forged token naming a real key id: each costs a signature check."""
    return jwt.encode({"sub": "j", "iat": 1, "jti": str(i), "grants": {"": "admin"}},
                      JUNK_KEY, algorithm="EdDSA", headers={"kid": next(iter(keys))})


JUNK_KEY = tokens.generate_key()


def test_junk_tokens_never_evict_an_accepted_one(key, keys, monkeypatch):
    """Refusals are cached apart: 4,096 + 100 distinct forgeries leave the valid token cached
    (it is not verified again), and the refusal cache stays bounded."""
    verifier = rbac._Verifier([])
    verifier.keys = keys
    monkeypatch.setattr(rbac, "VERIFY_BURST", 10**6)  # this test is about the caches
    good = tokens.issue(key, "a", {"": "r"})
    verifier.verify(good, "10.0.0.1")
    for i in range(rbac.REFUSED_CACHE_SIZE + 100):
        with pytest.raises(pluginapi.Unauthorized):
            verifier.verify(junk(keys, i), "10.0.0.2")
    before = verifier.verified
    assert verifier.verify(good, "10.0.0.1").subject == "a"
    assert verifier.verified == before  # served from the cache: no verification
    assert len(verifier.refused) == rbac.REFUSED_CACHE_SIZE and len(verifier.accepted) == 1
    # Teeth: one LRU for both (as it was) lets the flood evict the valid token.
    shared = rbac._Verifier([])
    shared.keys, shared.refused = keys, shared.accepted
    shared.verify(good)
    for i in range(rbac.CACHE_SIZE):
        with pytest.raises(pluginapi.Unauthorized):
            shared.verify(junk(keys, i), "10.0.0.2")
    before = shared.verified
    shared.verify(good)
    assert shared.verified == before + 1


def test_each_source_may_cause_a_bounded_rate_of_verifications(key, keys, monkeypatch):
    now = [0.0]
    verifier = rbac._Verifier([], clock=lambda: now[0])
    verifier.keys = keys
    monkeypatch.setattr(rbac, "MAX_SOURCES", 4)
    good = tokens.issue(key, "a", {"": "r"})
    verifier.verify(good, "flood")
    for i in range(rbac.VERIFY_BURST + 50):
        with pytest.raises(pluginapi.Unauthorized):
            verifier.verify(junk(keys, i), "flood")
    assert verifier.verified == rbac.VERIFY_BURST  # the burst, then nothing
    assert verifier.limited == 51
    with pytest.raises(pluginapi.Unauthorized, match="too many new tokens to verify from flood"):
        verifier.verify(tokens.issue(key, "b", {"": "r"}), "flood")
    assert verifier.verify(good, "flood").subject == "a"  # cached: no bucket needed
    assert verifier.verify(tokens.issue(key, "c", {"": "r"}), "other").subject == "c"
    now[0] += 1.0  # a second refills VERIFY_RATE
    for i in range(int(rbac.VERIFY_RATE)):
        with pytest.raises(pluginapi.Unauthorized, match="(?i)signature verification failed"):
            verifier.verify(junk(keys, 10_000 + i), "flood")
    with pytest.raises(pluginapi.Unauthorized, match="too many"):
        verifier.verify(junk(keys, 20_000), "flood")
    # The sources table is bounded; busy sources are kept, new ones share one bucket.
    for i in range(10):
        with pytest.raises(pluginapi.Unauthorized):
            verifier.verify(junk(keys, 30_000 + i), f"s{i}")
    assert len(verifier.buckets.table) == rbac.MAX_SOURCES + 1  # + the shared bucket
    assert "flood" in verifier.buckets.table and "s9" not in verifier.buckets.table


# ================================================================================================
# The decision
# ================================================================================================
def caller(subject="u", grants=(), roles=(), issued=1000, nbf=1000, exp=0):
    return Caller(subject, "k", issued_ms=issued, not_before_ms=nbf, expires_ms=exp,
                  grants=tuple(sorted((p.encode(), perms) for p, perms in grants)),
                  roles=tuple(roles))


def allowed(c, command=None, op=None, keys=(), stamp=2000, settings=None):
    needs = rbac.command_needs(command) if command is not None else rbac.request_needs(op, keys)
    return rbac.decide(c, stamp, settings or {}, needs) is None


def test_permission_table():
    user = caller(grants=[("user:", "rw")])
    reader = caller(grants=[("user:", "r")])
    writer = caller(grants=[("user:", "w")])
    admin_user = caller(grants=[("user:", "admin")])
    root = caller(grants=[("", "admin")])
    everything_rw = caller(grants=[("", "rw")])
    assert allowed(user, Put(b"user:1", b"v")) and allowed(user, op="get", keys=[b"user:1"])
    assert not allowed(user, Put(b"admin:1", b"v"))
    assert not allowed(user, op="get", keys=[b"admin:1"])
    assert not allowed(user, op="mget", keys=[b"user:1", b"admin:1"])
    assert not allowed(user, MSet(((b"user:1", b"v"), (b"admin:1", b"v"))))
    assert allowed(user, MSet(((b"user:1", b"v"), (b"user:2", b"v"))))
    assert allowed(reader, op="get", keys=[b"user:1"])
    assert not allowed(reader, Put(b"user:1", b"v")) and not allowed(reader, Incr(b"user:1"))
    assert allowed(writer, Put(b"user:1", b"v")) and allowed(writer, MSet(((b"user:1", b"v"),)))
    assert not allowed(writer, op="get", keys=[b"user:1"])
    # A write whose result reveals what was stored needs r as well: w alone is not a read.
    for revealing in (Remove(b"user:1"), Cas(b"user:1", 0, b"v"), Incr(b"user:1", 0),
                      Append(b"user:1", b""), Invalidate(b"user:x")):
        assert not allowed(writer, revealing) and not allowed(reader, revealing), revealing
        assert allowed(user, revealing) and allowed(admin_user, revealing), revealing
    split = caller(grants=[("user:", "w"), ("user:1", "r")])  # r from another grant is r
    assert allowed(split, Incr(b"user:1")) and not allowed(split, Incr(b"user:2"))
    # invalidate(P) needs w and r, each from a grant G that P starts with.
    assert allowed(user, Invalidate(b"user:")) and allowed(user, Invalidate(b"user:x"))
    assert not allowed(user, Invalidate(b"")) and not allowed(user, Invalidate(b"use"))
    assert not allowed(reader, Invalidate(b"user:"))
    assert allowed(admin_user, Invalidate(b"user:")) and allowed(admin_user, Put(b"user:", b""))
    # Cluster operations and settings: admin on "" only.
    for c in (user, admin_user, everything_rw):
        for op in ("transfer_leader", "change_member", "admin"):
            assert not allowed(c, op=op), (c, op)
        assert not allowed(c, Configure((("auth.revoked.x", b""),)))
        assert not allowed(c, Reseal(((b"user:1", 1, b"v"),)))
    for op in ("transfer_leader", "change_member", "admin"):
        assert allowed(root, op=op)
    assert allowed(root, Configure((("auth.revoked.x", b""),)))
    assert allowed(everything_rw, Invalidate(b"")) and not allowed(everything_rw, op="admin")
    assert not allowed(caller(), op="get", keys=[b"x"])  # no grants: nothing
    assert rbac.decide(None, 0, {}, [("cluster", b"")]) is None  # anonymous: auth off



# ---- the verdict on a command follows what its class declares it writes ----------------------
WRITER = caller("writer", grants=[("", "w")])  # may write any key, is no cluster admin
READ_WRITER = caller("read-writer", grants=[("", "rw")])  # may also read them
ROOT = caller("root", grants=[("", "admin")])
# Each kind of declared write: may a writer of every key run it, and may the cluster admin?
VERDICTS = {Writes.KEYS: (True, True), Writes.PREFIXES: (True, True),
            Writes.SETTINGS: (False, True), Writes.SEALING: (False, True),
            Writes.EXPIRED: (True, True)}


def check(command, c):
    return rbac.raftcache_check_command(command=command, stamp_ms=2000, caller=c, settings={})


@pytest.mark.parametrize("cls", list(COMMAND_TYPES.values()), ids=lambda cls: cls.__name__)
def test_every_registered_command_gets_the_verdict_of_its_declaration(cls):
    command = sample_command(cls)
    writer_may, root_may = VERDICTS[cls.writes]
    # A result that reveals what was stored is a read too: a writer alone may not run it.
    assert (check(command, WRITER) is None) == (writer_may and not cls.reveals)
    assert (check(command, READ_WRITER) is None) == writer_may
    assert (check(command, ROOT) is None) == root_may
    if cls.writes is Writes.KEYS:  # and on its keys, not others
        perms = "rw" if cls.reveals else "w"
        narrow = caller("narrow", grants=[(k.decode("latin-1"), perms)
                                          for k in command.written()])
        assert check(command, narrow) is None
        assert check(command, caller("elsewhere", grants=[("zzz", "rw")])) is not None


@attrs.frozen
class Rewritten(Put):  # a Put whose class now says it writes the cluster settings
    writes = Writes.SETTINGS


@attrs.frozen
class Narrowed(Configure):  # a Configure whose class now says it writes one user key
    writes = Writes.KEYS

    def written(self):
        return (b"user:1",)


@attrs.frozen
class Undeclared:  # what a new command forgotten in the declarations would be
    key: bytes


def test_changing_or_removing_a_declaration_changes_the_verdict():
    put, configure = Put(b"user:1", b"v"), Configure((("auth.revoked.x", b""),))
    user = caller("user", grants=[("user:", "w")])
    assert check(put, user) is None and check(Rewritten(b"user:1", b"v"), user) is not None
    assert check(configure, user) is not None and check(Narrowed(configure.items), user) is None
    # Declared nothing: refused loudly to everyone, the cluster admin and anonymous callers
    # included, rather than quietly becoming admin-only.
    for c in (ROOT, user, None):
        assert "does not declare what it writes" in check(Undeclared(b"user:1"), c)
    with pytest.raises(TypeError, match="does not declare"):
        command(Undeclared)  # and it cannot register as a command at all
    assert Undeclared not in COMMAND_TYPES.values()


def test_times_revocation_and_roles_come_from_stamps_and_settings():
    c = caller(grants=[("k", "rw")], issued=1000, nbf=1500, exp=3000)
    get = {"op": "get", "keys": [b"k"]}
    assert not allowed(c, stamp=1499, **get) and allowed(c, stamp=1500, **get)
    assert allowed(c, stamp=2999, **get) and not allowed(c, stamp=3000, **get)
    revoked = {"auth.revoked.u": Setting(b"", 1000, 7)}
    assert not allowed(c, stamp=2000, settings=revoked, **get)  # issued at the stamp: revoked
    later = caller(grants=[("k", "rw")], issued=1001, nbf=1001)
    assert allowed(later, stamp=2000, settings=revoked, **get)
    assert allowed(c, stamp=2000, settings={"auth.revoked.other": Setting(b"", 5000, 7)}, **get)
    role = caller(roles=["ops"])
    ops = {"auth.role.ops": Setting(json.dumps({"k": "r"}).encode(), 1, 1)}
    assert allowed(role, settings=ops, **get) and not allowed(role, Put(b"k", b""), settings=ops)
    assert not allowed(role, **get)  # the role is not (or no longer) defined
    assert not allowed(role, settings={"auth.role.ops": Setting(b"{garbage", 1, 1)}, **get)


# ---- the state machine: the verdict on a write comes from the entry's stamp ---------------------
def rbac_hook():
    pm = pluggy.PluginManager(pluginapi.PROJECT)
    pm.add_hookspecs(pluginapi.hookspecs)
    pm.register(rbac, name="rbac")
    return pm.hook.raftcache_check_command


class Replica:
    def __init__(self):
        self.sm = StateMachine(MemoryBackend(), check_command=rbac_hook())
        self.index = 0

    def apply(self, command, stamp, who=None, client_id=None, seq=None):
        self.index += 1
        env = Envelope(command, client_id=client_id, seq=seq, stamp_ms=stamp, caller=who,
                       identity=who.subject if who else None)
        return self.sm.apply(self.index, encode_envelope(env))

    def value(self, key):
        found = self.sm.read_many([key], self.sm.last_stamp_ms)[0]
        return found and found[0]


def test_state_machine_judges_expiry_and_revocation_by_the_entry_stamp():
    root = caller("root", grants=[("", "admin")], issued=0, nbf=0)
    alice = caller("alice", grants=[("a:", "rw")], issued=1000, nbf=1000, exp=5000)
    replicas = [Replica(), Replica()]
    for r in replicas:
        assert not isinstance(r.apply(Put(b"a:1", b"x"), 4999, alice), ApplyError)
        refused = r.apply(Put(b"a:1", b"y"), 5000, alice)  # the stamp reached exp
        assert refused == ApplyError("Unauthorized", "the token of 'alice' expired")
        assert r.value(b"a:1") == b"x"
        # A later entry stamped before exp cannot happen: stamps never go back.
        assert isinstance(r.apply(Put(b"a:1", b"z"), 4000, alice), ApplyError)
    bob = caller("bob", grants=[("b:", "rw")], issued=1000, nbf=1000)
    for r in replicas:
        assert not isinstance(r.apply(Put(b"b:1", b"1"), 6000, bob), ApplyError)
        r.apply(Configure((("auth.revoked.bob", b""),)), 6001, root)
        assert r.apply(Put(b"b:1", b"2"), 6002, bob) == ApplyError(
            "Unauthorized", "the tokens of 'bob' were revoked")
        bob2 = caller("bob", grants=[("b:", "rw")], issued=6002, nbf=6002)
        assert not isinstance(r.apply(Put(b"b:1", b"3"), 6003, bob2), ApplyError)
        assert isinstance(r.apply(Configure((("auth.revoked.alice", b""),)), 6004, bob2),
                          ApplyError)  # settings: admin on "" only
        assert r.apply(Put(b"free", b"1"), 6005) == r.index  # anonymous: auth is off
        assert r.apply(Sweep(7000), 7000, bob) is not None  # never checked
    assert replicas[0].sm.settings == replicas[1].sm.settings
    assert [r.value(b"b:1") for r in replicas] == [b"3", b"3"]


@attrs.define
class AdminNode:
    """What rbac's admin actions read of a node: its replicated settings and its time."""

    sm: StateMachine
    config: object = None

    @property
    def settings(self):
        return self.sm.settings

    def now_ms(self) -> int:
        return self.sm.last_stamp_ms


def admin(r: Replica, action: str, *args, stamp: int):
    """Run rbac's admin action against replica `r` and apply its Configure at `stamp`."""
    outcome = rbac.raftcache_admin(node=AdminNode(r.sm), action=action,
                                   args=[a.encode() for a in args], caller=None)
    command, report = outcome
    assert not isinstance(r.apply(command, stamp, ROOT), ApplyError)
    return report


ROOT = Caller("root", "k", grants=((b"", "admin"),))


def test_one_token_is_revoked_by_its_jti_and_the_revocation_ends_with_its_expiry():
    """`revoke-jti` refuses that token on every replica at apply, and no other token of its
    subject; once the cluster's time passed its expiry a later revoke-jti drops it."""
    r = Replica()
    one = attrs.evolve(caller("carl", grants=[("c:", "rw")], exp=10_000), jti="j1")
    other = attrs.evolve(one, jti="j2")
    assert not isinstance(r.apply(Put(b"c:1", b"x"), 2000, one), ApplyError)
    assert admin(r, "revoke-jti", "j1", "10000", stamp=2001)["revoked_jti"] == "j1"
    assert r.apply(Put(b"c:1", b"y"), 2002, one) == ApplyError(
        "Unauthorized", "the token 'j1' of 'carl' was revoked")
    assert not isinstance(r.apply(Put(b"c:1", b"z"), 2003, other), ApplyError)
    assert r.value(b"c:1") == b"z"
    # Bounded: at 10,000 ms the token expired by the cluster's time; the next revoke-jti
    # drops it (and one with no known expiry stays until unrevoked).
    admin(r, "revoke-jti", "forever", stamp=2004)
    r.apply(Put(b"tick", b""), 10_000)
    assert admin(r, "revoke-jti", "j3", "20000", stamp=10_001)["dropped_expired"] == 1
    held = {n for n in r.sm.settings if n.startswith(rbac.REVOKED_JTI)}
    assert held == {rbac.REVOKED_JTI + "forever", rbac.REVOKED_JTI + "j3"}
    admin(r, "unrevoke-jti", "forever", stamp=10_002)
    assert rbac.REVOKED_JTI + "forever" not in r.sm.settings


def test_revoked_jtis_are_bounded(monkeypatch):
    monkeypatch.setattr(rbac, "MAX_REVOKED_JTIS", 3)
    r = Replica()
    for i in range(3):
        admin(r, "revoke-jti", f"j{i}", "0", stamp=1000 + i)
    with pytest.raises(ValueError, match="revoke their subjects instead"):
        admin(r, "revoke-jti", "j9", stamp=1010)
    admin(r, "revoke-jti", "j1", "5", stamp=1011)  # the same id again: no new one held


def test_a_token_issued_ahead_of_the_cluster_time_is_refused():
    """An issuer whose clock runs ahead would mint a token that outlives a revocation of its
    subject (it compares iat): past the skew, its iat alone refuses it, nbf or not."""
    ahead = caller("eve", grants=[("e:", "rw")], issued=100_000 + rbac.ISSUED_SKEW_MS + 1,
                   nbf=0)
    within = caller("eve", grants=[("e:", "rw")], issued=100_000 + rbac.ISSUED_SKEW_MS, nbf=0)
    get = {"op": "get", "keys": [b"e:1"]}
    assert not allowed(ahead, stamp=100_000, **get) and allowed(within, stamp=100_000, **get)
    assert "issued in the future" in rbac.validity(ahead, 100_000, None)
    r = Replica()
    assert isinstance(r.apply(Put(b"e:1", b"x"), 100_000, ahead), ApplyError)


def test_one_grammar_for_subjects_at_issue_verification_and_revocation(key, keys):
    """"alice smith" is issued, verified and revoked alike; what one refuses, all refuse."""
    token = tokens.issue(key, "alice smith", {"": "r"})
    assert tokens.verify(token, keys).subject == "alice smith"
    r = Replica()
    assert admin(r, "revoke", "alice smith", stamp=5000) == {"revoked": "alice smith"}
    for bad in ("", " alice", "alice ", "al\tice", "al\nice", "x" * 257):
        with pytest.raises(tokens.TokenError):
            tokens.issue(key, bad, {"": "r"})
        with pytest.raises(ValueError):
            rbac.raftcache_admin(node=AdminNode(r.sm), action="revoke", args=[bad.encode()],
                                 caller=None)
        forged = jwt.encode({"sub": bad, "iat": 1, "grants": {}}, key, algorithm="EdDSA",
                            headers={"kid": tokens.key_id(key.public_key())})
        with pytest.raises(tokens.TokenError, match="subject"):
            tokens.verify(forged, keys)


def test_a_callers_jti_travels_in_the_entry():
    who = attrs.evolve(caller("u", grants=[("", "r")]), jti="abc")
    env = Envelope(Put(b"k", b"v"), identity="u", stamp_ms=5, caller=who)
    assert decode_envelope(encode_envelope(env)).caller == who
    bare = attrs.evolve(who, jti="")  # entries written before jtis were recorded
    data = encode_envelope(attrs.evolve(env, caller=bare))
    assert data[1] & 16 == 0 and decode_envelope(data).caller == bare


def test_a_vetoed_write_leaves_no_trace_in_its_session():
    r = Replica()
    mallory = caller("mallory", grants=[("m:", "rw")])
    assert isinstance(r.apply(Put(b"x", b"1"), 2000, mallory, "c1", 1), ApplyError)
    assert not isinstance(r.apply(Put(b"m:x", b"1"), 2001, mallory, "c1", 1), ApplyError)


# ---- teeth for the decision: each broken variant fails the table above --------------------------
def _decision_failures() -> list[str]:
    """The checks of the two tests above, as a list of what failed (empty: all hold)."""
    failures = []
    for test in (test_permission_table, test_times_revocation_and_roles_come_from_stamps_and_settings,
                 test_state_machine_judges_expiry_and_revocation_by_the_entry_stamp):
        try:
            test()
        except AssertionError as exc:
            failures.append(f"{test.__name__}: {exc}")
    return failures


def _ignore_revocation(validity):
    return lambda c, stamp, settings: validity(c, stamp, None)


def _ignore_expiry(validity):
    return lambda c, stamp, settings: validity(
        Caller(c.subject, c.key_id, c.issued_ms, c.not_before_ms, 0, c.grants, c.roles),
        stamp, settings)


def _ignore_not_before(validity):
    return lambda c, stamp, settings: validity(
        Caller(c.subject, c.key_id, c.issued_ms, 0, c.expires_ms, c.grants, c.roles),
        stamp, settings)


def _revoked_strictly_before(validity):
    def broken(c, stamp, settings):
        if settings is not None:
            s = settings.get(rbac.REVOKED + c.subject)
            if s is not None and c.issued_ms >= s.stamp_ms:  # off by one: the same ms passes
                settings = {k: v for k, v in settings.items() if k != rbac.REVOKED + c.subject}
        return validity(c, stamp, settings)
    return broken


def _invalidate_by_key(needs):
    # invalidate checked like a write of the prefix's key: a grant on "" is not required
    return lambda cmd: ([("w", b"\xff" + cmd.prefix)] if type(cmd) is Invalidate else needs(cmd))


def _write_needs_only(needs):
    # what main did: a write needs w, whatever its result tells of the stored value
    return lambda cmd: [(need, key) for need, key in needs(cmd) if need != "r"]


MUTANT_DECISIONS = {
    "ignores revocation": ("validity", _ignore_revocation),
    "ignores expiry": ("validity", _ignore_expiry),
    "ignores not-before": ("validity", _ignore_not_before),
    "revokes only tokens issued strictly before": ("validity", _revoked_strictly_before),
    "cluster ops allowed to any admin": ("request_needs",
                                         lambda needs: lambda op, keys: (
                                             [("w", b"")] if op != "get" and op != "mget"
                                             else needs(op, keys))),
    "invalidate checked as a key": ("command_needs", _invalidate_by_key),
    "a w grant runs writes whose result reads": ("command_needs", _write_needs_only),
}


def test_decision_passes_its_checks():
    assert _decision_failures() == []


@pytest.mark.parametrize("name", sorted(MUTANT_DECISIONS))
def test_decision_checks_catch_a_broken_variant(name, monkeypatch):
    attr, breaker = MUTANT_DECISIONS[name]
    monkeypatch.setattr(rbac, attr, breaker(getattr(rbac, attr)))
    assert _decision_failures(), f"the broken variant {name!r} passed every check"


# ================================================================================================
# Real nodes
# ================================================================================================
# The module's shared `cluster` (tests/conftest.py); tests with a cluster of their own start it
# with `running(auth=True, ...)`.
CLUSTER = {"auth": True}


def signing_key(cluster):
    return tokens.load_private_key(cluster.auth_files()["signing.key"])


def issue(cluster, subject, grants, **kwargs) -> str:
    return tokens.issue(signing_key(cluster), subject, grants, **kwargs)


def node_client(cluster, node_id, token, **kwargs) -> Client:
    """A client that talks to one node only (its reads are served there)."""
    kwargs.setdefault("timeout", WAIT)
    return Client([cluster.address(node_id)], token=token, **kwargs)


def refused(fn) -> bool:
    try:
        fn()
    except errors.Unauthorized:
        return True
    return False


def eventually(check, timeout=WAIT, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.02)
    raise AssertionError(f"{what}: not within {timeout} s")


def replicas_agree(cluster, keys, token=None) -> dict:
    """Wait until every node applied the same index, then their stale reads of `keys`: node ->
    values. (Stale reads by `token`, default the admin token, which reads every key.)"""
    nodes = range(1, cluster.nodes + 1)
    admin = token or cluster.admin_token()
    with cluster.client(timeout=WAIT) as c:
        def settled():
            applied = {c.status(cluster.address(i)).applied for i in nodes}
            return len(applied) == 1
        eventually(settled, what="replicas apply the same index")
    out = {}
    for i in nodes:
        with node_client(cluster, i, admin) as c:
            out[i] = c.mget(keys, consistency="stale")
    return out


# Each write whose result tells what was stored (its class's `reveals`), as a client call.
REVEALING_CALLS = {
    "incr": lambda c: c.incr("wo:n", 0),  # the value
    "append": lambda c: c.append("wo:s", ""),  # its length
    "cas": lambda c: c.cas("wo:s", 1, "x"),  # whether it exists, its version
    "delete": lambda c: c.delete("wo:gone"),  # whether it existed
    "invalidate": lambda c: c.invalidate("wo:gone"),  # how many keys were live
}


def test_a_write_only_grant_cannot_read_through_a_write_result(cluster):
    with cluster.client(token=cluster.admin_token(), timeout=WAIT) as admin:
        admin.set("wo:n", "41")
        admin.set("wo:s", "secret")
        admin.set("wo:gone", "x")
    write_only = issue(cluster, "w-only", {"wo:": "w"})
    read_write = issue(cluster, "w-and-r", {"wo:": "rw"})
    with cluster.client(token=write_only, timeout=WAIT) as c:
        answered = [name for name, call in REVEALING_CALLS.items()
                    if not refused(lambda call=call: call(c))]
        assert answered == [], "a w grant read through these writes' results"
        with pytest.raises(errors.Unauthorized, match="'w-only' may not read b'wo:n'"):
            c.incr("wo:n", 0)
        assert c.set("wo:blind", "v") > 0 and c.mset({"wo:blind": "w"})  # writes that tell nothing
    with cluster.client(token=cluster.admin_token(), timeout=WAIT) as admin:
        # nothing the refused calls would have done happened
        assert admin.mget(["wo:n", "wo:s", "wo:gone"]) == [b"41", b"secret", b"x"]
    with cluster.client(token=read_write, timeout=WAIT) as c:
        assert c.incr("wo:n", 0) == 41 and c.append("wo:s", "") == 6
        assert c.delete("wo:gone") is True and c.invalidate("wo:gone") == 0


def test_a_user_token_is_confined_to_its_prefix(cluster):
    with cluster.client(token=cluster.admin_token(), timeout=WAIT) as admin:
        admin.set("admin:secret", "s")
        leader = admin.status(cluster.address(1)).leader
    user = issue(cluster, "alice", {"user:": "rw"})
    with cluster.client(token=user, timeout=WAIT) as c:
        assert c.set("user:1", "a") > 0 and c.get("user:1") == b"a"
        assert c.incr("user:n") == 1 and c.append("user:1", "b") == 2
        assert c.invalidate("user:gone") == 0
        assert refused(lambda: c.set("admin:secret", "mine"))
        assert refused(lambda: c.get("admin:secret"))
        assert refused(lambda: c.get("admin:secret", consistency="stale"))
        assert refused(lambda: c.mget(["user:1", "admin:secret"]))
        assert refused(lambda: c.mset({"user:2": "x", "admin:2": "x"}))
        assert refused(lambda: c.delete("admin:secret"))
        assert refused(lambda: c.cas("admin:secret", 0, "x"))
        assert refused(lambda: c.invalidate(""))
        assert refused(lambda: c.invalidate("admin:"))
        assert refused(lambda: c.remove_member(2))
        assert refused(lambda: c.transfer_leader(1 if leader != 1 else 2))
        assert refused(lambda: c.admin("revoke", "admin"))
        assert c.get("user:2") is None  # the refused mset wrote nothing
    final = replicas_agree(cluster, ["admin:secret", "user:1"])
    assert all(v == [b"s", b"ab"] for v in final.values()), final
    with cluster.client(timeout=WAIT) as c:
        st = c.status(cluster.address(leader))
        assert st.leader == leader and st.voters == [1, 2, 3]


def test_anonymous_clients_may_only_ask_status(cluster):
    """The issue's report: an anonymous Thrift client shrank a cluster to one voter."""
    from raftcache.plugins.transport import thrift

    with cluster.client(timeout=WAIT) as anon:
        calls = {
            "set": lambda: anon.set("k", "v"), "get": lambda: anon.get("k"),
            "stale get": lambda: anon.get("k", consistency="stale"),
            "mget": lambda: anon.mget(["k"]), "mset": lambda: anon.mset({"k": "v"}),
            "delete": lambda: anon.delete("k"), "cas": lambda: anon.cas("k", 0, "v"),
            "incr": lambda: anon.incr("k"), "append": lambda: anon.append("k", "v"),
            "invalidate": lambda: anon.invalidate(""),
            "remove voter 2": lambda: anon.remove_member(2),
            "remove voter 3": lambda: anon.remove_member(3),
            "transfer": lambda: anon.transfer_leader(2), "admin": lambda: anon.admin("revoke", "x"),
        }
        for name, call in calls.items():
            assert refused(call), f"anonymous {name} was not refused"
        # A raw Thrift call without any request header at all.
        for i in range(1, 4):
            conn = thrift.connect(cluster.address(i), None, WAIT)
            try:
                r = conn.call(api.Request(op="change_member", change="remove", node_id=2), WAIT)
            finally:
                conn.close()
            assert r.error == "Unauthorized", r
        for i in range(1, 4):  # status stays open: it is the health check
            st = anon.status(cluster.address(i))
            assert st.voters == [1, 2, 3] and st.learners == []
    with pytest.raises(errors.Unauthorized):
        with cluster.client(token="", timeout=WAIT) as c:
            c.get("k")


def test_forged_tokens_are_refused_by_every_node(cluster):
    key = signing_key(cluster)
    keys = tokens.load_public_keys([cluster.auth_files()["signing.pub"]])
    forged = _forgeries(key, keys)
    with cluster.client(token=cluster.admin_token(), timeout=WAIT) as admin:
        admin.set("user:forge", "before")
    for name, token in forged.items():
        for i in range(1, 4):
            with node_client(cluster, i, token, timeout=2.0) as c:
                assert refused(lambda: c.get("user:forge")), (name, i)
                assert refused(lambda: c.set("user:forge", "forged")), (name, i)
                assert refused(lambda: c.remove_member(2)), (name, i)
    assert set(map(tuple, replicas_agree(cluster, ["user:forge"]).values())) == {(b"before",)}


def revocation_problems(cluster, subject: str) -> list[str]:
    """Revoke `subject` and report every replica that still serves its old token, writes that
    got through, replicas that disagree, and a later token that does not work."""
    problems = []
    old = issue(cluster, subject, {f"{subject}:": "rw"})
    key = f"{subject}:k"
    with cluster.client(token=old, timeout=WAIT) as c:
        c.set(key, "before")
    with cluster.client(token=cluster.admin_token(), timeout=WAIT) as admin:
        answer = admin.admin("revoke", subject)
        assert answer["revoked"] == subject and answer["result"] > 0
    # Right after the revocation committed: linearizable reads on each node, then writes.
    for i in range(1, cluster.nodes + 1):
        with node_client(cluster, i, old) as c:
            if not refused(lambda: c.get(key)):
                problems.append(f"node {i} served a linearizable read with a revoked token")
            if not refused(lambda: c.mget([key], consistency="lease")):
                problems.append(f"node {i} served a lease read with a revoked token")
    with cluster.client(token=old, timeout=WAIT) as c:
        if not refused(lambda: c.set(key, "after")):
            problems.append("a write with a revoked token applied")
    states = replicas_agree(cluster, [key])
    if len({tuple(v) for v in states.values()}) != 1:
        problems.append(f"replicas disagree after a revoked write: {states}")
    if any(v != [b"before"] for v in states.values()):
        problems.append(f"a revoked write changed a replica: {states}")
    time.sleep(0.01)  # a token issued after the revocation's stamp (same clock here)
    new = issue(cluster, subject, {f"{subject}:": "rw"})
    with cluster.client(token=new, timeout=WAIT) as c:
        c.set(key, "later")
    for i in range(1, cluster.nodes + 1):
        with node_client(cluster, i, new) as c:
            if c.get(key) != b"later":
                problems.append(f"node {i} did not serve a token issued after the revocation")
    return problems


def test_a_revoked_token_is_refused_on_every_replica_at_once(cluster):
    assert revocation_problems(cluster, "bob") == []
    with cluster.client(token=cluster.admin_token(), timeout=WAIT) as admin:
        status = admin.admin("auth-status")
        assert "bob" in status["revoked"] and status["required"] is True
        assert admin.admin("unrevoke", "bob")["unrevoked"] == "bob"
        assert "bob" not in admin.admin("auth-status")["revoked"]


FLOOD_CONNECTIONS = 2  # one source: the flood's connections all come from 127.0.0.1


def junk_flood(kid: str, n: int) -> list[str]:
    """n distinct forged tokens naming key `kid`, well formed down to a random signature."""
    header = b64(json.dumps({"alg": "EdDSA", "typ": "JWT", "kid": kid}).encode())
    return [f"{header}.{b64(json.dumps({'sub': 'x', 'iat': 1, 'jti': str(i)}).encode())}."
            f"{b64(os.urandom(64))}" for i in range(n)]


def p99(samples: list[float]) -> float:
    return sorted(samples)[int(len(samples) * 0.99)] * 1000


def test_a_junk_token_flood_costs_bounded_verifications_and_spares_valid_callers(cluster):
    """5,000 distinct forged tokens naming the real key id, from one source, while a valid
    caller reads: the valid token stays cached (never verified again), every forgery is
    refused, the source causes at most its rate of verifications, and the term holds."""
    import threading

    leader = cluster.wait_for_leader()
    address = cluster.address(leader)
    kid = next(iter(tokens.load_public_keys([cluster.auth_files()["signing.pub"]])))
    valid = issue(cluster, "flood-reader", {"flood:": "rw"})
    with cluster.client(token=cluster.admin_token(), timeout=WAIT) as admin:
        admin.set("flood:k", "v")
        term = admin.status(address).term

    def counters() -> dict:
        with node_client(cluster, leader, cluster.admin_token()) as c:
            return c.admin("auth-status")["tokens"]

    def reads(stop: threading.Event, out: list, errors_seen: list, count: int = 0):
        with node_client(cluster, leader, valid) as c:
            while not stop.is_set() and (count == 0 or len(out) < count):
                started = time.monotonic()
                try:
                    assert c.get("flood:k") == b"v"
                except Exception as exc:  # a refusal here is the failure this test looks for
                    errors_seen.append(repr(exc))
                out.append(time.monotonic() - started)

    quiet, problems = [], []
    reads(threading.Event(), quiet, problems, count=300)  # also puts `valid` in the cache
    before = counters()
    outcomes, stop, during = [], threading.Event(), []
    reader = threading.Thread(target=reads, args=(stop, during, problems))
    forged = junk_flood(kid, 5000)

    def flood(part: list[str]):
        with node_client(cluster, leader, None, timeout=2.0) as c:
            for token in part:
                c.token = token
                outcomes.append(refused(lambda: c.get("flood:k")))

    floods = [threading.Thread(target=flood, args=(forged[i::FLOOD_CONNECTIONS],)) for i in range(FLOOD_CONNECTIONS)]
    started = time.monotonic()
    reader.start()
    for t in floods:
        t.start()
    for t in floods:
        t.join(120)
    elapsed = time.monotonic() - started
    stop.set()
    reader.join(10)
    with cluster.client(timeout=WAIT) as c:
        assert c.status(address).term == term  # the counters below are this leader's
    after = counters()
    with node_client(cluster, leader, valid) as c:
        assert c.get("flood:k") == b"v"
    assert counters()["verified"] == after["verified"]  # both tokens still cached
    assert problems == [] and len(during) > 0
    assert len(outcomes) == 5000 and all(outcomes)
    verified = after["verified"] - before["verified"]
    assert verified <= rbac.VERIFY_BURST + rbac.VERIFY_RATE * (elapsed + 1)
    assert after["limited"] - before["limited"] >= 5000 - verified
    print(f"\njunk flood: 5000 forged tokens in {elapsed:.1f} s; {verified} verified, "
          f"{after['limited'] - before['limited']} refused unverified; valid reader p99 "
          f"{p99(quiet):.2f} ms quiet ({len(quiet)} gets), {p99(during):.2f} ms during the "
          f"flood ({len(during)} gets)")


def test_roles_resolve_against_the_replicated_settings(cluster):
    token = issue(cluster, "carol", {}, roles=["reader"])
    with cluster.client(token=cluster.admin_token(), timeout=WAIT) as admin:
        admin.set("shared:1", "v")
        assert admin.admin("role-set", "reader", "shared:=r")["grants"] == {"shared:": "r"}
        with pytest.raises(errors.InvalidRequest):
            admin.admin("role-set", "reader", "shared:=sudo")
        with pytest.raises(errors.InvalidRequest):
            admin.admin("no-such-action")
    for i in range(1, 4):
        with node_client(cluster, i, token) as c:
            assert c.get("shared:1") == b"v"
            assert refused(lambda: c.set("shared:1", "w"))
    with cluster.client(token=cluster.admin_token(), timeout=WAIT) as admin:
        assert admin.admin("auth-status")["roles"]["reader"] == {"shared:": "r"}
        admin.admin("role-delete", "reader")
    for i in range(1, 4):
        with node_client(cluster, i, token) as c:
            assert refused(lambda: c.get("shared:1"))


def test_one_caller_can_neither_consume_nor_fail_another_callers_sequence(cluster):
    alice = issue(cluster, "s-alice", {"s:": "rw"})
    mallory = issue(cluster, "s-mallory", {"s:": "rw"})
    session = "shared-client-id"

    def write(token, seq, request):
        header = api.RequestHeader(token=token, client_id=session, seq=seq)
        with cluster.client(token=token, timeout=WAIT) as c:
            return c._call_until_deadline(api.Request(header=header, **request))

    first = write(alice, 1, {"op": "put", "key": b"s:a", "value": b"1"}).number
    # Mallory under alice's client id: the same seq on another write is her own new write...
    assert write(mallory, 1, {"op": "incr", "key": b"s:m", "delta": 1}).number == 1
    # ...and a huge seq does not push alice's older numbers out of reach.
    assert write(mallory, 10**9, {"op": "put", "key": b"s:m2", "value": b"x"}).number > 0
    for seq in range(2, 12):
        write(mallory, 10**9 + seq, {"op": "put", "key": b"s:m2", "value": b"x"})
    # Alice's retry of seq 1 gets her first result; her seq 2 is a new write.
    assert write(alice, 1, {"op": "put", "key": b"s:a", "value": b"1"}).number == first
    assert write(alice, 2, {"op": "put", "key": b"s:a", "value": b"2"}).number > first
    with cluster.client(token=alice, timeout=WAIT) as c:
        c._sessions.append(_Session(session, 2))
        assert c.set("s:a", "3") > first and c.get("s:a") == b"3"
    assert set(map(tuple, replicas_agree(cluster, ["s:a", "s:m"]).values())) == {(b"3", b"1")}


def test_the_client_reuses_a_session_only_while_the_cluster_keeps_it(cluster):
    token = issue(cluster, "s-reuse", {"reuse:": "rw"})
    with cluster.client(token=token, timeout=WAIT) as c:
        c.set("reuse:s", "x")
        assert c.incr("reuse:n") == 1
        (first,) = c._sessions
        assert first.seq == 2
        with pytest.raises(errors.InvalidRequest):  # applied as a refusal: the session holds it
            c.incr("reuse:s")
        assert c._sessions == [first] and first.seq == 3
        assert refused(lambda: c.incr("other:n"))  # vetoed: no trace in the cluster's table
        assert c._sessions == []
        assert c.incr("reuse:n") == 2
        (second,) = c._sessions
        assert second.id != first.id and second.seq == 1
        second.used -= SESSION_REUSE_S  # idle long enough that the caps might have evicted it
        assert c.incr("reuse:n") == 3
        (third,) = c._sessions
        assert third.id not in (first.id, second.id) and third.seq == 1


def test_a_caller_cycling_client_ids_is_capped_and_others_write_on(cluster):
    flood = issue(cluster, "s-flood", {"flood:": "rw"})
    bystander = issue(cluster, "s-bystander", {"by:": "rw"})
    with cluster.client(token=bystander, timeout=WAIT) as c:
        assert c.incr("by:n") == 1
        kept = c._sessions[0]  # its session, opened before the flood

    def leader_answer(token, client_id, seq, key):
        """The leader's own answer to one incr (no retries elsewhere)."""
        leader = cluster.address(cluster.wait_for_leader())
        request = api.Request(op="incr", key=key, delta=1, header=api.RequestHeader(
            token=token, client_id=client_id, seq=seq, timeout_ms=int(WAIT * 1000)))
        with cluster.client(token=token, timeout=WAIT) as c:
            return c._call_once(leader, request, WAIT)

    cap = MAX_SESSIONS_PER_IDENTITY
    started = time.monotonic()
    with cluster.client(token=flood, timeout=WAIT) as c:
        for i in range(cap):
            header = api.RequestHeader(token=flood, client_id=f"flood-{i}", seq=1)
            c._call_until_deadline(api.Request(op="incr", key=b"flood:n", delta=1,
                                               header=header))
            assert time.monotonic() - started < 300, f"only {i} writes in five minutes"
    took = time.monotonic() - started
    new = leader_answer(flood, "flood-new", 1, b"flood:n")
    if new.error is not None:
        # All within a minute: the next new client id is refused and applies nothing, and
        # the oldest session is still there to answer its retry.
        assert new.error == "Unavailable" and "client sessions" in new.reason, new
        assert leader_answer(flood, "flood-0", 1, b"flood:n").number == 1
        flooded = cap
    else:  # a machine so loaded that the flood outlasted a minute: the oldest made room
        assert took > SESSION_EVICTABLE_MS / 1000 - 5 and new.number == cap + 1, (took, new)
        retry = leader_answer(flood, "flood-0", 1, b"flood:n")
        assert retry.error == "OutcomeUnknown" and "evicted" in retry.reason, retry
        flooded = cap + 1
    # Another caller neither lost its session nor is refused a new one.
    assert leader_answer(bystander, kept.id, kept.seq, b"by:n").number == 1  # its retry
    assert leader_answer(bystander, "by-new", 1, b"by:n").number == 2
    assert set(map(tuple, replicas_agree(cluster, ["flood:n", "by:n"]).values())) == \
        {(str(flooded).encode(), b"2")}


# ---- expiry judged by stamps, on a replica whose clock is an hour behind ------------------------
def expiry_problems(cluster) -> list[str]:
    """A token that expired by the leader's (correct) clock must be refused by node 3, whose
    clock is an hour behind: its verdict comes from the stamps it applied."""
    problems = []
    # Node 3 may lead at first, and judges tokens by its stamps: an hour behind, a token
    # issued now is not valid yet there (and issued in the future). This one is issued two
    # hours ago.
    admin_token = issue(cluster, "root", {"": "admin"}, now=time.time() - 7200)
    with cluster.client(token=admin_token, timeout=WAIT) as admin:
        admin.transfer_leader(1)
        admin.set("admin:tick", "0")
    # Valid from two hours ago (node 3's clock is no obstacle) for 1.5 s from now.
    token = issue(cluster, "dave", {"d:": "rw"}, ttl=7201.5, now=time.time() - 7200)
    with cluster.client(token=token, timeout=WAIT) as c:
        c.set("d:k", "v")
    with node_client(cluster, 3, token) as c:
        try:
            if c.get("d:k") != b"v":
                problems.append("node 3 served a wrong value")
        except errors.Unauthorized as exc:
            problems.append(f"node 3 refused the token before it expired: {exc}")
    time.sleep(2.0)
    with cluster.client(token=admin_token, timeout=WAIT) as admin:
        admin.set("admin:tick", "1")  # the leader's stamp passes the expiry
    with node_client(cluster, 3, token) as c:
        if not refused(lambda: c.get("d:k")):
            problems.append("node 3 (clock 1 h behind) served a linearizable read with an "
                            "expired token")
    with cluster.client(token=token, timeout=WAIT) as c:
        if not refused(lambda: c.set("d:k", "late")):
            problems.append("a write with an expired token applied")
    states = replicas_agree(cluster, ["d:k"], admin_token)
    if any(v != [b"v"] for v in states.values()):
        problems.append(f"replicas: {states}")
    return problems


def skewed_cluster(mutant: str | None = None) -> dict:
    """The shape of an auth cluster whose node 3 runs an hour behind (and `mutant`)."""
    node3 = ["--clock-offset-ms", str(-HOUR_MS)] + (["--mutant", mutant] if mutant else [])
    return {"auth": True, "launcher": ["-m", "raftcache.testing.node"], "node_args": {3: node3}}


def test_an_expired_token_is_refused_by_a_replica_whose_clock_is_behind(running):
    cluster = running(**skewed_cluster())
    assert expiry_problems(cluster) == []


# ---- teeth: the same scenarios catch a broken rbac on one node ----------------------------------
def test_teeth_a_replica_that_judges_expiry_by_its_own_clock_is_caught(running):
    cluster = running(**skewed_cluster(mutant="rbac-local-clock"))
    problems = expiry_problems(cluster)
    print("caught:", problems)
    assert any(p.startswith("node 3 (clock 1 h behind) served") for p in problems), problems
    assert not any("write" in p for p in problems), problems  # the leader judged those right


def test_teeth_a_replica_that_ignores_revocations_is_caught(running):
    cluster = running(auth=True, launcher=["-m", "raftcache.testing.node"],
                      node_args={3: ["--mutant", "rbac-ignores-revocation"]})
    with cluster.client(token=cluster.admin_token(), timeout=WAIT) as admin:
        admin.transfer_leader(1)  # node 3 a follower: the leader's answers stay right
    problems = revocation_problems(cluster, "eve")
    print("caught:", problems)
    assert any(p.startswith("node 3 served") for p in problems), problems
    assert any("disagree" in p for p in problems), problems  # it applied the vetoed write
    assert not any(p.startswith(("node 1", "node 2")) for p in problems), problems


# ================================================================================================
# The CLI and `raftcache up --auth`
# ================================================================================================
def raftcache(*args, env=None, timeout=30):
    return subprocess.run([sys.executable, "-m", "raftcache", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_token_issue_and_inspect_offline(tmp_path):
    paths = tokens.init_auth_dir(str(tmp_path / "auth"))
    out = raftcache("token", "issue", "--data-dir", str(tmp_path), "--subject", "alice",
                    "--grant", "user:=rw", "--grant", "=r", "--role", "ops", "--ttl", "60")
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    caller = tokens.verify(token, tokens.load_public_keys([paths["signing.pub"]]))
    assert caller.grants == ((b"", "r"), (b"user:", "rw")) and caller.roles == ("ops",)
    assert 59_000 <= caller.expires_ms - caller.issued_ms <= 60_001
    shown = raftcache("token", "inspect", token, "--data-dir", str(tmp_path))
    doc = json.loads(shown.stdout)
    assert shown.returncode == 0 and doc["verified"] is True
    assert doc["claims"]["sub"] == "alice" and doc["header"]["alg"] == "EdDSA"
    unchecked = json.loads(raftcache("token", "inspect", token).stdout)
    assert unchecked["verified"] is False and "not checked" in unchecked["note"]
    other = tmp_path / "other"
    tokens.init_auth_dir(str(other / "auth"))
    wrong = raftcache("token", "inspect", token, "--public-key", str(other / "auth/signing.pub"))
    assert wrong.returncode == 1 and json.loads(wrong.stdout)["verified"] is False
    garbage = raftcache("token", "inspect", "garbage")
    assert garbage.returncode == 2 and garbage.stderr.startswith("raftcache: InvalidRequest")
    bad = raftcache("token", "issue", "--data-dir", str(tmp_path), "--subject", "a",
                    "--grant", "user:=root")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    none = raftcache("token", "issue", "--data-dir", str(tmp_path), "--subject", "a")
    assert none.returncode == 2 and "--grant" in none.stderr


def exported(out: str) -> dict:
    """The NAME=VALUE pairs of the `export RAFTCACHE_...` lines `up` printed (not $(...))."""
    pairs = {}
    for line in out.splitlines():
        if "export RAFTCACHE_" in line:
            for word in line.split("export ", 1)[1].split():
                name, _, value = word.partition("=")
                if not value.startswith("$("):
                    pairs[name] = value
    return pairs


def test_up_auth_writes_an_admin_token_that_works(tmp_path):
    """`up --auth` runs TLS (tokens never cross a readable wire) and prints what clients
    need; the admin token expires in 7 days; tokens are revoked by subject or by jti."""
    up, port, out = start_up(tmp_path, "--storage", "memory", "--auth")
    data = tmp_path / "data"
    try:
        assert "leader: node" in out, out
        assert "tcp-tls transport" in out and "WARNING" not in out, out
        token_path = data / "auth" / "admin.token"
        assert f"export RAFTCACHE_TOKEN=$(cat {token_path})" in out, out
        expiry = tokens.expiry_text(tokens.expires_at(str(token_path)))
        assert f"(expires at {expiry}, renewed" in out, out
        assert 6.9 * 86400 < tokens.expires_at(str(token_path)) - time.time() <= 7 * 86400
        assert stat.S_IMODE(os.stat(token_path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(data / "auth" / "signing.key").st_mode) == 0o600
        assert stat.S_IMODE(os.stat(data / "auth").st_mode) == 0o700
        endpoints = ",".join(f"127.0.0.1:{port + i}" for i in range(3))
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAFTCACHE_")}
        plain = dict(env, RAFTCACHE_ENDPOINTS=endpoints,
                     RAFTCACHE_TOKEN=token_path.read_text().strip())
        assert raftcache("get", "admin:k", "--timeout", "2", env=plain).returncode == 2
        anon = dict(env, RAFTCACHE_ENDPOINTS=endpoints, **exported(out))
        assert anon["RAFTCACHE_TRANSPORT"] == "tcp-tls" and os.path.exists(anon["RAFTCACHE_CA"])
        admin = dict(anon, RAFTCACHE_TOKEN=token_path.read_text().strip())
        # Anonymous: one line, exit 3; status stays open.
        refused_set = raftcache("set", "k", "v", env=anon)
        assert refused_set.returncode == 3, refused_set
        assert refused_set.stderr.startswith("raftcache: Unauthorized: ")
        assert len(refused_set.stderr.strip().splitlines()) == 1
        assert raftcache("member", "remove", "2", env=anon).returncode == 3
        assert raftcache("status", env=anon).returncode == 0
        # The admin token works for everything.
        assert raftcache("set", "admin:k", "v", env=admin).returncode == 0
        assert raftcache("get", "admin:k", env=admin).stdout == "v\n"
        issued = raftcache("token", "issue", "--data-dir", str(data), "--subject", "alice",
                           "--grant", "user:=rw")
        alice = dict(anon, RAFTCACHE_TOKEN=issued.stdout.strip())
        claims = tokens.unverified(issued.stdout.strip())[1]
        assert claims["exp"] - claims["iat"] == tokens.USER_TTL  # a day, by default
        assert issued.stderr == (f"token for 'alice' (jti {claims['jti']}) expires at "
                                 f"{tokens.expiry_text(claims['exp'])}\n")
        assert raftcache("set", "user:1", "a", env=alice).returncode == 0
        assert raftcache("get", "admin:k", env=alice).returncode == 3
        assert raftcache("get", "admin:k", "--token", issued.stdout.strip(),
                         env=anon).returncode == 3
        assert raftcache("get", "user:1", "--token", issued.stdout.strip(),
                         env=anon).stdout == "a\n"
        assert raftcache("token", "revoke", "alice", env=alice).returncode == 3
        revoked = raftcache("token", "revoke", "alice", env=admin)
        assert revoked.returncode == 0 and json.loads(revoked.stdout)["revoked"] == "alice"
        gone = raftcache("get", "user:1", env=alice)
        assert gone.returncode == 3 and "revoked" in gone.stderr
        role = raftcache("role", "set", "ops", "--grant", "ops:=rw", "--grant", "=r", env=admin)
        assert json.loads(role.stdout)["grants"] == {"ops:": "rw", "": "r"}, role
        status = json.loads(raftcache("auth", "status", env=admin).stdout)
        assert "alice" in status["revoked"] and status["roles"]["ops"] == {"": "r", "ops:": "rw"}
        assert raftcache("role", "delete", "ops", env=admin).returncode == 0
        assert raftcache("token", "unrevoke", "alice", env=admin).returncode == 0
        assert raftcache("get", "user:1", env=alice).stdout == "a\n"
        # One token by its jti (given the token itself): the subject's others still work.
        second = raftcache("token", "issue", "--data-dir", str(data), "--subject",
                           "alice smith", "--grant", "user:=rw").stdout.strip()
        third = raftcache("token", "issue", "--data-dir", str(data), "--subject",
                          "alice smith", "--grant", "user:=rw").stdout.strip()
        by_jti = raftcache("token", "revoke", "--jti", second, env=admin)
        assert by_jti.returncode == 0, by_jti
        assert json.loads(by_jti.stdout)["revoked_jti"] == tokens.unverified(second)[1]["jti"]
        assert "was revoked" in raftcache("get", "user:1", "--token", second, env=anon).stderr
        assert raftcache("get", "user:1", "--token", third, env=anon).stdout == "a\n"
        status = json.loads(raftcache("auth", "status", env=admin).stdout)
        held = status["revoked_jti"][tokens.unverified(second)[1]["jti"]]
        assert held == round(tokens.unverified(second)[1]["exp"] * 1000)
        # Subjects with a space: issued, revoked and verified by one grammar.
        spaced = raftcache("token", "revoke", "alice smith", env=admin)
        assert spaced.returncode == 0, spaced
        assert raftcache("get", "user:1", "--token", third, env=anon).returncode == 3
        assert raftcache("token", "revoke", env=admin).returncode == 2  # nothing named
    finally:
        up.terminate()
        up.wait(20)


def test_up_auth_over_plaintext_thrift_warns(tmp_path):
    up, _port, out = start_up(tmp_path, "--storage", "memory", "--auth", "--transport",
                              "thrift")
    try:
        assert "leader: node" in out, out
        assert "WARNING: --auth over plaintext thrift" in out and "RAFTCACHE_CA" not in out
    finally:
        up.terminate()
        up.wait(20)


# ================================================================================================
# TLS client certificates as principals
# ================================================================================================
def test_a_client_certificate_maps_to_a_principal_through_a_role(running):
    """tcp-tls with `[auth] certificates = {CN = role}`: a call without a token over the
    `client` certificate runs as "cert:client" with the role's grants (held by the cluster,
    through the log), on every node and through a forwarding follower; revoking
    "cert:client" refuses it everywhere; a certificate the map does not name is refused."""
    from raftcache import certs
    from raftcache.pluginapi import TLSConfig

    cluster = running(transport="tcp-tls", auth=True,
                      extra={"auth": {"certificates": {"client": "apps"}}, "node": {"proxy": True}})
    tls = TLSConfig(**cluster.tls_files())
    d = os.path.dirname(tls.ca)
    certs.make_cert(os.path.join(d, "ca.pem"), os.path.join(d, "ca-key.pem"), d, "stranger",
                    server=False)
    stranger = TLSConfig(tls.ca, os.path.join(d, "stranger.pem"),
                         os.path.join(d, "stranger-key.pem"))

    def client(endpoints=None, tls=tls, token=None):
        return Client(endpoints or cluster.endpoints(), tls=tls, token=token, timeout=WAIT,
                      transport="tcp-tls")

    with client(token=cluster.admin_token()) as admin:
        admin.admin("role-set", "apps", "app:=rw")
        leader = admin.status().leader
    follower = next(a for i, a in enumerate(cluster.endpoints(), 1) if i != leader)
    with client() as c:
        assert c.set("app:1", "one")
        with pytest.raises(errors.Unauthorized, match="cert:client"):
            c.set("other:1", "x")
        with pytest.raises(errors.Unauthorized):
            c.remove_member(3)
    with client([follower]) as c:  # the follower forwards, naming the certificate
        assert c.set("app:2", "two") and c.get("app:2") == b"two"
    with client(tls=stranger) as c, pytest.raises(errors.Unauthorized, match="requires a token"):
        c.get("app:1")
    with client(token=cluster.admin_token()) as admin:
        admin.admin("revoke", "cert:client")
    for endpoint in cluster.endpoints():
        with client([endpoint]) as c, pytest.raises(errors.Unauthorized, match="revoked"):
            c.get("app:1")
