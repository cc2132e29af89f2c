"""The plugin author's manual: every hook raftcache calls, and what a plugin must provide.

raftcache uses pluggy, like pytest. A plugin is a module or object with functions marked
``@hookimpl`` whose names match the specs below; an implementation may take any subset of a
hook's arguments, by name. Plugins are found through the entry-point group ``raftcache`` (the
built-in ones are registered there too, exactly like third-party ones), e.g. in your package's
setup.cfg::

    [options.entry_points]
    raftcache =
        audit-log = my_package.audit_plugin

Entry-point plugins load sorted by name; plugins handed to ``make_manager(extra=...)`` (tests,
embedding applications) come after them. ``[plugins] block = ["name"]`` in a node's config keeps
an entry-point plugin from loading. `examples/raftcache-audit-log` is a complete third-party
plugin package.

There are five kinds of hooks:

- **Providers** (``raftcache_storages``, ``raftcache_transports``, ``raftcache_backends``)
  yield records naming implementations, in conda's style. A node's config picks one of each by
  name; an unknown name stops start-up with the list of known names, and two plugins providing
  the same name is an error naming both.
- **Observers** (``raftcache_node_started``, ``..._node_stopping``, ``..._role_changed``,
  ``..._snapshot_taken``, ``..._snapshot_installed``, ``raftcache_metrics``) are told what
  happened on one node. They run on the node's event loop, so they must return quickly and never
  block on I/O; an exception one raises is logged with its plugin's name and the node carries on
  (the other implementations still run). Their return values are ignored.
- **The apply pipeline** (``raftcache_check_command``, ``raftcache_value_codecs``) shapes what
  every replica stores. It must be deterministic: the same entry must give the same outcome on
  every replica, so decide only from the arguments, never from clocks, files or randomness. An
  exception raised here stops the node (it cannot know what the other replicas did).
- **Access control** (``raftcache_authenticate``, ``raftcache_check_request``,
  ``raftcache_admin``) runs on the node a client called: who is calling (a verified token),
  whether a read or a node operation is allowed, and what an admin action commits. The
  decision for writes is ``raftcache_check_command``'s, in the apply pipeline.
  `raftcache.plugins.security.rbac` implements them (docs/security.md).
- Hooks are called with keyword arguments; ``node`` is the `raftcache.core.node.Node` they run
  in (read its ``id``, ``config`` and ``status()``; do not call into it from a hook).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

import attrs
import pluggy

from . import api
from .commands import Caller as Caller
from .commands import Configure as Configure
from .messages import Entry, HardState, Message, Snapshot

# What Backend.apply gets (made by the state machine, which cannot import this module), and
# the replicated settings access checks and codecs read.
from .statemachine import Change as Change
from .statemachine import Setting as Setting
from .statemachine import ValueCodecError as ValueCodecError

if TYPE_CHECKING:
    from .node import Node

PROJECT = "raftcache"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# ================================================================================================
# What providers make
# ================================================================================================
class Storage(Protocol):
    """Durable home of one node's Raft log, hard state and newest snapshot.

    The node calls durable saves and compactions from the gevent threadpool (never on the
    hub), one call at a time, so an implementation may block (fsync) and need not be
    thread-safe beyond that. A storage may say ``blocking = False`` (a class or instance
    attribute); the node then calls its saves inline on the hub, saving a thread hop per
    Ready: right for a storage that never blocks, or whose fsync is shorter than the hop
    (file-wal on a local disk: see its "Where the fsync runs").
    """

    def load(self) -> tuple[HardState, Snapshot | None, Sequence[Entry]]:
        """Everything persisted so far (empty for a new node). Entries after the snapshot only."""

    def save(self, hard_state: HardState | None, entries: Sequence[Entry],
             snapshot: Snapshot | None, sync: bool) -> None:
        """Persist, in this order: `snapshot` (drop every entry it covers), `entries`
        (replacing stored entries at the same indexes or later), `hard_state`. When `sync`
        is true, return only once all of it is durable (fsync, appendfsync always). One
        save call covers every entry that arrived while the previous one ran: group commit."""

    def compact(self, snapshot: Snapshot) -> None:
        """Persist a snapshot taken by this node, then drop entries up to its index."""

    def close(self) -> None: ...


class PeerHandler(Protocol):
    """What a transport's server calls into. Implemented by the node."""

    def handle_request(self, request: api.Request,
                       certificate: str | None = None) -> api.Response:
        """A client's call, answered. Blocks the calling greenlet until the answer is known;
        never raises. `certificate`: the CN of the verified TLS client certificate the call
        came with (`transport.common.caller_certificate`), which access control may map to
        a principal. The transport turns its wire format into `api.Request` and the answer
        back (`raftcache.wire` does it for the Thrift IDL); `raftcache.core.operations` says
        which fields each operation takes and which field of the answer holds its result."""

    def handle_peer_messages(self, messages: Sequence[Message],
                             sender: int | None = None) -> None:
        """Raft messages from a connection that proved it belongs to node `sender` (a node
        certificate, or the cluster secret); None when the transport runs without peer
        authentication, which the node accepts only with `cluster.insecure = true`. The node
        drops (and counts) messages not from `sender`, from non-members, or out of range
        (`raftcache.core.validate`). Returns at once; never raises."""

    def peer_lost(self, peer: int) -> None:
        """A connection that carried Raft messages from node `peer` (proven, as for
        `handle_peer_messages`) closed or reset. A transport should say so as soon as it
        sees it: the node then notices a leader that died without waiting out an election
        timeout. Returns at once."""


