"""One writer per output folder: the lock every command that writes an `--out` holds.

`hold_output(out, command)` creates `out` and takes `out/.vctmae.lock` with
flock before the command writes anything there, and writes its pid and command
into it. A second run into the same folder — of any command — is refused in
one line naming the first one's command and pid. The kernel frees the lock
when its holder exits, however it ends, so a lock is never stuck; the file
itself is removed on a normal exit. A file still holding a pid when the lock
is taken was left by a run that died (kill -9, power loss): it is taken over,
saying so.

A forked process (ingest's workers, the training loader's) would inherit the
lock's file descriptor and with it the lock, and keep it after a kill -9 of
its parent until it notices: every held lock is closed in a child right after
fork, so only the process that took it ever holds it.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from vctmae.errors import UsageError, VctmaeError
from vctmae.files import out_of_space_as_error
from vctmae.progress import warn

LOCK_NAME = ".vctmae.lock"
_HELD: set[int] = set()  # the file descriptors of the locks this process holds


def _close_held_locks() -> None:
    """In a forked child: let go of the parent's locks (the parent keeps them)."""
    for fd in _HELD:
        os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_locks)


class OutputLockedError(VctmaeError):
    """Another run is writing into the same output folder."""


@contextmanager
def hold_output(out: Path, command: str, *, say: Callable[[str], None] = warn) -> Iterator[None]:
    """Hold the lock on `out` (created if missing) while the block runs.

    Raises `OutputLockedError` when another run holds it; `say` tells of a lock taken over
    from a run that died. Under torchrun only rank 0 (the RANK variable) takes it: the other
    processes of the run write nothing of their own there.
    """
    if os.environ.get("RANK", "0") != "0":
        # A torchrun process other than rank 0: its run's rank 0 holds the lock.
        yield
        return
    out = Path(out)
    created = not out.exists()
    make_output_folder(out)
    path = out / LOCK_NAME
    fd = _lock(path, out)
    _HELD.add(fd)
    try:
        left = _holder(fd)
        if left:
            say(f"{out}: taking over the lock of {left}, which ended without releasing it")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {command}\n".encode(), 0)
        yield
    finally:
        # Removed while still locked, so the next run never sees this run's pid.
        path.unlink(missing_ok=True)
        _HELD.discard(fd)
        os.close(fd)
        if created and not any(out.iterdir()):
            out.rmdir()  # a run that wrote nothing leaves no folder behind


def make_output_folder(folder: Path) -> None:
    """Create `folder` (and its parents); an `--out` that cannot be a folder is a usage error."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder}: --out must be a folder, but a file of that name exists")
    try:
        with out_of_space_as_error(folder):
            folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UsageError(f"{folder}: --out cannot be created: part of its path is a file") from None
    except PermissionError:
        raise VctmaeError(
            f"{folder}: cannot create the output folder (permission denied)"
        ) from None


def _lock(path: Path, out: Path) -> int:
    """Open and flock `path`; retried when the holder removed the file in between (its
    lock then guarded a file that no longer has this name)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd) or "another vctmae run (its pid is not written yet)"
            os.close(fd)
            raise OutputLockedError(
                f"{out}: {holder} is writing here; wait for it to finish or use another --out"
            ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _holder(fd: int) -> str:
    """Who a lock file names: "`vctmae COMMAND` (pid N)", or "" for an empty file."""
    text = os.pread(fd, 256, 0).decode("utf-8", "replace").split()
    if len(text) != 2 or not text[0].isdigit():
        return ""
    pid, command = text
    return f"`vctmae {command}` (pid {pid})"
