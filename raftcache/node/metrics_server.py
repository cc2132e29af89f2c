"""The HTTP endpoint of `node.metrics_address` (/metrics, /healthz, /readyz), a door into the
node like its client port and kept by the same rules.

Contract: `MetricsServer(address, app, admission, section, logger)` serves the WSGI `app`
(`NodeMetrics.wsgi`) once `start`ed, until `stop`. Every connection is admitted by
`admission` (the transport's, when it has one: one cap and one descriptor budget for both
doors) in the accept loop, a few per turn; it gets one request, which must arrive whole (TLS
handshake included) within `section.request_timeout`, and is closed after the answer. With
`[metrics.tls_server_config]` it speaks only TLS; with `[metrics.basic_auth_users]` every
path needs one of those users' passwords (bcrypt hashes, checked off the event loop, one at
a time). The keys are those of a Prometheus exporter's web config file.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import logging
import os

import bcrypt
import gevent
import gevent.lock
from gevent import ssl as gssl

from raftcache.pluginapi.throttle import Throttle
from raftcache.plugins.transport.admission import Admission, Listener
from raftcache.plugins.transport.sockets import close_quietly, parse_address, send_all

MAX_HEAD = 8192  # a request line and headers; a scrape sends a few hundred bytes
_SUCCESSES_KEPT = 64  # passwords found right, remembered so that scrapes skip bcrypt
# Checked when the user is unknown, so that a wrong name costs what a wrong password does.
_DUMMY_HASH = bcrypt.hashpw(b"no such user", bcrypt.gensalt(4))
_STATUS = {200: "200 OK", 400: "400 Bad Request", 401: "401 Unauthorized",
           405: "405 Method Not Allowed", 431: "431 Request Header Fields Too Large",
           500: "500 Internal Server Error"}


class MetricsServer:
    def __init__(self, address: str, app, admission: Admission | None, section, logger):
        self.app = app
        self.section = section
        self.log = logger
        # Without the transport's admission (a transport that keeps none): a small one.
        self.admission = admission or Admission(64, 16, logger)
        self._users = {user: h.encode() for user, h in section.basic_auth_users.items()}
        self._right: dict[bytes, None] = {}  # digests of user:password found right
        self._salt = os.urandom(16)
        self._checking = gevent.lock.Semaphore(1)  # one bcrypt at a time, whatever the flood
        self._ctx = None
        if section.tls_server_config is not None:
            self._ctx = gssl.SSLContext(gssl.PROTOCOL_TLS_SERVER)
            self._ctx.minimum_version = gssl.TLSVersion.TLSv1_2
            self._ctx.load_cert_chain(section.tls_server_config.cert_file,
                                      section.tls_server_config.key_file)
        self._closings = Throttle(logger)
        self._server = Listener(parse_address(address), self.admission, self._serve, logger)

    @property
    def bound_address(self) -> str:
        host, port = self._server.address[:2]
        return f"{host}:{port}"

    def start(self) -> None:
        self._server.start()

    def stop(self, timeout: float = 1.0) -> None:
        self._server.stop(timeout=timeout)

    def _serve(self, raw, addr, slot) -> None:
        sock = raw
        try:
            with gevent.Timeout(self.section.request_timeout, TimeoutError):
                if self._ctx is not None:
                    sock = self._ctx.wrap_socket(raw, server_side=True)
                    slot.close = lambda: close_quietly(sock)
                head = _read_head(sock)
                self.admission.begin(slot)
                try:
                    send_all(sock, self._answer(head))
                finally:
                    self.admission.end(slot)
        except (OSError, gssl.SSLError, TimeoutError, ValueError) as exc:
            self._closings.log(logging.INFO, addr[0], "/metrics: %s: %s; closing the connection",
                               addr[0], exc or type(exc).__name__)
        finally:
            self.admission.release(slot)
            close_quietly(sock)

    def _answer(self, head: bytes | None) -> bytes:
        if head is None:
            return _response(431, b"request head too large\n")
        try:
            line, *fields = head.decode("latin-1").split("\r\n")
            method, target, _version = line.split(" ")
        except ValueError:
            return _response(400, b"bad request\n")
        if method not in ("GET", "HEAD"):
            return _response(405, b"GET only\n")
        headers = {}
        for field in fields:
            name, _, value = field.partition(":")
            headers[name.strip().lower()] = value.strip()
        if self._users and not self._authorized(headers.get("authorization", "")):
            return _response(401, b"unauthorized\n",
                             [("WWW-Authenticate", 'Basic realm="raftcache"')])
        path, _, query = target.partition("?")
        try:
            return self._call_app(method, path, query)
        except Exception:  # a metrics plugin's bug, say: the page fails, not the node
            self.log.exception("/metrics: answering %s %s failed", method, path)
            return _response(500, b"internal error\n")

    def _authorized(self, header: str) -> bool:
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, sep, password = base64.b64decode(encoded.strip(), validate=True) \
                .decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        if not sep:
            return False
        digest = hashlib.sha256(self._salt + user.encode() + b"\0" + password.encode()).digest()
        if digest in self._right:
            return True
        hashed = self._users.get(user)
        with self._checking:  # bcrypt takes ~0.1-0.3 s of CPU: in a thread, one at a time
            ok = gevent.get_hub().threadpool.apply(
                bcrypt.checkpw, (password.encode(), hashed or _DUMMY_HASH))
        if not (ok and hashed):
            return False
        if len(self._right) >= _SUCCESSES_KEPT:
            self._right.clear()
        self._right[digest] = None
        return True

    def _call_app(self, method: str, path: str, query: str) -> bytes:
        started = []
        environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query,
                   "wsgi.input": io.BytesIO()}
        body = b"".join(self.app(environ, lambda status, headers: started.append(
            (status, headers))))
        status, headers = started[0]
        return _response(status, b"" if method == "HEAD" else body, headers, len(body))


def _read_head(sock) -> bytes | None:
    """The request line and headers (without the blank line); None when over MAX_HEAD."""
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > MAX_HEAD:
            return None
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed before a whole request")
        data += chunk
    return data.split(b"\r\n\r\n", 1)[0]


def _response(status, body: bytes, headers=(), length: int | None = None) -> bytes:
    """A whole HTTP/1.1 response that closes the connection."""
    status = _STATUS.get(status, status) if isinstance(status, int) else status
    fields = [(k, v) for k, v in headers if k.lower() not in ("content-length", "connection")]
    fields += [("Content-Length", str(len(body) if length is None else length)),
               ("Connection", "close")]
    if not any(k.lower() == "content-type" for k, _ in fields):
        fields.append(("Content-Type", "text/plain"))
    head = f"HTTP/1.1 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields) + "\r\n"
    return head.encode("latin-1") + body
