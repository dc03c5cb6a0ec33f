"""Plain-torch reference of the fused patch embedding (SPEC §6).

The reference spells out the semantics the Triton kernel must reproduce:
the clip's 16 frames at the given sagittal slice indices → HU clip/scale →
Conv3d with kernel = stride = (2, 16, 16) → tokens. It gathers the frames
inline so the kernel package depends on nothing else.

Layout (one crop, video order): crop (S=96 sagittal, 96 rows S→I, 96 cols A→P);
frame k of sample b = crop[frames[b, k]] for k in 0..15 (the paper's rule:
frames[b, k] = o_b + 6k, `stride_frames`); token index t*36 + row*6 + col over the
(8, 6, 6) grid of 2×16×16 tubes; patch vector index (u, p, q) row-major = u*256
+ p*16 + q (frame within the tube, row, column), matching the Conv3d weight
(D, 1, 2, 16, 16).reshape(D, 512).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CROP_SIZE = 96
NUM_FRAMES = 16
FRAME_STRIDE = 6
TUBE = 2
PATCH = 16
GRID_T = NUM_FRAMES // TUBE  # 8
GRID_HW = CROP_SIZE // PATCH  # 6
NUM_TOKENS = GRID_T * GRID_HW * GRID_HW  # 288
PATCH_DIM = TUBE * PATCH * PATCH  # 512
HU_MIN = -1000.0
HU_MAX = 1000.0
MAX_OFFSET = CROP_SIZE - FRAME_STRIDE * (NUM_FRAMES - 1)  # offsets in [0, 6)


def stride_frames(offsets: torch.Tensor) -> torch.Tensor:
    """The paper's frame rule as slice indices: offsets (B,) → (B, 16) = o + 6k."""
    steps = FRAME_STRIDE * torch.arange(NUM_FRAMES, device=offsets.device)
    return offsets.long()[:, None] + steps  # (B, 16)


def sample_frames_reference(crops: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """int16 crops (B, 96, 96, 96) + slice indices (B, 16) → float32 clips (B, 1, 16, 96, 96) in [0, 1]."""
    index = frames.to(device=crops.device, dtype=torch.long)  # (B, 16)
    batch = torch.arange(crops.shape[0], device=crops.device)[:, None]
    clips = crops[batch, index].float()  # (B, 16, 96, 96)
    clips = (clips.clamp(HU_MIN, HU_MAX) - HU_MIN) / (HU_MAX - HU_MIN)
    return clips.unsqueeze(1)  # (B, 1, 16, 96, 96)


def gather_patches(
    crops: torch.Tensor, frames: torch.Tensor, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """The patch vectors the kernel multiplies: (B, 288, 512), or (B, K, 512) with `keep`."""
    frames = sample_frames_reference(crops, frames)[:, 0]  # (B, 16, 96, 96)
    batch = frames.shape[0]
    patches = frames.reshape(
        batch, GRID_T, TUBE, GRID_HW, PATCH, GRID_HW, PATCH
    )  # (B, t, u, r, p, c, q)
    patches = patches.permute(0, 1, 3, 5, 2, 4, 6)  # (B, t, r, c, u, p, q)
    patches = patches.reshape(batch, NUM_TOKENS, PATCH_DIM)  # (B, 288, 512)
    if keep is not None:
        patches = patches.gather(
            1, keep.long()[:, :, None].expand(-1, -1, PATCH_DIM)
        )  # (B, K, 512)
    return patches


def patch_embed_reference(
    crops: torch.Tensor,
    frames: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    keep: torch.Tensor | None = None,
    pos: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch path: gather the frames + Conv3d → (B, 288, D), or (B, K, D) with `keep` (B, K) token
    indices. `frames` (B, 16) are the clip's sagittal slice indices; `weight` is (D, 512), the
    channel-summed Conv3d weight; `pos` (288, D) is added when given.
    """
    dim = weight.shape[0]
    clips = sample_frames_reference(crops, frames)  # (B, 1, 16, 96, 96)
    tokens = F.conv3d(
        clips, weight.reshape(dim, 1, TUBE, PATCH, PATCH), bias, stride=(TUBE, PATCH, PATCH)
    )
    tokens = tokens.flatten(2).transpose(1, 2)  # (B, 288, D)
    if pos is not None:
        tokens = tokens + pos
    if keep is not None:
        tokens = tokens.gather(1, keep.long()[:, :, None].expand(-1, -1, dim))  # (B, K, D)
    return tokens
