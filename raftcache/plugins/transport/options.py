"""`[transport.options]`: the options both built-in transports take, and what a client hears
when its request is over the limits they set.

Contract: `TransportOptions` is frozen and validated on construction (every size and timeout
must be positive: `pluginapi.positive` refuses it with an OptionError naming the key); each
transport subclasses it (adding keys of its own, if any) with a `from_dict` that reads
`[transport.options]` through `parse_options`. Nothing here does I/O.
"""

from __future__ import annotations

import attrs

from raftcache.pluginapi import positive


@attrs.frozen
class TransportOptions:
    """`[transport.options]` that both built-in transports take (each may add its own); every
    key is optional, seconds are floats."""

    handshake_timeout: float = attrs.field(default=5.0, converter=float, validator=positive)
    idle_timeout: float = attrs.field(default=60.0, converter=float, validator=positive)
    # A read stalled mid-frame or a write stalled this long closes the connection.
    io_timeout: float = attrs.field(default=10.0, converter=float, validator=positive)
    # A frame must arrive whole within this long of its first byte (slow-drip clients).
    frame_timeout: float = attrs.field(default=30.0, converter=float, validator=positive)
    max_frame: int = attrs.field(default=16 << 20, converter=int, validator=positive)
    # List, set and map elements in one client request (keys of an mget, items of an mset):
    # counted before decoding, so that no frame costs more than milliseconds to decode.
    max_request_items: int = attrs.field(default=16384, converter=int, validator=positive)
    # Connections from clients (anything that has not proved it is a peer), in all and from
    # one source address; when full, the longest-idle one is closed to make room, or the
    # newcomer is refused at once. Peers do not count: they always get in.
    max_connections: int = attrs.field(default=1024, converter=int, validator=positive)
    max_connections_per_source: int = attrs.field(default=256, converter=int,
                                                  validator=positive)
    peer_queue: int = attrs.field(default=4096, converter=int, validator=positive)
    peer_batch: int = attrs.field(default=256, converter=int, validator=positive)
    connect_timeout: float = attrs.field(default=2.0, converter=float, validator=positive)
    reconnect_min: float = attrs.field(default=0.05, converter=float, validator=positive)
    reconnect_max: float = attrs.field(default=2.0, converter=float, validator=positive)
    # Set by the node, not in [transport.options]: the cluster's id, its secret (None: peers
    # prove themselves with TLS node certificates, or not at all), and node.max_request_bytes.
    cluster_id: int = attrs.field(default=0, converter=int)
    peer_secret: bytes | None = attrs.field(default=None, repr=False)
    max_request_bytes: int = attrs.field(default=4 << 20, converter=int, validator=positive)

    @property
    def max_request_frame(self) -> int:
        """The longest frame a connection that is not a proven peer may send. Anything longer
        cannot hold an acceptable write (keys, headers and framing take far less than the
        slack), so it is answered from its first bytes and the rest is read and dropped."""
        return min(self.max_frame, self.max_request_bytes + REQUEST_SLACK)


REQUEST_SLACK = 1 << 20
# What a client hears when its request could not fit node.max_request_bytes.
TOO_LARGE = ("the request takes {} bytes, more than a write may (node.max_request_bytes is {}); "
             "nothing was applied")

# What a client hears when its request holds more than max_request_items elements.
TOO_MANY_ITEMS = ("the request holds more than {} keys, values or list items "
                  "(transport.options.max_request_items); send fewer at once")
