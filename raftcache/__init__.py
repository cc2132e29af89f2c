"""raftcache: a strongly consistent distributed cache on its own Raft."""

__version__ = "0.1.0"
__all__ = ["Client"]


def __getattr__(name):
    # Lazy, so that importing the pure core does not load the Thrift IDL or gevent.
    if name == "Client":
        from raftcache.client import Client

        return Client
    raise AttributeError(name)
