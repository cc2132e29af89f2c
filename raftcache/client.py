"""The Python client: `from raftcache import Client`.

It follows NotLeader redirects by itself, pools one connection per endpoint and throws away a
connection that saw any error (a Thrift connection reused after a timeout can return the
previous call's reply). Writes carry (client id, sequence) so that a retry after a lost reply
is applied once (Raft dissertation 6.3): a write is retried until its deadline, and only then
reported as OutcomeUnknown. Safe to share between greenlets and threads.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import uuid

import attrs

from raftcache import errors
from raftcache.core import api, operations
from raftcache.core.cache.commands import MAX_TTL_MS
from raftcache.core.cache.statemachine import SESSION_EVICTABLE_MS
from raftcache.pluginapi import TLSConfig

DEFAULT_ENDPOINTS = "127.0.0.1:7400,127.0.0.1:7401,127.0.0.1:7402"
# A session idle this long is not reused: well within the time after which the cluster's
# session caps may evict it (then its next write would be refused as a possible retry).
SESSION_REUSE_S = SESSION_EVICTABLE_MS / 1000 / 2


def _bytes(x) -> bytes:
    return x.encode() if isinstance(x, str) else bytes(x)


def _endpoints(endpoints) -> list[str]:
    if endpoints is None:
        endpoints = os.environ.get("RAFTCACHE_ENDPOINTS") or DEFAULT_ENDPOINTS
    if isinstance(endpoints, str):
        endpoints = [e.strip() for e in endpoints.split(",") if e.strip()]
    if not endpoints:
        raise ValueError("no endpoints given")
    return list(endpoints)


class Client:
    def __init__(self, endpoints=None, token: str | None = None, tls: TLSConfig | None = None,
                 timeout: float = 5.0, transport: str = "thrift",
                 attempt_timeout: float | None = None):
        """`timeout`: seconds a call may take in all, retries included. `attempt_timeout`:
        the longest one node may take to answer before the call tries another (a frozen
        leader holds its connections open, and would otherwise take the whole timeout); a
        write whose node gave up is retried under its session, so it applies once. None:
        one attempt may take the whole timeout."""
        from raftcache.pluginapi.manager import PluginSet, make_manager

        self.endpoints = _endpoints(endpoints)
        self.token = token
        self.tls = tls
        self.timeout = timeout
        self.attempt_timeout = attempt_timeout
        self._connect = PluginSet(make_manager()).transport(transport).connect
        self._lock = threading.Lock()
        self._idle: dict[str, list] = {}
        self._leader: str | None = None
        self._rotation = itertools.cycle(range(len(self.endpoints)))
        # Write sessions: one in-flight write per session keeps sequence numbers monotonic.
        # 128 random bits: nobody else's writes can land in our sessions by accident.
        self._base_id = uuid.uuid4().hex
        self._sessions: list[_Session] = []
        self._session_ids = itertools.count(1)

    # -- the API (a contract: README, and raftcache.thrift for other languages) -------------------
    def set(self, key, value, ttl: float | None = None) -> int:
        """Store `value`; returns its version (the log index that wrote it)."""
        r = self._call("set", key=_bytes(key), value=_bytes(value), ttl_ms=_ttl_ms(ttl))
        return r.number

    def get(self, key, consistency: str = "linearizable") -> bytes | None:
        found = self.get_with_version(key, consistency)
        return None if found is None else found[0]

    def get_with_version(self, key, consistency: str = "linearizable"):
        """(value, version), or None when the key is missing."""
        r = self._call("get", key=_bytes(key), consistency=consistency)
        return (r.result.value, r.result.version) if r.result.found else None

    def delete(self, key) -> bool:
        return bool(self._call("delete", key=_bytes(key)).ok)

    def cas(self, key, expected_version: int, value, ttl: float | None = None) -> bool:
        return self.cas_with_version(key, expected_version, value, ttl)[0]

    def cas_with_version(self, key, expected_version: int, value,
                         ttl: float | None = None) -> tuple[bool, int | None]:
        """(swapped, new version): the version when the transport carries it (tcp-tls does;
        the Thrift service's cas returns only a bool), else None."""
        r = self._call("cas", key=_bytes(key), expected_version=expected_version,
                       value=_bytes(value), ttl_ms=_ttl_ms(ttl))
        return (True, r.number or None) if r.ok else (False, None)

    def incr(self, key, delta: int = 1) -> int:
        return self._call("incr", key=_bytes(key), delta=delta).number

    def append(self, key, value) -> int:
        """Append `value` to the key's value (a missing key counts as empty); the new length."""
        return self._call("append", key=_bytes(key), value=_bytes(value)).number

    def invalidate(self, prefix="") -> int:
        return self._call("invalidate", key=_bytes(prefix)).number

    def mget(self, keys, consistency: str = "linearizable") -> list[bytes | None]:
        return [None if f is None else f[0] for f in self.mget_with_versions(keys, consistency)]

    def mget_with_versions(self, keys, consistency: str = "linearizable"):
        """[(value, version), or None for a missing key, ...], read at one point."""
        r = self._call("mget", keys=[_bytes(k) for k in keys], consistency=consistency)
        return [(g.value, g.version) if g.found else None for g in r.results]

    def mset(self, items: dict, ttl: float | None = None) -> list[int]:
        r = self._call("mset", items={_bytes(k): _bytes(v) for k, v in items.items()},
                       ttl_ms=_ttl_ms(ttl))
        return list(r.versions)

    def status(self, endpoint: str | None = None):
        """The status of one node (`endpoint`), or of the first that answers."""
        if endpoint is not None:
            return self._call_once(endpoint, api.Request(op="status"), self.timeout).status
        return self._call("status").status

    # -- operations ----------------------------------------------------------------------------------
    def transfer_leader(self, node_id: int):
        """Hand leadership to `node_id`; returns the leader's status once it leads."""
        return self._call("transfer_leader", node_id=node_id).status

    def add_member(self, node_id: int, address: str | None = None, learner: bool = False):
        """Add `node_id` as a voter, or as a learner that receives the log but does not vote;
        add_member(n) also promotes learner n. `address` ("host:port") is where peers reach
        it: the log carries it to every node, so it need not be in any config file (without
        it, the node must be listed in cluster.peers). Returns the leader's status once the
        change is applied."""
        change = "add-learner" if learner else "add-voter"
        return self._call("change_member", change=change, node_id=node_id,
                          address=address).status

    def update_member_address(self, node_id: int, address: str):
        """Tell every node that member `node_id` now listens at `address` (a machine that
        was replaced, a pod rescheduled): its identity and its data stay."""
        return self._call("change_member", change="update-address", node_id=node_id,
                          address=address).status

    def remove_member(self, node_id: int):
        """Remove `node_id` from the cluster; returns the status once the change is applied."""
        return self._call("change_member", change="remove", node_id=node_id).status

    def snapshot_part(self, index: int = 0, offset: int = 0):
        """Part of a backup from the leader (`api.SnapshotPart`): index 0 takes a new image;
        then ask with its index from the next offset. `raftcache.backup.save` does the rest."""
        return self._call("snapshot", index=index, offset=offset).part

    def admin(self, action: str, *args) -> dict:
        """Run an admin action of a security plugin (e.g. ``admin("revoke", "alice")``); its
        answer as a dict: ``{"result": ...}`` once a change applied, or a report."""
        import json

        r = self._call("admin", action=action, arguments=[_bytes(a) for a in args])
        return json.loads(r.text)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for c in conns:
                c.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- plumbing -----------------------------------------------------------------------------------
    def _call(self, name: str, **fields):
        """Call the operation the client calls `name` (`Operation.client_name`: set and
        delete are put and remove on the wire)."""
        op = operations.BY_CLIENT_NAME[name].name
        session = self._take_session() if operations.needs_session(op) else None
        answered = False
        try:
            header = api.RequestHeader(token=self.token)
            if session is not None:
                session.seq += 1
                header = attrs.evolve(header, client_id=session.id, seq=session.seq)
            response = self._call_until_deadline(api.Request(op=op, header=header, **fields))
            answered = True
            return response
        except errors.InvalidRequest:
            answered = True
            raise
        finally:
            # After any other error the cluster may hold the session differently than we
            # think (never opened, or evicted by its caps): its next number could be refused
            # as a possible retry. A fresh client id starts clean.
            if session is not None and answered:
                session.used = time.monotonic()
                with self._lock:
                    self._sessions.append(session)

    def _take_session(self) -> _Session:
        with self._lock:
            while self._sessions:
                session = self._sessions.pop()
                if time.monotonic() - session.used < SESSION_REUSE_S:
                    return session
        return _Session(f"{self._base_id}-{next(self._session_ids)}")

    def _call_until_deadline(self, request: api.Request):
        deadline = time.monotonic() + self.timeout
        is_write = operations.mutates(request.op)
        sent = False  # a write that may have reached a node cannot be reported as Unavailable
        last_error = "no endpoint answered"
        target = self._leader
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if is_write and sent:
                    raise errors.OutcomeUnknown(f"{request.op}: {last_error}")
                raise errors.Unavailable(f"{request.op}: {last_error}")
            if attempt:  # short backoff: an election takes about one election timeout
                time.sleep(min(0.01 * attempt, 0.1, remaining))
            attempt += 1
            address = target or self.endpoints[next(self._rotation)]
            target = None
            if self.attempt_timeout is not None:
                remaining = min(remaining, self.attempt_timeout)
            request = attrs.evolve(request, header=attrs.evolve(
                request.header or api.RequestHeader(), timeout_ms=max(1, int(remaining * 1000))))
            try:
                response = self._call_once(address, request, remaining)
            except ConnectionRefusedError as exc:
                last_error = f"{address}: {exc}"
                self._leader = None if self._leader == address else self._leader
                continue
            except (OSError, TimeoutError) as exc:
                sent = True
                last_error = f"{address}: {exc!r}"
                self._leader = None if self._leader == address else self._leader
                continue
            error = response.error
            if error is None:
                if request.op != "status":
                    self._leader = address
                return response
            if error == "NotLeader":
                target = response.leader_hint or None
                self._leader = target
                last_error = f"{address}: not the leader"
                attempt = 0 if target else attempt
                continue
            if error in ("Unavailable", "OutcomeUnknown"):
                sent = sent or error == "OutcomeUnknown"
                last_error = f"{address}: {response.reason}"
                # A hint says "here, after a backoff" (an overloaded leader); none, "elsewhere".
                target = response.leader_hint or None
                continue  # exactly-once sessions make a write's retry safe
            raise errors.BY_NAME.get(error, errors.RaftCacheError)(response.reason or error)

    def _call_once(self, address: str, request, timeout: float):
        with self._lock:
            idle = self._idle.get(address)
            conn = idle.pop() if idle else None
        if conn is None:
            conn = self._connect(address, self.tls, timeout)
        try:
            response = conn.call(request, timeout)
        except BaseException:
            conn.close()  # never reuse a connection that saw an error
            raise
        with self._lock:
            self._idle.setdefault(address, []).append(conn)
        return response


@attrs.define
class _Session:
    """An exactly-once session: one write in flight at a time keeps its numbers in order."""

    id: str
    seq: int = 0
    used: float = attrs.Factory(time.monotonic)  # when its last write was answered


def _ttl_ms(ttl: float | None) -> int | None:
    if ttl is None:
        return None
    if not 0 < ttl <= MAX_TTL_MS / 1000:
        raise ValueError(f"ttl must be positive and at most {MAX_TTL_MS // 1000} s (ten years)")
    return max(1, int(ttl * 1000))
