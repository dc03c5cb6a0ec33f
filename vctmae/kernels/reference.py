"""Plain-torch reference of the fused patch embedding.

The reference spells out the semantics the Triton kernel must reproduce:
the clip's 16 frames at the given sagittal slice indices → HU clip/scale →
(padding to the frame size) → Conv3d with kernel = stride = (2, 16, 16) → tokens.
The frame rules themselves (`o + 6k`, mask mode, HU window, padding) are `vctmae.clip`'s.

Layout (one crop, video order): crop (S sagittal slices, H rows S→I, W = H cols A→P),
S = H = 96 for ingest's crops; frame k of sample b = crop[frames[b, k]] for k in 0..15
(the paper's rule: frames[b, k] = o_b + 6k, `vctmae.clip.frame_index_tensor`). Frames are
F × F with F = the frame size: 96 (the paper's format, no padding) or 224 (Table 2 row 5: the
96² slices padded centred with −1000 HU, i.e. 0 after scaling). Token index
t·g² + row·g + col over the (8, g, g) grid of 2×16×16 tubes, g = F / 16 (6 or 14:
288 or 1568 tokens); patch vector index (u, p, q) row-major = u*256 + p*16 + q (frame
within the tube, row, column), matching the Conv3d weight (D, 1, 2, 16, 16).reshape(D, 512).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vctmae.clip import CROP_SIZE, NUM_FRAMES, clip_frames

TUBE = 2
PATCH = 16
GRID_T = NUM_FRAMES // TUBE  # 8
PATCH_DIM = TUBE * PATCH * PATCH  # 512


def num_tokens(frame_size: int) -> int:
    """Patch tokens of one clip of F × F frames: 8 · (F / 16)² (288 for 96, 1568 for 224)."""
    if frame_size % PATCH:
        raise ValueError(f"frame size {frame_size} is not a multiple of the {PATCH}-pixel patch")
    return GRID_T * (frame_size // PATCH) ** 2


NUM_TOKENS = num_tokens(CROP_SIZE)  # 288 for the paper's 96² frames


def frame_size_of(
    crops: torch.Tensor, pos: torch.Tensor | None = None, frame_size: int | None = None
) -> int:
    """The frame size of a call: `frame_size` if given, else the one `pos` (L, D) is a table for,
    else the crops' slice size."""
    if frame_size is not None:
        return int(frame_size)
    if pos is not None:
        side = math.isqrt(pos.shape[0] // GRID_T)
        if GRID_T * side * side != pos.shape[0]:
            raise ValueError(f"pos has {pos.shape[0]} rows, not 8 × a square token grid")
        return side * PATCH
    return int(crops.shape[-1])


def patch_embed_reference(
    crops: torch.Tensor,
    frames: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    keep: torch.Tensor | None = None,
    pos: torch.Tensor | None = None,
    frame_size: int | None = None,
) -> torch.Tensor:
    """Torch path: gather the frames + Conv3d → (B, L, D), or (B, K, D) with `keep` (B, K) token
    indices. `frames` (B, 16) are the clip's sagittal slice indices; `weight` is (D, 512), the
    channel-summed Conv3d weight; `pos` (L, D) is added when given; L = 288 for 96² frames,
    1568 for 224² (`frame_size_of`).
    """
    dim = weight.shape[0]
    size = frame_size_of(crops, pos, frame_size)
    clips = clip_frames(crops, frames, size)  # (B, 1, 16, F, F)
    tokens = F.conv3d(
        clips, weight.reshape(dim, 1, TUBE, PATCH, PATCH), bias, stride=(TUBE, PATCH, PATCH)
    )
    tokens = tokens.flatten(2).transpose(1, 2)  # (B, L, D)
    if pos is not None:
        tokens = tokens + pos
    if keep is not None:
        tokens = tokens.gather(1, keep.long()[:, :, None].expand(-1, -1, dim))  # (B, K, D)
    return tokens
