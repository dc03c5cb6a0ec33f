"""Writing files so that a crash or a full disk never leaves a half-written one visible.

`write_atomically(path, content)` writes `content` (bytes, or a function that
writes to the open binary file: `savefig`, `torch.save`) under a hidden temporary
name beside `path` (`.tmp-PID-NAME`) and renames it to `path` only once it is
complete; if anything fails first, the temporary file is removed and
`path` keeps its old content (or stays absent). The name starts with a dot, so
a concurrent ingest or a listing of cases never takes it for a finished file.
`durable=True` also fsyncs the file and its folder, for the few files whose
rename is a commit point (ingest's publish journal).

A full disk (ENOSPC, EDQUOT) while writing becomes `OutOfSpaceError` naming the
file (`out_of_space_as_error`): one line for the user instead of a traceback.

This module imports neither torch nor any stage, so every stage writes through it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from vctmae.errors import VctmaeError, is_out_of_space, out_of_space

TEMPORARY = ".tmp-"  # prefix of temporary names: .tmp-PID-NAME


def temporary_name(path: Path) -> Path:
    """Where `path` is written before its rename (unique per process, hidden)."""
    return path.with_name(f"{TEMPORARY}{os.getpid()}-{path.name}")


def _caused_by_full_disk(error: BaseException) -> bool:
    """Whether `error` or an error it was raised from is ENOSPC or EDQUOT (torch.save wraps the
    OSError of its file object in a RuntimeError)."""
    seen: BaseException | None = error
    while seen is not None:
        if is_out_of_space(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextmanager
def out_of_space_as_error(path: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk inside the block into `OutOfSpaceError` naming `path`."""
    try:
        yield
    except Exception as error:
        if _caused_by_full_disk(error):
            raise out_of_space(path) from error
        raise


def _sync_folder(folder: Path) -> None:
    """fsync a folder, so that a rename inside it survives a power cut (no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomically(
    path: str | os.PathLike,
    content: bytes | Callable[[BinaryIO], object],
    *,
    durable: bool = False,
) -> Path:
    """Write `content` to `path` whole or not at all (see the module docstring); returns
    `path`. A folder that cannot be written is one line (`VctmaeError`)."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with out_of_space_as_error(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as file:
                if callable(content):
                    content(file)
                else:
                    file.write(content)
                if durable:
                    file.flush()
                    os.fsync(file.fileno())
            os.replace(tmp, path)
    except PermissionError:
        raise VctmaeError(f"{path}: cannot write (permission denied)") from None
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        _sync_folder(path.parent)
    return path
