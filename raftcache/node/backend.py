"""How a node gets its backend: by provider name, composites (hybrid) with the instances they
name, and backends written to the first, simple protocol wrapped into the current one."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from raftcache.pluginapi import Backend, Change, ConfigError, PluginError
from raftcache.pluginapi.manager import PluginSet


def make_backend(plugins: PluginSet, name: str, node_id: int, options: dict,
                 where: str = "", plaintext: list | None = None) -> Backend:
    """The backend provider `name` made with `options`; ConfigError when the name is unknown or
    the options are refused, naming where they sit: `where` is the table holding ``plugin``
    and the options ("" for the ``[backend]`` section, whose options are ``backend.options``;
    "backend.options.instances.x" for an instance of a composite).

    ``encrypt_values = false`` among the options (any backend, any instance of a composite)
    is taken here, not by the plugin: the backend is wrapped so that its ``stores_plaintext``
    answers True, and the options' place is appended to `plaintext`."""
    plugin_key, options_key = (f"{where}.plugin", where) if where else ("backend.plugin",
                                                                          "backend.options")
    options = dict(options)
    encrypt = options.pop("encrypt_values", True)
    if type(encrypt) is not bool:
        raise ConfigError(f"{options_key}.encrypt_values: expected true or false, got "
                          f"{encrypt!r}")
    backend = _make(plugins, name, node_id, options, where, plugin_key, options_key, plaintext)
    if not encrypt:
        if plaintext is not None:
            plaintext.append(options_key)
        return PlaintextBackend(backend)
    return backend


def _make(plugins, name, node_id, options, where, plugin_key, options_key, plaintext):
    try:
        provider = plugins.backend(name)
    except PluginError as exc:
        raise ConfigError(f"{plugin_key}: {exc}") from None
    try:
        if provider.composite:
            def make(child: str, child_options: dict, child_where: str) -> Backend:
                return make_backend(plugins, child, node_id, child_options, child_where,
                                    plaintext)

            backend = provider.factory(node_id, options, make)
        else:
            backend = provider.factory(node_id, options)
    except ConfigError as exc:
        # Plugins name their options "backend.options.x": say where these ones really are.
        message = str(exc)
        if where and message.startswith("backend.options.") and not message.startswith(where):
            message = where + message[len("backend.options"):]
        raise ConfigError(message) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{options_key}: {exc}") from None
    return backend if hasattr(backend, "apply") else SimpleBackend(backend)


class SimpleBackend:
    """A backend of the first protocol (get, set, delete, clear) as the current one. It keeps
    nothing across restarts as far as the node knows (`open` returns None), applies changes one
    by one and never evicts."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def open(self, owner: str) -> None:
        return None

    def get(self, key: bytes) -> bytes | None:
        return self.inner.get(key)

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        return [self.inner.get(k) for k in keys]

    def apply(self, index: int, changes: Iterable[Change]) -> list[bytes]:
        for key, value, _ttl in changes:
            if value is None:
                self.inner.delete(key)
            else:
                self.inner.set(key, value)
        return []

    def load(self, index: int, items: Iterable[Change], stale: Iterable[bytes]) -> list[bytes]:
        for key in stale:
            self.inner.delete(key)
        return self.apply(index, items)

    def close(self) -> None:
        self.inner.close()


class PlaintextBackend:
    """A backend whose options say ``encrypt_values = false``: values routed to it are stored
    as the client wrote them (``stores_plaintext`` is True for every key); everything else is
    the wrapped backend's."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def stores_plaintext(self, key: bytes) -> bool:
        return True

    def __getattr__(self, name):
        return getattr(self.inner, name)
