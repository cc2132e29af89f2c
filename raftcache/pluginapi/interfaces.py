"""What plugins implement and what providers yield: storages, transports, connections, backends
and value codecs, the factories that make them, and the provider records that name them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import attrs

from raftcache.core import api
from raftcache.core.cache.statemachine import Change
from raftcache.core.raft.messages import Entry, HardState, Message, Snapshot


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

    def handle_request(self, request: api.Request, certificate: str | None = None,
                       source: str | None = None) -> api.Response:
        """A client's call, answered. Blocks the calling greenlet until the answer is known;
        never raises. `certificate`: the CN of the verified TLS client certificate the call
        came with (`transport.tls.caller_certificate`), which access control may map to
        a principal; `source`: the address the connection came from (its host, no port), what
        access control bounds per source (the token verifications it costs). The transport turns its wire format into `api.Request` and the answer
        back (`raftcache.wire` does it for the Thrift IDL); `raftcache.core.operations` says
        which fields each operation takes and which field of the answer holds its result."""

    def handle_peer_messages(self, messages: Sequence[Message],
                             sender: int | None = None) -> None:
        """Raft messages from a connection that proved it belongs to node `sender` (a node
        certificate, or the cluster secret); None when the transport runs without peer
        authentication, which the node accepts only with `cluster.insecure = true`. The node
        drops (and counts) messages not from `sender`, from non-members, or out of range
        (`raftcache.core.raft.validate`). Returns at once; never raises."""

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


class Backend(Protocol):
    """Where committed values live (docs/backends.md). The state machine keeps the catalog
    (key, version, expiry) and hands the backend only committed changes, in log order, one
    batch per Ready. Reads may run between batches, never during one.

    A backend with only ``get``, ``set``, ``delete`` and ``clear`` (the first version of this
    protocol) still works: the node wraps it (`raftcache.node.backend.SimpleBackend`).

    Optional: ``stores_plaintext(key) -> bool``, whether values under `key` must be stored as
    the client wrote them (a farm applications read directly): the encryption codec asks it
    for every value it seals or opens, so it must be a pure function of the key and the
    config, the same on every node. Any backend's options may say ``encrypt_values = false``:
    the node takes that option itself and wraps the backend so that it answers True
    (`raftcache.node.backend.PlaintextBackend`); a composite backend (``hybrid``) answers for
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


class ValueCodec(Protocol):
    """Turns a value into what is stored (sealed, compressed) and back.

    `encode` runs on the node that takes the write, before the value reaches the log; `decode`
    on the node that serves a read, and inside the state machine for ``incr`` (which must read
    a number). Both must be pure functions of their arguments and the codec's keys: `decode`
    runs on every replica for ``incr``. `encode` may be randomized (a nonce) - exactly-once
    retries compare writes without their values. `decode` raises `ValueCodecError` for a blob
    it cannot open (the node answers that read Unavailable, naming the problem).

    Optionally, ``bind(key, version, blob)`` and ``unbind(key, version, stored)``: the state
    machine binds what it stores to the version the entry gives it (only known at apply, so
    deterministic: every replica binds alike), and a stored value is unbound against the
    catalog's version before it is decoded (`ValueCodecError` when it does not match).
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
class DevServer:
    """A server that a local cluster (``raftcache up``, the fault suite, ``raftcache bench``,
    the tests) starts for each node whose backend options leave `option` unset, on a free
    port of the node's host, writing its address into `option`; it stops with the cluster.

    `kind` is what to start, by name (the plugin API never imports the product's
    `raftcache.servers`; `raftcache.cluster` maps kinds to servers):

    - ``"redis"``: a redis-server kept as a cache (no persistence, ``maxmemory-policy
      noeviction``); `option` gets its URL, ``unix:///path/redis-server.sock?db=0``;
    - ``"memcached"``: a memcached; `option` gets its socket's path,
      ``/path/memcached.sock``.

    Either listens on a unix socket in a 0700 directory and on no TCP port: only the node's
    user can reach it.
    """

    kind: str
    option: str


@attrs.frozen
class BackendProvider:
    """A cache backend by name (``[backend] plugin = "<name>"``).

    Example::

        @hookimpl
        def raftcache_backends():
            yield BackendProvider("audit-memory", AuditMemoryBackend, "a dict, audited")

    What a local cluster needs to run it (docs/backends.md, "Declaring dev servers"); a
    backend that declares nothing gets no servers and runs with the options it is given:

    - `dev_servers`: the servers it reaches (`DevServer`), e.g.
      ``dev_servers=(DevServer("redis", "url"),)``: ``raftcache up --backend <name>`` then
      starts a redis-server per node and sets ``[backend.options] url``. A config that sets
      the option itself keeps its server.
    - `dev_instances` (composites): the option holding its instances, tables of ``plugin``
      and that plugin's options; each instance gets the dev servers its own plugin declares,
      its address written into the instance's table (``hybrid``: ``"instances"``).
    - `dev_options`: the options the fault suite and ``raftcache bench`` run it with when
      their config gives none (``hybrid``: examples/hybrid/hybrid.toml's routes); None: it
      runs with no options.
    """

    name: str
    factory: BackendFactory | CompositeBackendFactory
    description: str = ""
    composite: bool = False  # factory is a CompositeBackendFactory
    dev_servers: tuple[DevServer, ...] = ()
    dev_instances: str | None = None
    # a dict is unhashable: left out of the record's hash (it is compared still)
    dev_options: dict | None = attrs.field(default=None, hash=False)


@attrs.frozen
class TLSConfig:
    """PEM file paths. Servers and clients both present `cert`; peers must chain to `ca`."""

    ca: str
    cert: str
    key: str
