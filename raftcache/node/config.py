"""Node configuration: TOML (stdlib tomllib) mapped onto attrs classes.

A mistake stops start-up with one line naming the file, the key and what is accepted, e.g.
``node.toml: raft.election_tick: expected an integer, got "ten"``.
"""

from __future__ import annotations

import os
import secrets
import tomllib

import attrs

from raftcache.core.raft.messages import MAX_NODE_ID, address_problem
from raftcache.pluginapi.errors import ConfigError, OptionError
from raftcache.pluginapi.options import (
    build,
    parse_options,
    positive,
    private_dir,
    redact_url,
    write_private,
)

__all__ = ["Config", "ConfigError", "OptionError", "load", "parse", "parse_options", "positive",
           "private_dir", "read_secret", "redact_url", "write_secret"]


@attrs.frozen
class NodeSection:
    id: int
    address: str  # host:port this node listens on (clients and peers)
    data_dir: str = "raftcache-data"
    proxy: bool = False  # forward requests from clients to the leader instead of NotLeader
    request_timeout_ms: int = 5000
    # A write whose log entry would be larger is refused (InvalidRequest) before it is
    # proposed: it must fit one peer frame (transport.options.max_frame) with room to spare.
    max_request_bytes: int = 4 << 20
    max_batch_keys: int = 1000  # keys in one mget or mset
    # Keys (and invalidate prefixes) and values in one request; beyond them InvalidRequest,
    # before anything is read or proposed. 1 MiB values: memcached's default item size.
    max_key_bytes: int = 64 << 10
    max_value_bytes: int = 1 << 20
    # The stored values one get or mget answer may hold (a key asked for twice counts twice):
    # beyond it InvalidRequest, from the values' sizes, before any is opened (decrypted).
    max_response_bytes: int = 8 << 20
    # Writes and reads waiting on this node (proposed and not yet applied, or waiting for a
    # read index): beyond it a request is refused at once, Unavailable "overloaded", which
    # clients retry after a backoff. Back-pressure, instead of queues and deadlines that grow
    # until every request times out.
    max_pending: int = 4096
    # "host:port" of this node's HTTP endpoint: Prometheus /metrics, and /healthz and /readyz
    # probes (raftcache.node.metrics). Empty: none.
    metrics_address: str = ""
    # `stale` reads skip the read index: a node serves them only while it has heard from a
    # leader within this long (a leader: from a quorum), and only as a member. Beyond it
    # they are refused Unavailable, so a partitioned node stops judging by old settings.
    # 0: 500 ms, or four of the longest election timeouts when that is longer (`stale_ms`).
    max_stale_ms: int = 0


@attrs.frozen
class ClusterSection:
    # node id (string key in TOML) -> "host:port": the members a new cluster starts with
    # (must include this node), or, for a joining node, any it should know beforehand.
    # Members added later travel with their address through the log.
    peers: dict = attrs.Factory(dict)
    # A node that joins a running cluster: "host:port" of some of its members. It does not
    # start a cluster of its own; it waits until `raftcache member add ID ADDRESS` adds it.
    join: list = attrs.Factory(list)
    id: int = 1  # cluster id: nodes of another cluster are ignored
    # node id -> "host:port" that clients use, when it differs from the peer address (peers
    # reached through proxies or relays). NotLeader hints and status name these; defaults to
    # where the log and `peers` say each member is.
    client_addresses: dict = attrs.Factory(dict)
    # node id -> "host:port" this node dials to reach that peer instead of its address (a
    # relay or proxy on the way, as in the fault suite): local routing, never replicated.
    dial: dict = attrs.Factory(dict)
    # Peers prove they are nodes of this cluster: with a TLS node certificate, or on a
    # plaintext transport with this shared secret (`raftcache up` generates one). Without
    # either, Raft traffic is accepted from anyone only when `insecure` is true.
    secret_file: str = ""
    insecure: bool = False


@attrs.frozen
class RaftSection:
    tick_ms: int = 10
    election_tick: int = 6  # followers campaign after 6-12 ticks (60-120 ms) of silence
    heartbeat_tick: int = 2
    pre_vote: bool = True
    check_quorum: bool = True
    # "lease" lets reads that ask for the `lease` level use the leader's check-quorum lease
    # (needs check_quorum); with "read_index" they get a ReadIndex round like `linearizable`.
    read_only: str = "read_index"
    lease_margin_ticks: int = 2
    max_inflight: int = 64
    snapshot_entries: int = 10000  # take a snapshot after this many applied entries
    snapshot_keep_entries: int = 1000  # keep this many before it for slow followers


