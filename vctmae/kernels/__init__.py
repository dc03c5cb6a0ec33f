"""vctmae.kernels — fused Triton patch embedding with a plain-torch reference.

`patch_embed` picks the backend: Triton on CUDA tensors (when triton is
installed), the torch reference elsewhere. `backend="triton"` on CPU tensors
works only under the Triton interpreter (TRITON_INTERPRET=1 set before this
package's Triton module is first imported).
"""

from __future__ import annotations

import importlib.util

import torch

from vctmae.kernels.reference import (
    NUM_TOKENS,
    PATCH_DIM,
    num_tokens,
    patch_embed_reference,
)

BACKENDS = ("auto", "torch", "triton")

__all__ = [
    "BACKENDS",
    "NUM_TOKENS",
    "PATCH_DIM",
    "num_tokens",
    "patch_embed",
    "patch_embed_reference",
    "resolve_backend",
    "triton_available",
]


def triton_available() -> bool:
    """True when the triton package is importable (it is not needed for the torch path)."""
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' → 'triton' on CUDA when triton is installed, else 'torch'; other names pass through checked."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton" and not triton_available():
        raise RuntimeError("backend='triton' needs the triton package (pip install 'vctmae[gpu]')")
    return backend


def patch_embed(
    crops: torch.Tensor,
    frames: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    keep: torch.Tensor | None = None,
    pos: torch.Tensor | None = None,
    backend: str = "auto",
    frame_size: int | None = None,
) -> torch.Tensor:
    """int16 crops (B, 96, 96, 96) + frame indices (B, 16) → patch tokens (B, L, D), or (B, K, D) with keep.

    frames[b, k] is the sagittal slice of clip frame k (from `vctmae.clip.frame_index_tensor`);
    weight (D, 512) is the Conv3d weight (D, 3, 2, 16, 16) summed over input channels and
    reshaped; frames are `frame_size` square (96: L = 288 tokens,
    t*36 + row*6 + col; 224: the slices padded centred with −1000 HU, L = 1568 tokens on an
    8 × 14 × 14 grid; default: what `pos` is a table for, else the slices' own size); keep (B, K)
    holds token indices; pos (L, D) is added when given. Differentiable w.r.t. weight, bias and
    pos.
    """
    if resolve_backend(backend, crops.device) == "torch":
        return patch_embed_reference(
            crops, frames, weight, bias, keep=keep, pos=pos, frame_size=frame_size
        )
    from vctmae.kernels.triton_patch_embed import patch_embed_triton

    return patch_embed_triton(
        crops, frames, weight, bias, keep=keep, pos=pos, frame_size=frame_size
    )
