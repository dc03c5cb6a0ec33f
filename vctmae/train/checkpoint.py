"""Atomic, resumable checkpoints.

Layout under a run directory:

    checkpoints/epoch-0007.safetensors (+ epoch-0007.json model config)   weights
    checkpoints/epoch-0007.state.pt                                         training state
    checkpoints/last.json                                                   which pair is current

Both files of an epoch are written under temporary names and renamed; the
pointer `last.json` is replaced last, so a crash at any moment leaves the
previous epoch's pair current and loadable. The training state is a dict of
tensors and plain Python values (optimizer state, step, epoch, RNG states,
loader epoch, early-stopping counters), read back with
`torch.load(weights_only=True)`: no pickled objects.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

CHECKPOINT_DIR = "checkpoints"
POINTER = "last.json"


def _replace(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)


def save_weights(model: nn.Module, path: Path) -> Path:
    """Write `model` with vctmae.model.save_model (safetensors + JSON config), atomically."""
    from vctmae.model.checkpoint import config_path, save_model

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    save_model(model, tmp)
    _replace(config_path(tmp), config_path(path))
    _replace(tmp, path)
    return path


def load_weights_into(model: nn.Module, path: Path) -> None:
    """Load a safetensors file written by `save_weights` into `model` (strict)."""
    state = load_file(str(path))
    model.load_state_dict(state, strict=True)


def save_checkpoint(run_dir: Path, *, model: nn.Module, state: dict[str, Any], epoch: int) -> Path:
    """Write the epoch's weights and training state, then flip the pointer. Returns the pointer."""
    ckpt_dir = Path(run_dir) / CHECKPOINT_DIR
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    name = f"epoch-{epoch:04d}"
    weights = save_weights(model, ckpt_dir / f"{name}.safetensors")
    state_path = ckpt_dir / f"{name}.state.pt"
    tmp = ckpt_dir / f".tmp-{os.getpid()}-{state_path.name}"
    torch.save(state, tmp)
    _replace(tmp, state_path)
    pointer = ckpt_dir / POINTER
    tmp_pointer = ckpt_dir / f".tmp-{os.getpid()}-{POINTER}"
    tmp_pointer.write_text(
        json.dumps({"epoch": epoch, "weights": weights.name, "state": state_path.name}) + "\n"
    )
    _replace(tmp_pointer, pointer)
    # Older epochs are no longer current: drop them (only after the pointer moved).
    for old in ckpt_dir.glob("epoch-*"):
        if not old.name.startswith(name):
            old.unlink(missing_ok=True)
    return pointer


def latest_checkpoint(run_dir: Path) -> tuple[Path, Path] | None:
    """(weights, state) of the current checkpoint, or None when the run has none."""
    ckpt_dir = Path(run_dir) / CHECKPOINT_DIR
    pointer = ckpt_dir / POINTER
    if not pointer.exists():
        return None
    entry = json.loads(pointer.read_text())
    weights, state = ckpt_dir / entry["weights"], ckpt_dir / entry["state"]
    for path in (weights, state):
        if not path.exists():
            raise FileNotFoundError(f"{path}: named by {pointer} but missing")
    return weights, state


def load_state(path: Path) -> dict[str, Any]:
    """Training state dict, loaded without running any pickled code."""
    return torch.load(path, map_location="cpu", weights_only=True)
