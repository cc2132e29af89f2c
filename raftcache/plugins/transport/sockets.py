"""Small socket helpers both transports use: parsing host:port, sending a frame, closing
without raising.

Contract: plain functions over any socket-like object (gevent's or the standard library's);
they block only as long as the socket's own timeout lets them.
"""

from __future__ import annotations


def send_all(sock, data: bytes) -> None:
    """`sock.sendall(data)`, but a frame that fits the socket buffer costs one send(): gevent's
    sendall asks the kernel for the buffer size (a getsockopt) on every call."""
    sent = sock.send(data)
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def close_quietly(sock) -> None:
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass
