"""`rbac`: who may do what, from signed tokens (docs/security.md).

- ``raftcache_authenticate`` verifies a request's token against ``[auth] public_keys`` (the
  node keeps accepted and refused tokens in two bounded LRUs, so a request costs a dict
  lookup, not an Ed25519 verify, and bounds the verifications each source may cause) and
  returns the `Caller` the node records in the entries it proposes.
- ``raftcache_check_command`` (every replica, at apply) and ``raftcache_check_request`` (reads
  once their read index applied; node operations) decide with one function, `decide`, from
  the caller, the entry's stamp and the replicated settings only: never from a clock.
- ``raftcache_admin`` turns ``revoke``, ``unrevoke``, ``revoke-jti``, ``unrevoke-jti``,
  ``role-set`` and ``role-delete`` into
  `Configure` commands (committed through the log like any write) and answers
  ``auth-status``.

Replicated state (settings): ``auth.revoked.<subject>`` (value b""; tokens of that subject
issued at or before the setting's stamp are refused), ``auth.revoked-jti.<jti>`` (value: the
token's expiry in ms as ASCII digits, "0" unknown; that one token is refused; dropped by a
later revoke-jti once the cluster's time passed the expiry) and ``auth.role.<name>`` (JSON
object prefix -> perms).
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence

from raftcache.core.cache.commands import PERMS, Caller, Configure, Writes
from raftcache.pluginapi import Unauthorized, hookimpl

from . import tokens

REVOKED = "auth.revoked."
REVOKED_JTI = "auth.revoked-jti."
MAX_REVOKED_JTIS = 10_000  # revoked token ids held at once (expired ones are dropped)
ISSUED_SKEW_MS = 60_000  # a token issued further ahead of the cluster's time is refused
ROLE = "auth.role."
CERTIFICATE = "cert:"  # the subject of a caller known by its TLS client certificate
CACHE_SIZE = 4096  # accepted tokens kept per node
REFUSED_CACHE_SIZE = 4096  # refused tokens' reasons, kept apart from the accepted ones
VERIFY_RATE = 100.0  # token verifications a second one source may cause (past its burst)
VERIFY_BURST = 200
MAX_SOURCES = 1024  # sources whose buckets a node keeps
CLUSTER_OPS = frozenset({"transfer_leader", "change_member", "admin", "snapshot"})
_READS = frozenset({"r", "rw", "admin"})
_WRITES = frozenset({"w", "rw", "admin"})


# ================================================================================================
# The decision: one place, pure
# ================================================================================================
# What each kind of write a command declares (`commands.Writes`) needs of its caller. A kind
# missing here, or a command that declares none, is refused to every caller, admins included,
# with a reason that says so: a new kind of write gets a rule here on purpose; it must never
# fall silently to "admins only" (nor to "anyone").
_NEEDS_OF = {
    Writes.KEYS: lambda cmd: [("w", key) for key in cmd.written()],
    Writes.PREFIXES: lambda cmd: [("invalidate", prefix) for prefix in cmd.written()],
    Writes.SETTINGS: lambda _cmd: [("cluster", b"")],  # revocations, roles, data keys
    Writes.SEALING: lambda _cmd: [("cluster", b"")],  # any key's stored form (key rotation)
    # The state machine never asks about the leader's sweep: it drops only what every
    # reader already sees as gone.
    Writes.EXPIRED: lambda _cmd: [],
}


class UndeclaredWrite(Exception):
    """A command whose class does not say what it writes in a way rbac knows: refused."""


def command_needs(command) -> list[tuple[str, bytes]]:
    """What a write command needs, from what its class declares it writes (`writes` and
    `written()`) and what its result reveals (`reveals`): (need, key) pairs, need one of "w",
    "invalidate" (w on a grant whose prefix starts the invalidated prefix), "r" (r on a grant
    that covers the key, or starts the prefix) and "cluster" (admin on ""). Raises
    UndeclaredWrite for a command that declares nothing rbac knows."""
    cls = type(command)
    needs_of = _NEEDS_OF.get(getattr(cls, "writes", None))
    if needs_of is None:
        raise UndeclaredWrite(
            f"{cls.__name__} does not declare what it writes (commands.Writes), or "
            "declares a kind rbac has no rule for: refused to every caller")
    reveals = getattr(cls, "reveals", None)
    if not isinstance(reveals, str):
        raise UndeclaredWrite(f"{cls.__name__} does not declare what its result reveals "
                              "(commands.command): refused to every caller")
    needs = needs_of(command)
    if reveals:  # the result tells what was stored there: a w grant must not be a read
        needs += [("r", key) for need, key in needs if need in ("w", "invalidate")]
    return needs


def request_needs(op: str, keys: Sequence[bytes]) -> list[tuple[str, bytes]]:
    """What a read or a node operation needs (see `command_needs`)."""
    if op in ("get", "mget"):
        return [("r", key) for key in keys]
    return [("cluster", b"")]  # transfer_leader, change_member, admin, anything unknown


@functools.lru_cache(maxsize=1024)
def role_grants(value: bytes) -> tuple[tuple[bytes, str], ...]:
    """A role's grants from its setting's value; nothing when it is malformed (only a direct
    Configure can write one: `role-set` checks them), the same on every replica."""
    try:
        grants = json.loads(value)
        return tuple(sorted((prefix.encode("utf-8"), perms) for prefix, perms in grants.items()
                            if isinstance(prefix, str) and perms in PERMS))
    except (ValueError, AttributeError, UnicodeEncodeError):
        return ()


def effective_grants(caller: Caller, settings: Mapping) -> tuple[tuple[bytes, str], ...]:
    """The token's grants and those of its roles as they stand in `settings`."""
    grants = caller.grants
    for role in caller.roles:
        setting = settings.get(ROLE + role)
        if setting is not None:
            grants = grants + role_grants(setting.value)
    return grants


def validity(caller: Caller, stamp_ms: int, settings: Mapping | None) -> str | None:
    """Why the caller's token is not good at `stamp_ms` (issued in the future, not yet valid,
    expired, revoked), or None."""
    if caller.issued_ms > stamp_ms + ISSUED_SKEW_MS:
        # An issuer whose clock runs ahead would mint tokens that outlive a revocation of
        # their subject (judged by `iat`): the cluster's time says when "now" is.
        return (f"the token of {caller.subject!r} was issued in the future (its iat is more "
                f"than {ISSUED_SKEW_MS // 1000} s ahead of the cluster's time)")
    if stamp_ms < caller.not_before_ms:
        return f"the token of {caller.subject!r} is not valid yet"
    if caller.expires_ms and stamp_ms >= caller.expires_ms:
        return f"the token of {caller.subject!r} expired"
    if settings is not None:
        revoked = settings.get(REVOKED + caller.subject)
        if revoked is not None and caller.issued_ms <= revoked.stamp_ms:
            return f"the tokens of {caller.subject!r} were revoked"
        if caller.jti and settings.get(REVOKED_JTI + caller.jti) is not None:
            return f"the token {caller.jti!r} of {caller.subject!r} was revoked"
    return None


def _short(key: bytes) -> str:
    return repr(key[:64]) + ("..." if len(key) > 64 else "")


def decide(caller: Caller | None, stamp_ms: int, settings: Mapping,
           needs: Sequence[tuple[str, bytes]]) -> str | None:
    """The verdict on `caller` doing what `needs` says at `stamp_ms`: the reason it is
    refused, or None. A pure function of its arguments (it runs in the apply pipeline)."""
    if caller is None:
        return None
    reason = validity(caller, stamp_ms, settings)
    if reason:
        return reason
    grants = effective_grants(caller, settings)
    for need, key in needs:
        if need == "r":
            ok = any(p in _READS and key.startswith(g) for g, p in grants)
        elif need in ("w", "invalidate"):
            ok = any(p in _WRITES and key.startswith(g) for g, p in grants)
        else:  # "cluster"
            ok = any(p == "admin" and g == b"" for g, p in grants)
        if not ok:
            what = {"r": "read", "w": "write", "invalidate": "invalidate the prefix"}.get(need)
            if what is None:
                return f"{caller.subject!r} may not run cluster operations (needs admin on \"\")"
            return f"{caller.subject!r} may not {what} {_short(key)}"
    return None


# ================================================================================================
# The node's side: tokens in, verified callers out
# ================================================================================================
class _Verifier:
    """One node's public keys and the tokens it verified: the token's SHA-256 -> Caller for
    accepted tokens, and apart from them -> the reason for refused ones, each an LRU of its
    own, so that no number of junk tokens can evict an accepted one (a cached token costs a
    hash and a lookup, no verification). A token in neither costs one verification, which
    each source may cause at most `VERIFY_RATE` times a second (a token bucket of
    `VERIFY_BURST`): past that, the call is refused unverified."""

    def __init__(self, paths: Sequence[str], clock=time.monotonic):
        self.keys = tokens.load_public_keys(paths)
        self.accepted: OrderedDict[bytes, Caller] = OrderedDict()
        self.refused: OrderedDict[bytes, str] = OrderedDict()
        self.buckets = _Buckets(clock)
        self.verified = 0  # signatures checked (cache misses let through)
        self.limited = 0  # calls refused unverified: their source was over its rate

    def verify(self, token: str, source: str | None = None) -> Caller:
        if not isinstance(token, str) or len(token) > tokens.MAX_TOKEN_BYTES:
            raise Unauthorized(f"a token is a string of at most {tokens.MAX_TOKEN_BYTES} bytes")
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        found = self.accepted.get(digest)
        if found is not None:
            self.accepted.move_to_end(digest)
            return found
        reason = self.refused.get(digest)
        if reason is None:
            if not self.buckets.take(source):
                self.limited += 1
                raise Unauthorized(
                    f"too many new tokens to verify from {source or 'this source'} (at most "
                    f"{VERIFY_RATE:g} a second); not verified, retry later")
            self.verified += 1
            try:
                caller = tokens.verify(token, self.keys)
            except tokens.TokenError as exc:
                reason = str(exc)
            else:
                _remember(self.accepted, digest, caller, CACHE_SIZE)
                return caller
            _remember(self.refused, digest, reason, REFUSED_CACHE_SIZE)
        else:
            self.refused.move_to_end(digest)
        raise Unauthorized(reason)


def _remember(cache: OrderedDict, digest: bytes, found, size: int) -> None:
    cache[digest] = found
    if len(cache) > size:
        cache.popitem(last=False)


class _Buckets:
    """Token buckets per source (`VERIFY_RATE` a second, `VERIFY_BURST` at most), in a table
    of `MAX_SOURCES`. A source is dropped only once its bucket is full again (forgetting it
    changes nothing); when the table is full of busy sources, new ones share one bucket."""

    _SHARED = object()

    def __init__(self, clock):
        self.clock = clock
        self.table: OrderedDict = OrderedDict()  # source -> [tokens, when], least recent first

    def take(self, source) -> bool:
        now = self.clock()
        bucket = self.table.get(source)
        if bucket is None:
            if len(self.table) >= MAX_SOURCES:
                oldest, (left, when) = next(iter(self.table.items()))
                if oldest is not self._SHARED and _refill(left, when, now) >= VERIFY_BURST:
                    del self.table[oldest]
                else:
                    source = self._SHARED
            bucket = self.table.setdefault(source, [float(VERIFY_BURST), now])
        self.table.move_to_end(source)
        bucket[0], bucket[1] = _refill(bucket[0], bucket[1], now), now
        if bucket[0] < 1:
            return False
        bucket[0] -= 1
        return True


