"""What a hook is handed instead of the node: `NodeContext`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import attrs

from raftcache.core import api
from raftcache.core.cache.statemachine import Setting

if TYPE_CHECKING:
    from raftcache.node.config import Config


@attrs.frozen(eq=False)
class NodeContext:
    """One node, as its plugins see it: who it is, its config and logger, its time, the
    replicated settings, and reads of what it has applied. The node makes one at start and
    hands the same one to every hook (so a plugin may key its own state by it).

    The node behind it is not reachable from here, on purpose: a plugin that needs more asks
    for a new method on this class, and that method becomes part of the plugin API.
    """

    id: int
    config: Config
    log: logging.LoggerAdapter  # lines name the node, its term and role
    # Where the backend stores values unsealed (`encrypt_values = false`), by option place.
    plaintext_routes: tuple[str, ...]
    _now_ms: Callable[[], int]
    _settings: Callable[[], Mapping[str, Setting]]
    _read_settled: Callable[[Sequence[bytes]], list]
    _keys_at: Callable[[int, int], list]
    _key_count: Callable[[], int]
    _stores_plaintext: Callable[[bytes], bool]
    _codecs: Callable[[], tuple]
    _status: Callable[[], api.NodeStatus]

    def now_ms(self) -> int:
        """The node's cluster time in ms: its clock while within 250 ms of the time a majority
        of voters' clocks agree on (else that time), never before the newest stamp it
        applied, never going backwards (what stamps the writes it proposes; docs/security.md,
        "Cluster time")."""
        return self._now_ms()

    @property
    def settings(self) -> Mapping[str, Setting]:
        """The replicated settings this node has applied (read only)."""
        return self._settings()

    def read_settled(self, keys: Sequence[bytes]) -> list:
        """(stored blob, version) or None for each key, as the state machine holds them
        between apply batches (never half a batch). Raises `BackendUnavailable` when the
        backend is down or the node is catching up."""
        return self._read_settled(keys)

    def keys_at(self, position: int, count: int) -> list[bytes]:
        """Up to `count` keys from `position` on, in the order they were first written."""
        return self._keys_at(position, count)

    def key_count(self) -> int:
        """How many keys the node holds."""
        return self._key_count()

    def stores_plaintext(self, key: bytes) -> bool:
        """Whether the backend keeps `key`'s value as the client wrote it (`encrypt_values =
        false` on the route it takes)."""
        return self._stores_plaintext(key)

    @property
    def codecs(self) -> tuple:
        """The node's value codecs, in encoding order (empty until they are made)."""
        return self._codecs()

    def status(self) -> api.NodeStatus:
        """What the ``status`` call answers: role, term, leader, members."""
        return self._status()
