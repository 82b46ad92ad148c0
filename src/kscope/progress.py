"""Rich progress bars for long loops (quiet when not attached to a terminal and KSCOPE_QUIET is set)."""

from __future__ import annotations

import os

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def note(message: str) -> None:
    """A ``note:`` line on stderr: something left out or changed that the user should know of."""
    console.print(f"[yellow]note:[/] {message}", soft_wrap=True)


def make_progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=bool(os.environ.get("KSCOPE_QUIET")),
        transient=False,
    )
