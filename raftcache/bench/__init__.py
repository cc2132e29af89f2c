"""`raftcache bench`: load, latency and throughput against a raftcache cluster, and side by side
against Redis (appendfsync always), Memcached and PySyncObj in the same run (`--compare`).

Kept free of imports: `python -m raftcache.bench.worker` runs this first, and the worker must
let gevent patch the standard library before anything imports socket or threading.

    stats          percentiles, median and spread (no dependencies)
    worker         a client process: greenlets in closed loops, JSON lines on stdin/stdout
    pysyncobj_node a PySyncObj node process (its leader drives the load in-process)
    run            the driver: targets, scenarios, repetitions, tables, --json, --plot
"""
