"""Showing how far a long command has got: a rich progress bar when stdout is a terminal,
plain lines (few enough for a log) when it is not.

Contract: rich is imported only once a bar is shown, on a terminal; what is printed to a
pipe or a file never depends on rich.
"""

from __future__ import annotations

import sys


def progress_display(label: str):
    """A callback (done, total) that shows progress: a bar on a terminal, else a line for
    every tenth of the way; and a function that ends it."""
    if sys.stdout.isatty():
        from rich.progress import Progress

        bar = Progress()
        bar.start()
        task = bar.add_task(label, total=None)
        return (lambda done, total: bar.update(task, completed=done, total=total)), bar.stop
    said = [-1]

    def line(done: int, total: int) -> None:
        tenth = done * 10 // max(total, 1)
        if tenth != said[0]:
            said[0] = tenth
            print(f"{label}: {done:,} of {total:,}", flush=True)

    return line, (lambda: None)


class ResealProgress:
    """A progress bar (rich) on a terminal, plain lines otherwise."""

    def __init__(self):
        self.bar = None
        self.task = None
        self.last = 0.0
        if sys.stdout.isatty():
            try:
                from rich.progress import Progress

                self.bar = Progress(transient=False)
                self.bar.start()
                self.task = self.bar.add_task("resealing", total=None)
            except ImportError:
                self.bar = None

    def update(self, position: int, total: int, resealed: int) -> None:
        import time

        if self.bar is not None:
            self.bar.update(self.task, completed=position, total=total,
                            description=f"resealed {resealed}")
            return
        now = time.monotonic()
        if now - self.last >= 1.0 or position >= total:
            self.last = now
            print(f"resealed {resealed} values; at key {position} of {total}", flush=True)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text)
        else:
            print(text, flush=True)

    def close(self, text: str | None = None) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        if text:
            print(text, flush=True)
