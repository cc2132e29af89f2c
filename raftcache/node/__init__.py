"""The gevent driver: a node process hosts replicas of Raft groups and carries out what the
pure core asks (persist, send, apply), serves clients, and runs the plugins."""

from .host import Node

__all__ = ["Node"]