def _refill(left: float, when: float, now: float) -> float:
    return min(float(VERIFY_BURST), left + max(0.0, now - when) * VERIFY_RATE)


_verifiers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _verifier(node) -> _Verifier:
    verifier = _verifiers.get(node)
    if verifier is None:
        try:
            verifier = _verifiers[node] = _Verifier(node.config.auth.public_keys)
        except tokens.TokenError as exc:  # fail closed, and say why
            node.log.error("auth.public_keys: %s", exc)
            raise Unauthorized(f"this node cannot load its auth.public_keys: {exc}") from None
    return verifier


@hookimpl
def raftcache_node_started(node) -> None:
    if node.config.auth.public_keys:  # load now: a bad key file shows in the log at start
        try:
            _verifier(node)
        except Unauthorized:
            return
        node.log.info("client authentication %s; token keys: %s",
                      "required" if node.config.auth.required else "optional",
                      ", ".join(sorted(_verifier(node).keys)))


@hookimpl
def raftcache_authenticate(node, token, certificate, source):
    auth = node.config.auth
    if not token and certificate is not None and certificate in auth.certificates:
        # A certificate the CA signed stands for its principal; its grants are its role's.
        return Caller(f"{CERTIFICATE}{certificate}", "certificate",
                      roles=(auth.certificates[certificate],))
    if not auth.public_keys:
        return None  # authentication is off: tokens are ignored
    if not token:
        if auth.required:
            raise Unauthorized("this cluster requires a token (--token or $RAFTCACHE_TOKEN)")
        return None
    caller = _verifier(node).verify(token, source)
    # A cheap early refusal by this node's time; the verdict on writes is taken at apply.
    reason = validity(caller, node.now_ms(), None)
    if reason:
        raise Unauthorized(reason)
    return caller


@hookimpl
def raftcache_check_request(node, op, keys, caller, stamp_ms, settings):
    if caller is None:
        return "this cluster requires a token" if node.config.auth.required else None
    return decide(caller, stamp_ms, settings, request_needs(op, keys))


@hookimpl
def raftcache_check_command(command, stamp_ms, caller, settings):
    try:
        needs = command_needs(command)
    except UndeclaredWrite as exc:  # before the anonymous pass: nobody may run it
        return str(exc)
    if caller is None:  # only nodes without authentication propose anonymous entries
        return None
    return decide(caller, stamp_ms, settings, needs)


# ================================================================================================
# Admin actions
# ================================================================================================
def _name(args: Sequence[bytes], what: str, limit: int) -> str:
    if not args:
        raise ValueError(f"needs a {what}")
    name = bytes(args[0]).decode("utf-8")
    if not 0 < len(name) <= limit or any(c.isspace() or not c.isprintable() for c in name):
        raise ValueError(f"a {what} is 1 to {limit} printable characters without spaces, "
                         f"got {name!r}")
    return name


def _only(args: Sequence[bytes], n: int, action: str) -> None:
    if len(args) != n:
        raise ValueError(f"{action} takes {n} argument{'s' if n != 1 else ''}, got {len(args)}")


def _subject(args: Sequence[bytes]) -> str:
    try:
        return tokens.check_subject(bytes(args[0]).decode("utf-8"))
    except (tokens.TokenError, UnicodeDecodeError) as exc:
        raise ValueError(str(exc)) from None


def _jti(args: Sequence[bytes]) -> str:
    jti = bytes(args[0]).decode("utf-8")
    if not 0 < len(jti) <= tokens.MAX_NAME_CHARS or not jti.isprintable():
        raise ValueError(f"a token id (jti) is 1 to {tokens.MAX_NAME_CHARS} printable "
                         f"characters, got {jti!r}")
    return jti


