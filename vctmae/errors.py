"""The exception types of expected failures, shared by every stage and command.

An *expected* failure is one a user can fix: a bad or missing input file, a
flag out of range, a full disk. Every command prints such an error as one line,
``error: <file>: <problem>``, and exits 1 (`UsageError`: 2, the exit code of a
bad flag). Anything else — a bug, a CUDA out-of-memory, an NCCL failure — is
not caught by the command line and shows its full traceback.

Stage-specific errors (`IngestError`, `ShardError`, `CheckpointError`, …)
subclass `VctmaeError`; several also subclass `ValueError`, so code that
catches a bad value catches them too.
"""

from __future__ import annotations

import errno
import os


class VctmaeError(Exception):
    """An expected failure; `str(error)` is the one line the user sees."""

    exit_code = 1


class UsageError(VctmaeError, ValueError):
    """A command-line flag or configuration value that cannot be used (exit 2)."""

    exit_code = 2


class OutOfSpaceError(VctmaeError):
    """The disk filled up while writing; earlier, completed outputs are intact."""


def is_out_of_space(error: BaseException) -> bool:
    """Whether an OSError means the disk (or quota) is full."""
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def out_of_space(path: str | os.PathLike) -> OutOfSpaceError:
    """The one-line error for a full disk while writing `path`."""
    return OutOfSpaceError(
        f"no space left on device writing {os.fspath(path)}; earlier outputs are intact"
    )
