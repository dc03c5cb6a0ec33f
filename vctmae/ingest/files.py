"""Writing ingest's files so that a crash or a full disk never leaves a half-written one visible.

`atomic_file(path)` yields a binary file open on a temporary name beside `path`
(`NAME.tmp-PID`) and renames it to `path` only once it is complete; if anything
fails first, the temporary file is removed and `path` keeps its old content (or
stays absent). `durable=True` also fsyncs the file and its folder, for the few
files whose rename is a commit point (the publish journal).

A full disk (ENOSPC, EDQUOT) while writing becomes `OutOfSpaceError` naming the
file (`out_of_space_as_error`): one line for the user instead of a traceback.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from vctmae.errors import is_out_of_space, out_of_space

TEMPORARY = ".tmp-"  # infix of temporary names: NAME.tmp-PID


def temporary_name(path: Path) -> Path:
    """Where `path` is written before its rename (unique per process)."""
    return path.with_name(f"{path.name}{TEMPORARY}{os.getpid()}")


@contextmanager
def out_of_space_as_error(path: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk inside the block into `OutOfSpaceError` naming `path`."""
    try:
        yield
    except OSError as error:
        if is_out_of_space(error):
            raise out_of_space(path) from None
        raise


def sync_folder(folder: Path) -> None:
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


@contextmanager
def atomic_file(path: Path, *, durable: bool = False) -> Iterator[BinaryIO]:
    """A file that appears at `path` whole, when the block ends without an error, or not at all."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with out_of_space_as_error(path):
            with open(tmp, "wb") as file:
                yield file
                if durable:
                    file.flush()
                    os.fsync(file.fileno())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        sync_folder(path.parent)


def atomic_write(path: Path, data: bytes, *, durable: bool = False) -> None:
    """Write `data` to `path` through `atomic_file`."""
    with atomic_file(path, durable=durable) as file:
        file.write(data)
