"""Real servers started on demand: the redis-server and memcached that the storage tests, the
crash tests and `raftcache up` run.

`raftcache up` starts its servers with `unix=True`: they listen on a unix socket in a 0700
directory and on no TCP port, so only the node's user can reach them (read keys, delete
values, put back an older ciphertext). The tests' own servers listen on 127.0.0.1.

A server keeps its directory and port (or socket) across kill -9 and restart, so a
`RedisServer` with its AOF loads what the killed process left behind, exactly like a crashed
production server coming back; a cache (memcached, redis without persistence) comes back
empty.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from typing import ClassVar

import attrs

from raftcache.node.config import private_dir


class ServerError(RuntimeError):
    """A server would not start (missing binary, port taken, bad config): says which and why."""


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = map(int, f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_ports(n: int = 1, host: str = "127.0.0.1") -> int:
    """A base port such that base .. base+n-1 are free on `host`, chosen *below* the kernel's
    ephemeral range: a port in that range can be taken at any moment as the source port of
    some outgoing connection (a node dialling its peers, say) before our server binds it."""
    low, _high = _ephemeral_range()
    rng = random.Random()  # unseeded: concurrent test runs must not pick alike
    for _ in range(500):
        base = rng.randrange(10000, max(10001, low - n))
        socks = []
        try:
            for i in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind((host, base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise ServerError(f"no block of {n} free ports below {low} on {host}")


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)


def _private_file(path: str) -> str:
    """`path`, created empty with mode 0600 if it is not there yet."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    return path


def die_with_parent() -> None:
    # Runs in the child between fork and exec: if our process dies (even by kill -9), the
    # kernel sends the server SIGTERM instead of leaving it orphaned.
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


# A unix socket's path must fit sockaddr_un (108 bytes with its NUL on Linux).
_SOCKET_PATH_MAX = 100


def _socket_path(directory: str, name: str) -> str:
    """Where a server in `directory` listens: there, or, when that path is too long for a
    socket, in a new 0700 directory of ours under the temporary directory."""
    path = os.path.join(os.path.abspath(directory), name)
    if len(path) <= _SOCKET_PATH_MAX:
        return path
    return os.path.join(tempfile.mkdtemp(prefix="raftcache-sock-"), name)  # mkdtemp: 0700


def _own_private_dir(path: str) -> None:
    """`path` made 0700 if missing (`private_dir`), tightened to 0700 if ours; ServerError if
    another user owns it (a name under /tmp another user took first): they could connect."""
    private_dir(path)
    st = os.stat(path)
    if st.st_uid != os.geteuid():
        raise ServerError(f"{path} belongs to uid {st.st_uid}, not to us: a server's socket "
                          "there would be theirs to reach")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)


