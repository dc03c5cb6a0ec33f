"""From int16 vertebra crops to model inputs: the frame gather and the patch-embedding backends.

A crop is (96, 96, 96) int16 HU in video order; frame k of a clip is the sagittal slice
crop[o + 6k] (o the view offset in [0, 6)), clipped to [−1000, 1000] HU and scaled to [0, 1],
as `vctmae.data.sample_frames` defines it.
"""

from __future__ import annotations

from typing import Literal

import torch

PatchEmbedBackend = Literal["auto", "torch", "triton"]
BACKENDS = ("auto", "torch", "triton")

HU_MIN = -1000.0
HU_MAX = 1000.0
FRAME_STRIDE = 6


def gather_frames(
    crops: torch.Tensor,
    offsets: torch.Tensor,
    frame_indices: torch.Tensor,
    stride: int = FRAME_STRIDE,
) -> torch.Tensor:
    """Clip frames crops[b, offsets[b] + stride·k] for k in frame_indices → float (B, 1, K, H, W) in [0, 1]."""
    if crops.dim() != 4:
        raise ValueError(f"crops must be (B, D, H, W), got shape {tuple(crops.shape)}")
    slices = (
        offsets.to(crops.device, torch.long)[:, None]
        + stride * frame_indices.to(crops.device, torch.long)[None, :]
    )  # (B, K)
    _, _, height, width = crops.shape
    index = slices[:, :, None, None].expand(-1, -1, height, width)  # (B, K, H, W)
    hu = torch.gather(crops, 1, index).float()  # (B, K, H, W)
    return ((hu.clamp(HU_MIN, HU_MAX) - HU_MIN) / (HU_MAX - HU_MIN)).unsqueeze(1)  # (B, 1, K, H, W)


def frames_from_crops(
    crops: torch.Tensor, offsets: torch.Tensor, num_frames: int = 16
) -> torch.Tensor:
    """The clip (B, 1, num_frames, 96, 96) of each crop: `vctmae.data.sample_frames` when present."""
    try:
        from vctmae.data import sample_frames
    except ImportError:
        sample_frames = None
    if sample_frames is not None:
        return sample_frames(crops, offsets, num_frames=num_frames, stride=FRAME_STRIDE)
    frame_indices = torch.arange(num_frames, device=crops.device)
    return gather_frames(crops, offsets, frame_indices)


def triton_patch_embed_available() -> bool:
    """True when the Triton kernel module and the triton package are both importable."""
    try:
        from vctmae.kernels import triton_available
    except ImportError:
        return False
    return triton_available()


def resolve_backend(backend: str, crops: torch.Tensor) -> str:
    """'auto' → 'triton' for CUDA crops when the kernel imports, else 'torch'."""
    if backend not in BACKENDS:
        raise ValueError(f"patch_embed_backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if crops.is_cuda and triton_patch_embed_available() else "torch"
    return backend


def triton_patch_tokens(
    crops: torch.Tensor,
    offsets: torch.Tensor,
    weight_folded: torch.Tensor,
    bias: torch.Tensor,
    *,
    keep: torch.Tensor | None,
    pos: torch.Tensor | None,
) -> torch.Tensor:
    """Fused gather + patch embedding (+ positional embedding) from the Triton kernel.

    weight_folded (D, 512) is the Conv3d weight summed over its input channels; returns (B, 288, D),
    or (B, K, D) for the kept token ids (B, K).
    """
    from vctmae.kernels import patch_embed, stride_frames

    frames = stride_frames(offsets.to(crops.device))  # (B, 16) = o + 6k
    return patch_embed(crops, frames, weight_folded, bias, keep=keep, pos=pos, backend="triton")
