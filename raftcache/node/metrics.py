"""A node's Prometheus metrics (prometheus-client) and the HTTP endpoint that serves them.

`node.metrics_address` ("host:port") turns the endpoint on (served by
raftcache.node.metrics_server, under the rules of `[metrics]`):

- ``/metrics``: the Prometheus text exposition. Counters and histograms the node updates as it
  works (calls by operation and outcome, their latency, durable-save latency, snapshots,
  elections), and gauges read from the node when scraped (term, role, leader, commit and
  applied index, apply lag, the log's retention, pending requests, keys, backend health, peer
  links and what they dropped, plus whatever `raftcache_metrics` plugins add as numbers).
- ``/healthz``: 200 while the process serves (liveness).
- ``/readyz``: 200 when the node can serve clients (it knows a leader, its backend is up and
  it has applied nearly everything committed), else 503 with the reason (readiness).

Label values come only from bounded sets: operation names the node knows (anything else
counts as "unknown"), error kinds, roles and peer ids, so hostile calls cannot grow a series
per request.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from raftcache.core.api import ERRORS
from raftcache.core.operations import OPERATIONS

ROLES = ("follower", "pre_candidate", "candidate", "leader")
# Seconds: from a cached get (~0.1 ms) to a write that waited out an election (~seconds).
LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)
SYNC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                0.5, 1.0)
SNAPSHOT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Gauges read from Node.metrics() at each scrape: key -> (metric name, help).
GAUGES = {
    "term": ("raftcache_term", "The node's Raft term."),
    "leader": ("raftcache_leader_id", "The id of the leader this node knows (0: none)."),
    "commit": ("raftcache_commit_index", "The highest log index known to be committed."),
    "applied": ("raftcache_applied_index", "The highest log index applied to the cache."),
    "log_first_index": ("raftcache_log_first_index", "The first entry still in the log (after "
                                                     "the snapshot)."),
    "log_last_index": ("raftcache_log_last_index", "The last entry in the log."),
    "pending_writes": ("raftcache_pending_writes", "Writes proposed and not yet applied."),
    "pending_reads": ("raftcache_pending_reads", "Reads waiting for their read index."),
    "keys": ("raftcache_keys", "Keys in the cache (expired ones not yet swept included)."),
}


class NodeMetrics:
    """The instruments a node updates, in a registry of its own (several nodes may share a
    process in tests), and the collector that reads the rest from the node at scrape time."""

    def __init__(self, node) -> None:
        self.node = node
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter("raftcache_requests", "Client calls answered, by operation and "
                                "outcome (ok, or the error's name).", ["op", "outcome"],
                                registry=r)
        self.request_seconds = Histogram("raftcache_request_duration_seconds",
                                         "Client calls' time in the node, by operation.", ["op"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.sync_seconds = Histogram("raftcache_storage_sync_duration_seconds",
                                      "Durable saves of the log (an fsync, or the storage's "
                                      "equivalent).", buckets=SYNC_BUCKETS, registry=r)
        self.snapshot_seconds = Histogram("raftcache_snapshot_duration_seconds",
                                          "Snapshots taken: image and save.",
                                          buckets=SNAPSHOT_BUCKETS, registry=r)
        self.snapshots_installed = Counter("raftcache_snapshots_installed",
                                           "Snapshots received from the leader and installed.",
                                           registry=r)
        self.elections = Counter("raftcache_elections", "Elections this node started (it "
                                 "became a candidate).", registry=r)
        self.leader_changes = Counter("raftcache_leader_changes", "Times the leader this node "
                                      "knows changed to another node.", registry=r)
        self.snapshot_bytes = 0  # the newest snapshot's size
        r.register(_NodeState(self))
        self._ops = frozenset(OPERATIONS)
        self._outcomes = frozenset(ERRORS)
        # (op, outcome) -> its counter and histogram: labels() costs more than the update,
        # and this runs for every call (bounded: the keys are the bounded label values)
        self._children: dict[tuple[str, str], tuple] = {}

    def request(self, op: str, error: str | None, seconds: float) -> None:
        key = (op if op in self._ops else "unknown",
               "ok" if error is None else error if error in self._outcomes else "other")
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (self.requests.labels(*key),
                                               self.request_seconds.labels(key[0]))
        children[0].inc()
        children[1].observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def wsgi(self, environ, start_response):
        """/metrics, /healthz and /readyz."""
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            body, status, kind = self.exposition(), "200 OK", CONTENT_TYPE_LATEST
        elif path == "/healthz":
            body, status, kind = b"ok\n", "200 OK", "text/plain"
        elif path == "/readyz":
            reason = self.node.not_ready()
            body = (reason or "ready").encode() + b"\n"
            status = "503 Service Unavailable" if reason else "200 OK"
            kind = "text/plain"
        else:
            body, status, kind = b"not found: /metrics, /healthz, /readyz\n", "404 Not Found", \
                "text/plain"
        start_response(status, [("Content-Type", kind), ("Content-Length", str(len(body)))])
        return [body]


class _NodeState:
    """Gauges and counters read from the node when scraped."""

    def __init__(self, metrics: NodeMetrics) -> None:
        self.metrics = metrics

    def collect(self):
        node = self.metrics.node
        m = node.metrics()
        for key, (name, text) in GAUGES.items():
            yield GaugeMetricFamily(name, text, value=m[key])
        role = GaugeMetricFamily("raftcache_role", "1 for the node's current role.", labels=["role"])
        for r in ROLES:
            role.add_metric([r], 1 if m["role"] == r else 0)
        yield role
        yield GaugeMetricFamily("raftcache_apply_lag", "Committed entries not yet applied.",
                                value=m["commit"] - m["applied"])
        yield GaugeMetricFamily("raftcache_log_entries", "Entries the log keeps (bounded by "
                                "raft.snapshot_entries plus raft.snapshot_keep_entries).",
                                value=max(0, m["log_last_index"] - m["log_first_index"] + 1))
        yield GaugeMetricFamily("raftcache_snapshot_bytes", "The newest snapshot's size.",
                                value=self.metrics.snapshot_bytes)
        yield GaugeMetricFamily("raftcache_backend_up", "1 while the backend serves, 0 while "
                                "it is unreachable or being rebuilt.", value=1 - m["backend_down"])
        yield CounterMetricFamily("raftcache_dropped_peer_messages", "Raft messages dropped "
                                  "because they were unauthenticated, from a non-member or out "
                                  "of range.", value=m["dropped_peer_messages"])
        yield CounterMetricFamily("raftcache_refused_snapshots", "Snapshots from a leader that "
                                  "failed the state machine's check.", value=m["refused_snapshots"])
        up = GaugeMetricFamily("raftcache_peer_up", "1 while the link to a peer is connected.",
                               labels=["peer"])
        dropped = CounterMetricFamily("raftcache_peer_queue_dropped_messages", "Raft messages "
                                      "dropped because the link's queue to a peer was full.",
                                      labels=["peer"])
        for peer, (connected, lost) in sorted(node.peer_links().items()):
            up.add_metric([str(peer)], 1 if connected else 0)
            dropped.add_metric([str(peer)], lost)
        yield up
        yield dropped
        for key, value in m.items():  # what raftcache_metrics plugins added
            if key not in BUILT_IN and isinstance(value, int | float) and key.isidentifier():
                yield GaugeMetricFamily(f"raftcache_plugin_{key}", "Added by a plugin "
                                        "(raftcache_metrics).", value=value)


BUILT_IN = frozenset(GAUGES) | {"node", "role", "dropped_peer_messages", "refused_snapshots",
                                "backend_down"}
