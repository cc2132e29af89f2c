"""Reading frames from a socket under deadlines: the buffer a transport's frame parser takes
whole frames from, and the errors that end a connection.

Contract: a transport's frame parser asks `SocketBuffer.fill(n)` for the bytes it needs and
`take`s whole frames. Mid-frame, a silence longer than the socket's timeout, an EOF, or a
frame whose first byte came more than `frame_timeout` ago raise ProtocolError (close the
connection); between frames, silence past `idle_timeout` raises Idle and a clean EOF is
`fill` returning False. A frame over the connection's limit is the parser's to report as
Oversized, and `discard` then reads it without keeping it. A long frame yields to the other
greenlets every megabyte.
"""

from __future__ import annotations

import math
import time

import gevent

_RECV = 65536
_YIELD_EVERY = 1 << 20  # bytes of one frame read between two turns for the other greenlets


class ProtocolError(Exception):
    """The other end broke the framing rules; the connection is closed."""


class Idle(Exception):
    """No frame started within idle_timeout."""


class Oversized(Exception):
    """A frame longer than this connection may send; `head` holds its first bytes (enough to
    answer it), the rest was never read."""

    def __init__(self, length: int, head: bytes):
        super().__init__(f"a frame of {length} bytes")
        self.length = length
        self.head = head


HEAD_BYTES = 256  # of an oversized frame, read to name the call it carries


def _pace(paced: int, n: int) -> int:
    # A big frame that arrives as fast as it is read would keep its greenlet running (gevent
    # switches only when a read would block): give the others a turn every megabyte, so the
    # node's ticks and heartbeats go on while a 16 MiB frame comes in.
    paced += n
    if paced < _YIELD_EVERY:
        return paced
    gevent.sleep(0)
    return 0


class SocketBuffer:
    """Bytes read from a socket, for a frame parser to take whole frames from. A socket timeout,
    when set, is the longest silence tolerated mid-frame and the polling period of
    `idle_timeout` (the longest silence between frames); a frame whose first byte arrived more
    than `frame_timeout` ago ends the connection however steadily its bytes drip in."""

    __slots__ = ("sock", "buf", "max_frame", "frame_timeout", "_started")

    def __init__(self, sock, max_frame: int, frame_timeout: float = math.inf):
        self.sock = sock
        self.buf = bytearray()
        self.max_frame = max_frame
        self.frame_timeout = frame_timeout
        self._started: float | None = None  # when the frame being read was first seen

    def fill(self, need: int, idle_timeout: float) -> bool:
        """Read until `need` bytes are buffered; False on a clean EOF between frames."""
        idle_since = time.monotonic()
        paced = 0
        while len(self.buf) < need:
            chunk = self._recv(bool(self.buf), idle_since, idle_timeout)
            if chunk is None:
                continue
            if not chunk:
                return False
            self.buf += chunk
            paced = _pace(paced, len(chunk))
        return True

    def discard(self, end: int) -> None:
        """Read and drop the frame that ends at offset `end` without keeping it: what an
        oversized request costs is a read, not its size in memory."""
        left = end - len(self.buf)
        del self.buf[:end]
        paced = 0
        while left > 0:
            chunk = self._recv(True, 0.0, math.inf, min(_RECV, left))  # never past this frame
            left -= len(chunk)
            paced = _pace(paced, len(chunk))
        self._started = time.monotonic() if self.buf else None

    def _recv(self, mid_frame: bool, idle_since: float, idle_timeout: float,
              size: int = _RECV) -> bytes | None:
        """One read: bytes, b"" at a clean EOF between frames, None when nothing came within
        the socket's timeout between frames (Idle once idle_timeout has passed). Mid-frame,
        silence, EOF and a frame older than frame_timeout are ProtocolErrors."""
        if mid_frame:
            now = time.monotonic()
            if self._started is None:
                self._started = now
            elif now - self._started > self.frame_timeout:
                raise ProtocolError(f"a frame took over {self.frame_timeout:g}s to arrive")
        try:
            chunk = self.sock.recv(size)
        except TimeoutError:
            if mid_frame:
                raise ProtocolError("stalled mid-frame") from None
            if time.monotonic() - idle_since >= idle_timeout:
                raise Idle from None
            return None
        if not chunk and mid_frame:
            raise ProtocolError("truncated frame: EOF mid-frame")
        return chunk

    def take(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of a whole frame that ends at `end`, and drop the frame."""
        with memoryview(self.buf) as view:
            data = bytes(view[start:end])  # one copy, not two
        del self.buf[:end]
        self._started = time.monotonic() if self.buf else None
        return data
