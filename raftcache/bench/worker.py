"""A client process of `raftcache bench`: `clients` greenlets, each in a closed loop (the next
request once the answer is in), against one target on 127.0.0.1.

    python -m raftcache.bench.worker

JSON lines on stdin: first the setup {"target": {...}, "clients": n, "keys": [...],
"value_size": n}, then commands:

    {"cmd": "fill", "part": i, "of": n}    write keys[i::n] once (so that gets find them)
    {"cmd": "run", "read_ratio": r, "consistency": c, "start_at": t, "seconds": s, "seed": n}

Answers on stdout: {"ready": true} after connecting; {"done": count} about every 0.25 s while a
run lasts; then {"result": {...}} (latencies in µs per operation, per-second completions,
errors, misses, and whether the run started late).
"""

if __name__ == "__main__":  # before anything imports socket, ssl or threading (see cli.main)
    from gevent import monkey

    monkey.patch_all()

import json  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

TICK = 0.25  # s between progress lines


def connect(target: dict, clients: int, value: bytes) -> tuple[Callable, Callable]:
    """(set(key), get(key, consistency)) for a target {"kind": raftcache|redis|memcached,
    "address", and for raftcache perhaps "token", "transport", "tls"}; safe to share between
    greenlets."""
    kind, address = target["kind"], target["address"]
    if kind == "raftcache":
        from raftcache.client import Client
        from raftcache.pluginapi import TLSConfig

        tls = TLSConfig(**target["tls"]) if target.get("tls") else None
        c = Client(address, token=target.get("token"), tls=tls, timeout=10.0,
                   transport=target.get("transport", "thrift"))
        return (lambda key: c.set(key, value)), (lambda key, level: c.get(key, level))
    host, port = address.rsplit(":", 1)
    if kind == "redis":
        import redis

        r = redis.Redis(connection_pool=redis.BlockingConnectionPool(
            host=host, port=int(port), max_connections=max(1, clients)))
        return (lambda key: r.set(key, value)), (lambda key, level: r.get(key))
    if kind == "memcached":
        from pymemcache.client.base import PooledClient

        m = PooledClient((host, int(port)), max_pool_size=max(1, clients), no_delay=True)
        return (lambda key: m.set(key, value, noreply=False)), (lambda key, level: m.get(key))
    raise ValueError(f"unknown target kind {kind!r}")


class Tally:
    """What one run counts: latencies per operation (µs) and completions per second of the
    window [start_at, start_at + seconds), errors (by kind too) and gets that found nothing."""

    def __init__(self, start_at: float, seconds: float):
        self.start_at, self.end = start_at, start_at + seconds
        self.latencies: dict[str, list[int]] = {"set": [], "get": []}
        self.per_second = [0] * max(1, int(seconds + 0.999))
        self.done = self.errors = self.misses = 0
        self.last_error = ""
        self.error_kinds: dict[str, int] = {}

    def failed(self, exc: Exception) -> None:
        self.errors += 1
        self.last_error = repr(exc)[:300]
        kind = type(exc).__name__
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1

    def answered(self, op: str, t0: float, found) -> bool:
        """Count an answer to a request sent at perf_counter `t0`; False (not counted) when
        it came after the window."""
        now = time.time()
        if now >= self.end:
            return False
        self.latencies[op].append(round((time.perf_counter() - t0) * 1e6))
        self.per_second[min(len(self.per_second) - 1, max(0, int(now - self.start_at)))] += 1
        self.done += 1
        if op == "get" and found is None:
            self.misses += 1
        return True

    def result(self, late: bool) -> dict:
        return {"latencies_us": self.latencies, "per_second": self.per_second, "late": late,
                "errors": self.errors, "misses": self.misses, "last_error": self.last_error}


