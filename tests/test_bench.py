"""`raftcache bench`: the figures' math, the comparison end to end, its JSON, and --plot's
dependency. No timed assertions: speed lives in the printed tables."""

import importlib.util
import json
import subprocess
import sys

import pytest

from raftcache.bench import report, results, scenarios, targets
from raftcache.bench.stats import latency_summary, percentile, spread


def raftcache(*args, timeout=120, prelude=""):
    code = (f"{prelude}\nimport sys\nfrom raftcache.cli import main\n"
            "sys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout)


# -- the math -----------------------------------------------------------------------------------


def test_percentile_is_nearest_rank():
    values = list(range(1, 1001))  # 1..1000
    assert percentile(values, 0.5) == 500
    assert percentile(values, 0.99) == 990
    assert percentile(values, 0.999) == 999
    assert percentile(values, 1.0) == 1000
    assert percentile([7], 0.5) == percentile([7], 0.999) == 7
    assert percentile([1, 2], 0.5) == 1 and percentile([1, 2], 0.51) == 2
    with pytest.raises(ValueError):
        percentile([], 0.5)


def test_latency_summary_in_ms_from_unsorted_us():
    us = [3000, 1000, 2000] * 100 + [50_000]  # one slow outlier in 301
    s = latency_summary(us)
    assert s == {"count": 301, "p50_ms": 2.0, "p99_ms": 3.0, "p999_ms": 50.0}
    assert latency_summary([]) == {"count": 0, "p50_ms": 0.0, "p99_ms": 0.0, "p999_ms": 0.0}


def test_spread_is_median_min_max():
    assert spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}
    assert spread([4.0, 1.0]) == {"median": 2.5, "min": 1.0, "max": 4.0}
    with pytest.raises(ValueError):
        spread([])


def _rep(set_us, get_us, seconds=1.0):
    return {"latencies_us": {"set": set_us, "get": get_us}, "per_second": [len(set_us + get_us)],
            "late": False, "errors": 0, "misses": 0, "last_error": ""}


def test_merge_and_summarize_over_processes_and_reps():
    step = scenarios.Step(0.5, "lease", 2, 4)
    assert step.ops == ("set", "get") and step.name == "mix 50/50 lease"
    # two client processes in one repetition: their latencies pooled, their counts summed
    r1 = results.merge_rep([_rep([1000] * 10, [500] * 30), _rep([3000] * 10, [500] * 10)], step, 2.0)
    assert r1["ops_per_s"] == 30.0  # 60 requests in 2 s
    assert r1["ops"]["set"]["ops_per_s"] == 10.0 and r1["ops"]["get"]["ops_per_s"] == 20.0
    assert r1["ops"]["set"]["p50_ms"] == 1.0 and r1["ops"]["set"]["p99_ms"] == 3.0
    assert r1["per_second"] == [60]
    r2 = results.merge_rep([_rep([2000] * 20, [1000] * 20)], step, 2.0)
    r3 = results.merge_rep([_rep([4000] * 40, [1000] * 40)], step, 2.0)
    s = results.summarize([r1, r2, r3], step)
    assert s["ops_per_s"] == {"median": 30.0, "min": 20.0, "max": 40.0}
    assert s["ops"]["set"]["p50_ms"] == {"median": 2.0, "min": 1.0, "max": 4.0}


def test_steps_per_target_and_ratios():
    lin = scenarios.Step(1.0, "linearizable", 2, 25)
    assert lin.for_target("redis") == scenarios.Step(1.0, None, 2, 25)
    assert lin.for_target("pysyncobj") is None  # its reads are local dict lookups
    assert scenarios.Step(0.0, None, 1, 1).for_target("pysyncobj").name == "set"
    ours = results.Outcome("throughput", lin, "raftcache", "raftcache",
                         [results.merge_rep([_rep([], [2000] * 50)], lin, 1.0)])
    redis = results.Outcome("throughput", lin.for_target("redis"), "redis", "redis",
                          [results.merge_rep([_rep([], [500] * 100)], lin, 1.0)])
    (r,) = results.ratios([ours, redis])
    assert r["ops_per_s"] == 0.5 and r["p50_ms"] == 4.0 and r["against"] == "redis"
    rows = report.table_rows([ours, redis])["throughput"]
    assert [row[2] for row in rows] == ["raftcache", "redis"]
    assert rows[1][7] == "0.50x" and rows[1][8] == "4.00x"


