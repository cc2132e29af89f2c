// raftcache wire format: the client service and the peer messages.
//
// Binary protocol, framed transport. `set` is reserved in Thrift IDL and thriftpy2 rejects
// `delete`, so the service calls them `put` and `remove`, and so does everything inside the node
// (the Python client and the CLI keep set/delete: `Operation.client_name`). Every client call
// takes an optional trailing RequestHeader: generated clients in any language may pass null.

namespace py raftcache_rpc  // not "raftcache": that is the Python package
namespace java io.raftcache
namespace go raftcache

// ---- errors: what each promises about the call that raised it ---------------------------------
exception NotLeader {
  1: string leader_hint    // "host:port" of the leader this node knows of, or ""
}
exception Unauthorized {
  1: string reason
}
exception InvalidRequest {
  1: string reason
}
exception Unavailable {     // nothing was sent, or it surely did not apply: safe to retry
  1: string reason
  2: optional string leader_hint  // set: retry at this node after a backoff (it is overloaded)
}
exception OutcomeUnknown {  // a write that may or may not have applied
  1: string reason
}

// ---- client calls -----------------------------------------------------------------------------
struct RequestHeader {
  1: optional string token,       // signed RBAC token
  2: optional string client_id,   // exactly-once: (client_id, seq) identifies a write
  3: optional i64 seq,
  4: optional i32 timeout_ms,
  5: optional bool forwarded,     // proxied by a follower: the receiver must not forward again
  6: optional string certificate, // set by a node that forwards a call: the CN of the caller's
                                  // client certificate (from anyone but a node: ignored)
}

struct GetResult {
  1: bool found,
  2: binary value,
  3: i64 version,                 // log index of the entry that last wrote the key
}

// Part of a backup: an image of the whole state machine at a committed log index.
struct SnapshotPart {
  1: i64 index,
  2: i64 term,
  3: i64 size,                    // bytes of the whole image
  4: string sha256,               // of the whole image, hex
  5: i64 offset,                  // where data starts in it
  6: binary data,
}

struct NodeStatus {
  1: i64 id,
  2: string address,
  3: string role,
  4: i64 term,
  5: i64 commit,
  6: i64 applied,
  7: i64 leader,
  8: string leader_address,
  9: list<i64> voters,
  10: list<i64> learners,
  11: optional map<i64, string> peer_addresses, // member id -> where peers reach it
  12: optional list<i64> joined,  // members that ran and hold the log
  13: optional string metrics_url, // Prometheus text at http://.../metrics (node.metrics_address)
  14: optional i64 cluster_time_ms, // what it stamps writes and judges expiry by
}

// A request or response as one value: what the tcp-tls transport carries in its frames, and
// what the node handles whichever transport a call came in on.
struct Request {
  1: string op,                   // put remove get cas incr append invalidate mget mset
                                  // status transfer_leader change_member snapshot admin
  2: optional binary key,
  3: optional binary value,
  4: optional i64 ttl_ms,
  5: optional i64 expected_version,
  6: optional i64 delta,
  7: optional string consistency, // linearizable (default), lease, stale
  8: optional list<binary> keys,
  9: optional map<binary, binary> items,
  10: optional RequestHeader header,
  11: optional i64 node_id,       // transfer_leader, change_member
  12: optional string change,     // change_member: add-voter, add-learner, remove,
                                  // update-address
  13: optional string action,     // admin: e.g. "revoke", "keys-rotate"
  14: optional list<binary> arguments, // admin: the action's arguments
  15: optional string address,    // change_member: where peers reach node_id (host:port)
  16: optional i64 offset,        // snapshot: the byte to read from
  17: optional i64 index,         // snapshot: the image being read (0: take a new one)
}

struct Response {
  1: optional string error,       // exception name, e.g. "NotLeader"; absent on success
  2: optional string reason,
  3: optional string leader_hint,
  4: optional GetResult result,   // get
  5: optional list<GetResult> results,  // mget
  6: optional i64 number,         // put/cas/mset: version; incr: value; invalidate: count
  7: optional bool ok,            // remove/cas
  8: optional NodeStatus status,
  9: optional list<i64> versions, // mset
  10: optional string text,       // admin: a JSON object
  11: optional SnapshotPart part, // snapshot
}

// ---- peer messages (raftcache.core.messages) --------------------------------------------------
struct Entry {
  1: i64 term,
  2: i64 index,
  3: i8 type,
  4: binary data,
}

struct ConfState {
  1: list<i64> voters,
  2: list<i64> voters_outgoing,
  3: list<i64> learners,
}

struct SnapshotMeta {
  1: i64 index,
  2: i64 term,
  3: ConfState conf_state,
}

struct RaftMessage {
  1: i8 type,
  2: i64 to,
  3: i64 frm,
  4: i64 term,
  5: i64 log_term,
  6: i64 index,
  7: list<Entry> entries,
  8: i64 commit,
  9: bool reject,
  10: i64 reject_hint,
  11: binary context,
  12: optional SnapshotMeta snapshot_meta,
  13: i64 offset,
  14: binary data,
  15: bool done,
  16: i64 tick,
  17: i64 clock_ms,
}

struct RaftBatch {
  1: i64 cluster_id,
  2: list<RaftMessage> messages,
}

