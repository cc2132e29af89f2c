"""Deliberately broken access control, so that tests can prove they catch each bug
(`python -m raftcache.testing.node --mutant rbac-...`). Each replaces the node's `rbac` plugin
with one that is wrong in one way and right in every other."""

from __future__ import annotations

from raftcache.pluginapi import Unauthorized, hookimpl
from raftcache.plugins.security import rbac


class _RBAC:
    """The real plugin, hook for hook; subclasses break one thing."""

    def settings(self, settings):
        return settings

    def now(self, node, stamp_ms: int) -> int:
        return stamp_ms

    @hookimpl
    def raftcache_node_started(self, node):
        return rbac.raftcache_node_started(node=node)

    @hookimpl
    def raftcache_authenticate(self, node, token):
        auth = node.config.auth
        if not auth.public_keys:
            return None
        if not token:
            if auth.required:
                raise Unauthorized("this cluster requires a token")
            return None
        caller = rbac._verifier(node).verify(token)
        reason = rbac.validity(caller, self.now(node, node.now_ms()), None)
        if reason:
            raise Unauthorized(reason)
        return caller

    @hookimpl
    def raftcache_check_request(self, node, op, keys, caller, stamp_ms, settings):
        return rbac.raftcache_check_request(node=node, op=op, keys=keys, caller=caller,
                                            stamp_ms=self.now(node, stamp_ms),
                                            settings=self.settings(settings))

    @hookimpl
    def raftcache_check_command(self, command, stamp_ms, caller, settings):
        return rbac.raftcache_check_command(command=command, stamp_ms=stamp_ms, caller=caller,
                                            settings=self.settings(settings))

    @hookimpl
    def raftcache_admin(self, node, action, args, caller):
        return rbac.raftcache_admin(node=node, action=action, args=args, caller=caller)


class IgnoresRevocation(_RBAC):
    """Forgets `auth.revoked.*`: a revoked token reads, and writes on this replica."""

    def settings(self, settings):
        return {k: v for k, v in settings.items() if not k.startswith(rbac.REVOKED)}


class LocalClock(_RBAC):
    """Judges a token's times by this node's own clock instead of the replicated stamps."""

    def __init__(self, clock):
        self.clock = clock  # the node's wall clock (hooks see only its cluster time)

    def now(self, node, stamp_ms: int) -> int:
        return int(self.clock() * 1000)


def _swap(make_broken):
    """A node mutant: the node's rbac plugin replaced by `make_broken(the node)` (it gets the
    `raftcache.node.Node` itself, which only test code may touch; hooks get a NodeContext)."""
    def mutate(host) -> None:
        host.pm.unregister(name="rbac")
        host.pm.register(make_broken(host), name="rbac-mutant")
    return mutate


AUTH_MUTANTS = {
    "rbac-ignores-revocation": _swap(lambda host: IgnoresRevocation()),
    "rbac-local-clock": _swap(lambda host: LocalClock(lambda: host.clock())),
}
