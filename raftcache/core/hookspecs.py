"""The plugin author's manual: every hook raftcache calls, and what a plugin must provide.

raftcache uses pluggy, like pytest. A plugin is a module or object with functions marked
``@hookimpl`` whose names match the specs below. Plugins are found through the entry-point group
``raftcache`` (the built-in ones are registered there too, exactly like third-party ones), e.g. in
your package's setup.cfg::

    [options.entry_points]
    raftcache =
        audit-log = my_package.audit_plugin

A node's config picks storage, transport and backend implementations by name; a name that no
plugin provides stops start-up with the list of known names. ``[plugins] block = ["name"]`` in
the config keeps an entry-point plugin from loading.

Provider hooks follow conda's style: they return (or yield) records naming implementations.
Two plugins providing the same name is an error, reported with both plugin names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import attrs
import pluggy

from .messages import Entry, HardState, Message, Snapshot

PROJECT = "raftcache"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# ================================================================================================
# What providers return
# ================================================================================================
class Storage(Protocol):
    """Durable home of one node's Raft log, hard state and newest snapshot.

    The node calls these from the gevent threadpool (never on the hub), one call at a time, so
    an implementation may block (fsync) and need not be thread-safe beyond that. A storage
    whose calls never block may say so with a class attribute ``blocking = False``; the node
    then calls it inline, saving a thread hop per Ready.
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

    def handle_request(self, request: Any) -> Any:
        """A client request (`raftcache.wire.Request`), answered with a `raftcache.wire.Response`.
        Blocks the calling greenlet until the answer is known; never raises."""

    def handle_peer_messages(self, messages: Sequence[Message],
                             sender: int | None = None) -> None:
        """Raft messages from a connection that proved it belongs to node `sender` (a node
        certificate, or the cluster secret); None when the transport runs without peer
        authentication, which the node accepts only with `cluster.insecure = true`. The node
        drops (and counts) messages not from `sender`, from non-members, or out of range
        (`raftcache.core.validate`). Returns at once; never raises."""


class Transport(Protocol):
    """One node's listener (client and peer traffic on one port) and its links to peers.

    A transport hands the node Raft messages only from connections that proved they are a
    node of this cluster, and names that node (`PeerHandler.handle_peer_messages`). It bounds
    what one connection can cost (frame size, a deadline for each whole frame, idle time) and
    how many connections clients may hold, so that peers always get in. It may offer
    ``max_frame`` (int): the largest frame it carries; the node then refuses writes that could
    not fit one append to a peer.
    """

    def serve(self, handler: PeerHandler) -> None:
        """Start listening on the node's address (spawn greenlets; return at once)."""

    def send(self, messages: Sequence[Message]) -> None:
        """Queue Raft messages for their peers (`message.to`). Never blocks; drops when a peer
        is unreachable or its queue is full (Raft retries)."""

    def close(self) -> None: ...


class Connection(Protocol):
    """A client's connection to one node."""

    def call(self, request: Any, timeout: float) -> Any:
        """Send a `raftcache.wire.Request`, return its `raftcache.wire.Response`. Raises
        OSError/TimeoutError on transport failure; then the connection is useless: close it."""

    def close(self) -> None: ...


class Backend(Protocol):
    """Where committed values live. The state machine keeps the catalog (key, version, expiry)
    and calls the backend only with values that are committed, in log order."""

    def get(self, key: bytes) -> bytes | None: ...
    def set(self, key: bytes, value: bytes) -> None: ...
    def delete(self, key: bytes) -> None: ...
    def clear(self) -> None:
        """Drop everything (before a snapshot is installed)."""

    def close(self) -> None: ...


@attrs.frozen
class StorageProvider:
    name: str
    factory: Callable[..., Storage]  # factory(node_id, data_dir, options: dict) -> Storage
    description: str = ""


@attrs.frozen
class TransportProvider:
    name: str
    # server(node_id, address, peers: dict[int, str], tls: TLSConfig | None, options) -> Transport
    # `options` is `[transport.options]` plus what the node sets: `cluster_id` (int) and
    # `peer_secret` (bytes, or None: the cluster secret that peers must prove they hold).
    server: Callable[..., Transport]
    # connect(address, tls: TLSConfig | None, timeout) -> Connection
    connect: Callable[..., Connection]
    description: str = ""


@attrs.frozen
class BackendProvider:
    name: str
    factory: Callable[..., Backend]  # factory(node_id, options: dict) -> Backend
    description: str = ""


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
    """Yield the storage implementations this plugin offers, by name (`storage.plugin`)."""


@hookspec
def raftcache_transports() -> Iterable[TransportProvider]:
    """Yield the transports this plugin offers, by name (`transport.plugin`)."""


@hookspec
def raftcache_backends() -> Iterable[BackendProvider]:
    """Yield the cache backends this plugin offers, by name (`backend.plugin`)."""


# ================================================================================================
# Node life cycle: observers; exceptions they raise are logged, never fatal
# ================================================================================================
@hookspec
def raftcache_node_started(node) -> None:
    """The node is serving: its transport listens and its driver loop runs."""


@hookspec
def raftcache_node_stopping(node) -> None:
    """The node is shutting down (SIGTERM/SIGINT or `Node.stop()`); storage is still open."""


@hookspec
def raftcache_role_changed(node, role: str, term: int, leader: int) -> None:
    """This node's role or the leader it knows changed."""


@hookspec
def raftcache_snapshot_taken(node, index: int, size: int) -> None:
    """The node took a snapshot covering the log up to `index` (`size` bytes)."""


@hookspec
def raftcache_snapshot_installed(node, index: int) -> None:
    """The node installed a snapshot received from the leader."""


# ================================================================================================
# The apply pipeline: runs on every replica, so it must be deterministic
# ================================================================================================
@hookspec
def raftcache_check_command(command, identity: str | None, stamp_ms: int) -> str | None:
    """Veto a committed command before it is applied: return a reason to refuse it, or None.

    Runs on every replica for every write, so decide only from the command, the identity
    recorded in the entry, the entry's stamp and replicated state - never from local clocks or
    files - or replicas will disagree. A vetoed write is reported to its client as
    Unauthorized(reason) and changes nothing.
    """


@hookspec
def raftcache_value_codecs() -> Iterable:
    """Yield value codecs: objects with ``encode(key, value) -> bytes`` and
    ``decode(key, blob) -> bytes``. Values are encoded, in plugin registration order, before
    they reach the log, snapshots and backends, and decoded in reverse order when read."""


@hookspec
def raftcache_metrics(node, metrics: dict) -> None:
    """Observe or add to the node's metrics (called for `status` and periodically)."""
