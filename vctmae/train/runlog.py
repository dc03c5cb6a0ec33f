"""Where a run writes what it did: a JSONL log and a rich progress bar."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from vctmae.errors import is_out_of_space, out_of_space
from vctmae.provenance import git_commit, machine_info, versions


class RunLog:
    """Append-only JSONL log; the first record says where the run came from.

    Only the main process writes (others get `enabled=False` and do nothing).
    """

    def __init__(self, path: Path, *, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        record = {"event": event, "time": time.time(), **fields}
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(record, default=str) + "\n")
        except OSError as error:
            if is_out_of_space(error):
                raise out_of_space(self.path) from None
            raise

    def start(self, *, command: str, config: dict[str, Any], **extra: Any) -> None:
        self.write(
            "start",
            command=command,
            config=config,
            versions=versions(),
            git_commit=git_commit(),
            machine=machine_info(),
            **extra,
        )


def warn(message: str) -> None:
    """One yellow `warning: …` line on stderr (something the user should know, not an error)."""
    Console(stderr=True).print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)


def read_log(path: Path) -> list[dict[str, Any]]:
    """All records of a JSONL log (for tests and tools)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def training_progress(*, enabled: bool) -> Progress:
    """Progress bar with samples/s, loss and lr fields (updated by the trainer)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>7.1f} samples/s"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("lr {task.fields[lr]:.2e}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=False,
    )
