"""From int16 vertebra crops to the model's input frames.

A crop is (96, 96, 96) int16 HU in video order (axis 0 = sagittal slice). A clip is 16 of its
sagittal slices, chosen per sample by a (B, 16) tensor of slice indices (the paper's rule:
o + 6k for a view offset o in [0, 6); or any other rule of `vctmae.clip`), HU clipped to
[−1000, 1000] and scaled to [0, 1], and padded centred to the model's frame size when that is
larger than the slices (Table 2 row 5: 96² slices in 224² frames, padding −1000 HU = 0).
A volume model (the 3-D MAE) reads the whole crop instead (`volume_voxels`), through the same
HU rule. The rules are `vctmae.clip`'s; this is the model's one call into them.
"""

from __future__ import annotations

import torch

from vctmae import clip


def clip_frames(
    crops: torch.Tensor, frames: torch.Tensor, frame_size: int | None = None
) -> torch.Tensor:
    """Frames crops[b, frames[b, k]] → float (B, 1, K, F, F) in [0, 1].

    crops: int16 (B, S, H, H); frames: integer (B, K) sagittal slice indices; F = `frame_size`
    (default H, no padding).
    """
    # In place after the gather: the clip is a fresh tensor, and each temporary would cost a
    # full copy.
    scaled = clip.scale_hu(clip.gather_slices(crops, frames))  # (B, K, H, H)
    if frame_size is not None:
        scaled = clip.pad_frames(scaled, frame_size, clip.PAD_SCALED)  # (B, K, F, F)
    return scaled.unsqueeze(1)  # (B, 1, K, F, F)


def volume_voxels(crops: torch.Tensor) -> torch.Tensor:
    """The whole crops as the 3-D model's input: int16 (B, S, H, W) → float (B, 1, S, H, W) in
    [0, 1], by the same HU window as the frames (`vctmae.clip.scale_hu`)."""
    if crops.dim() != 4:
        raise ValueError(f"crops must be (B, S, H, W), got shape {tuple(crops.shape)}")
    return clip.scale_hu(crops).unsqueeze(1)  # (B, 1, S, H, W)
