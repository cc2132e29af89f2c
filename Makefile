.PHONY: test lint sim sim-long jepsen jepsen-long jepsen-backends fuzz demo bench bench-all \
	bench-failover bench-storage bench-latency bench-backends bench-security bench-stalls

test:
	scripts/test

lint:
	scripts/bootstrap && .venv/bin/ruff check raftcache tests examples

# The deterministic simulator: 1,000 seeds on 5 nodes (about a minute per core).
sim:
	scripts/bootstrap && .venv/bin/python -m raftcache.testing.sim --seeds 1000 --nodes 5 --jobs 2

sim-long:
	scripts/bootstrap && .venv/bin/python -m raftcache.testing.sim --seeds 10000 --nodes 5 --jobs 2

# The fault suite against a real 5-node cluster: all nemeses, 2 minutes / 30 minutes.
jepsen:
	scripts/bootstrap && .venv/bin/python -m raftcache.testing.jepsen --time 120 --nemesis all

jepsen-long:
	scripts/bootstrap && .venv/bin/python -m raftcache.testing.jepsen --time 1800 --nemesis all --rate 150

# The fault suite on each cache backend, 5 minutes each: all nemeses (kill-backend too where the
# backend runs servers); every backend runs even when one fails.
JEPSEN_BACKENDS = memory redis memcached hybrid
jepsen-backends:
	scripts/bootstrap && status=0; for b in $(JEPSEN_BACKENDS); do \
	  .venv/bin/python -m raftcache.testing.jepsen --time 300 --nemesis all --backend $$b \
	    || status=1; done; exit $$status

# Every parser's fuzz target for a minute (atheris where it installs).
fuzz:
	scripts/bootstrap && for t in $$(.venv/bin/python -m raftcache.testing.fuzz --list); do \
	  .venv/bin/python -m raftcache.testing.fuzz $$t --seconds 60 || exit 1; done

demo:
	scripts/demo

# kill -9 the leader 20 times; time to the first acknowledged write
bench-failover:
	scripts/bootstrap && .venv/bin/python examples/failover_bench.py --rounds 20
	.venv/bin/python examples/failover_bench.py --rounds 20 --stop

# durable appends/s: group commit vs one fsync per entry (file-wal, redis-aof)
bench-storage:
	scripts/bootstrap && .venv/bin/python examples/bench_storage.py

# one sequential client, 3 nodes: end-to-end write latency per storage
bench-latency:
	scripts/bootstrap && .venv/bin/python examples/bench_latency.py

# set/get throughput and p50/p99 per backend, 3 nodes, beside direct Redis and Memcached
bench-backends:
	scripts/bootstrap && .venv/bin/raftcache bench --scenario backends --compare $(BENCH_ARGS)

# raftcache bench --compare: latency, throughput and read-heavy scenarios, 3 nodes (file-wal
# with fsync, thrift), beside Redis (appendfsync always), Memcached and PySyncObj; a few minutes
BENCH_ARGS ?=
bench:
	scripts/bootstrap
	.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,bench]' \
	  || echo "could not install the bench extra: PySyncObj will be skipped"
	.venv/bin/raftcache bench --compare $(BENCH_ARGS)

# every older benchmark, one after another
bench-all: bench-storage bench-latency bench-failover bench-backends bench-security bench-stalls

# the throughput cost of auth (signed tokens) plus encryption at rest: off vs on, 3 nodes
bench-security:
	scripts/bootstrap && .venv/bin/raftcache bench --scenario security $(BENCH_ARGS)

# the longest stall of a node's hub under hostile requests, and under large invalidates and
# mgets with a million keys
bench-stalls:
	scripts/bootstrap && .venv/bin/python examples/hostile_stalls.py
	.venv/bin/python examples/amplification_stalls.py
