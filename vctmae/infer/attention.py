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
16 × 96 × 96 by repetition and overlaid on the view's sagittal slices. The maps
come from the forward pass that gives the probabilities (`vctmae.infer.views.assess`:
only its shown view takes the explicit attention path).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from vctmae.clip import ClipRule
from vctmae.infer.views import Assessment, assess
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


def shown_views(
    result: Assessment,
    crops: torch.Tensor,
    boxes: torch.Tensor | None,
    *,
    frames: str,
    model: ModelConfig,
) -> list[dict[str, Any]]:
    """Each crop's shown view and the attention maps over it, from `assess(..., attention=True)`
    on int16 crops (B, 96, 96, 96) (mask mode: with their JSON mask `boxes` (B, 6)).

    Per crop: `frames` (16, H, W) in [0, 1] as the frame rule `frames` cuts them (with mask
    mode's in-plane context), `slices` (the crop's sagittal slice of each frame) and `maps`
    {"last layer", "rollout"}, each (16, H, W) scaled to [0, 1].
    """
    from vctmae import clip
    from vctmae.data.frames import FrameSampler

    shifts = result.shown_shifts
    view_crops, view_frames = FrameSampler(mode=frames).view_input(crops, boxes, shifts)
    shown = clip.scale_hu(clip.gather_slices(view_crops, view_frames)).cpu()  # (B, 16, H, W)
    extents = None if boxes is None else clip.extents_from_boxes(boxes)
    slices = clip.frame_index_tensor(frames, shifts, extents).cpu()  # (B, 16) in the crop
    maps = [layer.cpu() for layer in result.maps]  # per layer (B, heads, N, N)
    pictures = []
    for index in range(crops.shape[0]):
        scores = token_scores([layer[index] for layer in maps], model.grid)
        pictures.append(
            {
                "frames": shown[index],  # (16, H, W)
                "slices": tuple(int(i) for i in slices[index].tolist()),
                "maps": {
                    name: to_frames(score, model.t_patch, model.patch)
                    for name, score in scores.items()
                },
            }
        )
    return pictures


@torch.no_grad()
def explain_crop(
    model: torch.nn.Module,
    crop: np.ndarray,
    rule: ClipRule,
    *,
    shift: int | None = None,
    bbox: tuple[int, ...] | None = None,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Attention maps of one int16 crop (96, 96, 96) over the frames of one of the rule's views
    (`shift`, default the middle one), its probability under the rule (`prob_multiview`: the
    rule's views combined) and that of the shown view alone (`prob_view`), all from one pass
    (`assess`); `precision` as `resolve_precision` gives it."""
    model.eval()
    device = next(model.parameters()).device
    crops = torch.from_numpy(np.ascontiguousarray(crop)).to(device)[None]  # (1, 96, 96, 96)
    boxes = None if bbox is None else torch.tensor([list(bbox)], dtype=torch.long, device=device)
    result = assess(
        model,
        crops,
        views=rule.multiview,
        device=device,
        precision=precision,
        frames=rule.frames,
        boxes=boxes,
        combine=rule.combine,
        attention=True,
        shown=shift,
    )
    (picture,) = shown_views(result, crops, boxes, frames=rule.frames, model=model.config)
    return {
        **picture,
        "prob_view": float(result.shown_probs[0]),
        "prob_multiview": float(result.probs[0]),
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