@attrs.frozen
class TLSSection:
    ca: str
    cert: str
    key: str


@attrs.frozen
class PluginChoice:
    plugin: str
    options: dict = attrs.Factory(dict)
    tls: TLSSection | None = None


@attrs.frozen
class PluginsSection:
    block: list = attrs.Factory(list)


@attrs.frozen
class AuthSection:
    """Client authentication (docs/security.md). Every node of a cluster needs the same."""

    required: bool = False  # every call but `status` needs a valid token
    # PEM files of the Ed25519 public keys that may sign tokens (`raftcache up --auth`
    # writes DATA_DIR/auth/signing.pub); tokens name theirs by key id.
    public_keys: list = attrs.Factory(list)
    # TLS client certificate CN -> role: a call without a token, over a verified client
    # certificate named here, runs as subject "cert:<CN>" with that role's grants.
    certificates: dict = attrs.Factory(dict)


@attrs.frozen
class EncryptionSection:
    """Values sealed at rest (docs/security.md). `raftcache serve` needs a keyring or an
    explicit ``enabled = false``."""

    enabled: bool | None = None  # None: not said (serve refuses to guess)
    keyring: str = ""  # the keyring file (mode 0600), the same on every node
    # Seals (random 96-bit nonces) this node makes with one data key before the leader
    # rotates to a new one: far below NIST's 2**32 per key for the whole cluster.
    rotate_after: int = 1 << 26


@attrs.frozen
class MetricsTLSSection:
    cert_file: str
    key_file: str


@attrs.frozen
class MetricsSection:
    """Who may read `node.metrics_address` (raftcache.node.metrics_server): the keys of a
    Prometheus exporter's web config file, in the node's TOML (docs/security.md)."""

    # Serve HTTPS only, with this certificate and key.
    tls_server_config: MetricsTLSSection | None = None
    # user -> bcrypt hash of the password (as for Prometheus exporters: `htpasswd -nBC 10 ""`,
    # or Python's bcrypt.hashpw): every path then needs HTTP basic auth as one of them.
    basic_auth_users: dict = attrs.Factory(dict)
    # A connection's request (TLS handshake included) must arrive whole within this long.
    request_timeout: float = 5.0


@attrs.frozen
class LogSection:
    level: str = "info"


@attrs.frozen
class Config:
    node: NodeSection
    cluster: ClusterSection
    raft: RaftSection = RaftSection()
    storage: PluginChoice = PluginChoice("file-wal")
    transport: PluginChoice = PluginChoice("thrift")
    backend: PluginChoice = PluginChoice("memory")
    plugins: PluginsSection = PluginsSection()
    auth: AuthSection = AuthSection()
    encryption: EncryptionSection = EncryptionSection()
    metrics: MetricsSection = MetricsSection()
    log: LogSection = LogSection()
    path: str = "<config>"

    def peer_addresses(self) -> dict[int, str]:
        """cluster.peers and this node: where the members a new cluster starts with are."""
        return {**{int(k): v for k, v in self.cluster.peers.items()},
                self.node.id: self.node.address}

    def dial_addresses(self) -> dict[int, str]:
        return {int(k): v for k, v in self.cluster.dial.items()}

    def client_addresses(self) -> dict[int, str]:
        out = self.peer_addresses()
        out.update({int(k): v for k, v in self.cluster.client_addresses.items()})
        out[self.node.id] = self.node.address
        return out

    def stale_ms(self) -> int:
        """How long after its last contact with a leader a node still serves `stale` reads
        (`node.max_stale_ms`; 0: 500 ms, or four of the longest election timeouts)."""
        r = self.raft
        return self.node.max_stale_ms or max(500, 4 * 2 * r.election_tick * r.tick_ms)

    def fail(self, key: str, problem: str) -> ConfigError:
        """A ConfigError for `key` of this file (for checks made after loading)."""
        return ConfigError(f"{self.path}: {key}: {problem}")


def parse(data: dict, path: str = "<config>") -> Config:
    config = attrs.evolve(build(Config, data, path, ""), path=path)
    _validate(config)
    return config


