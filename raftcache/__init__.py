"""raftcache: a strongly consistent distributed cache on its own Raft."""

__version__ = "0.1.0"
