"""The `hybrid` backend: keys routed to named backend instances by ordered rules.

Options (``[backend.options]``), e.g. sessions in Memcached, configuration in Redis, the rest
in memory (examples/hybrid/hybrid.toml)::

    [backend]
    plugin = "hybrid"
    [backend.options]
    default = "local"
    routes = [{ match = "session:*", to = "sessions" }, { match = "config:", to = "config" }]
    [backend.options.instances.sessions]
    plugin = "memcached"
    address = "127.0.0.1:11211"
    [backend.options.instances.config]
    plugin = "redis"
    url = "redis://127.0.0.1:6379/0"
    [backend.options.instances.local]
    plugin = "memory"

- ``instances``: name -> a table with ``plugin`` (any backend but another hybrid) and that
  plugin's own options.
- ``routes``: tried in order, the first that matches a key wins. ``match`` is a glob when it
  holds ``*``, ``?`` or ``[`` (matched against the whole key, bytewise), else a key prefix.
- ``default``: the instance for keys no route matches.
- ``encrypt_values = false`` in an instance's table: values routed there are stored unsealed
  even when encryption at rest is on (a farm applications read directly; docs/backends.md).

Routing is a pure function of the key, so every replica routes alike. Each apply batch goes to
every instance it touches (an instance down stalls the node's applies until it is back, so
`mset` and `invalidate` across routes never stay half done); mget asks each instance once.
Each route keeps its backend's semantics (a Memcached route is "linearizable or miss").
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Sequence

from raftcache.pluginapi import Backend, BackendProvider, Change, ConfigError, hookimpl

_GLOB = re.compile(r"[*?\[]")

# examples/hybrid/hybrid.toml's options (sessions in memcached, configuration in redis, the
# rest in memory): what the fault suite and `raftcache bench` run `hybrid` with when their
# config gives no options. Its instances name no servers: a local cluster starts them.
EXAMPLE_OPTIONS = {
    "default": "local",
    "routes": [{"match": "session:*", "to": "sessions"},
               {"match": "config:*", "to": "config"}],
    "instances": {"sessions": {"plugin": "memcached"}, "config": {"plugin": "redis"},
                  "local": {"plugin": "memory"}},
}


def route_matcher(pattern: str) -> Callable[[bytes], bool]:
    """A glob (with * ? [) matched against the whole key, else a prefix; bytewise."""
    raw = pattern.encode("utf-8")
    if not _GLOB.search(pattern):
        return lambda key: key.startswith(raw)
    # fnmatch on latin-1 text is bytewise matching; DOTALL lets * match newlines in keys.
    regex = re.compile(fnmatch.translate(raw.decode("latin-1")).encode("latin-1"), re.DOTALL)
    return lambda key: regex.match(key) is not None


class HybridBackend:
    def __init__(self, instances: dict[str, Backend], routes: list, default: str):
        self.instances = instances
        self.names = list(instances)
        self.routes = routes  # [(matcher, instance name)]
        self.default = default

    def route(self, key: bytes) -> str:
        for matches, name in self.routes:
            if matches(key):
                return name
        return self.default

    def stores_plaintext(self, key: bytes) -> bool:
        """Whether `key`'s route opted out of encryption at rest (``encrypt_values = false`` in
        its instance's table): a pure function of the key and the config, like routing."""
        asks = getattr(self.instances[self.route(key)], "stores_plaintext", None)
        return bool(asks is not None and asks(key))

    def _split(self, changes: Iterable[Change]) -> dict[str, list[Change]]:
        parts: dict[str, list[Change]] = {}
        for change in changes:
            parts.setdefault(self.route(change.key), []).append(change)
        return parts

    def open(self, owner: str) -> int | None:
        # The node replays from the oldest: an instance that holds more takes entries again,
        # which ends in the same state.
        found = [self.instances[n].open(f"{owner} route {n}") for n in self.names]
        return None if None in found else min(found)

    def get(self, key: bytes) -> bytes | None:
        return self.instances[self.route(key)].get(key)

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        by_instance: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            by_instance.setdefault(self.route(key), []).append(i)
        out: list[bytes | None] = [None] * len(keys)
        for name, positions in by_instance.items():
            values = self.instances[name].get_many([keys[i] for i in positions])
            for i, value in zip(positions, values, strict=True):
                out[i] = value
        return out

    def apply(self, index: int, changes: Iterable[Change]) -> list[bytes]:
        evicted: list[bytes] = []
        for name, part in self._split(changes).items():
            evicted += self.instances[name].apply(index, part)
        return evicted

    def load(self, index: int, items: Iterable[Change], stale: Iterable[bytes]) -> list[bytes]:
        parts = self._split(items)
        stale_parts = self._split(Change(key, None) for key in stale)
        evicted: list[bytes] = []
        for name in self.names:  # every one: each records the index
            evicted += self.instances[name].load(
                index, parts.get(name, []), [c.key for c in stale_parts.get(name, [])])
        return evicted

    def close(self) -> None:
        for instance in self.instances.values():
            instance.close()


def make_hybrid_backend(node_id: int, options: dict, make_backend) -> HybridBackend:
    where = "backend.options"
    unknown = set(options) - {"instances", "routes", "default"}
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown key (accepted: default, "
                          "instances, routes)")
    tables = options.get("instances")
    if not isinstance(tables, dict) or not tables:
        raise ConfigError(f"{where}.instances: missing: a table of named backend instances, "
                          'e.g. [backend.options.instances.local] plugin = "memory"')
    instances = {}
    try:
        for name, table in tables.items():
            here = f"{where}.instances.{name}"
            if not isinstance(table, dict) or not isinstance(table.get("plugin"), str):
                raise ConfigError(f"{here}.plugin: missing (the backend this instance uses)")
            if table["plugin"] == "hybrid":
                raise ConfigError(f"{here}.plugin: a hybrid instance cannot be hybrid")
            child = {k: v for k, v in table.items() if k != "plugin"}
            instances[name] = make_backend(table["plugin"], child, here)
        default = options.get("default")
        if default not in instances:
            raise ConfigError(f"{where}.default: {default!r} is not an instance (instances: "
                              f"{', '.join(instances)})")
        routes = []
        for n, rule in enumerate(options.get("routes", [])):
            here = f"{where}.routes[{n}]"
            if (not isinstance(rule, dict) or set(rule) != {"match", "to"}
                    or not isinstance(rule["match"], str) or not rule["match"]):
                raise ConfigError(f'{here}: expected {{ match = "prefix or glob", to = '
                                  '"instance" }')
            if rule["to"] not in instances:
                raise ConfigError(f"{here}.to: {rule['to']!r} is not an instance (instances: "
                                  f"{', '.join(instances)})")
            routes.append((route_matcher(rule["match"]), rule["to"]))
    except BaseException:
        for instance in instances.values():
            instance.close()
        raise
    return HybridBackend(instances, routes, default)


@hookimpl
def raftcache_backends():
    yield BackendProvider(
        "hybrid", make_hybrid_backend,
        "keys routed by prefix or glob to named memory, redis or memcached instances",
        composite=True, dev_instances="instances", dev_options=EXAMPLE_OPTIONS)
