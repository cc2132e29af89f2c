// raftcache from Node.js: a client generated from raftcache/raftcache.thrift by Apache Thrift's
// compiler (thrift --gen js:node,with_ns; see README.md for why with_ns), on the official Apache
// Thrift runtime for Node (npm "thrift").
//
//   node client.js HOST:PORT[,HOST:PORT...] [GEN_DIR]
//
// GEN_DIR holds the generated RaftCache.js (default: gen/ next to this file). Exits 0 after
// printing "nodejs ok <version>", non-zero on any failure; every step is bounded in time.
"use strict";

const path = require("path");
const thrift = require("thrift");

const CALL_TIMEOUT_MS = 5000;
const WHOLE_RUN_TIMEOUT_MS = 30000;

const [endpointList, genDir = path.join(__dirname, "gen")] = process.argv.slice(2);
if (!endpointList) {
  console.error("usage: node client.js HOST:PORT[,HOST:PORT...] [GEN_DIR]");
  process.exit(2);
}
const endpoints = endpointList.split(",");
const RaftCache = require(path.resolve(genDir, "RaftCache.js"));
const { NotLeader } = require(path.resolve(genDir, "raftcache_types.js"));

// The npm runtime has no per-call deadline: a call to a node that never answers would hang.
function withTimeout(promise, what) {
  let timer;
  const expired = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer in ${CALL_TIMEOUT_MS} ms`)),
      CALL_TIMEOUT_MS);
  });
  return Promise.race([promise, expired]).finally(() => clearTimeout(timer));
}

// Framed transport + binary protocol: what every raftcache node speaks.
function connect(address) {
  const i = address.lastIndexOf(":");
  const connection = thrift.createConnection(address.slice(0, i), Number(address.slice(i + 1)), {
    transport: thrift.TFramedTransport,
    protocol: thrift.TBinaryProtocol,
    connect_timeout: CALL_TIMEOUT_MS,
  });
  const connected = new Promise((resolve, reject) => {
    connection.once("connect", resolve);
    connection.once("error", reject);
  });
  // Without a listener a late socket error would crash the process instead of failing a call.
  connection.on("error", (err) => console.error(`${address}: ${err.message}`));
  return withTimeout(connected, `connect to ${address}`).then(
    () => ({ address, connection, client: thrift.createClient(RaftCache, connection) }),
    (err) => {
      connection.destroy();
      throw err;
    });
}

function check(condition, message) {
  if (!condition) throw new Error(`check failed: ${message}`);
}

// Any node knows who leads once one is elected; an empty leader_address means "not yet".
async function connectToLeader() {
  const deadline = Date.now() + 10000;
  while (Date.now() < deadline) {
    for (const address of endpoints) {
      let node;
      try {
        node = await connect(address);
        const status = await withTimeout(node.client.status(), `status of ${address}`);
        if (status.leader_address === address) return node;
        node.connection.end();
        if (status.leader_address) return await connect(status.leader_address);
      } catch (err) {
        if (node) node.connection.end();
        console.error(`${address}: ${err.message}; trying the next node`);
      }
    }
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
  throw new Error(`no leader known to any of ${endpoints.join(", ")}`);
}

// By the address each node reports for itself: an endpoint may name the leader differently
// (localhost rather than 127.0.0.1).
async function connectToFollower(leaderAddress) {
  for (const address of endpoints) {
    const node = await connect(address);
    const status = await withTimeout(node.client.status(), `status of ${address}`);
    if (status.address !== leaderAddress) return node;
    node.connection.end();
  }
  throw new Error("no follower among the endpoints: give at least two");
}

async function main() {
  const leader = await connectToLeader();
  const cache = leader.client;
  const call = (promise, what) => withTimeout(promise, `${what} at ${leader.address}`);

  // Keys and values are Thrift `binary`: Buffers. i64 results are node-int64 values.
  // The trailing null is the optional RequestHeader (no token, no exactly-once id).
  const key = Buffer.from("nodejs:interop");
  const version = await call(cache.put(key, Buffer.from("from-node"), 0, null), "put");
  const got = await call(cache.get(key, "linearizable", null), "get");
  check(got.found && got.value.toString() === "from-node", `get after put: ${got.value}`);
  check(got.version.equals(version), `version ${got.version} != ${version}`);
  check((await call(cache.remove(key, null), "remove")) === true, "remove of a present key");
  check(!(await call(cache.get(key, "linearizable", null), "get")).found, "get after remove");
  // Removed first, so that a second run against the same cluster counts from zero again.
  const counterKey = Buffer.from("nodejs:counter");
  await call(cache.remove(counterKey, null), "remove");
  const counter = await call(cache.incr(counterKey, 41, null), "incr");
  check(counter.toNumber() === 41, `incr of a missing key by 41 gave ${counter}`);

  // A follower refuses a write with NotLeader, whose leader_hint says where to go instead.
  const follower = await connectToFollower(leader.address);
  try {
    await withTimeout(follower.client.put(key, Buffer.from("v"), 0, null), "put at a follower");
    throw new Error(`follower ${follower.address} accepted a write`);
  } catch (err) {
    if (!(err instanceof NotLeader)) throw err;
    check(err.leader_hint === leader.address, `leader_hint ${err.leader_hint}`);
    console.log(`${follower.address} answered NotLeader(leader_hint=${err.leader_hint})`);
  } finally {
    follower.connection.end();
  }

  // Left in place: a client in another language can read it back.
  const greeting = await call(
    cache.put(Buffer.from("nodejs:greeting"), Buffer.from("hello from node"), 0, null), "put");
  leader.connection.end();
  console.log(`nodejs ok ${greeting}`);
}

// A watchdog for the whole run; unref'd so that it does not keep a finished run alive.
setTimeout(() => {
  console.error(`gave up after ${WHOLE_RUN_TIMEOUT_MS} ms`);
  process.exit(1);
}, WHOLE_RUN_TIMEOUT_MS).unref();

main().catch((err) => {
  console.error(`nodejs client failed: ${err.stack || err}`);
  process.exit(1);
});
