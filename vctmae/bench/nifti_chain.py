"""A per-sample NIfTI chain in the style of the paper code: the loader benchmark's baseline.

The paper's public code reads one NIfTI file per sample and runs a MONAI
transform chain on it at every access. This module writes such a chain in plain
numpy/nibabel so the benchmark measures the same *kind* of work without MONAI:
load → scale HU to [0, 1] (clip) → crop to the voxels > 0 → pad to 96³ → 16
sagittal frames at stride 6 → replicate to 3 channels → random flip of the
sagittal order.

It is a cost baseline, not the paper code's data path, and never used for
training. The paper code (docs/reference-code-notes.md §2–§5) also loads the
vertebra's mask, cuts the volume to the mask's box (sagittal extent, ±16 rows,
all columns, `CropForegroundD` with the mask as source — not to the voxels > 0),
spreads its 16 frames over the mask's sagittal extent (`round(linspace)`, not
stride 6), and in pretraining flips the rows of each frame (not the sagittal
order); `vctmae.clip` implements those rules (`--frames mask`, `--flip rows`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import nibabel as nib
import numpy as np
import torch
from torch.utils.data import Dataset

from vctmae.clip import HU_MAX, HU_MIN, NUM_FRAMES, STRIDE


def reference_transform(volume: np.ndarray, rng: np.random.Generator, size: int = 96) -> np.ndarray:
    """float32 (3, 16, size, size) model input from one HU volume, the paper-code way."""
    scaled = (np.clip(volume.astype(np.float32), HU_MIN, HU_MAX) - HU_MIN) / (HU_MAX - HU_MIN)
    foreground = np.nonzero(scaled > 0)  # MONAI CropForeground's default select_fn: x > 0
    if foreground[0].size:
        lo = [int(axis.min()) for axis in foreground]
        hi = [int(axis.max()) + 1 for axis in foreground]
        scaled = scaled[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    pad = [(max(0, size - n) // 2, max(0, size - n) - max(0, size - n) // 2) for n in scaled.shape]
    scaled = np.pad(scaled, pad)[:size, :size, :size]  # SpatialPad (symmetric, zeros)
    offset = int(rng.integers(STRIDE))
    frames = scaled[offset::STRIDE][:NUM_FRAMES]  # (16, size, size)
    rgb = np.repeat(frames[None], 3, axis=0)  # (3, 16, size, size)
    if rng.random() < 0.5:
        rgb = rgb[:, ::-1]  # left–right flip of the sagittal order
    return np.ascontiguousarray(rgb)


class ReferenceNiftiDataset(Dataset):
    """One NIfTI file per sample, read and transformed on every access (the paper code's Dataset)."""

    def __init__(self, paths: Sequence[str | os.PathLike], labels: Sequence[int], seed: int = 0):
        self.paths = [os.fspath(p) for p in paths]
        self.labels = list(labels)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        volume = np.asarray(nib.load(self.paths[index]).dataobj)
        rng = np.random.default_rng([self.seed, index])
        return torch.from_numpy(reference_transform(volume, rng)), self.labels[index]