class Transport(Protocol):
    """One node's listener (client and peer traffic on one port) and its links to peers.

    A transport hands the node Raft messages only from connections that proved they are a
    node of this cluster, and names that node (`PeerHandler.handle_peer_messages`). It bounds
    what one connection can cost (frame size, a deadline for each whole frame, idle time) and
    how many connections clients may hold, so that peers always get in (docs/security.md). It
    may offer ``max_frame`` (int): the largest frame it carries; the node then refuses, at
    start, a ``node.max_request_bytes`` that could not fit one append to a peer.
    """

    def serve(self, handler: PeerHandler) -> None:
        """Start listening on the node's address (spawn greenlets; return at once)."""

    def send(self, messages: Sequence[Message]) -> None:
        """Queue Raft messages for their peers (`message.to`). Never blocks; drops when a peer
        is unreachable or its queue is full (Raft retries)."""

    def set_peer(self, peer: int, address: str | None) -> None:
        """Reach node `peer` at `address` ("host:port") from now on; None: it left the
        cluster. The node calls it when the log moves a member (a node added at a new
        address, an address update) and at start for the addresses its snapshot holds. A
        transport without it reaches only the peers it was built with."""

    def peer_links(self) -> dict[int, tuple[bool, int]]:
        """Optional, for metrics: per peer it links to, (connected, Raft messages dropped
        because the link's queue was full)."""

    def close(self) -> None: ...


class Connection(Protocol):
    """A client's connection to one node."""

    def call(self, request: api.Request, timeout: float) -> api.Response:
        """Send a call, return its answer. Raises OSError/TimeoutError on transport failure;
        then the connection is useless: close it."""

    def close(self) -> None: ...


class BackendUnavailable(OSError):
    """The backend's server cannot be reached or answered too slowly. The node answers reads
    Unavailable (the client tries another node), keeps retrying the apply with backoff and
    serves again once it went through: nothing is skipped and nothing older is ever served."""


class BackendLost(Exception):
    """The backend no longer holds what it was told to hold (its server restarted empty, or
    another writer replaced its bookkeeping). The node rebuilds it from its snapshot and log
    (`load`, then the entries since), answering reads Unavailable meanwhile."""


