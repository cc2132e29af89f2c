"""The Raft protocol, sans-I/O (like etcd-raft's RawNode): no sockets, files, clocks, threads,
gevent or randomness other than the `random.Random` it is handed. `setup.cfg [importlinter]`
keeps it that way. `RawNode` is its face: Tick/Step/Propose/Ready/Advance."""

from .rawnode import PersistedState, RaftConfig, RawNode, ReadOnlyOption

__all__ = ["PersistedState", "RaftConfig", "RawNode", "ReadOnlyOption"]
