"""What `raftcache bench` shows: the tables, the live progress, the plot.

Contract: reads `Outcome`s (`raftcache.bench.results`), never runs anything. `print_tables`
prints a table per scenario (rich when the terminal is wide enough, plain text otherwise);
`Display` shows each step as it runs; `plot` draws latency histograms and throughput over time
with matplotlib (the plot extra: `plotting_available`, `PLOT_HINT`).
"""

from __future__ import annotations

import time

from raftcache.bench.results import Outcome, compared, ratios
from raftcache.bench.scenarios import SCENARIOS, Options
from raftcache.bench.stats import spread
from raftcache.bench.targets import START_DELAY

PLOT_HINT = "pip install 'raftcache[plot]'"


def _fmt_spread(s: dict, fmt: str) -> str:
    return f"{s['median']:{fmt}} [{s['min']:{fmt}}-{s['max']:{fmt}}]"


def table_rows(outcomes: list[Outcome]) -> dict:
    """Per scenario: rows of cells (step, op, target, ops/s, p50, p99, p99.9, ratios)."""
    by_ratio = {(r["scenario"], r["step"], r["op"], r["against"]): r for r in ratios(outcomes)}
    scenarios: dict[str, list] = {}
    ours = [o for o in outcomes if o.kind == "raftcache"]
    for o in ours:
        rows = scenarios.setdefault(o.scenario, [])
        others = [x for x in outcomes if compared(o, x)]
        for op in o.step.ops:
            for x in [o, *others]:
                s = x.summary()["ops"].get(op)
                if s is None:
                    continue
                r = by_ratio.get((o.scenario, o.step.name, op, x.target))
                cells = [o.step.name if x is o and op == o.step.ops[0] else "",
                         op if x is o else "", x.target,
                         _fmt_spread(s["ops_per_s"], ",.0f"), _fmt_spread(s["p50_ms"], ".2f"),
                         _fmt_spread(s["p99_ms"], ".2f"), _fmt_spread(s["p999_ms"], ".2f"),
                         f"{r['ops_per_s']:.2f}x" if r and r["ops_per_s"] else "",
                         f"{r['p50_ms']:.2f}x" if r and r["p50_ms"] else ""]
                problems = sum(p["errors"] for p in x.reps), sum(p["misses"] for p in x.reps)
                if x is o or op == x.step.ops[0]:
                    notes = [f"{n} {what}" for n, what in
                             zip(problems, ("errors", "misses"), strict=True) if n]
                    notes += _open_loop_notes(x.reps)
                    cells.append(", ".join(notes))
                else:
                    cells.append("")
                rows.append(cells)
    return scenarios


def _open_loop_notes(reps: list[dict]) -> list[str]:
    """An open loop's completions against the peak, what it shed, and elections."""
    if not reps or "offered_per_s" not in reps[0]:
        return []
    share = [r["ops_per_s"] / r["peak_ops_per_s"] for r in reps if r.get("peak_ops_per_s")]
    notes = [f"{spread(share)['median']:.0%} of peak"] if share else []
    notes.append(f"{sum(r['shed'] for r in reps):,} shed")
    if all("elections" in r for r in reps):
        notes.append(f"terms moved {sum(r['elections'] for r in reps)}")
    return notes


HEADER = ("step", "op", "target", "ops/s median [min-max]", "p50 ms", "p99 ms", "p99.9 ms",
          "ops/s: raftcache/this", "p50: raftcache/this", "notes")


