"""Real servers started on demand: what the storage tests, the crash tests and `raftcache up`
run their redis-server on.

A `RedisServer` keeps its directory and port across kill -9 and restart, so a restart loads the
AOF the killed process left behind, exactly like a crashed production server coming back.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time

import attrs


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


def die_with_parent() -> None:
    # Runs in the child between fork and exec: if our process dies (even by kill -9), the
    # kernel sends the server SIGTERM instead of leaving it orphaned.
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@attrs.define
class RedisServer:
    """One redis-server process with its data in `dir` (AOF under dir/appendonlydir).

    Defaults are the durable ones raftcache needs: appendonly yes, appendfsync always, no RDB
    snapshots. Use it as a context manager, or call start() and stop().
    """

    dir: str
    port: int = 0  # 0: a free port, chosen at the first start and kept across restarts
    host: str = "127.0.0.1"
    appendonly: bool = True
    appendfsync: str = "always"
    extra_args: list = attrs.Factory(list)  # e.g. ["--auto-aof-rewrite-min-size", "1mb"]
    executable: str = "redis-server"
    start_timeout: float = 20.0
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def log_path(self) -> str:
        return os.path.join(self.dir, "redis.log")

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        return [
            self.executable, "--port", str(self.port), "--bind", self.host,
            "--dir", os.path.abspath(self.dir), "--logfile", os.path.abspath(self.log_path),
            "--daemonize", "no", "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync, *map(str, self.extra_args),
        ]

    def start(self) -> RedisServer:
        """Start the server and wait until it has loaded its AOF and answers PING."""
        if self.running():
            return self
        exe = shutil.which(self.executable)
        if exe is None:
            raise ServerError(f"{self.executable} not found on PATH: install it "
                              "(apt-get install -y redis-server; scripts/test does this)")
        os.makedirs(self.dir, exist_ok=True)
        chosen = self.port == 0
        for _ in range(5 if chosen else 1):
            if chosen:
                self.port = free_port(self.host)
            # The death signal follows the thread that forked: only safe from the main thread.
            main = threading.current_thread() is threading.main_thread()
            self.process = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=die_with_parent if main else None,
            )
            try:
                self._wait_ready()
                return self
            except ServerError:
                self.kill()
                if not (chosen and "Address already in use" in self._log_tail()):
                    raise
                self.port = 0
        raise ServerError(f"redis-server found no free port; see {self.log_path}")

    def _log_tail(self, lines: int = 5) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def _wait_ready(self) -> None:
        # PING answers +PONG only once the AOF is loaded (-LOADING before), so a client that
        # gets through sees all the data the killed process had acknowledged.
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"redis-server on port {self.port} exited with code "
                                  f"{self.process.returncode}: {self._log_tail().strip()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1.0) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        raise ServerError(f"redis-server on port {self.port} not ready within "
                          f"{self.start_timeout} s: {self._log_tail().strip()}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: redis fsyncs its AOF and exits. Falls back to kill -9 after `timeout`."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def kill(self) -> None:
        """kill -9: no goodbye; what the AOF holds is what the kernel got."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def restart(self) -> RedisServer:
        """Same dir, same port: loads the AOF the previous process left."""
        self.stop()
        return self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
