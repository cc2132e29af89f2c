"""Tools for testing raftcache: history recording and linearizability checking."""
