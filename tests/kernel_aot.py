"""Ahead-of-time compile of the patch-embedding kernels for a GPU target, without a GPU.

CI has no GPU, and the interpreter never lowers the kernels, so lowering
errors (layouts, dot shapes, shared memory, ptxas) would only show on a lent
GPU. `compile_for_target(90)` runs Triton's real pipeline (TTIR → TTGIR →
LLIR → PTX → cubin) for sm_90 on this machine. If ptxas is absent it stops
at PTX (a mocked PTX version keeps Triton from asking ptxas for one).

Run as `python tests/kernel_aot.py 80 90 [--ptx-only] [--fp32]` (prints JSON), as the kernel
tests do. It must not run under TRITON_INTERPRET=1: the kernels would then be interpreter
objects.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class KernelVariant:
    """One specialisation of a kernel: its name, argument types, constexpr values and launch options."""

    name: str
    kernel: str
    signature: dict[str, str]
    constexprs: dict[str, Any]
    options: dict[str, int]  # num_warps, num_stages


# Frame sizes the kernels are compiled for: the paper's 96² frames and Table 2 row 5's 224²
# (the 96² slices padded); the crops are ingest's (96, 96, 96) either way.
FRAME_SIZES = (96, 224)


# The kernels' runtime arguments that are not fp32 pointers; every constexpr argument is typed
# "constexpr".
ARGUMENT_TYPES = {
    "crops_ptr": "*i16",
    "frames_ptr": "*i32",
    "keep_ptr": "*i32",
    "num_rows": "i32",
    "n_keep": "i32",
    "dim": "i32",
}


def kernel_variants(
    dim: int = 1024, *, include_fp32: bool = False, frame_sizes: tuple[int, ...] = FRAME_SIZES
) -> list[KernelVariant]:
    """The specialisations training uses (bf16 dots, with/without keep and pos), per frame size.

    `include_fp32` adds the fp32-dot check path (slow to compile: ~30 s a kernel on 2 cores).
    """
    from vctmae.kernels import triton_patch_embed as kernels

    def variant(kernel: str, name: str, cfg: Any, **constexprs: Any) -> KernelVariant:
        arguments = getattr(kernels, kernel).arg_names
        signature = {
            arg: "constexpr" if arg in constexprs else ARGUMENT_TYPES.get(arg, "*fp32")
            for arg in arguments
        }
        options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        return KernelVariant(name, kernel, signature, constexprs, options)

    fwd_cfg = kernels.launch_config(dim, forward=True)
    bwd_cfg = kernels.launch_config(dim, forward=False)
    forward_cases = [(True, True, True), (False, True, True)] + (
        [(False, False, False)] if include_fp32 else []
    )
    grad_cases = [(True, True)] + ([(False, False)] if include_fp32 else [])
    variants = []
    for frame in frame_sizes:
        for keep, pos, bf16 in forward_cases:
            dot = "bf16" if bf16 else "fp32"
            constexprs = kernels.kernel_constexprs(
                96, 96, frame, has_keep=keep, dot_bf16=bf16, cfg=fwd_cfg
            )
            name = f"forward frame={frame} keep={keep} pos={pos} dot={dot}"
            variants.append(
                variant("_patch_embed_fwd_kernel", name, fwd_cfg, **constexprs, HAS_POS=pos)
            )
        for keep, bf16 in grad_cases:
            dot = "bf16" if bf16 else "fp32"
            constexprs = kernels.kernel_constexprs(
                96, 96, frame, has_keep=keep, dot_bf16=bf16, cfg=bwd_cfg
            )
            name = f"grad_weight frame={frame} keep={keep} dot={dot}"
            variants.append(
                variant(
                    "_patch_embed_grad_weight_kernel",
                    name,
                    bwd_cfg,
                    **constexprs,
                    BLOCKS_PER_SPLIT=4,
                )
            )
    return variants


def ptxas_available() -> bool:
    """Whether Triton can find a ptxas (its wheels bundle one; TRITON_PTXAS_PATH may point elsewhere)."""
    from triton import knobs

    try:
        knobs.nvidia.ptxas  # noqa: B018 — resolving the knob looks the binary up
    except RuntimeError:
        return False
    return True


def _compile_to_ptx(src, target, options: dict[str, Any]) -> dict[str, str]:
    """Run Triton's stages up to PTX by hand (no ptxas). Uses Triton internals shared by 3.6–3.9."""
    from triton._C.libtriton import ir
    from triton.backends import backends  # noqa: F401 — registers the backends
    from triton.compiler.compiler import make_backend

    os.environ.setdefault(
        "TRITON_MOCK_PTX_VERSION", "12.8"
    )  # else make_ptx asks ptxas for its version
    backend = make_backend(target)
    opts = backend.parse_options(options)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = src.make_ir(
        target, opts, backend.get_codegen_implementation(opts), backend.get_module_map(), context
    )
    stages: dict[str, Any] = {}
    backend.add_stages(stages, opts, src.language)
    metadata: dict[str, Any] = {"target": target, **opts.__dict__}
    asm = {}
    for ext, stage in stages.items():
        if ext == "cubin":
            break
        module = stage(module, metadata)
        asm[ext] = module if isinstance(module, str) else str(module)
    return asm


def compile_for_target(
    capability: int, dim: int = 1024, *, ptx_only: bool = False, include_fp32: bool = False
) -> list[dict[str, Any]]:
    """Compile every kernel variant for sm_<capability>; returns one summary dict per variant.

    `ptx_only` (automatic when ptxas is missing) stops before the cubin.
    """
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET to compile for a GPU target")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from vctmae.kernels import triton_patch_embed

    target = GPUTarget("cuda", capability, 32)
    full = not ptx_only and ptxas_available()
    results = []
    for variant in kernel_variants(dim, include_fp32=include_fp32):
        fn = getattr(triton_patch_embed, variant.kernel)
        src = ASTSource(
            fn=fn, signature=dict(variant.signature), constexprs=dict(variant.constexprs)
        )
        start = time.perf_counter()
        if full:
            compiled = triton.compile(src, target=target, options=dict(variant.options))
            asm = {k: v for k, v in compiled.asm.items() if k != "source"}
            shared = int(getattr(compiled.metadata, "shared", 0))
        else:
            asm = _compile_to_ptx(src, target, dict(variant.options))
            shared = None
        ptx = asm.get("ptx", "")
        results.append(
            {
                "arch": f"sm_{capability}",
                "variant": variant.name,
                "stages": list(asm),
                "shared_bytes": shared,
                "mma": "wgmma"
                if "wgmma.mma_async" in ptx
                else ("mma.sync" if "mma.sync" in ptx else None),
                "cubin_bytes": len(asm["cubin"]) if "cubin" in asm else None,
                "seconds": round(time.perf_counter() - start, 2),
            }
        )
    return results


def main(argv: list[str]) -> int:
    flags = {"--ptx-only", "--fp32"}
    capabilities = [int(a) for a in argv if a not in flags] or [80, 90]
    results = [
        r
        for cap in capabilities
        for r in compile_for_target(
            cap, ptx_only="--ptx-only" in argv, include_fp32="--fp32" in argv
        )
    ]
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
