"""The plugin manager: built-in and third-party plugins, loaded the same way.

Every plugin, ours included, is an entry point in the group ``raftcache`` (see setup.cfg). The
config names implementations; `PluginSet.storage("file-wal")` and friends resolve them and fail
with the list of known names.
"""

from __future__ import annotations

import importlib.metadata
import logging

import pluggy

from . import hookspecs

log = logging.getLogger("raftcache.plugins")


class PluginError(Exception):
    """A plugin could not be loaded, or a name is unknown or provided twice."""


def make_manager(block: tuple[str, ...] | list[str] = (), extra=()) -> pluggy.PluginManager:
    """A plugin manager with every entry-point plugin loaded except the `block`ed ones.

    `extra` registers plugin objects directly (tests, embedding applications).
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in block:
        pm.set_blocked(name)
    for ep in sorted(importlib.metadata.entry_points(group=hookspecs.PROJECT),
                     key=lambda ep: ep.name):
        if pm.is_blocked(ep.name) or pm.has_plugin(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken plugin must name itself
            raise PluginError(f"plugin {ep.name!r} ({ep.value}) failed to load: {exc!r}") from exc
        pm.register(plugin, name=ep.name)
    for plugin in extra:
        pm.register(plugin)
    return pm


class PluginSet:
    """The named implementations that the loaded plugins provide."""

    def __init__(self, pm: pluggy.PluginManager):
        self.pm = pm
        self._kinds = {
            "storage": self._collect(pm.hook.raftcache_storages, "storage"),
            "transport": self._collect(pm.hook.raftcache_transports, "transport"),
            "backend": self._collect(pm.hook.raftcache_backends, "backend"),
        }

    def _collect(self, hook, kind: str) -> dict:
        found: dict = {}
        owners: dict = {}
        for impl in hook.get_hookimpls():
            for provider in impl.function() or ():
                if provider.name in found:
                    raise PluginError(
                        f"{kind} {provider.name!r} is provided twice: by plugin "
                        f"{owners[provider.name]!r} and by plugin {impl.plugin_name!r}"
                    )
                found[provider.name] = provider
                owners[provider.name] = impl.plugin_name
        return found

    def names(self, kind: str) -> list[str]:
        return sorted(self._kinds[kind])

    def get(self, kind: str, name: str):
        try:
            return self._kinds[kind][name]
        except KeyError:
            known = ", ".join(self.names(kind)) or "none"
            raise PluginError(f"unknown {kind} {name!r} (known: {known})") from None

    def storage(self, name: str) -> hookspecs.StorageProvider:
        return self.get("storage", name)

    def transport(self, name: str) -> hookspecs.TransportProvider:
        return self.get("transport", name)

    def backend(self, name: str) -> hookspecs.BackendProvider:
        return self.get("backend", name)


def notify(hook, logger, **kwargs) -> None:
    """Call every implementation of observer `hook` with `kwargs` (each takes the arguments it
    names). One that raises is logged with its plugin's name and the others still run: an
    observer must never stop a node, and pluggy's own call stops at the first exception."""
    for impl in hook.get_hookimpls():
        try:
            impl.function(*(kwargs[name] for name in impl.argnames))
        except Exception:
            logger.exception("plugin %r: %s failed; carrying on", impl.plugin_name, hook.name)


def entry_point_names() -> list[str]:
    """Names of every plugin declared in the `raftcache` entry-point group."""
    return sorted(ep.name for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT))
