"""The plugin manager: built-in and third-party plugins, loaded the same way.

Every plugin, ours included, is an entry point in the group ``raftcache`` (see setup.cfg). The
config names implementations; `PluginSet.storage("file-wal")` and friends resolve them and fail
with the list of known names. Every hook is called through pluggy (its tracing and wrappers
apply); where the node needs to know which plugin answered or failed, it calls one plugin at a
time through pluggy's subset callers.
"""

from __future__ import annotations

import importlib.metadata
import logging

import pluggy

from . import hookspecs
from .errors import PluginError
from .interfaces import BackendProvider, StorageProvider, TransportProvider

log = logging.getLogger("raftcache.plugins")


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
    check_hooks(pm)
    return pm


def check_hooks(pm: pluggy.PluginManager) -> None:
    """Refuse a plugin that implements a hook no spec names (a misspelt hook would otherwise
    never be called), in one line naming the plugin and the hook."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        name = pm.get_name(exc.plugin)
        if name == str(id(exc.plugin)):  # registered without a name (make_manager's extra)
            name = getattr(exc.plugin, "__name__", type(exc.plugin).__name__)
        unknown = next(n for n in vars(pm.hook) if not n.startswith("_")
                       and not getattr(pm.hook, n).has_spec()
                       and any(i.plugin is exc.plugin for i in getattr(pm.hook, n).get_hookimpls()))
        known = sorted(n for n in vars(hookspecs) if n.startswith("raftcache_"))
        raise PluginError(f"plugin {name!r} implements {unknown!r}, which is no hook "
                          f"(known hooks: {', '.join(known)})") from None


def per_plugin(pm: pluggy.PluginManager, name: str):
    """(plugin name, a pluggy caller of hook `name` that reaches only that plugin) for each
    plugin that implements it, in registration order."""
    hook = getattr(pm.hook, name)
    plugins = [impl.plugin for impl in hook.get_hookimpls()]
    for impl in hook.get_hookimpls():
        others = [p for p in plugins if p is not impl.plugin]
        yield impl.plugin_name, pm.subset_hook_caller(name, remove_plugins=others)


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
        for plugin_name, call in per_plugin(self.pm, hook.name):
            for provider in (p for result in call() for p in (result or ())):
                if provider.name in found:
                    raise PluginError(
                        f"{kind} {provider.name!r} is provided twice: by plugin "
                        f"{owners[provider.name]!r} and by plugin {plugin_name!r}"
                    )
                found[provider.name] = provider
                owners[provider.name] = plugin_name
        return found

    def names(self, kind: str) -> list[str]:
        return sorted(self._kinds[kind])

    def get(self, kind: str, name: str):
        try:
            return self._kinds[kind][name]
        except KeyError:
            known = ", ".join(self.names(kind)) or "none"
            raise PluginError(f"unknown {kind} {name!r} (known: {known})") from None

    def storage(self, name: str) -> StorageProvider:
        return self.get("storage", name)

    def transport(self, name: str) -> TransportProvider:
        return self.get("transport", name)

    def backend(self, name: str) -> BackendProvider:
        return self.get("backend", name)


def notify(pm: pluggy.PluginManager, name: str, logger, **kwargs) -> None:
    """Call every implementation of observer hook `name` with `kwargs`, one plugin at a time:
    one that raises is logged with its plugin's name and the others still run (an observer
    must never stop a node, and a single pluggy call stops at the first exception)."""
    for plugin_name, call in per_plugin(pm, name):
        try:
            call(**kwargs)
        except Exception:
            logger.exception("plugin %r: %s failed; carrying on", plugin_name, name)


def entry_point_names() -> list[str]:
    """Names of every plugin declared in the `raftcache` entry-point group."""
    return sorted(ep.name for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT))
