"""The pure layers: no I/O, no clocks, no gevent (`setup.cfg [importlinter]` checks it).

- `raft/`: the Raft protocol (`RawNode`);
- `cache/`: the cache's deterministic state machine;
- `api`, `operations`: what a node is asked and answers, and the registry of client
  operations (fields, kind, the command a write proposes).
"""
