"""Atomic, resumable checkpoints; the last two are kept.

Layout under a run directory, in one folder per run kind (`checkpoints/pretrain/`,
`checkpoints/finetune/`: a pretraining and a finetuning into one run directory
never resume from, or prune, each other's checkpoints):

    checkpoints/KIND/epoch-0007.safetensors (+ epoch-0007.json model config)   weights
    checkpoints/KIND/epoch-0007.state.pt                                   training state
    checkpoints/KIND/epoch-0006.*                                          the one before
    checkpoints/KIND/last.json                                             which pairs are current

Every file of an epoch is written under a temporary name and renamed; the
pointer `last.json` (naming the newest pair and the previous one) is replaced
last, and only then are older epochs deleted. So a crash or a full disk at any
moment leaves the previous pointer and both pairs it names loadable. Keeping two
pairs means a newest pair damaged later (a bad disk, a copy cut short) still
leaves the one before to resume from: `checkpoint_candidates` lists both, newest
first. The training state is a dict of tensors and plain Python values
(optimizer state, step, epoch, RNG states, early-stopping counters, the run's
config), read back with `torch.load(weights_only=True)`: no pickled objects.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vctmae.files import write_atomically
from vctmae.model.checkpoint import (
    CheckpointError,
    ModelFiles,
    load_plain,
    model_files,
    write_model,
)
from vctmae.train.graph import tensors_in, with_tensors

CHECKPOINT_DIR = "checkpoints"
POINTER = "last.json"
KEEP = 2  # checkpoints kept: the newest and the one before it


@dataclass(frozen=True, kw_only=True)
class CheckpointFiles:
    """The two files of one epoch's checkpoint."""

    epoch: int
    weights: Path
    state: Path


def _entry(files: CheckpointFiles) -> dict[str, Any]:
    return {"epoch": files.epoch, "weights": files.weights.name, "state": files.state.name}


def checkpoint_folder(run_dir: Path, kind: str) -> Path:
    """Where the checkpoints of one run kind ("pretrain", "finetune") live in a run directory."""
    return Path(run_dir) / CHECKPOINT_DIR / kind


def save_checkpoint(
    run_dir: Path,
    *,
    kind: str,
    model: nn.Module | ModelFiles,
    state: dict[str, Any],
    epoch: int,
) -> Path:
    """Write the epoch's weights and training state, then flip the pointer. Returns the pointer.

    `model` may be a `ModelFiles` snapshot (what the background writer passes). Only `kind`'s
    older checkpoints are deleted.
    """
    ckpt_dir = checkpoint_folder(run_dir, kind)
    name = f"epoch-{epoch:04d}"
    files = model if isinstance(model, ModelFiles) else model_files(model)
    weights = write_model(files, ckpt_dir / f"{name}.safetensors")
    state_path = write_atomically(
        ckpt_dir / f"{name}.state.pt", lambda handle: torch.save(state, handle)
    )
    current = CheckpointFiles(epoch=epoch, weights=weights, state=state_path)
    try:
        previous = checkpoint_candidates(run_dir, kind)
    except CheckpointError:
        previous = []  # a damaged pointer: this checkpoint's replaces it
    kept = [current] + [files for files in previous if files.epoch != epoch][: KEEP - 1]
    pointer = ckpt_dir / POINTER
    text = json.dumps({**_entry(kept[0]), "previous": [_entry(f) for f in kept[1:]]}) + "\n"
    write_atomically(pointer, lambda handle: handle.write(text.encode()))
    # Epochs no longer named by the pointer go (only after the pointer moved).
    keep_names = {f"epoch-{files.epoch:04d}" for files in kept}
    for old in ckpt_dir.glob("epoch-*"):
        if old.name.split(".", 1)[0] not in keep_names:
            old.unlink(missing_ok=True)
    return pointer


def checkpoint_candidates(run_dir: Path, kind: str) -> list[CheckpointFiles]:
    """The checkpoints of `kind` the pointer names, newest first ([] when the run has none); a
    damaged pointer is a CheckpointError."""
    pointer = checkpoint_folder(run_dir, kind) / POINTER
    if not pointer.exists():
        return []
    try:
        entry = json.loads(pointer.read_text())
        files = [
            CheckpointFiles(
                epoch=int(item["epoch"]),
                weights=pointer.parent / _plain_name(item["weights"]),
                state=pointer.parent / _plain_name(item["state"]),
            )
            for item in [entry, *entry.get("previous", [])]
        ]
    except (UnicodeDecodeError, ValueError, AttributeError, KeyError, TypeError) as error:
        # What a cut, edited or foreign JSON file raises here (JSONDecodeError is a ValueError).
        raise CheckpointError(
            f"{pointer}: not a checkpoint pointer ({type(error).__name__}: {error}); it names the "
            "checkpoint to resume — remove the run folder's checkpoints/ to start afresh"
        ) from None
    return files


def _plain_name(name: object) -> str:
    """A file name inside checkpoints/ (no folders: the pointer cannot point elsewhere)."""
    if not isinstance(name, str) or not name or Path(name).name != name:
        raise ValueError(f"{name!r} is not a file name in its checkpoint folder")
    return name


STATE_KEYS = ("optimizer", "step", "epoch", "torch_rng", "generators", "world_size", "config")


def load_state(path: Path) -> dict[str, Any]:
    """Training state dict, loaded without running any pickled code; a damaged one is named."""
    state = load_plain(path, what="training state")
    if not isinstance(state, dict) or any(key not in state for key in STATE_KEYS):
        raise CheckpointError(f"{path}: not a vctmae training state (keys missing)")
    return state


def cpu_copy(value: Any) -> Any:
    """`value` (nested dicts, lists, tensors) with every tensor copied to the CPU: a snapshot
    the background writer can save while the training step changes the originals."""
    copies = (tensor.detach().to("cpu", copy=True) for tensor in tensors_in(value))
    return with_tensors(value, copies)


class BackgroundWriter:
    """Writes checkpoints and weights in a thread, one job after another, off the training step.

    The step only pays for copying the tensors to the CPU (`model_files`, `cpu_copy`); the
    serialisation, the disk writes and the pointer flip — the same atomic protocol as a
    synchronous save — happen while the next epoch trains. `wait()` blocks until every job is
    done and re-raises the first error of one (e.g. a full disk, as `OutOfSpaceError`). The
    thread is not a daemon: an interrupted run still finishes the write it had started.
    """

    def __init__(self) -> None:
        self._jobs: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="vctmae-checkpoints")
            self._thread.start()
        self._jobs.put((job, args, kwargs))

    def _work(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                self._jobs.task_done()
                return
            job, args, kwargs = item
            try:
                if self._error is None:
                    job(*args, **kwargs)
            except BaseException as error:
                self._error = error
            finally:
                self._jobs.task_done()

    def wait(self, *, raise_errors: bool = True) -> None:
        """Block until every submitted job is written; re-raise a job's error."""
        if self._thread is not None:
            self._jobs.join()
        if raise_errors and self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self, *, raise_errors: bool = True) -> None:
        """Finish every job and stop the thread (a job's error is re-raised)."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None
        self.wait(raise_errors=raise_errors)