class Backend(Protocol):
    """Where committed values live (docs/backends.md). The state machine keeps the catalog
    (key, version, expiry) and hands the backend only committed changes, in log order, one
    batch per Ready. Reads may run between batches, never during one.

    A backend with only ``get``, ``set``, ``delete`` and ``clear`` (the first version of this
    protocol) still works: the node wraps it (`raftcache.plugins.backend.simple`).

    Optional: ``stores_plaintext(key) -> bool``, whether values under `key` must be stored as
    the client wrote them (a farm applications read directly): the encryption codec asks it
    for every value it seals or opens, so it must be a pure function of the key and the
    config, the same on every node. Any backend's options may say ``encrypt_values = false``:
    the node takes that option itself and wraps the backend so that it answers True
    (`raftcache.core.backend.PlaintextBackend`); a composite backend (``hybrid``) answers for
    the instance the key is routed to.
    """

    def open(self, owner: str) -> int | None:
        """Called once, first. `owner` names this node of this cluster; a backend that keeps
        data across restarts refuses (config.ConfigError) data recorded for another owner.
        Returns the log index its data reflects (what the last `apply` or `load` recorded), or
        None when it cannot tell (empty, or it keeps nothing across restarts): the node then
        reloads it from its snapshot. A backend that returns an index must make each `apply`
        atomic with it (the node skips the entries up to it when it restarts)."""

    def get(self, key: bytes) -> bytes | None: ...

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """The values of `keys`, in order, None for each one missing."""

    def apply(self, index: int, changes: Sequence[Change]) -> Sequence[bytes]:
        """Make the changes (entries up to log `index`: each key's net change over the batch,
        so a key set then deleted in one batch comes as one delete) and record `index`, at
        once if the backend can. Returns the keys it evicted to stay within its own limits: the state
        machine forgets them (they read as missing). Evictions must be a deterministic
        function of the changes, identical on every replica; a backend whose server evicts
        on its own (Memcached) returns nothing and its reads miss instead.
        Raises BackendUnavailable or BackendLost; the node retries the same call."""

    def load(self, index: int, items: Iterable[Change], stale: Iterable[bytes]) -> Sequence[bytes]:
        """Replace the contents with a snapshot's at log `index`: set every item (in the
        order given: it is the order they were written) and delete the `stale` keys (held
        before, absent from the snapshot). Returns the keys it evicted, like `apply`."""

    def close(self) -> None: ...


class Unauthorized(Exception):
    """Raised by an access-control hook: the call is refused with ``Unauthorized(reason)``."""


class ValueCodec(Protocol):
    """Turns a value into what is stored (sealed, compressed) and back.

    `encode` runs on the node that takes the write, before the value reaches the log; `decode`
    on the node that serves a read, and inside the state machine for ``incr`` (which must read
    a number). Both must be pure functions of their arguments and the codec's keys: `decode`
    runs on every replica for ``incr``. `encode` may be randomized (a nonce) - exactly-once
    retries compare writes without their values. `decode` raises `ValueCodecError` for a blob
    it cannot open (the node answers that read Unavailable, naming the problem).
    """

    def encode(self, key: bytes, value: bytes) -> bytes: ...
    def decode(self, key: bytes, blob: bytes) -> bytes: ...


# ---- factories, as providers name them -----------------------------------------------------------
class StorageFactory(Protocol):
    def __call__(self, node_id: int, data_dir: str, options: dict) -> Storage:
        """`options` is ``[storage.options]`` of the node's config; refuse unknown keys with
        ValueError naming them (or config.ConfigError for a finding about the environment)."""


class TransportServer(Protocol):
    def __call__(self, node_id: int, address: str, peers: dict[int, str],
                 tls: TLSConfig | None, options: dict) -> Transport:
        """`options` is ``[transport.options]`` plus what the node sets: ``cluster_id`` (int),
        ``peer_secret`` (bytes, or None: the cluster secret peers must prove they hold) and
        ``max_request_bytes`` (``node.max_request_bytes``)."""


class TransportConnect(Protocol):
    def __call__(self, address: str, tls: TLSConfig | None, timeout: float,
                 options: dict | None = None) -> Connection:
        """A client connection to `address` ("host:port"); OSError/TimeoutError when it cannot
        be made within `timeout`."""


class BackendFactory(Protocol):
    def __call__(self, node_id: int, options: dict) -> Backend:
        """`options` is ``[backend.options]`` of the node's config (or one instance's table of
        a composite backend's options); refuse unknown keys like a storage does."""


class CompositeBackendFactory(Protocol):
    def __call__(self, node_id: int, options: dict,
                 make_backend: Callable[[str, dict], Backend]) -> Backend:
        """A backend made of others (`hybrid`): `make_backend(plugin name, options)` builds one
        by provider name (an unknown name raises ConfigError listing the known ones)."""


# ---- the records providers yield ------------------------------------------------------------------
@attrs.frozen
class StorageProvider:
    """A storage by name (``[storage] plugin = "<name>"``).

    Example::

        @hookimpl
        def raftcache_storages():
            yield StorageProvider("rocks", RocksStorage, "the log in RocksDB (durable)")
    """

    name: str
    factory: StorageFactory
    description: str = ""


