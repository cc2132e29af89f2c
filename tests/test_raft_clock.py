"""Cluster time in the core: clocks are data the driver hands in, and no single one decides."""

from __future__ import annotations

from raft_harness import Network

from raftcache.core.raft.messages import MsgType

T = 1_900_000_000_000  # "now" in ms, as a correct clock reads it
YEAR = 365 * 24 * 3600 * 1000


def cluster_times(net: Network, clocks: dict[int, int]) -> dict[int, int | None]:
    """Each node's cluster time after its driver hands it `clocks[n]` (its wall clock)."""
    out = {}
    for n, node in net.nodes.items():
        node.set_clock(clocks[n])
        offset = node.clock_offset_ms()
        out[n] = None if offset is None else clocks[n] + offset
    return out


def run(net: Network, clocks: dict[int, int], rounds: int = 3) -> None:
    """Heartbeat rounds with every node's clock set first, as the driver does."""
    for _ in range(rounds):
        for n, node in net.nodes.items():
            node.set_clock(clocks[n])
        net.tick_all(net.make_config(1).heartbeat_tick)
        net.stabilize()


def test_a_leader_a_year_ahead_or_behind_does_not_move_cluster_time():
    for skew in (YEAR, -YEAR):
        net = Network.bootstrap([1, 2, 3])
        net.elect(1)
        clocks = {1: T + skew, 2: T + 3, 3: T - 5}
        run(net, clocks)
        times = cluster_times(net, clocks)
        assert all(abs(t - T) <= 5 for t in times.values()), (skew, times)


def test_a_follower_a_year_behind_runs_at_the_leaders_agreed_time():
    net = Network.bootstrap([1, 2, 3])
    net.elect(1)
    clocks = {1: T, 2: T + 2, 3: T - YEAR}
    run(net, clocks)
    assert cluster_times(net, clocks)[3] == T
    # Its clock keeps running (at its own rate) while it hears nothing more.
    net.isolate(3)
    later = {n: c + 10_000 for n, c in clocks.items()}
    assert cluster_times(net, later)[3] == T + 10_000


def test_a_new_leader_agrees_on_nothing_until_a_quorum_reports():
    net = Network.bootstrap([1, 2, 3])
    assert all(n.clock_offset_ms() is None for n in net.nodes.values())
    leader = net.elect(1)  # no clocks handed in: nobody reported one
    assert leader.clock_offset_ms() is None
    leader.set_clock(T + YEAR)
    net.nodes[2].set_clock(T)
    net.tick(1, net.make_config(1).heartbeat_tick)
    net.deliver(lambda m: m.type == MsgType.HEARTBEAT and m.to == 3)
    net.deliver(lambda m: m.type == MsgType.HEARTBEAT_RESP)
    assert leader.clock_offset_ms() is None  # node 3 reported no clock: no quorum yet
    net.deliver(lambda m: m.type == MsgType.HEARTBEAT and m.to == 2)
    net.deliver(lambda m: m.type == MsgType.HEARTBEAT_RESP)
    assert leader.clock_offset_ms() == -YEAR  # itself and node 2: the earlier one wins


def test_a_lone_voter_is_the_cluster():
    net = Network.bootstrap([1])
    net.elect(1)
    assert cluster_times(net, {1: T + YEAR}) == {1: T + YEAR}


def test_messages_carry_no_clock_unless_the_driver_gives_one():
    # The simulator never sets clocks: its messages (and hence its runs) are unchanged.
    net = Network.bootstrap([1, 2, 3])
    net.elect(1)
    net.tick_all(2)
    assert net.queue and all(m.clock_ms == 0 for m in net.queue)
    assert all(n.clock_offset_ms() in (None, 0) for n in net.nodes.values())


def test_a_leader_sends_the_agreed_time_and_a_follower_its_own_clock():
    net = Network.bootstrap([1, 2, 3])
    net.elect(1)
    clocks = {1: T + YEAR, 2: T, 3: T + 4}
    run(net, clocks)
    for n, node in net.nodes.items():
        node.set_clock(clocks[n])
    net.tick_all(net.make_config(1).heartbeat_tick)
    beats = [m for m in net.queue if m.type == MsgType.HEARTBEAT]
    assert beats and all(abs(m.clock_ms - T) <= 4 for m in beats)
    net.deliver(lambda m: m.type == MsgType.HEARTBEAT)
    answers = {m.frm: m.clock_ms for m in net.queue if m.type == MsgType.HEARTBEAT_RESP}
    assert answers == {2: T, 3: T + 4}


def test_ticks_since_leader():
    net = Network.bootstrap([1, 2, 3])
    assert net.nodes[2].ticks_since_leader() is None  # not heard from one since it started
    net.elect(1)
    run(net, {1: T, 2: T, 3: T})
    assert net.nodes[1].ticks_since_leader() <= 2 and net.nodes[3].ticks_since_leader() <= 2
    net.isolate(3)
    run(net, {1: T, 2: T, 3: T}, rounds=4)
    assert net.nodes[3].ticks_since_leader() == 4 * net.make_config(3).heartbeat_tick
    assert net.nodes[2].ticks_since_leader() <= 2


def test_teeth_a_core_whose_leader_trusts_its_own_clock_is_caught(monkeypatch):
    # The check of the first test, on a core whose leader takes its own clock as agreed.
    from raftcache.core.raft import RawNode

    agreed = RawNode.clock_offset_ms
    monkeypatch.setattr(RawNode, "clock_offset_ms",
                        lambda self: 0 if self.role.name == "LEADER" else agreed(self))
    net = Network.bootstrap([1, 2, 3])
    net.elect(1)
    clocks = {1: T + YEAR, 2: T + 3, 3: T - 5}
    run(net, clocks)
    times = cluster_times(net, clocks)
    assert not all(abs(t - T) <= 5 for t in times.values())
    assert times[1] == T + YEAR and times[2] == times[3] == T + YEAR  # all follow it
