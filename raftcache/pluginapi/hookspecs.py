"""The hooks raftcache calls: the plugin author's manual.

raftcache uses pluggy, like pytest. A plugin is a module or object with functions marked
``@hookimpl`` whose names match the specs below; an implementation may take any subset of a
hook's arguments, by name. A function named ``raftcache_*`` that matches no spec stops start-up
with one line naming it (a misspelt hook would otherwise never be called). Plugins are found
through the entry-point group ``raftcache`` (the built-in ones are registered there too,
exactly like third-party ones), e.g. in your package's setup.cfg::

    [options.entry_points]
    raftcache =
        audit-log = my_package.audit_plugin

Entry-point plugins load sorted by name; plugins handed to ``make_manager(extra=...)`` (tests,
embedding applications) come after them. ``[plugins] block = ["name"]`` in a node's config keeps
an entry-point plugin from loading. `examples/raftcache-audit-log` is a complete third-party
plugin package. Everything a plugin needs is importable from `raftcache.pluginapi`.

There are four kinds of hooks:

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

Hooks are called with keyword arguments. ``node`` is a `NodeContext`
(`raftcache.pluginapi.context`): the node's id, config and logger, its cluster time, the
replicated settings, its status and a read of settled values. It is all a plugin may know of
the node: the node itself is not handed out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import pluggy

from raftcache.core.cache.commands import Caller
from raftcache.core.cache.statemachine import Setting

from .context import NodeContext
from .interfaces import BackendProvider, StorageProvider, TransportProvider, ValueCodec

PROJECT = "raftcache"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


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
def raftcache_node_started(node: NodeContext) -> None:
    """The node is serving: its transport listens and its driver loop runs.

    :param node: the node.
    """


@hookspec
def raftcache_node_stopping(node: NodeContext) -> None:
    """The node is shutting down (SIGTERM/SIGINT or `Node.stop()`); storage is still open.

    :param node: the node.
    """


@hookspec
def raftcache_role_changed(node: NodeContext, role: str, term: int, leader: int) -> None:
    """This node's role, or the leader it knows, changed. Called after the change is durable,
    on each node for itself.

    :param node: the node.
    :param role: "follower", "pre_candidate", "candidate" or "leader".
    :param term: the node's term.
    :param leader: the id of the leader it knows, 0 for none.
    """


@hookspec
def raftcache_snapshot_taken(node: NodeContext, index: int, size: int) -> None:
    """The node took a snapshot of its state machine and dropped the log up to `index`.

    :param node: the node.
    :param index: the last log index the snapshot covers.
    :param size: the snapshot's size in bytes.
    """


@hookspec
def raftcache_snapshot_installed(node: NodeContext, index: int) -> None:
    """The node replaced its state with a snapshot received from the leader (it was too far
    behind for the log).

    :param node: the node.
    :param index: the last log index the snapshot covers.
    """


@hookspec
def raftcache_metrics(node: NodeContext, metrics: dict) -> None:
    """Read or add to the node's metrics. Called when the node starts and every ten seconds
    after, at each scrape of its /metrics (number values you add show as
    ``raftcache_plugin_<key>``) and whenever `Node.metrics()` is asked (not by the ``status``
    call).

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

    :param command: a `raftcache.core.cache.commands` command (Put, Remove, Cas, Incr, Invalidate,
        MSet, Append, Configure, Reseal) as in the log, its values encoded by the value codecs.
    :param identity: the caller's identity recorded in the entry by the node that took the
        write, or None (no authentication).
    :param stamp_ms: the entry's time: the proposing leader's cluster time, never going
        backwards.
    :param caller: what the node that took the write verified of its caller
        (`raftcache_authenticate`), recorded in the entry; None for an anonymous write.
    :param settings: the replicated cluster settings as of this entry (`commands.Configure`
        writes them): name -> `Setting(value, stamp_ms, index)`. Read only.
    """


@hookspec
def raftcache_value_codecs(node: NodeContext) -> Iterable[ValueCodec]:
    """Yield value codecs (`ValueCodec`): encryption, compression.

    Called once when a node starts, before its state machine exists; a codec that needs the
    replicated settings (data keys) keeps `node` and reads ``node.settings`` when it runs. A
    value is encoded by every codec in plugin registration order (entry-point plugins by
    name, then extra plugins; within a plugin, in the order it yields them), before it
    reaches the log, snapshots and backends, and decoded in the reverse order when read. Codecs must be the same on every node of a cluster.
    `raftcache.plugins.security.encryption` is the built-in one (encryption at rest).
    """


# ================================================================================================
# Access control: on the node a client called
# ================================================================================================
@hookspec(firstresult=True)
def raftcache_authenticate(node: NodeContext, token: str | None, certificate: str | None,
                           source: str | None) -> Caller | None:
    """Who is calling: verify the request's `token` (or map its client certificate) and
    return the `Caller` it proves, which the node records in the entries it proposes for the
    call. Raise `Unauthorized(reason)` for
    a token that is forged, malformed, expired or unknown, or for a missing token when
    authentication is required. Return None when the plugin does not authenticate (the call
    runs anonymously); the first implementation that returns a Caller decides.

    Runs on every client call but ``status``, so it must be quick (cache verified tokens).

    :param node: the node that received the call.
    :param token: ``RequestHeader.token``, or None.
    :param certificate: the CN of the TLS client certificate the call came with, or None.
    :param source: the address (host) the call's connection came from, or None: what a
        plugin bounds the work a source can cause (token verifications) by.
    """


@hookspec(firstresult=True)
def raftcache_check_request(node: NodeContext, op: str, keys: Sequence[bytes],
                            caller: Caller | None,
                            stamp_ms: int, settings: Mapping[str, Setting]) -> str | None:
    """Veto a read or a node operation on the node that serves it: return the reason (the
    client gets ``Unauthorized(reason)``), or None. Reads are checked once their read index
    is applied, so a revocation committed before the read is in `settings`.

    :param node: the node.
    :param op: the operation (`raftcache.core.operations.OPERATIONS`): "get", "mget",
        "transfer_leader", "change_member" or "admin".
    :param keys: the keys a read asks for (empty for node operations).
    :param caller: what `raftcache_authenticate` returned, or None (anonymous).
    :param stamp_ms: the node's cluster time (`NodeContext.now_ms`).
    :param settings: the replicated settings this node has applied.
    """


@hookspec(firstresult=True)
def raftcache_admin(node: NodeContext, action: str, args: Sequence[bytes],
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
