"""vctmae.kernels — the fused Triton patch embedding and its plain-torch reference.

`patch_embed` picks the backend: Triton on CUDA tensors (when triton is installed), the torch
reference (`reference.patch_embed_reference`) elsewhere. `backend="triton"` on CPU tensors works
only under the Triton interpreter (TRITON_INTERPRET=1 set before `triton_patch_embed` is first
imported).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from vctmae.kernels.reference import patch_embed_reference

BACKENDS = ("auto", "torch", "triton")


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
    *,
    backend: str = "auto",
    **options: Any,
) -> torch.Tensor:
    """The tokens of `reference.patch_embed_reference` (options: keep, pos, frame_size), computed
    by the chosen backend ('auto': `resolve_backend`)."""
    if resolve_backend(backend, crops.device) == "torch":
        return patch_embed_reference(crops, frames, weight, bias, **options)
    from vctmae.kernels.triton_patch_embed import patch_embed_triton

    return patch_embed_triton(crops, frames, weight, bias, **options)
