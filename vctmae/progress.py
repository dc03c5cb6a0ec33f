"""What the long commands show on stderr: the progress bar (ingest, predict: one layout), error
and warning lines.

`rich` is imported when a bar is made, so that importing a command stays cheap.
"""

from __future__ import annotations

from typing import Any


def progress_bar(description: str, *fields: str, enabled: bool = True) -> Any:
    """A `rich` progress bar: description, bar, done/total, `fields`, elapsed, remaining.

    description and fields are `rich` column templates, e.g. "{task.fields[rate]}".
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn(description),
        BarColumn(),
        MofNCompleteColumn(),
        *(TextColumn(field) for field in fields),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


def error_line(bar: Any, line: str) -> None:
    """One red `error: …` line above the bar (the bar keeps its place)."""
    bar.console.print(f"[bold red]error[/]: {line}", markup=True, highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    """One yellow `warning: …` line on stderr (something the user should know, not an error)."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True).print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)