// ---- peer authentication on a plaintext connection (docs/security.md) -------------------------
// A node that dials a peer calls peer_hello, checks the listener's proof, then calls peer_auth
// with its own; only then do its raft() batches count. A proof is HMAC-SHA256 with the cluster
// secret over both nonces, the cluster id and both node ids (transport/peer_proof.py).
struct PeerHello {
  1: i64 cluster_id,
  2: i64 from_node,
  3: i64 to_node,
  4: binary nonce,                // 32 fresh random bytes
}

struct PeerChallenge {
  1: binary nonce,                // the listener's 32 fresh random bytes
  2: binary proof,                // the listener's proof that it holds the secret
}

service RaftCache {
  i64 put(1: binary key, 2: binary value, 3: i64 ttl_ms, 4: RequestHeader header)
      throws (1: NotLeader not_leader, 2: Unauthorized unauthorized,
              3: InvalidRequest invalid, 4: Unavailable unavailable, 5: OutcomeUnknown unknown),
  GetResult get(1: binary key, 2: string consistency, 3: RequestHeader header)
      throws (1: NotLeader not_leader, 2: Unauthorized unauthorized,
              3: InvalidRequest invalid, 4: Unavailable unavailable, 5: OutcomeUnknown unknown),
  bool remove(1: binary key, 2: RequestHeader header)
      throws (1: NotLeader not_leader, 2: Unauthorized unauthorized,
              3: InvalidRequest invalid, 4: Unavailable unavailable, 5: OutcomeUnknown unknown),
  bool cas(1: binary key, 2: i64 expected_version, 3: binary value, 4: i64 ttl_ms,
           5: RequestHeader header)
      throws (1: NotLeader not_leader, 2: Unauthorized unauthorized,
              3: InvalidRequest invalid, 4: Unavailable unavailable, 5: OutcomeUnknown unknown),
  i64 incr(1: binary key, 2: i64 delta, 3: RequestHeader header)
      throws (1: NotLeader not_leader, 2: Unauthorized unauthorized,
              3: InvalidRequest invalid, 4: Unavailable unavailable, 5: OutcomeUnknown unknown),
  i64 invalidate(1: binary prefix, 2: RequestHeader header)
      throws (1: NotLeader not_leader, 2: Unauthorized unauthorized,
              3: InvalidRequest invalid, 4: Unavailable unavailable, 5: OutcomeUnknown unknown),
  list<GetResult> mget(1: list<binary> keys, 2: string consistency, 3: RequestHeader header)
      throws (1: NotLeader not_leader, 2: Unauthorized unauthorized,
              3: InvalidRequest invalid, 4: Unavailable unavailable, 5: OutcomeUnknown unknown),
  list<i64> mset(1: map<binary, binary> items, 2: i64 ttl_ms, 3: RequestHeader header)
      throws (1: NotLeader not_leader, 2: Unauthorized unauthorized,
              3: InvalidRequest invalid, 4: Unavailable unavailable, 5: OutcomeUnknown unknown),
  i64 append(1: binary key, 2: binary value, 3: RequestHeader header)
      throws (1: NotLeader not_leader, 2: Unauthorized unauthorized,
              3: InvalidRequest invalid, 4: Unavailable unavailable, 5: OutcomeUnknown unknown),
  NodeStatus status(),

  // Operations. Both are answered by the leader (a follower redirects or proxies) and return
  // the leader's status once done: transfer_leader when `node_id` leads, change_member when
  // the change is applied. change_member is idempotent: asking for what is already in effect
  // succeeds at once.
  NodeStatus transfer_leader(1: i64 node_id, 2: RequestHeader header)
      throws (1: NotLeader not_leader, 2: Unauthorized unauthorized,
              3: InvalidRequest invalid, 4: Unavailable unavailable, 5: OutcomeUnknown unknown),
  NodeStatus change_member(1: string change, 2: i64 node_id, 3: RequestHeader header,
                           4: string address)
      throws (1: NotLeader not_leader, 2: Unauthorized unauthorized,
              3: InvalidRequest invalid, 4: Unavailable unavailable, 5: OutcomeUnknown unknown),

  // A backup from the leader, a part (up to 1 MiB) at a time: index 0 takes a new image once
  // everything committed before the call is applied; then ask with its index and the next
  // offset until offset + len(data) = size. Needs an admin grant when authentication is on.
  SnapshotPart snapshot(1: i64 offset, 2: i64 index, 3: RequestHeader header)
      throws (1: NotLeader not_leader, 2: Unauthorized unauthorized,
              3: InvalidRequest invalid, 4: Unavailable unavailable, 5: OutcomeUnknown unknown),

  // Admin actions (security plugins: revoke a subject's tokens, set roles, rotate the data
  // key); needs an admin grant when authentication is on. Answers a JSON object: {"result":
  // ...} once a change applied, or a report.
  string admin(1: string action, 2: list<binary> arguments, 3: RequestHeader header)
      throws (1: NotLeader not_leader, 2: Unauthorized unauthorized,
              3: InvalidRequest invalid, 4: Unavailable unavailable, 5: OutcomeUnknown unknown),

  // Node-to-node: Raft messages, one way, in batches, on a connection that proved it is a
  // peer (a node certificate under TLS, or peer_hello + peer_auth with the cluster secret).
  oneway void raft(1: RaftBatch batch),
  PeerChallenge peer_hello(1: PeerHello hello),
  bool peer_auth(1: binary proof),
}
