"""The deterministic simulator: clean runs, reproducibility, and its command line."""

import pytest

from raftcache.core.raft import ReadOnlyOption
from raftcache.testing import sim
from raftcache.testing.sim import SimConfig, Simulation, run_seed


@pytest.mark.parametrize("nodes", [3, 5])
@pytest.mark.parametrize("lease", [False, True], ids=["readindex", "lease"])
def test_many_seeds_run_clean(nodes, lease):
    """CI's share of the 10,000-seed run: 4 x 80 seeds, every check after every event."""
    read_only = ReadOnlyOption.LEASE if lease else ReadOnlyOption.READ_INDEX
    config = SimConfig(nodes=nodes, read_only=read_only)
    ok_ops = 0
    for seed in range(1000, 1080):
        result = run_seed(seed, config)
        ok_ops += sum(1 for op in result.history.operations() if str(op.status) == "ok")
    assert ok_ops > 80 * 50  # the runs did real work, not just fail every request


def test_runs_exercise_every_fault():
    faults: dict = {}
    for seed in range(40):
        for name, n in run_seed(seed).faults.items():
            faults[name] = faults.get(name, 0) + n
    for expected in ["crash", "partition isolate_leader", "partition halves", "partition ring",
                     "partition bridge", "partition asymmetric", "transfer", "membership",
                     "clock skew", "lossy links", "leader churn", "connection reset"]:
        assert faults.get(expected, 0) > 0, (expected, faults)


def test_snapshots_are_sent_in_chunks_and_installed():
    installs = 0
    for seed in range(20):
        s = run_seed(seed)
        installs += sum(1 for _t, what in s.trace if what[0] == "snapshot")
    assert installs > 0


def test_same_seed_same_run():
    a = Simulation(7).run()
    b = Simulation(7).run()
    assert a.delivered == b.delivered
    assert list(a.trace) == list(b.trace)
    assert [op.describe() for op in a.history.operations()] == [
        op.describe() for op in b.history.operations()
    ]


def test_different_seeds_differ():
    assert Simulation(1).run().delivered != Simulation(2).run().delivered


def test_cli_reports_rate(capsys):
    assert sim.main(["--seeds", "6", "--nodes", "3"]) == 0
    out = capsys.readouterr().out
    assert "6 seeds, 3 nodes: 0 failed" in out
    assert "simulated messages/s" in out


def test_demo_tells_the_story(capsys):
    assert sim.main(["--demo", "--start", "3"]) == 0
    out = capsys.readouterr().out
    assert "becomes leader of term" in out
    assert "all checks passed" in out