def load(path: str, node: dict | None = None) -> Config:
    """The config in `path`; `node` overrides keys of its [node] table (`raftcache serve
    --id/--address/--data-dir`: one join.toml serves every node that joins)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    if node:
        section = data.setdefault("node", {})
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: node: expected a table")
        section.update(node)
    return parse(data, path)


_I64_MAX = (1 << 63) - 1
# What a write's log entry holds besides its key and value: the command's fields, the client
# id (up to 128 characters), sequence number and stamp, and what a value codec adds.
ENTRY_HEADROOM = 4 << 10


def _ranges(c: Config) -> list:
    """(key, value, lowest, highest) of every number a node takes from its config."""
    n, r = c.node, c.raft
    return [
        ("node.id", n.id, 1, MAX_NODE_ID),
        ("node.request_timeout_ms", n.request_timeout_ms, 1, 3_600_000),
        ("node.max_request_bytes", n.max_request_bytes, 1024, 1 << 30),
        ("node.max_batch_keys", n.max_batch_keys, 1, 1 << 20),
        ("node.max_pending", n.max_pending, 1, 1 << 24),
        ("node.max_key_bytes", n.max_key_bytes, 1, 1 << 20),
        ("node.max_value_bytes", n.max_value_bytes, 1, 1 << 30),
        ("node.max_response_bytes", n.max_response_bytes, 1024, 1 << 30),
        ("node.max_stale_ms", n.max_stale_ms, 0, 86_400_000),
        ("cluster.id", c.cluster.id, 0, _I64_MAX),
        ("raft.tick_ms", r.tick_ms, 1, 60_000),
        ("raft.election_tick", r.election_tick, 2, 100_000),
        ("raft.heartbeat_tick", r.heartbeat_tick, 1, max(1, r.election_tick - 1)),
        ("raft.lease_margin_ticks", r.lease_margin_ticks, 0, max(0, r.election_tick - 1)),
        ("raft.max_inflight", r.max_inflight, 1, 1 << 16),
        ("raft.snapshot_entries", r.snapshot_entries, 1, _I64_MAX),
        ("raft.snapshot_keep_entries", r.snapshot_keep_entries, 0, _I64_MAX),
        ("encryption.rotate_after", c.encryption.rotate_after, 1, 1 << 28),
    ]


def _address(c: Config, key: str, value) -> str:
    problem = address_problem(value) if value else f"expected \"host:port\", got {value!r}"
    if problem:
        raise c.fail(key, problem)
    return value


def _validate(c: Config) -> None:
    for key, value, lo, hi in _ranges(c):
        if not lo <= value <= hi:
            raise c.fail(key, f"must be between {lo} and {hi}, got {value}")
    n = c.node
    beat_ms = c.raft.heartbeat_tick * c.raft.tick_ms
    if n.max_stale_ms and n.max_stale_ms < 2 * beat_ms:
        # Else a follower refuses stale reads between two heartbeats of a healthy leader.
        raise c.fail("node.max_stale_ms", f"must be 0 (the default) or at least two heartbeat "
                                          f"intervals ({2 * beat_ms} ms), got {n.max_stale_ms}")
    if n.max_key_bytes + n.max_value_bytes + ENTRY_HEADROOM > n.max_request_bytes:
        # Else a set within both limits could still be refused for its log entry's size.
        raise c.fail("node.max_value_bytes",
                     f"node.max_key_bytes ({n.max_key_bytes}) + node.max_value_bytes "
                     f"({n.max_value_bytes}) must leave {ENTRY_HEADROOM} bytes of "
                     f"node.max_request_bytes ({n.max_request_bytes}) for the rest of the entry")
    if n.max_response_bytes < n.max_value_bytes:
        # Else a value a put accepted could never be read back.
        raise c.fail("node.max_response_bytes",
                     f"{n.max_response_bytes} is less than node.max_value_bytes "
                     f"({n.max_value_bytes}): a value could be written but not read")
    peers = {}
    for k, v in c.cluster.peers.items():
        if not str(k).isdigit() or not 1 <= int(k) <= MAX_NODE_ID:
            raise c.fail(f"cluster.peers.{k}", "node ids must be integers >= 1")
        peers[int(k)] = _address(c, f"cluster.peers.{k}", v)
    for table in ("client_addresses", "dial"):
        for k, v in getattr(c.cluster, table).items():
            if not str(k).isdigit() or not 1 <= int(k) <= MAX_NODE_ID:
                raise c.fail(f"cluster.{table}.{k}", "node ids must be integers >= 1")
            _address(c, f"cluster.{table}.{k}", v)
    if c.node.metrics_address:
        _address(c, "node.metrics_address", c.node.metrics_address)
    _validate_metrics(c)
    for i, endpoint in enumerate(c.cluster.join):
        _address(c, f"cluster.join[{i}]", endpoint)
    if c.node.id not in peers and not c.cluster.join:
        raise c.fail("cluster.peers", f"must include this node (id {c.node.id}), or name "
                     "the members of a running cluster to join in cluster.join")
    if c.node.id in peers and peers[c.node.id] != c.node.address:
        raise c.fail("node.address",
                     f"{c.node.address!r} differs from cluster.peers.{c.node.id} "
                     f"({peers[c.node.id]!r})")
    if c.raft.read_only not in ("read_index", "lease"):
        raise c.fail("raft.read_only", f"expected \"read_index\" or \"lease\", got "
                                       f"{c.raft.read_only!r}")
    if c.raft.read_only == "lease" and not c.raft.check_quorum:
        raise c.fail("raft.read_only", "\"lease\" needs raft.check_quorum = true")
    if c.log.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise c.fail("log.level", "expected debug, info, warning or error")
    if c.auth.required and not c.auth.public_keys:
        raise c.fail("auth.public_keys", "auth.required = true needs the public keys tokens "
                     "are signed with (`raftcache up --auth` writes DATA_DIR/auth/signing.pub)")
    for cn, role in c.auth.certificates.items():
        if not isinstance(role, str) or not role:
            raise c.fail(f"auth.certificates.{cn}", f"expected a role name, got {role!r}")
    if c.encryption.enabled and not c.encryption.keyring:
        raise c.fail("encryption.keyring", "encryption.enabled = true needs a keyring file "
                     "(`raftcache keys init FILE` makes one; `raftcache up` makes "
                     "DATA_DIR/keyring)")
    if ((len(peers) > 1 or c.cluster.join)
            and not (c.cluster.secret_file or c.transport.tls or c.cluster.insecure)):
        raise c.fail("cluster.secret_file",
                     "peers must prove they are nodes of this cluster: name a secret file "
                     "(`raftcache up` generates one; any 32 random bytes, mode 0600), or use "
                     "TLS node certificates ([transport.tls]), or accept Raft traffic from "
                     "anyone who can reach the port with cluster.insecure = true")


def _validate_metrics(c: Config) -> None:
    m = c.metrics
    if not 0 < m.request_timeout <= 300:
        raise c.fail("metrics.request_timeout", f"must be between 0 and 300 seconds, got "
                                                f"{m.request_timeout}")
    for user, hashed in m.basic_auth_users.items():
        if not isinstance(hashed, str) or not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            raise c.fail(f"metrics.basic_auth_users.{user}", "expected a bcrypt hash "
                         "($2b$...), not a password")
        if ":" in user:
            raise c.fail(f"metrics.basic_auth_users.{user}", "a user name has no colon")
    tls = m.tls_server_config
    if tls is not None:
        for key in ("cert_file", "key_file"):
            if not os.path.isfile(getattr(tls, key)):
                raise c.fail(f"metrics.tls_server_config.{key}",
                             f"{getattr(tls, key)!r}: no such file")


def read_secret(path: str, config: Config | None = None) -> bytes:
    """The cluster secret in `path`: refused when missing, short, or readable by others."""
    def fail(problem: str) -> ConfigError:
        message = f"{path}: {problem}"
        return config.fail("cluster.secret_file", message) if config else ConfigError(message)

    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            secret = f.read(4096).strip()
    except OSError as exc:
        raise fail(f"cannot read the cluster secret: {exc.strerror}") from None
    if mode & 0o077:
        raise fail(f"the cluster secret is readable by others (mode {mode & 0o777:04o}); "
                   f"chmod 600 {path}")
    if len(secret) < 32:
        raise fail(f"the cluster secret has {len(secret)} bytes; use at least 32 "
                   "(e.g. `head -c 32 /dev/urandom | xxd -p -c 64`)")
    return secret


def write_secret(path: str) -> None:
    """A new random cluster secret in `path` (mode 0600); an existing one is kept."""
    try:
        write_private(path, secrets.token_hex(32) + "\n", replace=False)
    except FileExistsError:
        pass
