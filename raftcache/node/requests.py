"""Client requests: one call in, one answer out, whatever the call holds."""

from __future__ import annotations

import time

import attrs

from raftcache.core import api
from raftcache.core.cache import commands
from raftcache.core.cache.statemachine import (
    ApplyError,
    ValueCodecError,
    decode_value,
    encode_value,
)
from raftcache.core.operations import OPERATIONS, BadRequest, batch, key
from raftcache.core.raft.messages import NotLeader, ProposalRefused
from raftcache.pluginapi import NodeContext, Unauthorized

from .addresses import AddressBook
from .applier import BackendDown
from .config import Config
from .control import ClusterCalls
from .replica import Replica
from .waiting import Overloaded, give_way

MAX_CLIENT_ID = 128  # characters; the Python client sends 32 random hex digits and a counter
# A read's values are opened (decrypted) this many bytes at a time between yields to the hub:
# ~1 ms of AES-GCM, so a large mget never stalls heartbeats for long.
OPEN_YIELD_BYTES = 1 << 20


class NoClusterTime(Exception):
    """Nothing can be judged yet: answered Unavailable (the client asks another node)."""


class Requests:
    """Answers the calls a transport hands the node (`handle`).

    Contract: `handle` blocks the calling greenlet until the answer is known and never
    raises: a bad call gets InvalidRequest, a refused one Unauthorized, a call this node
    cannot serve now Unavailable (with a hint when another node can), a write whose fate is
    unknown OutcomeUnknown, never a failure. Every wait has the call's deadline. In order:
    the operation's sizes (`node.max_*`), who is calling (`raftcache_authenticate`), then
    - a write: its command (values sealed by the codecs), proposed in an envelope carrying
      the leader's stamp, the caller and the client's (id, seq); the applied result;
    - a read: the read index confirmed (unless stale) and applied, then
      `raftcache_check_request`, then the settled values (each key read once, however often
      it is asked for), refused when they exceed `node.max_response_bytes` before any is
      opened, else opened by the codecs a MiB at a time between yields to the hub;
    - a node operation (`control.ClusterCalls`): `raftcache_check_request`, then the call.
    Not the leader: NotLeader with the leader's address, or, with `node.proxy`, the call
    forwarded to it once.
    """

    def __init__(self, config: Config, replica: Replica, addresses: AddressBook, pm,
                 context: NodeContext, codecs: tuple, connect, tls, stats, log, status):
        self.config = config
        self.id = config.node.id
        self.replica = replica
        self.addresses = addresses
        self.pm = pm
        self.context = context
        self.codecs = codecs
        self.connect = connect
        self.tls = tls
        self.stats = stats
        self.log = log
        self.status = status  # the node's status() (the `status` call is the health check)
        self._proxy_conns: dict[str, object] = {}
        control = ClusterCalls(self)
        self._node_calls = {"transfer_leader": control.transfer_leader,
                            "change_member": control.change_member,
                            "snapshot": control.snapshot, "admin": control.admin}

    def handle(self, request: api.Request, certificate: str | None = None,
               source: str | None = None) -> api.Response:
        started = time.monotonic()
        response = self._dispatch(request, certificate, source)
        self.stats.request(request.op, response.error, time.monotonic() - started)
        return response

    def _dispatch(self, request: api.Request, certificate: str | None,
                  source: str | None) -> api.Response:
        op = OPERATIONS.get(request.op)
        try:
            if op is None:
                raise BadRequest(f"unknown operation {request.op!r}")
            op.check_sizes(request, self.config.node)
            if op.name == "status":  # open to all: it is the health check
                return api.Response(status=self.status())
            caller = self._authenticate(request, certificate, source)
            request = _with_certificate(request, certificate)  # what a forward carries
            if op.kind == "write":
                return self._write(op, request, caller)
            if op.kind == "read":
                return self._read(request, caller)
            self.authorize(op.name, (), caller)
            return self._node_calls[op.name](request, caller)
        except (BadRequest, commands.CommandError) as exc:
            return api.error("InvalidRequest", str(exc))
        except Unauthorized as exc:
            return api.error("Unauthorized", str(exc))
        except NoClusterTime as exc:
            return api.error("Unavailable", str(exc))
        except NotLeader as exc:
            return self.not_leader(exc.leader, request)
        except Overloaded as exc:
            # The hint names this node: "come back here after a backoff", not "try another".
            return api.error("Unavailable", str(exc),
                             self.addresses.client_addresses.get(self.id, ""))
        except Exception:
            self.log.exception("request %r failed", request.op)
            return api.error("Unavailable", "internal error; see the node's log")

    # -- who is calling ----------------------------------------------------------------------------
    def _authenticate(self, request: api.Request, certificate: str | None,
                      source: str | None = None):
        """The verified caller of `request` (None: anonymous); raises Unauthorized."""
        token = request.header.token if request.header is not None else None
        if token:
            self.need_cluster_time()  # a token's times are judged by it
        return self.pm.hook.raftcache_authenticate(node=self.context, token=token,
                                                   certificate=certificate, source=source)

    def need_cluster_time(self) -> None:
        """Raise NoClusterTime unless this node knows the cluster time: tokens, TTLs and stamps
        are judged by it, never by this node's clock alone (a node that just started)."""
        if not self.replica.knows_cluster_time():
            raise NoClusterTime("this node does not know the cluster time yet (no leader "
                                "heard since it started); try another node")

    def authorize(self, op: str, keys, caller) -> None:
        """Raise Unauthorized unless the access plugins allow `op` on `keys` here and now."""
        reason = self.pm.hook.raftcache_check_request(
            node=self.context, op=op, keys=keys, caller=caller, stamp_ms=self.replica.stamp(),
            settings=self.replica.sm.settings)
        if reason:
            raise Unauthorized(reason)

    # -- writes ------------------------------------------------------------------------------------
    def _write(self, op, request: api.Request, caller) -> api.Response:
        command = op.command(request, self._encode, self.config.node.max_batch_keys)
        header = request.header
        client_id, seq = (header.client_id, header.seq) if header else (None, None)
        if client_id is not None and len(client_id) > MAX_CLIENT_ID:
            raise BadRequest(f"client_id is limited to {MAX_CLIENT_ID} characters")
        if seq is not None and seq < 0:
            raise BadRequest("seq must not be negative")
        result = self.propose(command, request, caller, client_id, seq)
        if isinstance(result, api.Response):
            return result
        return api.Response(**op.answer(result))

    def propose(self, command, request: api.Request, caller, client_id=None, seq=None):
        """Commit `command` on behalf of `caller` and return its applied result, or an error
        Response (a refusal, a timeout). Raises NotLeader and Overloaded."""
        if self.replica.raw.status().lead == self.id:
            self.need_cluster_time()  # the leader stamps the entry (a follower's is dropped)
        envelope = commands.Envelope(command=command, client_id=client_id, seq=seq,
                                     identity=caller.subject if caller else None,
                                     stamp_ms=self.replica.stamp(), caller=caller)
        data = commands.encode_envelope(envelope)
        if len(data) > self.config.node.max_request_bytes:
            raise BadRequest(f"the write takes {len(data)} bytes in the log, more than "
                             f"node.max_request_bytes ({self.config.node.max_request_bytes})")
        try:
            result = self.replica.writes.propose(data, self.timeout(request))
        except NotLeader:
            raise  # a ProposalRefused too: the request handler redirects or forwards
        except ProposalRefused as exc:
            return api.error("Unavailable", exc.reason)
        if isinstance(result, ApplyError):
            return api.error(result.kind, result.reason)
        return result

    def _encode(self, key: bytes, value: bytes) -> bytes:
        return encode_value(self.codecs, key, value)

    # -- reads -------------------------------------------------------------------------------------
    def _read(self, request: api.Request, caller) -> api.Response:
        consistency = request.consistency or "linearizable"
        if consistency not in ("linearizable", "lease", "stale"):
            raise BadRequest(f"unknown consistency {consistency!r} "
                             "(use linearizable, lease or stale)")
        if request.op == "get":
            keys = [key(request.key)]
        else:
            keys = [key(k) for k in batch(request.keys, self.config.node.max_batch_keys, "mget")]
        if self.replica.applier.backend_down:
            return api.error("Unavailable", "this node's backend is unavailable; try another node")
        if consistency == "stale":
            stale = self.replica.stale_read_refusal()
            if stale is not None:
                return api.error("Unavailable", stale)
        else:
            refused = self.read_index(request, lease=consistency == "lease")
            if refused is not None:
                return refused
        # After the read index applied: a revocation committed before the read is known here.
        self.need_cluster_time()  # expiry of keys and tokens
        self.authorize(request.op, keys, caller)
        distinct = list(dict.fromkeys(keys))  # a key asked for twice is read and opened once
        try:
            found = dict(zip(distinct, self.read_settled(distinct), strict=True))
        except BackendDown as exc:
            return api.error("Unavailable", str(exc))
        # The answer's size from the stored values, before any is opened: a repeated key
        # counts each time, as the answer carries it each time.
        size = sum(len(found[k][0]) for k in keys if found[k] is not None)
        limit = self.config.node.max_response_bytes
        if size > limit:
            raise BadRequest(f"the answer would hold {size} bytes of values; "
                             f"node.max_response_bytes is {limit}: ask for fewer keys at once")
        try:
            opened = self._open(found)
        except ValueCodecError as exc:  # altered here, perhaps intact on another node
            self.replica.applier.backend_log.warning("codec", "a stored value cannot be "
                                                     "opened: %s", exc)
            return api.error("Unavailable", f"this node cannot open a stored value: {exc}; "
                             "try another node")
        results = [opened[k] for k in keys]
        if request.op == "get":
            return api.Response(result=results[0])
        return api.Response(results=results)

    def read_index(self, request: api.Request, lease: bool = False) -> api.Response | None:
        """Wait until this node may serve a read of everything committed before now; None
        once it may, else the answer to give. Raises NotLeader and Overloaded."""
        return self.replica.reads.wait_for_index(self.timeout(request), lease=lease)

    def read_settled(self, keys) -> list:
        """(stored value, version) or None for each key, between apply batches; raises
        BackendDown."""
        return self.replica.applier.read_settled(
            keys, self.replica.stamp, self.config.node.request_timeout_ms / 1000.0)

    def _open(self, found: dict) -> dict:
        """key -> GetResult of each (stored value, version) or None in `found`, the values
        opened by the codecs (which check that each is bound to its version); yields to the
        hub every `OPEN_YIELD_BYTES` opened, so that a large answer does not hold up
        heartbeats and other requests."""
        opened, since_yield = {}, 0
        for k, item in found.items():
            if item is None:
                opened[k] = api.GetResult(found=False)
                continue
            value, version = item
            if self.codecs:
                since_yield += len(value)
                value = decode_value(self.codecs, k, value, version)
                if since_yield >= OPEN_YIELD_BYTES:
                    give_way()
                    since_yield = 0
            opened[k] = api.GetResult(found=True, value=value, version=version)
        return opened

    # -- deadlines and other nodes -----------------------------------------------------------------
    def timeout(self, request: api.Request) -> float:
        """The call's deadline in seconds: the client's (1 ms to 60 s), else the node's."""
        header = request.header
        if header is not None and header.timeout_ms:
            return min(max(header.timeout_ms, 1), 60_000) / 1000.0
        return self.config.node.request_timeout_ms / 1000.0

    def not_leader(self, leader: int, request: api.Request) -> api.Response:
        forwarded = request.header is not None and request.header.forwarded
        peers = self.addresses.peers
        if self.config.node.proxy and leader in peers and not forwarded:
            return self._forward(peers[leader], request)
        return api.error("NotLeader", "not the leader",
                         self.addresses.client_addresses.get(leader, ""))

    def _forward(self, address: str, request: api.Request) -> api.Response:
        # One hop only: stale hints must not bounce it around.
        request = attrs.evolve(request, header=attrs.evolve(request.header or api.RequestHeader(),
                                                            forwarded=True))
        conn = self._proxy_conns.pop(address, None) or self.connect(address, self.tls,
                                                                    self.timeout(request))
        try:
            response = conn.call(request, self.timeout(request))
        except (OSError, TimeoutError):
            conn.close()
            if OPERATIONS[request.op].mutates:
                return api.error("OutcomeUnknown", "forwarding to the leader failed")
            return api.error("Unavailable", "forwarding to the leader failed")
        self._proxy_conns[address] = conn
        return response


def _with_certificate(request: api.Request, certificate: str | None) -> api.Request:
    # The header names the caller's certificate only as the transport vouched for it.
    header = request.header
    if (header.certificate if header is not None else None) == certificate:
        return request
    return attrs.evolve(request, header=attrs.evolve(header or api.RequestHeader(),
                                                     certificate=certificate))
