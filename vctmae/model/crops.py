"""From int16 vertebra crops to the model's input frames.

A crop is (96, 96, 96) int16 HU in video order (axis 0 = sagittal slice). A clip is 16 of its
sagittal slices, chosen per sample by a (B, 16) tensor of slice indices (the paper's rule:
o + 6k for a view offset o in [0, 6)), HU clipped to [−1000, 1000] and scaled to [0, 1].
"""

from __future__ import annotations

import torch

HU_MIN = -1000.0
HU_MAX = 1000.0


def clip_frames(crops: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """Frames crops[b, frames[b, k]] → float (B, 1, K, H, W) in [0, 1].

    crops: int16 (B, S, H, W); frames: integer (B, K) sagittal slice indices.
    """
    if crops.dim() != 4:
        raise ValueError(f"crops must be (B, S, H, W), got shape {tuple(crops.shape)}")
    if frames.dim() != 2 or frames.shape[0] != crops.shape[0]:
        raise ValueError(
            f"frames must be (B, K) slice indices with B = {crops.shape[0]}, "
            f"got shape {tuple(frames.shape)}"
        )
    rows = torch.arange(crops.shape[0], device=crops.device)[:, None]
    # (B, K, H, W): advanced indexing copies whole slices (a gather with an expanded index is
    # several times slower on CPU).
    clip = crops[rows, frames.to(crops.device, torch.long)].float()
    # In place: the clip is a fresh tensor, and each temporary would cost a full copy.
    clip.clamp_(HU_MIN, HU_MAX).sub_(HU_MIN).div_(HU_MAX - HU_MIN)
    return clip.unsqueeze(1)  # (B, 1, K, H, W)
