"""A training progress bar: rich on a terminal when installed (the ``bench`` extra), plain
lines otherwise (pipes, log files)."""

from __future__ import annotations

import sys
from typing import Optional


class ProgressBar:
    """Shows step, loss, learning rate and tokens/s; a no-op when ``enabled`` is False.

    Args:
        total: the last step; start: the first step of this run (after a resume).
        every: with plain printing, print one line every ``every`` steps (and the last).
    """

    def __init__(self, total: int, *, start: int = 0, enabled: bool = True, every: int = 1):
        self.total, self.start, self.enabled, self.every = total, start, enabled, max(1, every)
        self._rich = None
        self._task = None
        if not enabled or not sys.stdout.isatty():  # logs and pipes get plain lines
            return
        try:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )
        except ImportError:
            return
        self._rich = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            transient=False,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._task = self._rich.add_task("train", total=total, completed=start, info="")
        self._rich.start()

    def update(self, step: int, loss: float, lr: float, tokens_per_s: Optional[float]) -> None:
        """Report that ``step`` (1-based count of finished steps) ended with ``loss``."""
        if not self.enabled:
            return
        tps = f"  {tokens_per_s:,.0f} tok/s" if tokens_per_s else ""
        info = f"loss {loss:.5f}  lr {lr:.2e}{tps}"
        if self._rich is not None:
            self._rich.update(self._task, completed=step, info=info)
        elif step % self.every == 0 or step == self.total:
            print(f"step {step}/{self.total}  {info}", file=sys.stdout, flush=True)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None
