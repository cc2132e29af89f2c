"""The fault suite's slow disk: a wrapper that stalls durable saves on demand, and only those."""

import time

import pytest

from raftcache.core.raft.messages import Entry, HardState
from raftcache.pluginapi.manager import PluginSet, entry_point_names, make_manager
from raftcache.testing import slow_disk
from raftcache.testing.slow_disk import set_delay


def make(tmp_path, **options):
    # Test code: registered by the test side (raftcache.testing.node --plugin), never shipped
    # as an entry point.
    provider = PluginSet(make_manager(extra=[slow_disk])).storage("slow-disk")
    return provider.factory(1, str(tmp_path), {"inner": "file-wal", **options})


def test_a_production_node_cannot_load_it():
    assert "slow-disk" not in entry_point_names()
    with pytest.raises(Exception, match="unknown storage 'slow-disk'"):
        PluginSet(make_manager()).storage("slow-disk")


def timed(fn):
    start = time.monotonic()
    fn()
    return time.monotonic() - start


def test_saves_stall_only_while_asked_and_only_when_durable(tmp_path):
    s = make(tmp_path)
    s.load()
    entry = Entry(term=1, index=1, type=0, data=b"x")
    assert timed(lambda: s.save(HardState(1, 0, 0), [entry], None, True)) < 0.25
    set_delay(str(tmp_path), 0.3)
    time.sleep(0.06)  # the wrapper looks at its control file every 50 ms
    assert timed(lambda: s.save(HardState(1, 0, 1), [], None, False)) < 0.25  # no fsync: no stall
    assert timed(lambda: s.save(None, [Entry(1, 2, 0, b"y")], None, True)) >= 0.3
    set_delay(str(tmp_path), 0)
    time.sleep(0.06)
    assert timed(lambda: s.save(None, [Entry(1, 3, 0, b"z")], None, True)) < 0.25
    s.close()
    # Everything went to the inner storage, durably.
    again = make(tmp_path)
    hard_state, _snapshot, entries = again.load()
    assert [e.data for e in entries] == [b"x", b"y", b"z"] and hard_state.term == 1
    again.close()


def test_inner_must_be_another_storage(tmp_path):
    with pytest.raises(ValueError, match="another storage"):
        make(tmp_path, inner="slow-disk")
    with pytest.raises(Exception, match="unknown storage 'nope' \\(known: "):
        make(tmp_path, inner="nope")
