"""Training progress: a line per step, and on a terminal a live bar under the lines.

The lines are the record (logs, CI, ``ray job logs``); the bar (steps done of the run, the rate,
the time left, the last loss) is drawn only when the lines go to an interactive terminal
through ``print``, and disappears at the end.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

__all__ = ["StepProgress"]


class StepProgress:
    """``step(done, line, loss)`` after each step of a run of ``total`` steps that starts after
    ``start`` (a resumed run); use as a context manager."""

    def __init__(self, total: int, start: int, print_fn: Callable[[str], None], *, console: Console | None = None) -> None:
        self.print_fn = print_fn
        live = console is not None or (print_fn is print and sys.stdout.isatty())
        self.progress: Progress | None = None
        if live:
            self.progress = Progress(
                TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                console=console or Console(), transient=True)
            self.task = self.progress.add_task("train", total=total, completed=start, info="")

    def __enter__(self) -> "StepProgress":
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def step(self, done: int, line: str, loss: float) -> None:
        """Step ``done`` (1-based) ended: print its ``line``; move the bar."""
        if self.progress is None:
            self.print_fn(line)
            return
        self.progress.console.print(line, markup=False, highlight=False)
        self.progress.update(self.task, completed=done, info=f"loss {loss:.4f}")
