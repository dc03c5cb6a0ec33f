"""Reconstruction preview PNG written after each pretraining epoch.

Rows: the 8 target frames (mae_st's `linspace(0, T−1, pred_t_dim)`), the
visible patches only, and the reconstruction with the visible patches pasted
back (the model's own `unpatchify` turns token predictions into frames). For
the 3-D model: one sagittal slice through each of its six layers of cubes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

GRID = (8, 6, 6)  # tokens along time, rows, columns for 16 × 96 × 96 clips
PATCH = 16


def save_preview(
    target: torch.Tensor,
    recon: torch.Tensor,
    mask: torch.Tensor,
    path: Path,
    *,
    title: str,
    grid: tuple[int, int, int] = GRID,
) -> Path:
    """target, recon (t, 96, 96): one image per token layer of the `grid` (t, h, w) (the 8 target
    frames; the 3-D model's six slices) and their reconstruction; mask (L,) 1 = masked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target, recon = target.float().cpu(), recon.float().cpu()
    t, h, w = grid
    token_mask = mask.reshape(t, h, w).float().cpu()
    pixel_mask = token_mask.repeat_interleave(PATCH, 1).repeat_interleave(PATCH, 2)  # (8, 96, 96)
    visible = torch.where(pixel_mask.bool(), torch.full_like(target, 0.5), target)
    pasted = torch.where(pixel_mask.bool(), recon.clamp(0, 1), target)
    rows = [("target", target), ("visible", visible), ("reconstruction", pasted)]
    fig, axes = plt.subplots(3, t, figsize=(1.6 * t, 5.2))
    for r, (name, images) in enumerate(rows):
        for c in range(t):
            ax = axes[r, c]
            ax.imshow(np.asarray(images[c]), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name)
    fig.suptitle(title)
    fig.tight_layout()
    from vctmae.files import write_atomically

    # Atomically (a full disk keeps an earlier picture intact, and leaves no partial PNG).
    path = write_atomically(path, lambda handle: fig.savefig(handle, format="png", dpi=80))
    plt.close(fig)
    return path
