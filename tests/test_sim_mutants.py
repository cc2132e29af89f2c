"""The simulator has teeth: each deliberately broken core is caught within a bounded number
of seeds. The bounds are generous multiples of what was measured (the simulator is
deterministic, so a seed that catches a mutant today catches it every time)."""

import pytest

from raftcache.core.raft import RawNode, ReadOnlyOption
from raftcache.testing import mutants, sim
from raftcache.testing.sim import SafetyViolation, SimConfig, find_violation

CASES = [
    # (mutant, nodes, leader churn, seed bound, what the report must mention)
    (mutants.VoteWithoutLogCheck, 5, 0.3, 50, ""),
    # Figure 8 needs leaders that win and vanish before their entries spread: more churn.
    (mutants.CommitByCountingOldTerms, 3, 0.6, 100, "commit safety"),
    (mutants.ReadIndexWithoutHeartbeat, 3, 0.3, 200, "linearizability"),
    (mutants.ReadIndexBeforeOwnCommit, 5, 0.3, 50, "linearizability"),
]


@pytest.mark.parametrize(
    "mutant,nodes,churn,bound,mentions", CASES, ids=[c[0].__name__ for c in CASES]
)
def test_simulator_catches_mutant(mutant, nodes, churn, bound, mentions):
    config = SimConfig(nodes=nodes, read_only=ReadOnlyOption.READ_INDEX, leader_churn=churn)
    found = find_violation(range(bound), config, mutant)
    assert found is not None, f"{mutant.__name__} survived {bound} seeds"
    seed, exc = found
    assert isinstance(exc, SafetyViolation)
    assert mentions in str(exc)
    assert exc.sim.format_trace().strip()  # a readable trace of the last steps
    # The same seed passes with the real core: the violation is the mutant's doing.
    assert find_violation([seed], config, RawNode) is None


def test_cli_prints_seed_and_trace_on_failure(capsys):
    assert sim.main(["--seeds", "5", "--nodes", "5", "--lease", "off",
                     "--mutant", "vote-without-log-check"]) == 1
    err = capsys.readouterr().err
    assert "FAILED seed" in err
    assert "last steps:" in err
    assert "--mutant vote-without-log-check" in err  # the reproduce line
