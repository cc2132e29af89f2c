"""The errors plugins raise, and those the node raises to them."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration mistake, phrased for the operator: file, key, what is accepted."""


class OptionError(ValueError):
    """Raised by a plugin's options class (in a converter, validator or __attrs_post_init__)
    for one of its options: `parse_options` names the full key."""

    def __init__(self, option: str, problem: str):
        super().__init__(f"{option}: {problem}")
        self.option = option
        self.problem = problem


class PluginError(Exception):
    """A plugin could not be loaded, or a name is unknown or provided twice."""


class BackendUnavailable(OSError):
    """The backend's server cannot be reached or answered too slowly. The node answers reads
    Unavailable (the client tries another node), keeps retrying the apply with backoff and
    serves again once it went through: nothing is skipped and nothing older is ever served."""


class BackendLost(Exception):
    """The backend no longer holds what it was told to hold (its server restarted empty, or
    another writer replaced its bookkeeping). The node rebuilds it from its snapshot and log
    (`load`, then the entries since), answering reads Unavailable meanwhile."""


class Unauthorized(Exception):
    """Raised by an access-control hook: the call is refused with ``Unauthorized(reason)``."""

