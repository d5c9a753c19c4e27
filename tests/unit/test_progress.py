"""``runtime.progress.StepProgress``: the per-step lines always, a live bar only on a terminal."""

from __future__ import annotations

import io

from rich.console import Console

from memtrain.runtime.progress import StepProgress


def test_lines_go_to_print_fn_without_a_terminal():
    lines: list[str] = []
    with StepProgress(4, 1, lines.append) as progress:
        for done in (2, 3, 4):
            progress.step(done, f"step {done}/4", 1.0 / done)
    assert lines == ["step 2/4", "step 3/4", "step 4/4"]


def test_a_terminal_gets_the_lines_and_a_bar_with_steps_done_and_the_loss():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100, color_system=None)
    with StepProgress(10, 4, print, console=console) as progress:  # a run resumed after step 4
        progress.step(5, "step     5/10  loss 2.5000", 2.5)
        progress.progress.refresh()
        shown = out.getvalue()
    assert "step     5/10  loss 2.5000" in shown
    assert "5/10 steps" in shown and "loss 2.5000" in shown
