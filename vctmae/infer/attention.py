"""Attention pictures of the classifier over the 16 frames of a crop.

Two maps per crop, both over the 8 × 6 × 6 token grid:
- last layer: the last block's attention probabilities, mean over heads, then
  mean over the patch-token queries of the attention each patch token receives.
  The classifier pools the mean of the patch tokens (not the cls token), so the
  mean over patch queries — not the cls row — is what feeds its decision.
- rollout (Abnar & Zuidema 2020): per layer the head-mean attention plus the
  identity (the residual path), rows renormalised, multiplied through all
  layers; then the same mean over patch queries.
Each token covers 2 frames × 16 × 16 pixels, so a map is upsampled to
16 × 96 × 96 by repetition and overlaid on the view's sagittal slices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from vctmae.clip import ClipRule
from vctmae.infer.views import multiview_probs
from vctmae.model.config import ModelConfig


def refuse_volume(model: ModelConfig, who: str) -> None:
    """The pictures here are drawn over a video model's 16 frames; a 3-D model has none."""
    if model.volume:
        from vctmae.errors import UsageError

        raise UsageError(
            f"{who}: attention pictures are drawn over a video model's 16 frames; this is "
            f"{model.describe()} (in predict, pass --no-attention)"
        )


def rollout(maps: list[torch.Tensor]) -> torch.Tensor:
    """Attention rollout of one sample: maps are per layer (heads, N, N) → (N, N)."""
    tokens = maps[0].shape[-1]
    identity = torch.eye(tokens, dtype=torch.float64)
    result = identity
    for layer in maps:
        attention = 0.5 * layer.double().mean(0) + 0.5 * identity  # (N, N)
        attention = attention / attention.sum(-1, keepdim=True)
        result = attention @ result
    return result


def token_scores(maps: list[torch.Tensor], grid: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    """Per-token relevance (t, h, w) from one sample's attention maps (cls token first)."""
    last = maps[-1].double().mean(0)  # (N, N) mean over heads
    rolled = rollout(maps)
    scores = {}
    for name, matrix in (("last layer", last), ("rollout", rolled)):
        received = matrix[1:, 1:].mean(0)  # (L,) mean over patch queries of attention to patch keys
        scores[name] = received.reshape(grid).float()  # (t, h, w)
    return scores


def to_frames(scores: torch.Tensor, t_patch: int = 2, patch: int = 16) -> torch.Tensor:
    """(t, h, w) token scores → (t·t_patch, h·patch, w·patch), scaled to [0, 1]."""
    frames = (
        scores.repeat_interleave(t_patch, 0).repeat_interleave(patch, 1).repeat_interleave(patch, 2)
    )
    low, high = frames.min(), frames.max()
    return (frames - low) / (high - low) if high > low else torch.zeros_like(frames)


@torch.no_grad()
def attention_frames(
    model: torch.nn.Module,
    crop: np.ndarray,
    *,
    frames: str = "crop",
    shift: int | None = None,
    bbox: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """The frames of one view of an int16 crop (96, 96, 96) and the attention maps over them.

    The view is the one the model is evaluated on under the frame rule `frames` (crop or mask
    mode, with its in-plane context cut): `shift` (default the middle view,
    `clip.middle_shift`); mask mode needs the crop's mask `bbox` (its JSON `bbox`).
    Returns `frames` (16, H, W) in [0, 1], `slices` (the crop's sagittal slice of each frame)
    and `maps` {"last layer", "rollout"}, each (16, H, W) scaled to [0, 1]; one forward pass
    (`vctmae predict` draws these for every vertebra, with probabilities it has already
    computed).
    """
    from vctmae import clip
    from vctmae.data.frames import FrameSampler
    from vctmae.model import attention_maps

    model.eval()
    device = next(model.parameters()).device
    crops = torch.from_numpy(np.ascontiguousarray(crop)).to(device)[None]  # (1, 96, 96, 96)
    boxes = None if bbox is None else torch.tensor([list(bbox)], dtype=torch.long, device=device)
    shift = clip.middle_shift(frames) if shift is None else shift
    shifts = torch.full((1,), shift, dtype=torch.long, device=device)
    view_crops, view_frames = FrameSampler(mode=frames).view_input(crops, boxes, shifts)
    shown = clip.scale_hu(clip.gather_slices(view_crops, view_frames))  # (1, 16, H, W)
    extents = None if boxes is None else clip.extents_from_boxes(boxes)
    slices = clip.frame_index_tensor(frames, shifts, extents)[0]  # (16,) in the crop
    # Per layer (heads, N, N).
    maps = [m[0].cpu() for m in attention_maps(model, view_crops, view_frames)]
    cfg = model.config
    scores = token_scores(maps, cfg.grid)
    return {
        "frames": shown[0].cpu(),  # (16, H, W)
        "slices": tuple(int(i) for i in slices.tolist()),
        "maps": {name: to_frames(s, cfg.t_patch, cfg.patch) for name, s in scores.items()},
    }


@torch.no_grad()
def explain_crop(
    model: torch.nn.Module,
    crop: np.ndarray,
    rule: ClipRule,
    *,
    shift: int | None = None,
    bbox: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """Attention maps of one int16 crop (96, 96, 96) over the frames of one view (`shift`,
    default the middle one), its probability under the rule (`prob_multiview`: the rule's views
    combined) and that of the shown view alone (`prob_view`)."""
    from vctmae import clip
    from vctmae.data.frames import FrameSampler

    model.eval()
    device = next(model.parameters()).device
    crops = torch.from_numpy(np.ascontiguousarray(crop)).to(device)[None]  # (1, 96, 96, 96)
    boxes = None if bbox is None else torch.tensor([list(bbox)], dtype=torch.long, device=device)
    combined = multiview_probs(
        model,
        crops,
        views=rule.multiview,
        device=device,
        precision="fp32",
        frames=rule.frames,
        boxes=boxes,
        combine=rule.combine,
    )
    shift = clip.middle_shift(rule.frames) if shift is None else shift
    shifts = torch.full((1,), shift, dtype=torch.long, device=device)
    logits = model(*FrameSampler(mode=rule.frames).view_input(crops, boxes, shifts))
    return {
        **attention_frames(model, crop, frames=rule.frames, shift=shift, bbox=bbox),
        "prob_view": float(torch.softmax(logits.float(), -1)[0, 1]),
        "prob_multiview": float(combined[0]),
    }


def save_explanation(result: dict[str, Any], path: Path, *, title: str) -> Path:
    """Two blocks of 2 × 8 panels (last layer, rollout), each frame with its attention overlay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = result["frames"].numpy()
    names = list(result["maps"])
    columns = frames.shape[0] // 2
    fig, axes = plt.subplots(
        2 * len(names), columns, figsize=(1.5 * columns, 1.65 * 2 * len(names))
    )
    for block, name in enumerate(names):
        heat = result["maps"][name].numpy()
        for k in range(frames.shape[0]):
            ax = axes[2 * block + k // columns, k % columns]
            ax.imshow(frames[k], cmap="gray", vmin=0, vmax=1)
            ax.imshow(heat[k], cmap="jet", alpha=0.35, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"frame {k}", fontsize=7)
            if k % columns == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    from vctmae.files import write_atomically

    # Atomically (a full disk keeps an earlier picture intact, and leaves no partial PNG).
    path = write_atomically(path, lambda handle: fig.savefig(handle, format="png", dpi=90))
    plt.close(fig)
    return path
