.PHONY: test lint sim sim-long jepsen jepsen-long fuzz demo bench bench-failover bench-storage bench-latency

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

# Every parser's fuzz target for a minute (atheris where it installs).
fuzz:
	scripts/bootstrap && for t in $$(.venv/bin/python -m raftcache.testing.fuzz --list); do \
	  .venv/bin/python -m raftcache.testing.fuzz $$t --seconds 60 || exit 1; done

demo:
	scripts/demo

# kill -9 the leader 20 times; time to the first acknowledged write
bench-failover:
	scripts/bootstrap && .venv/bin/python examples/failover_bench.py --rounds 20

# durable appends/s: group commit vs one fsync per entry (file-wal, redis-aof)
bench-storage:
	scripts/bootstrap && .venv/bin/python examples/bench_storage.py

# one sequential client, 3 nodes: end-to-end write latency per storage
bench-latency:
	scripts/bootstrap && .venv/bin/python examples/bench_latency.py

bench: bench-storage bench-latency bench-failover