def test_latency_scenario_covers_every_read_level():
    names = [s.name for s in scenarios.SCENARIOS["latency"].steps(scenarios.Options())]
    assert names == ["set", "get linearizable", "get lease", "get stale"]
    shapes = {(s.processes, s.clients) for s in scenarios.SCENARIOS["latency"].steps(scenarios.Options())}
    assert shapes == {(1, 1)}
    (mix,) = scenarios.SCENARIOS["read-heavy"].steps(scenarios.Options(processes=2))
    assert (mix.read_ratio, mix.processes * mix.clients) == (0.9, 50)


def test_value_sizes_scenario_names_each_size_and_bounds_big_key_spaces():
    steps = scenarios.SCENARIOS["value-sizes"].steps(scenarios.Options(processes=2))
    assert [s.name for s in steps[:3]] == ["set 100 B", "set 100 B", "get 100 B linearizable"]
    assert [s.name for s in steps[-3:]] == ["set 1 MB", "set 1 MB", "get 1 MB linearizable"]
    assert [(s.processes, s.clients) for s in steps[:3]] == [(1, 1), (2, 25), (2, 25)]
    assert steps[0].for_target("redis").value_size == 100  # the size goes to every target
    o = scenarios.Options(keys=1000)
    assert [targets.key_count(o, n) for n in (100, 10_000, 1_000_000)] == [1000, 1000, 67]


def test_nodes_scenario_runs_raftcache_at_each_size_and_the_others_once():
    steps = scenarios.SCENARIOS["nodes"].steps(scenarios.Options(processes=2))
    assert [s.nodes for s in steps] == [3] * 3 + [5] * 3 + [7] * 3
    assert steps[4].name == "set 5 nodes"
    assert steps[4].for_target("redis") == steps[1].for_target("redis")  # one Redis run
    assert steps[4].for_target("redis").name == "set"