@attrs.frozen
class TransportProvider:
    """A transport by name (``[transport] plugin = "<name>"``): the node's server side and the
    clients' connections, which must speak to each other.

    Example::

        @hookimpl
        def raftcache_transports():
            yield TransportProvider("quic", quic_server, quic_connect, "frames over QUIC")
    """

    name: str
    server: TransportServer
    connect: TransportConnect
    description: str = ""


@attrs.frozen
class BackendProvider:
    """A cache backend by name (``[backend] plugin = "<name>"``).

    Example::

        @hookimpl
        def raftcache_backends():
            yield BackendProvider("audit-memory", AuditMemoryBackend, "a dict, audited")
    """

    name: str
    factory: BackendFactory | CompositeBackendFactory
    description: str = ""
    composite: bool = False  # factory is a CompositeBackendFactory


@attrs.frozen
class TLSConfig:
    """PEM file paths. Servers and clients both present `cert`; peers must chain to `ca`."""

    ca: str
    cert: str
    key: str


# ================================================================================================
# Providers
# ================================================================================================
@hookspec
def raftcache_storages() -> Iterable[StorageProvider]:
    """Yield the storage implementations this plugin offers.

    Called once per plugin manager, when a node starts (and by the CLI to list names).
    """


@hookspec
def raftcache_transports() -> Iterable[TransportProvider]:
    """Yield the transports this plugin offers.

    Called when a node starts and when a client is made (`raftcache.Client(transport=...)`).
    """


@hookspec
def raftcache_backends() -> Iterable[BackendProvider]:
    """Yield the cache backends this plugin offers. Called when a node starts."""


# ================================================================================================
# Observers: one node's events; an exception is logged and the node carries on
# ================================================================================================
@hookspec
def raftcache_node_started(node: Node) -> None:
    """The node is serving: its transport listens and its driver loop runs.

    :param node: the node.
    """


@hookspec
def raftcache_node_stopping(node: Node) -> None:
    """The node is shutting down (SIGTERM/SIGINT or `Node.stop()`); storage is still open.

    :param node: the node.
    """


@hookspec
def raftcache_role_changed(node: Node, role: str, term: int, leader: int) -> None:
    """This node's role, or the leader it knows, changed. Called after the change is durable,
    on each node for itself.

    :param node: the node.
    :param role: "follower", "pre_candidate", "candidate" or "leader".
    :param term: the node's term.
    :param leader: the id of the leader it knows, 0 for none.
    """


@hookspec
def raftcache_snapshot_taken(node: Node, index: int, size: int) -> None:
    """The node took a snapshot of its state machine and dropped the log up to `index`.

    :param node: the node.
    :param index: the last log index the snapshot covers.
    :param size: the snapshot's size in bytes.
    """


@hookspec
def raftcache_snapshot_installed(node: Node, index: int) -> None:
    """The node replaced its state with a snapshot received from the leader (it was too far
    behind for the log).

    :param node: the node.
    :param index: the last log index the snapshot covers.
    """


@hookspec
def raftcache_metrics(node: Node, metrics: dict) -> None:
    """Read or add to the node's metrics. Called every ten seconds by the node's ticker, at
    each scrape of its /metrics (number values you add show as ``raftcache_plugin_<key>``)
    and whenever `Node.metrics()` is asked (not by the ``status`` call).

    :param node: the node.
    :param metrics: name -> value (numbers and short strings); add your own keys. Built in:
        node, term, role, leader, commit, applied, log_first_index, log_last_index,
        pending_writes, pending_reads, keys, dropped_peer_messages, refused_snapshots,
        backend_down (1 while the backend is unavailable or being rebuilt).
    """


