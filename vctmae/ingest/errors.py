"""The one error type ingest raises for bad input."""

from __future__ import annotations

from pathlib import Path

from vctmae.errors import VctmaeError


class IngestError(VctmaeError, ValueError):
    """An input (a case, a csv, the output folder) that cannot be used: `str(error)` is the one
    line a user sees, ``"<path>: <problem>"``."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):
        # Worker processes send errors back pickled; rebuild from both fields.
        return (type(self), (str(self.path), self.problem))


def error_detail(error: Exception, path: Path | None = None) -> str:
    """A library's error on one line, "Type: text" (messages may span lines), `path` in it
    shortened to its name."""
    text = str(error) if path is None else str(error).replace(str(path), path.name)
    return f"{type(error).__name__}: {' '.join(text.split()) or 'no details'}"
