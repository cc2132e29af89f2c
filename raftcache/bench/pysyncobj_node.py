"""One node of the PySyncObj cluster `raftcache bench --compare` measures: a `SyncObj` replicating
a dict through a `@replicated` set: PySyncObj's defaults (its log in memory, nothing fsynced)
but for appendEntriesUseBatch=False, as in its own latency benchmark (with batching every commit
waits for the next 50 ms tick: a closed loop of 50 clients then commits under 500/s). Under load
its followers log "truncating already-applied log entries ... state machine may have diverged";
`raftcache bench` counts those lines. As in PySyncObj's own benchmarks, the load runs in-process on the leader: the
leader keeps `clients` commands in flight (a closed loop: a new one as each callback comes in)
and times each from the call to its callback, which PySyncObj makes once the entry is committed
and applied.

    python -m raftcache.bench.pysyncobj_node '{"self": "127.0.0.1:P1", "partners": [...]}'

Prints {"ready": true} once a leader is known; then on each stdin line {"cmd": "run", "clients",
"seconds", "value_size", "keys", "seed"} answers {"result": null} on a follower and
{"result": {...}} (the worker's shape) on the leader. Not gevent: PySyncObj runs its own thread.
"""

import json
import random
import sys
import threading
import time


def make_node(self_address: str, partners: list):
    from pysyncobj import SyncObj, SyncObjConf, replicated

    class ReplicatedDict(SyncObj):
        def __init__(self):
            super().__init__(self_address, partners, SyncObjConf(appendEntriesUseBatch=False))
            self.data = {}

        @replicated
        def set(self, key, value):
            self.data[key] = value

    return ReplicatedDict()


def run(node, cmd: dict) -> dict:
    from pysyncobj import FAIL_REASON

    clients, seconds = cmd["clients"], cmd["seconds"]
    value = "v" * cmd["value_size"]
    rng = random.Random(cmd["seed"])
    window = threading.BoundedSemaphore(clients)
    lock = threading.Lock()
    latencies: list[int] = []
    per_second = [0] * max(1, int(seconds + 0.999))
    state = {"errors": 0, "last_error": ""}
    start = time.time()
    end = start + seconds

    def answered(t0: float, result, error) -> None:
        elapsed = time.perf_counter() - t0
        now = time.time()
        with lock:
            if error != FAIL_REASON.SUCCESS:
                state["errors"] += 1
                state["last_error"] = f"FAIL_REASON {error}"
            elif now < end:
                latencies.append(round(elapsed * 1e6))
                per_second[min(len(per_second) - 1, int(now - start))] += 1
        window.release()

    while time.time() < end:
        if not window.acquire(timeout=0.1):
            continue
        key = f"bench{rng.randrange(cmd['keys'])}"
        t0 = time.perf_counter()
        node.set(key, value, callback=lambda r, e, t0=t0: answered(t0, r, e))
    for _ in range(clients):  # let the last ones land (or fail) before answering
        window.acquire(timeout=5.0)
    return {"latencies_us": {"set": latencies, "get": []}, "per_second": per_second,
            "late": False, "errors": state["errors"], "misses": 0,
            "last_error": state["last_error"]}


def main() -> int:
    spec = json.loads(sys.argv[1])
    node = make_node(spec["self"], spec["partners"])
    while node._getLeader() is None:
        time.sleep(0.05)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        result = run(node, cmd) if node._isLeader() else None
        print(json.dumps({"result": result}), flush=True)
    node.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
