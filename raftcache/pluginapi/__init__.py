"""The plugin API: everything a raftcache plugin imports, in one place.

- `hookspecs`: the hooks raftcache calls (the plugin author's manual) and ``hookimpl``;
- `interfaces`: what providers make (storages, transports, connections, backends, value
  codecs), their factories and the provider records;
- `context`: `NodeContext`, what hooks are handed instead of the node;
- `errors`: what plugins raise (ConfigError, OptionError, BackendUnavailable, BackendLost,
  Unauthorized) and what the plugin manager raises (PluginError);
- `options`: reading a plugin's options table like the rest of a node's config;
- `manager`: how plugins are found (entry points) and called;
- `throttle`: log lines a hostile peer could otherwise repeat a thousand times a second.

The values plugins handle (Raft entries and messages, cache commands and changes, client
requests) are the pure core's, `raftcache.core`, and are importable from there.
"""

from raftcache.core.cache.commands import Caller, Configure
from raftcache.core.cache.statemachine import Change, Setting, ValueCodecError

from .context import NodeContext
from .errors import (
    BackendLost,
    BackendUnavailable,
    ConfigError,
    OptionError,
    PluginError,
    Unauthorized,
)
from .hookspecs import PROJECT, hookimpl, hookspec
from .interfaces import (
    Backend,
    BackendFactory,
    BackendProvider,
    CompositeBackendFactory,
    Connection,
    DevServer,
    PeerHandler,
    Storage,
    StorageFactory,
    StorageProvider,
    TLSConfig,
    Transport,
    TransportConnect,
    TransportProvider,
    TransportServer,
    ValueCodec,
)
from .options import parse_options, positive, private_dir, redact_url, write_private

__all__ = [
    "PROJECT", "Backend", "BackendFactory", "BackendLost", "BackendProvider", "BackendUnavailable",
    "Caller", "Change", "CompositeBackendFactory", "ConfigError", "Configure", "Connection",
    "DevServer", "NodeContext", "OptionError", "PeerHandler", "PluginError", "Setting", "Storage",
    "StorageFactory", "StorageProvider", "TLSConfig", "Transport", "TransportConnect",
    "TransportProvider", "TransportServer", "Unauthorized", "ValueCodec", "ValueCodecError",
    "hookimpl", "hookspec", "parse_options", "positive", "private_dir", "redact_url",
    "write_private",
]