def _revoke_jti(node, args: Sequence[bytes]):
    """revoke-jti JTI [EXPIRES_MS]: refuse that one token. The revoked ids whose token
    expired by the cluster's time go in the same entry: the entry's stamp is no earlier than
    that time, so every later verdict finds them expired anyway."""
    if not 1 <= len(args) <= 2:
        raise ValueError("revoke-jti JTI [EXPIRES_MS] takes 1 or 2 arguments")
    jti = _jti(args)
    expires = bytes(args[1]).decode("ascii", "replace") if len(args) == 2 else "0"
    if not expires.isdigit() or len(expires) > 19:
        raise ValueError(f"EXPIRES_MS is the token's expiry in ms since the epoch, got {expires!r}")
    now = node.now_ms()
    held = {name: s.value for name, s in node.settings.items() if name.startswith(REVOKED_JTI)}
    dropped = [name for name, value in held.items()
               if value.isdigit() and 0 < int(value) <= now][:_MAX_DROPS]
    if len(held) - len(dropped) >= MAX_REVOKED_JTIS and REVOKED_JTI + jti not in held:
        raise ValueError(f"{MAX_REVOKED_JTIS} token ids are revoked and not yet expired; "
                         "revoke their subjects instead (`raftcache token revoke SUBJECT`)")
    items = ((REVOKED_JTI + jti, str(int(expires)).encode()),
             *((name, None) for name in dropped if name != REVOKED_JTI + jti))
    return Configure(items), {"revoked_jti": jti, "dropped_expired": len(dropped)}


_MAX_DROPS = 1024  # expired revoked ids one revoke-jti drops


@hookimpl
def raftcache_admin(node, action, args, caller):
    if action in ("revoke", "unrevoke"):
        _only(args, 1, action)
        subject = _subject(args)
        value = b"" if action == "revoke" else None
        return Configure(((REVOKED + subject, value),)), {action + "d": subject}
    if action == "revoke-jti":
        return _revoke_jti(node, args)
    if action == "unrevoke-jti":
        _only(args, 1, action)
        jti = _jti(args)
        return Configure(((REVOKED_JTI + jti, None),)), {"unrevoked_jti": jti}
    if action == "role-set":
        name = _name(args, "role name", tokens.MAX_NAME_CHARS)
        if not 1 < len(args) <= 1 + tokens.MAX_GRANTS:
            raise ValueError(f"role-set NAME PREFIX=PERMS...: 1 to {tokens.MAX_GRANTS} grants")
        grants = dict(tokens.parse_grant(bytes(a).decode("utf-8")) for a in args[1:])
        value = json.dumps(grants, sort_keys=True).encode()
        return Configure(((ROLE + name, value),)), {"role": name, "grants": grants}
    if action == "role-delete":
        _only(args, 1, action)
        name = _name(args, "role name", tokens.MAX_NAME_CHARS)
        return Configure(((ROLE + name, None),)), {"role": name, "deleted": True}
    if action == "auth-status":
        _only(args, 0, action)
        settings = node.settings
        revoked = {name[len(REVOKED):]: s.stamp_ms for name, s in settings.items()
                   if name.startswith(REVOKED)}
        revoked_jtis = {name[len(REVOKED_JTI):]: int(s.value) if s.value.isdigit() else 0
                        for name, s in settings.items() if name.startswith(REVOKED_JTI)}
        roles = {name[len(ROLE):]: {p.decode(): perms for p, perms in role_grants(s.value)}
                 for name, s in settings.items() if name.startswith(ROLE)}
        auth = node.config.auth
        verifier = _verifier(node) if auth.public_keys else None
        # This node's token caches and counters (not replicated): what a flood cost it.
        cache = {} if verifier is None else {
            "accepted": len(verifier.accepted), "refused": len(verifier.refused),
            "verified": verifier.verified, "limited": verifier.limited}
        return {"required": auth.required, "enabled": bool(auth.public_keys),
                "key_ids": sorted(verifier.keys) if verifier else [],
                "revoked": revoked, "revoked_jti": revoked_jtis, "roles": roles,
                "tokens": cache,
                "caller": caller.subject if caller is not None else None}
    return None