def print_tables(outcomes: list[Outcome], options: Options, rich_console=None) -> None:
    for scenario, rows in table_rows(outcomes).items():
        shapes = sorted({(o.step.processes, o.step.clients) for o in outcomes
                         if o.scenario == scenario and o.kind == "raftcache"})
        clients = ", ".join(f"{p} process{'es' if p > 1 else ''} x {c} greenlet"
                            f"{'s' if c > 1 else ''}" for p, c in shapes)
        title = (f"{scenario}: {SCENARIOS[scenario].doc} ({clients}); medians [min-max] of "
                 f"{options.reps} repetitions of {options.seconds:g} s")
        widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
        if rich_console is not None and rich_console.width >= sum(widths) + 3 * len(widths) + 1:
            from rich.markup import escape
            from rich.table import Table

            t = Table(title=escape(title), title_justify="left")
            for i, h in enumerate(HEADER):
                t.add_column(escape(h), justify="right" if i >= 3 else "left", no_wrap=True)
            for row in rows:
                t.add_row(*map(escape, row))
            rich_console.print(t)
            continue
        print(f"\n{title}")  # plain on a narrow terminal and in files
        for row in [HEADER, *rows]:
            print("  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                            for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip())


def rep_line(r: dict) -> str:
    """One repetition (`merge_rep`) in a line: throughput, p50s and what went wrong."""
    line = f"{r['ops_per_s']:,.0f} ops/s" + "".join(
        f", {op} p50 {s['p50_ms']:.2f} ms" for op, s in r["ops"].items())
    if r["errors"]:
        line += f", {r['errors']} errors (e.g. {r['last_error']})"
    if r["late"]:
        line += " (a client process started late)"
    if r.get("fault"):
        line += f" ({r['fault']})"
    if "offered_per_s" in r:
        line += (f"; offered {r['offered_per_s']:,.0f}/s, peak {r['peak_ops_per_s']:,.0f}/s, "
                 f"shed {r['shed']:,}, errors {r['error_kinds'] or 0}")
        if "elections" in r:
            line += f", terms moved {r['elections']}"
    return line


class Display:
    """A rich progress bar per step on a terminal; a plain line per finished step otherwise."""

    def __init__(self, console=None):
        self.console = console
        self.progress = None
        if console is not None:
            from rich.progress import BarColumn, Progress, TextColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(bar_width=12),
                                     TextColumn("{task.fields[rate]}"), console=console)
            self.progress.start()

    def step(self, label: str, seconds: float):
        """A callback (done so far) for a step's progress, and a function that closes it."""
        started = time.monotonic() + START_DELAY
        if self.progress is None:
            return None, (lambda line: print(f"  {label}: {line}", flush=True))
        from rich.markup import escape

        task = self.progress.add_task(escape(label), total=seconds, rate="")

        def update(done: int) -> None:
            elapsed = time.monotonic() - started
            if elapsed > 0:
                self.progress.update(task, completed=min(seconds, elapsed),
                                     rate=f"{done / elapsed:,.0f} ops/s")

        def finish(line: str) -> None:
            self.progress.update(task, completed=seconds, rate=escape(line))

        return update, finish

    def note(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def plot(outcomes: list[Outcome], path: str) -> None:
    """Per scenario: a latency histogram per target (every op, every rep) and the completions
    per second over the measured time, steps and repetitions one after another."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(dict.fromkeys(o.scenario for o in outcomes))
    fig, axes = plt.subplots(len(scenarios), 2, figsize=(13, 3.6 * len(scenarios)),
                             squeeze=False)
    for row, scenario in zip(axes, scenarios, strict=True):
        mine = [o for o in outcomes if o.scenario == scenario]
        targets = list(dict.fromkeys(o.target for o in mine))
        everything = [us for o in mine for r in o.reps for lat in r["_raw"].values()
                      for us in lat]
        if everything:
            low, high = max(1, min(everything)), max(everything)
            bins = [low * (high / low) ** (i / 60) for i in range(61)] if high > low else 10
        for t in targets:
            lat = [us / 1000 for o in mine if o.target == t for r in o.reps
                   for x in r["_raw"].values() for us in x]
            if lat:  # each target's share of its own requests: shapes compare across rates
                row[0].hist(lat, bins=[b / 1000 for b in bins] if everything and
                            not isinstance(bins, int) else 10, histtype="step", label=t,
                            weights=[1 / len(lat)] * len(lat))
            series = [n for o in mine if o.target == t for r in o.reps for n in r["per_second"]]
            row[1].plot(range(len(series)), series, label=t, marker=".")
        row[0].set_xscale("log")
        row[0].set_xlabel("latency, ms (log)")
        row[0].set_ylabel("share of the target's requests")
        row[0].set_title(f"{scenario}: latency")
        row[1].set_xlabel("measured second (steps and repetitions in turn)")
        row[1].set_ylabel("completions / s")
        row[1].set_title(f"{scenario}: throughput over time")
        row[0].legend(fontsize="small")
        row[1].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plotting_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
