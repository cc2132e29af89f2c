"""How a node gets its backend: by provider name, composites (hybrid) with the instances they
name, and backends written to the first, simple protocol wrapped into the current one."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .config import ConfigError
from .hookspecs import Backend, Change
from .plugins import PluginError, PluginSet


def make_backend(plugins: PluginSet, name: str, node_id: int, options: dict,
                 where: str = "") -> Backend:
    """The backend provider `name` made with `options`; ConfigError when the name is unknown or
    the options are refused, naming where they sit: `where` is the table holding ``plugin``
    and the options ("" for the ``[backend]`` section, whose options are ``backend.options``;
    "backend.options.instances.x" for an instance of a composite)."""
    plugin_key, options_key = (f"{where}.plugin", where) if where else ("backend.plugin",
                                                                          "backend.options")
    try:
        provider = plugins.backend(name)
    except PluginError as exc:
        raise ConfigError(f"{plugin_key}: {exc}") from None
    try:
        if provider.composite:
            def make(child: str, child_options: dict, child_where: str) -> Backend:
                return make_backend(plugins, child, node_id, child_options, child_where)

            backend = provider.factory(node_id, dict(options), make)
        else:
            backend = provider.factory(node_id, dict(options))
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
