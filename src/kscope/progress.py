"""Progress of long loops: rich bars on a terminal, plain lines when stderr is not one (logs, pipes, CI), nothing
with ``KSCOPE_QUIET`` set."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from kscope.errors import KscopeError

console = Console(stderr=True)


def note(message: str) -> None:
    """A ``note:`` line on stderr: something left out or changed that the user should know of."""
    console.print(f"[yellow]note:[/] {message}", soft_wrap=True)


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


@dataclass
class _Task:
    description: str
    total: float | None
    done: float
    start_done: float
    t0: float


class LineProgress:
    """The part of rich's ``Progress`` kscope uses (``add_task``, ``advance``, ``update``), logged as plain lines: the
    task, done/total, rate and ETA, at most one line every ``interval`` seconds, and a line when a task finishes."""

    def __init__(self, interval: float):
        self.interval = interval
        self.tasks: list[_Task] = []
        self.last = time.monotonic()

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **_) -> int:
        self.tasks.append(_Task(description, total, completed, completed, time.monotonic()))
        return len(self.tasks) - 1

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, completed=self.tasks[task].done + advance)

    def update(self, task: int, completed: float | None = None, total: float | None = None, **_) -> None:
        t = self.tasks[task]
        was_done = t.total is not None and t.done >= t.total
        t.total = t.total if total is None else total
        t.done = t.done if completed is None else completed
        now = time.monotonic()
        finished = t.total is not None and t.done >= t.total and not was_done
        if finished or now - self.last >= self.interval:
            self.last = now
            sys.stderr.write(self._line(t, now, finished) + "\n")
            sys.stderr.flush()

    @staticmethod
    def _line(t: _Task, now: float, finished: bool) -> str:
        elapsed = max(now - t.t0, 1e-9)
        rate = (t.done - t.start_done) / elapsed
        of = f"/{t.total:g}" if t.total is not None else ""
        head = f"progress: {t.description}: {t.done:g}{of}"
        if finished:
            return f"{head} done in {_duration(elapsed)} ({rate:.3g}/s)"
        eta = f", ETA {_duration((t.total - t.done) / rate)}" if t.total is not None and rate > 0 else ""
        return f"{head} ({100 * t.done / t.total:.0f} %), {rate:.3g}/s{eta}" if t.total else f"{head}, {rate:.3g}/s"


def make_progress() -> Progress | LineProgress:
    """Bars on a terminal; off stderr's terminal, lines every ``$KSCOPE_PROGRESS_INTERVAL`` seconds (default 30)."""
    quiet = bool(os.environ.get("KSCOPE_QUIET"))
    if not quiet and not console.is_terminal:
        interval = os.environ.get("KSCOPE_PROGRESS_INTERVAL", "30")
        try:
            return LineProgress(float(interval))
        except ValueError:
            raise KscopeError(f"KSCOPE_PROGRESS_INTERVAL={interval!r}: give seconds, e.g. 30") from None
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=quiet,
        transient=False,
    )