# ================================================================================================
# The apply pipeline: every replica, deterministic
# ================================================================================================
@hookspec(firstresult=True)
def raftcache_check_command(command, identity: str | None, stamp_ms: int,
                            caller: Caller | None, settings: Mapping[str, Setting]) -> str | None:
    """Veto a committed write before it is applied: return the reason, or None to let it be.

    Called on every replica, for every write command (not for the leader's expiry sweeps), in
    log order; the first implementation that returns a reason decides (pluggy's firstresult),
    and later ones are not asked. A vetoed write changes nothing, not even the client's
    exactly-once session, and its client gets ``Unauthorized(reason)``. Decide only from the
    arguments and replicated state, or replicas will disagree. An exception stops the node.

    :param command: a `raftcache.core.commands` command (Set, Delete, Cas, Incr, Invalidate,
        MSet) as it is in the log; its values are already encoded by the value codecs.
    :param identity: the caller's identity recorded in the entry by the node that took the
        write, or None (no authentication).
    :param stamp_ms: the entry's time: the proposing leader's clock, never going backwards.
    :param caller: what the node that took the write verified of its caller
        (`raftcache_authenticate`), recorded in the entry; None for an anonymous write.
    :param settings: the replicated cluster settings as of this entry (`commands.Configure`
        writes them): name -> `Setting(value, stamp_ms, index)`. Read only.
    """


@hookspec
def raftcache_value_codecs(node: Node) -> Iterable[ValueCodec]:
    """Yield value codecs (`ValueCodec`): encryption, compression.

    Called once when a node starts, before its state machine exists; a codec that needs the
    replicated settings (data keys) reads ``node.sm.settings`` when it runs. A value is encoded by every codec in plugin registration
    order (entry-point plugins by name, then extra plugins; within a plugin, in the order it
    yields them), before it reaches the log, snapshots and backends, and decoded in the reverse
    order when read. Codecs must be the same on every node of a cluster.
    `raftcache.plugins.security.encryption` is the built-in one (encryption at rest).
    """


# ================================================================================================
# Access control: on the node a client called
# ================================================================================================
@hookspec(firstresult=True)
def raftcache_authenticate(node: Node, token: str | None,
                           certificate: str | None) -> Caller | None:
    """Who is calling: verify the request's `token` (or map its client certificate) and
    return the `Caller` it proves, which
    the node records in the entries it proposes for the call. Raise `Unauthorized(reason)` for
    a token that is forged, malformed, expired or unknown, or for a missing token when
    authentication is required. Return None when the plugin does not authenticate (the call
    runs anonymously); the first implementation that returns a Caller decides.

    Runs on every client call but ``status``, so it must be quick (cache verified tokens).

    :param node: the node that received the call.
    :param token: ``RequestHeader.token``, or None.
    :param certificate: the CN of the TLS client certificate the call came with, or None.
    """


@hookspec(firstresult=True)
def raftcache_check_request(node: Node, op: str, keys: Sequence[bytes], caller: Caller | None,
                            stamp_ms: int, settings: Mapping[str, Setting]) -> str | None:
    """Veto a read or a node operation on the node that serves it: return the reason (the
    client gets ``Unauthorized(reason)``), or None. Reads are checked once their read index
    is applied, so a revocation committed before the read is in `settings`.

    :param node: the node.
    :param op: the operation (`raftcache.core.operations.OPERATIONS`): "get", "mget",
        "transfer_leader", "change_member" or "admin".
    :param keys: the keys a read asks for (empty for node operations).
    :param caller: what `raftcache_authenticate` returned, or None (anonymous).
    :param stamp_ms: the node's time: the later of its clock and the newest applied stamp.
    :param settings: the replicated settings this node has applied.
    """


@hookspec(firstresult=True)
def raftcache_admin(node: Node, action: str, args: Sequence[bytes],
                    caller: Caller | None):
    """Carry out an admin action (``raftcache token revoke``, ``raftcache keys rotate``).
    Return one of:

    - a command (`Configure`, `Reseal`) for the node to commit on the caller's behalf
      (``raftcache_check_command`` decides it like any write); the client gets
      ``{"result": the command's result}`` once it applied (a Configure's is its log
      index, a Reseal's the number of values it replaced);
    - ``(command, report)``: the same, with the dict `report`'s items added to the answer;
    - a dict: answered at once, as JSON (a report; nothing is committed);
    - None: the action is not this plugin's.

    Raise ValueError for bad arguments (InvalidRequest). The caller was already allowed the
    ``admin`` operation by ``raftcache_check_request``. Runs on the leader.

    :param node: the node (the leader).
    :param action: the action's name, e.g. "revoke", "keys-rotate".
    :param args: its arguments.
    :param caller: the verified caller, or None.
    """