class Worker:
    def __init__(self, setup: dict, out=sys.stdout):
        self.clients = setup["clients"]
        # Filling: a raftcache client takes any number of greenlets (a sequential fill of
        # 1,000 durable writes would take seconds); Redis' and Memcached's pools are sized.
        self.fillers = max(self.clients, 32 if setup["target"]["kind"] == "raftcache" else 1)
        self.keys = setup["keys"]
        self.set, self.get = connect(setup["target"], self.clients,
                                     b"v" * setup["value_size"])
        self.out = out

    def say(self, message: dict) -> None:
        self.out.write(json.dumps(message) + "\n")
        self.out.flush()

    def fill(self, part: int, of: int) -> dict:
        import gevent

        mine = self.keys[part::of]
        errors = []

        def writer(g: int) -> None:
            for key in mine[g::self.fillers]:
                try:
                    self.set(key)
                except Exception as exc:  # noted, not fatal: gets will count the misses
                    errors.append(repr(exc))

        gevent.joinall([gevent.spawn(writer, g) for g in range(self.fillers)])
        return {"written": len(mine) - len(errors), "errors": len(errors),
                "last_error": errors[-1] if errors else ""}

    def run(self, cmd: dict) -> dict:
        """Closed loops from `start_at` (wall clock) for `seconds`; each request a get with
        probability `read_ratio`, else a set, on a key drawn uniformly. With `rate`, an open
        loop instead (`open_loop`)."""
        import gevent

        if cmd.get("rate"):
            return self.open_loop(cmd)
        tally = Tally(cmd["start_at"], cmd["seconds"])
        ratio, level = cmd["read_ratio"], cmd.get("consistency") or "linearizable"
        keys = self.keys

        def loop(seed: int) -> None:
            rng = random.Random(seed)
            try:  # a warm call (its own connection) before the clock starts; not counted
                self.get(keys[seed % len(keys)], level)
            except Exception:
                pass
            gevent.sleep(max(0.0, tally.start_at - time.time()))
            while True:
                key = rng.choice(keys)
                is_get = rng.random() < ratio
                t0 = time.perf_counter()
                try:
                    found = self.get(key, level) if is_get else self.set(key)
                except Exception as exc:
                    tally.failed(exc)
                    if time.time() >= tally.end:
                        break
                    gevent.sleep(0.01)  # a failing target: no busy loop
                    continue
                if not tally.answered("get" if is_get else "set", t0, found):
                    break  # answered after the window: not counted

        late = time.time() > tally.start_at
        progress = gevent.spawn(self.report_progress, tally)
        gevent.joinall([gevent.spawn(loop, cmd["seed"] * 1000 + i) for i in range(self.clients)])
        progress.kill()
        return tally.result(late)

    def open_loop(self, cmd: dict) -> dict:
        """Requests started at `rate` per second from `start_at` for `seconds`, whatever the
        answers (an open loop: users do not wait for each other), each in its own greenlet,
        at most `clients` at once: a request due while all are busy is shed (counted, never
        sent). Requests still out at the end get `drain` seconds to finish; only answers
        within the window count as completions. Errors are counted by kind."""
        import gevent
        import gevent.pool

        tally = Tally(cmd["start_at"], cmd["seconds"])
        rate, ratio = cmd["rate"], cmd["read_ratio"]
        level = cmd.get("consistency") or "linearizable"
        rng = random.Random(cmd["seed"])
        pool = gevent.pool.Pool(self.clients)
        offered = shed = 0

        def one(key: str, is_get: bool) -> None:
            t0 = time.perf_counter()
            try:
                found = self.get(key, level) if is_get else self.set(key)
            except Exception as exc:
                tally.failed(exc)
                return
            tally.answered("get" if is_get else "set", t0, found)

        late = time.time() > tally.start_at
        progress = gevent.spawn(self.report_progress, tally)
        gevent.sleep(max(0.0, tally.start_at - time.time()))
        while (now := time.time()) < tally.end:
            for _ in range(int((now - tally.start_at) * rate) - offered):
                offered += 1
                if pool.full():
                    shed += 1
                else:
                    pool.spawn(one, rng.choice(self.keys), rng.random() < ratio)
            gevent.sleep(0.002)
        pool.join(timeout=cmd.get("drain", 15.0))
        pool.kill()
        progress.kill()
        return tally.result(late) | {"offered": offered, "shed": shed,
                                     "error_kinds": tally.error_kinds}

    def report_progress(self, tally: Tally) -> None:
        import gevent

        while True:
            gevent.sleep(TICK)
            self.say({"done": tally.done})


def main() -> int:
    setup = json.loads(sys.stdin.readline())
    worker = Worker(setup)
    worker.say({"ready": True})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "fill":
            worker.say({"result": worker.fill(cmd["part"], cmd["of"])})
        elif cmd["cmd"] == "run":
            worker.say({"result": worker.run(cmd)})
        else:
            raise ValueError(f"unknown command {cmd!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