@attrs.define
class _LocalServer:
    """One server process on host:port, or with `unix` on a unix socket only, with its files
    in `dir` (its output in dir/<name>.log), killed with us (die_with_parent). A subclass
    names its command line and how to ask it whether it is ready. Use it as a context
    manager, or call start() and stop()."""

    PROBE: ClassVar[tuple[bytes, bytes]]  # (what to send, how a ready server's answer starts)

    dir: str
    port: int = 0  # 0: a free port, chosen at the first start and kept across restarts
    host: str = "127.0.0.1"
    start_timeout: float = 20.0
    # No TCP port: a unix socket in a 0700 directory (dir, when its path is short enough),
    # reachable by our user only; kept across restarts.
    unix: bool = False
    socket_path: str | None = None
    process: subprocess.Popen | None = None

    def __attrs_post_init__(self):
        if self.unix and self.socket_path is None:
            self.socket_path = _socket_path(self.dir, f"{os.path.basename(self.executable)}.sock")

    @property
    def address(self) -> str:
        """host:port, or the path of the unix socket."""
        return self.socket_path if self.unix else f"{self.host}:{self.port}"

    @property
    def log_path(self) -> str:
        return os.path.join(self.dir, f"{os.path.basename(self.executable)}.log")

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self):
        """Start the server and wait until it answers its probe."""
        if self.running():
            return self
        exe = shutil.which(self.executable)
        if exe is None:
            raise ServerError(f"{self.executable} not found on PATH: install it (apt-get "
                              f"install -y {self.executable}; scripts/test does this)")
        private_dir(self.dir)  # owner-only: the server's files hold values
        if self.unix:
            _own_private_dir(os.path.dirname(self.socket_path))
            try:  # a socket left by a kill -9 (the directory is ours alone)
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
        chosen = self.port == 0 and not self.unix
        for _ in range(5 if chosen else 1):
            if chosen:
                self.port = free_port(self.host)
            # The death signal follows the thread that forked: only safe from the main thread.
            main = threading.current_thread() is threading.main_thread()
            with open(_private_file(self.log_path), "ab") as log:
                self.process = subprocess.Popen(
                    self.command(), stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True, umask=0o077,
                    preexec_fn=die_with_parent if main else None,
                )
            try:
                self._wait_ready()
                return self
            except ServerError:
                self.kill()
                if not (chosen and "Address already in use" in self.log_tail()):
                    raise
                self.port = 0
        raise ServerError(f"{self.executable} found no free port; see {self.log_path}")

    def log_tail(self, lines: int = 5) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def _wait_ready(self) -> None:
        probe, ready = self.PROBE
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"{self.executable} on {self.address} exited with code "
                                  f"{self.process.returncode}: {self.log_tail().strip()}")
            try:
                with self._connect() as s:
                    s.sendall(probe)
                    if s.recv(64).startswith(ready):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        raise ServerError(f"{self.executable} on {self.address} not ready within "
                          f"{self.start_timeout} s: {self.log_tail().strip()}")

    def _connect(self) -> socket.socket:
        if not self.unix:
            return socket.create_connection((self.host, self.port), timeout=1.0)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(1.0)
            s.connect(self.socket_path)
        except OSError:
            s.close()
            raise
        return s

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, and kill -9 after `timeout`; a socket directory of our own under the
        temporary directory goes too (start makes it again)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self.unix and os.path.dirname(self.socket_path) != os.path.abspath(self.dir):
            shutil.rmtree(os.path.dirname(self.socket_path), ignore_errors=True)

    def kill(self) -> None:
        """kill -9: no goodbye."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def restart(self):
        """Same dir, same port."""
        self.stop()
        return self.start()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@attrs.define
class RedisServer(_LocalServer):
    """redis-server, its data in `dir` (AOF under dir/appendonlydir).

    Defaults are the durable ones the redis-aof storage needs: appendonly yes, appendfsync
    always, no RDB snapshots; SIGTERM fsyncs the AOF, a kill -9 leaves what the kernel got, and
    a restart loads it. With appendonly off (a backend's cache) a restart comes back empty.
    """

    # PING answers +PONG only once the AOF is loaded (-LOADING before), so a client that
    # gets through sees all the data the killed process had acknowledged.
    PROBE = (b"PING\r\n", b"+PONG")

    appendonly: bool = True
    appendfsync: str = "always"
    extra_args: list = attrs.Factory(list)  # e.g. ["--maxmemory-policy", "noeviction"]
    executable: str = "redis-server"

    @property
    def url(self) -> str:
        if self.unix:
            return f"unix://{self.socket_path}?db=0"
        return f"redis://{self.host}:{self.port}/0"

    def command(self) -> list[str]:
        listen = (["--port", "0", "--unixsocket", self.socket_path, "--unixsocketperm", "700"]
                  if self.unix else ["--port", str(self.port), "--bind", self.host])
        return [
            self.executable, *listen,
            "--dir", os.path.abspath(self.dir), "--logfile", os.path.abspath(self.log_path),
            "--daemonize", "no", "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync, *map(str, self.extra_args),
        ]


@attrs.define
class MemcachedServer(_LocalServer):
    """memcached on TCP only (no UDP), or on a unix socket only (`unix`), holding at most
    `memory_mb` MiB; it keeps nothing on disk (`dir` holds its log), so a restart comes back
    empty on the same port or socket."""

    PROBE = (b"version\r\n", b"VERSION ")

    memory_mb: int = 64
    executable: str = "memcached"

    def command(self) -> list[str]:
        user = ["-u", "root"] if os.geteuid() == 0 else []  # it refuses root without -u
        # -s: no network at all; -a: the socket's mode
        listen = (["-s", self.socket_path, "-a", "0700"] if self.unix
                  else ["-U", "0", "-l", self.host, "-p", str(self.port)])
        return [self.executable, *listen, "-m", str(self.memory_mb), *user]
