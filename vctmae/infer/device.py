"""Where and how a model computes: the device, the number format, the patch embedding.

`resolve_device` turns `--device` into a torch device; `resolve_precision` turns
`--precision` into the number format that runs, and `autocast_context` applies it to a
forward pass. Speed switches are applied from outside the model. The model's patch embedding
computes with plain torch (gather frames → Conv3d) until `install_patch_embed` switches it to
the fused Triton kernel, which reads the same parameters (the same `proj` Conv3d, so state-dict
keys, checkpoints and optimizer parameters are unchanged) and gives the same tokens.
`apply_speedups` does that and optionally `torch.compile`s the model; training wraps the result
for DDP. The kernel gathers video frames; a 3-D model (`VolumePatchEmbed`, which reads the
whole crop) keeps its torch patch embedding.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from vctmae.errors import UsageError
from vctmae.model.vit import VolumePatchEmbed


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' → this process's GPU when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: torch sees no GPU here; use --device cpu or auto")
        return torch.device("cuda", local_rank)
    return torch.device(name)


# CPU flags (/proc/cpuinfo) of the instruction sets that compute bf16 matrix products natively:
# AMX tiles and AVX-512 BF16. Elsewhere bf16 on the CPU is emulated and slower than fp32.
BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def resolve_precision(
    choice: str,
    device: torch.device,
    *,
    inference: bool,
    flags: frozenset[str] | None = None,
) -> str:
    """'auto' → the number format that runs, 'bf16' or 'fp32'; an explicit choice stays.

    auto: bf16 autocast on a GPU. On the CPU, inference (predict, eval, explain) takes bf16 where
    the CPU accelerates it (`BF16_CPU_FLAGS` among `flags`, default this CPU's) and fp32
    elsewhere; training stays fp32 on the CPU, so its runs and its validation do not depend on
    the machine's instruction set.
    """
    if choice != "auto":
        return choice
    if device.type == "cuda":
        return "bf16"
    if inference and BF16_CPU_FLAGS & (cpu_flags() if flags is None else flags):
        return "bf16"
    return "fp32"


def autocast_context(
    device: torch.device, precision: str = "auto", *, cache: bool = True
) -> contextlib.AbstractContextManager:
    """The forward pass's number format: bf16 autocast (no GradScaler needed) or plain fp32.

    precision: 'bf16', 'fp32', or 'auto' — training's choice (`resolve_precision` with
    inference=False: bf16 on a GPU, fp32 on the CPU); inference resolves its own first.
    `cache=False` turns autocast's weight-cast cache off (a CUDA graph must not capture a cast
    made once and reused: the weights change every step).
    """
    if resolve_precision(precision, device, inference=False) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


def resolve_patch_embed(choice: str, device: torch.device) -> str:
    """'auto' → 'triton' on CUDA when triton is installed, else 'torch' (`vctmae.kernels`)."""
    from vctmae.kernels import resolve_backend

    try:
        return resolve_backend(choice, torch.device(device))
    except (ValueError, RuntimeError) as error:
        raise UsageError(f"--patch-embed {choice}: {error}") from None


def install_patch_embed(model: nn.Module, choice: str, device: torch.device) -> str:
    """Give `model` the chosen patch embedding (in place); returns 'torch' or 'triton'.

    A 3-D model keeps its own (torch) patch embedding: 'auto' means torch for it, and 'triton'
    is refused.
    """
    if isinstance(model.patch_embed, VolumePatchEmbed):
        if choice == "triton":
            raise UsageError(
                f"--patch-embed triton: the Triton kernel gathers video frames; this is "
                f"{model.config.describe()}, which reads the whole crop — use auto or torch"
            )
        return "torch"
    resolved = resolve_patch_embed(choice, torch.device(device))
    model.patch_embed.backend = resolved
    return resolved


def apply_speedups(
    model: nn.Module, *, patch_embed: str, compile: bool, device: torch.device
) -> nn.Module:
    """Install the patch embedding; return the module a step calls (compiled when asked)."""
    install_patch_embed(model, patch_embed, device)
    return torch.compile(model) if compile else model
