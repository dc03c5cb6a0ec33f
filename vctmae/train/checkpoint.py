"""Atomic, resumable checkpoints; the last two are kept.

Layout under a run directory:

    checkpoints/epoch-0007.safetensors (+ epoch-0007.json model config)   weights
    checkpoints/epoch-0007.state.pt                                         training state
    checkpoints/epoch-0006.*                                                the one before
    checkpoints/last.json                                                   which pairs are current

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vctmae.model.checkpoint import CheckpointError, load_plain, save_model, write_atomically

CHECKPOINT_DIR = "checkpoints"
POINTER = "last.json"
KEEP = 2  # checkpoints kept: the newest and the one before it


@dataclass(frozen=True, kw_only=True)
class CheckpointFiles:
    """The two files of one epoch's checkpoint."""

    epoch: int
    weights: Path
    state: Path


def save_weights(model: nn.Module, path: Path) -> Path:
    """Write `model` (safetensors + JSON config) atomically; a full disk keeps the old file."""
    return save_model(model, Path(path))


def _entry(files: CheckpointFiles) -> dict[str, Any]:
    return {"epoch": files.epoch, "weights": files.weights.name, "state": files.state.name}


def save_checkpoint(run_dir: Path, *, model: nn.Module, state: dict[str, Any], epoch: int) -> Path:
    """Write the epoch's weights and training state, then flip the pointer. Returns the pointer."""
    ckpt_dir = Path(run_dir) / CHECKPOINT_DIR
    name = f"epoch-{epoch:04d}"
    weights = save_weights(model, ckpt_dir / f"{name}.safetensors")
    state_path = write_atomically(
        ckpt_dir / f"{name}.state.pt", lambda handle: torch.save(state, handle)
    )
    current = CheckpointFiles(epoch=epoch, weights=weights, state=state_path)
    previous = _current_entries(ckpt_dir)
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


def _current_entries(ckpt_dir: Path) -> list[CheckpointFiles]:
    """What the pointer names, newest first; [] when there is no usable pointer."""
    try:
        return checkpoint_candidates(ckpt_dir.parent)
    except CheckpointError:
        return []


def _read_pointer(pointer: Path) -> list[CheckpointFiles]:
    """The checkpoints `last.json` names, newest first; a damaged pointer is a CheckpointError."""
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
        raise ValueError(f"{name!r} is not a file name in checkpoints/")
    return name


def checkpoint_candidates(run_dir: Path) -> list[CheckpointFiles]:
    """The checkpoints the pointer names, newest first ([] when the run has none)."""
    pointer = Path(run_dir) / CHECKPOINT_DIR / POINTER
    return _read_pointer(pointer) if pointer.exists() else []


def latest_checkpoint(run_dir: Path) -> tuple[Path, Path] | None:
    """(weights, state) of the newest checkpoint, or None when the run has none."""
    candidates = checkpoint_candidates(run_dir)
    if not candidates:
        return None
    newest = candidates[0]
    for path in (newest.weights, newest.state):
        if not path.exists():
            raise CheckpointError(
                f"{path}: named by {Path(run_dir) / CHECKPOINT_DIR / POINTER} but missing"
            )
    return newest.weights, newest.state


STATE_KEYS = ("optimizer", "step", "epoch", "torch_rng", "generators", "world_size", "config")


def load_state(path: Path) -> dict[str, Any]:
    """Training state dict, loaded without running any pickled code; a damaged one is named."""
    state = load_plain(path, what="training state")
    if not isinstance(state, dict) or any(key not in state for key in STATE_KEYS):
        raise CheckpointError(f"{path}: not a vctmae training state (keys missing)")
    return state
