"""The pure Raft core (sans-I/O) and, later, the gevent node that drives it."""