def test_value_sizes_end_to_end(tmp_path):
    path = tmp_path / "sizes.json"
    p = raftcache("bench", "--scenario", "value-sizes", "--seconds", "0.5", "--reps", "1",
                  "--processes", "1", "--clients", "2", "--json", str(path), timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    results = json.loads(path.read_text())["results"]
    assert sorted({r["value_size"] for r in results}) == [100, 10_000, 1_000_000]
    for r in results:
        rep = r["reps"][0]
        assert rep["ops_per_s"] > 0 and rep["errors"] == 0, r
        assert rep["misses"] == 0, r  # every get found its key, filled at this size
    assert "get 1 MB linearizable" in p.stdout


# -- the command --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """One small end-to-end run of `raftcache bench --compare`: its output and its JSON."""
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    p = raftcache("bench", "--compare", "--seconds", "1", "--reps", "1", "--scenario",
                  "throughput", "--processes", "1", "--clients", "4", "--json", str(path))
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout, json.loads(path.read_text())


def test_compare_prints_every_target_with_ratios(compared):
    out, _ = compared
    rows = [line.split() for line in out.splitlines()]
    assert any(line.startswith("throughput: ") for line in out.splitlines())
    ratio = [r for r in rows if r and r[0] in ("redis", "memcached")]  # target cells
    assert any(r[:2] == ["set", "set"] and r[2] == "raftcache" for r in rows)
    assert any(r[:3] == ["get", "linearizable", "get"] and r[3] == "raftcache" for r in rows)
    # one redis and one memcached row per step, each ending in two ratios (ops/s, p50)
    assert len([r for r in ratio if r[0] == "redis"]) == 2
    assert len([r for r in ratio if r[0] == "memcached"]) == 2
    for r in ratio:
        assert r[-2].endswith("x") and r[-1].endswith("x"), r
    if importlib.util.find_spec("pysyncobj"):
        assert len([r for r in rows if r[:3] == ["pysyncobj", "(3", "nodes)"]]) == 1  # sets
    else:
        assert "pysyncobj: skipped (not installed" in out


def test_json_holds_the_numbers(compared):
    _, data = compared
    assert data["schema"] == results.SCHEMA
    assert data["machine"]["cpus"] >= 1
    assert data["options"]["seconds"] == 1 and data["options"]["reps"] == 1
    assert data["scenarios"] == ["throughput"]
    kinds = {(r["kind"], r["step"]) for r in data["results"]}
    assert {("raftcache", "set"), ("raftcache", "get linearizable"), ("redis", "set"),
            ("redis", "get"), ("memcached", "set"), ("memcached", "get")} <= kinds
    for r in data["results"]:
        assert set(r) >= {"scenario", "step", "target", "kind", "processes", "clients",
                          "read_ratio", "consistency", "summary", "reps"}
        assert len(r["reps"]) == 1
        rep = r["reps"][0]
        assert set(rep) == {"ops_per_s", "ops", "errors", "misses", "late", "last_error",
                            "per_second"}
        assert rep["ops_per_s"] > 0 and sum(rep["per_second"]) > 0
        for op, figures in r["summary"]["ops"].items():
            assert op in ("set", "get")
            for field in ("ops_per_s", "p50_ms", "p99_ms", "p999_ms"):
                s = figures[field]
                assert s["min"] <= s["median"] <= s["max"]
            assert figures["p50_ms"]["median"] <= figures["p999_ms"]["median"]
            assert rep["ops"][op]["count"] > 0
    against = {(x["step"], x["against"]) for x in data["ratios"]}
    assert {("set", "redis (AOF always)"), ("set", "memcached"),
            ("get linearizable", "redis (AOF always)"),
            ("get linearizable", "memcached")} <= against
    assert all(x["ops_per_s"] > 0 and x["p50_ms"] > 0 for x in data["ratios"])


def test_plot_without_matplotlib_exits_2_naming_the_extra(tmp_path):
    p = raftcache("bench", "--plot", str(tmp_path / "x.png"), timeout=30,
                  prelude="import sys; sys.modules['matplotlib'] = None  # import fails")
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'raftcache[plot]'" in lines[0], p.stderr
    assert not (tmp_path / "x.png").exists()


def test_help_names_every_scenario():
    p = raftcache("bench", "--help", timeout=30)
    assert p.returncode == 0, p.stderr
    text = " ".join(p.stdout.split())
    for name in scenarios.SCENARIOS:
        assert f"{name} (" in text
    assert "90% gets" in text and "--compare" in text


@pytest.mark.parametrize("scenario", ["nodes", "backends", "security"])
def test_scenarios_that_start_clusters_refuse_endpoints(scenario):
    p = raftcache("bench", "--scenario", scenario, "--endpoints", "127.0.0.1:1", timeout=30)
    assert p.returncode == 2 and "starts clusters of its own" in p.stderr


def test_cluster_shapes_keep_the_runs_settings_where_a_step_has_none():
    run = scenarios.Shape(3, "memory", None)
    assert scenarios.Shape(backend="redis").over(run) == scenarios.Shape(3, "redis", None)
    assert scenarios.Shape(secure=False).over(run) == scenarios.Shape(3, "memory", False)
    assert scenarios.Shape().over(run) == run
    steps = scenarios.SCENARIOS["backends"].steps(scenarios.Options(processes=2))
    assert [s.name for s in steps[2:4]] == ["set redis backend",
                                            "get redis backend linearizable"]
    assert [s.backend for s in steps] == [b for b in scenarios.BACKENDS for _ in (0, 1)]
    # Redis and Memcached direct run each shape once, and every backend's row compares to it
    assert {s.for_target("redis") for s in steps} == {scenarios.Step(0.0, None, 2, 25),
                                                      scenarios.Step(1.0, None, 2, 25)}
    steps = scenarios.SCENARIOS["security"].steps(scenarios.Options(processes=2))
    assert [s.name for s in steps] == [
        "set auth+encryption off", "get auth+encryption off linearizable",
        "set auth+encryption on", "get auth+encryption on linearizable"]


def test_plot_draws_a_png(tmp_path):
    step = scenarios.Step(0.0, None, 1, 1)
    outcomes = [results.Outcome("latency", step, t, k, [results.merge_rep([_rep(us, [])], step, 1)])
                for t, k, us in (("raftcache", "raftcache", [2000, 3000, 2500]),
                                 ("redis", "redis", [300, 400, 350]))]
    report.plot(outcomes, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 0


def test_nodes_end_to_end(tmp_path):
    path = tmp_path / "nodes.json"
    p = raftcache("bench", "--scenario", "nodes", "--compare", "--seconds", "0.5", "--reps", "1",
                  "--processes", "1", "--clients", "2", "--json", str(path), timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    results = json.loads(path.read_text())["results"]
    ours = [r for r in results if r["kind"] == "raftcache"]
    assert [r["nodes"] for r in ours] == [3] * 3 + [5] * 3 + [7] * 3
    for r in ours:
        assert r["reps"][0]["ops_per_s"] > 0 and r["reps"][0]["errors"] == 0, r
    redis = [r["step"] for r in results if r["kind"] == "redis"]
    assert sorted(redis) == ["get", "set", "set"]  # sequential and 50-greenlet shapes, once
    assert "set 7 nodes" in p.stdout


def test_leader_kill_end_to_end(tmp_path):
    path = tmp_path / "kill.json"
    p = raftcache("bench", "--scenario", "leader-kill", "--compare", "--seconds", "2", "--reps",
                  "1", "--processes", "1", "--clients", "4", "--json", str(path), timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    (result,) = json.loads(path.read_text())["results"]  # raftcache only: no failover to time
    assert result["kind"] == "raftcache" and result["step"] == "set, leader-kill"
    rep = result["reps"][0]
    assert rep["fault"].startswith("killed the leader, node ")
    # Every write that was in flight at the kill was retried to the new leader: none failed.
    assert rep["errors"] == 0 and rep["ops_per_s"] > 0, rep
    assert "killed the leader" in p.stdout


def test_overload_end_to_end(tmp_path):
    path = tmp_path / "overload.json"
    p = raftcache("bench", "--scenario", "overload", "--seconds", "1", "--reps", "1",
                  "--processes", "1", "--clients", "4", "--json", str(path), timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    closed, open_loop = json.loads(path.read_text())["results"]
    assert (closed["step"], open_loop["step"]) == ("set", "set at 2x peak")
    assert open_loop["clients"] == scenarios.OVERLOAD_INFLIGHT
    rep, peak = open_loop["reps"][0], closed["reps"][0]["ops_per_s"]
    # It offered twice what the closed loop reached (the clock's own jitter aside).
    assert rep["peak_ops_per_s"] == pytest.approx(peak, rel=0.01)
    assert rep["offered_per_s"] == pytest.approx(2 * peak, rel=0.2)
    assert rep["shed"] >= 0 and isinstance(rep["error_kinds"], dict)
    assert rep["elections"] >= 0  # the cluster's terms, read before and after
    assert "of peak" in p.stdout


def test_backends_end_to_end(tmp_path):
    path = tmp_path / "backends.json"
    p = raftcache("bench", "--scenario", "backends", "--compare", "--seconds", "0.5", "--reps",
                  "1", "--processes", "1", "--clients", "2", "--json", str(path),
                  "--dir", str(tmp_path / "not" / "yet"), timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    data = json.loads(path.read_text())
    ours = [r for r in data["results"] if r["kind"] == "raftcache"]
    assert [r["backend"] for r in ours] == [b for b in scenarios.BACKENDS for _ in (0, 1)]
    for r in ours:
        rep = r["reps"][0]
        assert rep["ops_per_s"] > 0 and rep["errors"] == 0 and rep["misses"] == 0, r
        if r["backend"] != "memory":  # the run's own cluster has the memory backend
            assert f"{r['backend']} backend" in rep["cluster"], rep["cluster"]
    against = {(x["step"], x["against"]) for x in data["ratios"]}
    assert ("set hybrid backend", "redis (AOF always)") in against
    assert ("get memcached backend linearizable", "memcached") in against
    assert "get hybrid backend linearizable" in p.stdout


def test_security_end_to_end(tmp_path):
    path = tmp_path / "security.json"
    p = raftcache("bench", "--scenario", "security", "--seconds", "0.5", "--reps", "1",
                  "--processes", "1", "--clients", "2", "--json", str(path), timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    results = json.loads(path.read_text())["results"]
    assert [r["secure"] for r in results] == [False, False, True, True]
    for r in results:
        rep = r["reps"][0]
        # no errors with auth on: the clients carried the cluster's admin token
        assert rep["ops_per_s"] > 0 and rep["errors"] == 0 and rep["misses"] == 0, r
        word = "on" if r["secure"] else "off"
        assert f"auth {word}, encryption {word}" in rep["cluster"], rep["cluster"]
    cost = json.loads(path.read_text())["security_on_vs_off"]
    assert set(cost) == {"set", "get"} and all(r > 0 for r in cost.values())
    assert "auth and encryption on, throughput as a share of off: set " in p.stdout
