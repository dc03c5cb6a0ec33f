"""Fused Triton patch embedding: int16 crops → patch tokens in one kernel.

Forward (`_patch_embed_fwd_kernel`): each program owns a (BLOCK_M tokens ×
BLOCK_N channels) output tile. Tokens are rows r = b*K + j of the flattened
(B, K) token list (K = L = 8·g² tokens — 288 for 96² frames, 1568 for 224² —
or the kept tokens when `keep` is given). For each BLOCK_K slice of the
512-long patch vector it gathers the int16 voxels straight from the crop at
sagittal index frames[b, 2t + u] (the sample's 16 frame indices, e.g. o_b + 6k
for the paper's rule), clips/scales HU, and feeds
the tile to `tl.dot` with the matching (BLOCK_K × BLOCK_N) slice of the
channel-summed weight; bias (and the positional embedding of the token) are
added in the epilogue. The frames and the patch matrix never exist in memory.

Geometry as constexprs: the crops' depth SLICES and slice size CROP (96 and 96 for
ingest's crops; 16 for the trainers' pre-gathered clips), and the frame size FRAME
(96, or 224 for Table 2 row 5). A frame larger than the slice holds it centred,
padded with −1000 HU (0 after scaling): those voxels are masked loads, never read.
With FRAME == CROP the padding test is compiled out.

Backward: grad_bias and grad_pos are reductions done in torch;
grad_weight = Σ_r grad_out[r]ᵀ · patch[r] is a second kernel
(`_patch_embed_grad_weight_kernel`) that re-gathers the patches from the crops
(nothing but the int16 crops, frame indices and keep indices is saved), split
over rows into partial sums that torch adds up (deterministic, no atomics).

Both launches are `torch.library` custom ops (`vctmae::patch_embed`,
`vctmae::patch_embed_grad_weight`) with fake (shape-only) implementations and
a registered autograd formula, so `torch.compile` traces a model through the
kernel without a graph break, and a CUDA graph captures it like any other op.

Precision: on a GPU the dot operands are bf16 with fp32 accumulation (patch
values in [0, 1]; as the bf16 autocast training path). Under TRITON_INTERPRET=1
the dots run in fp32, because the interpreter computes bf16 dot products
wrongly. The environment variable is read when this module is imported (that is
when `triton.jit` decides to interpret), so set it first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

# The kernels spell out the fixed geometry (16 frames, 2x16x16 tubes) because tl.constexpr
# globals differ across Triton versions; reference.py names it. The HU window, the pad value and
# the crop and frame geometry arrive as constexpr arguments, the HU ones from vctmae.clip.
from vctmae.clip import HU_MAX, HU_MIN, PAD_HU
from vctmae.kernels.reference import NUM_FRAMES, PATCH_DIM, frame_size_of, num_tokens

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The constexpr arguments that carry the clip's HU window and pad value into both kernels.
HU_CONSTEXPRS = {"HU_MIN": HU_MIN, "HU_MAX": HU_MAX, "PAD_HU": PAD_HU}


@triton.jit
def _token_coordinates(keep_ptr, rows, row_mask, n_keep, HAS_KEEP: tl.constexpr):
    """Row r of the flattened (B, K) token list → (batch index, token index in 0..L−1)."""
    batch = rows // n_keep
    if HAS_KEEP:
        token = tl.load(keep_ptr + rows, mask=row_mask, other=0)
    else:
        token = rows % n_keep
    return batch, token


@triton.jit
def _patch_tile(
    crops_ptr,
    frames_ptr,
    batch,
    token,
    row_mask,
    k,
    SLICES: tl.constexpr,
    CROP: tl.constexpr,
    FRAME: tl.constexpr,
    HU_MIN: tl.constexpr,
    HU_MAX: tl.constexpr,
    PAD_HU: tl.constexpr,
):
    """Gather a (BLOCK_M, BLOCK_K) tile of scaled patch values.

    batch/token: (BLOCK_M,) per row; frames_ptr: the (B, 16) sagittal slice of each
    clip frame; k: (BLOCK_K,) indices into the 512-long patch vector laid out
    (u, p, q) = (frame in tube, row, column). crops are (B, SLICES, CROP, CROP); frames
    FRAME × FRAME, the slice centred in them, the rest PAD_HU. HU values are clipped to
    [HU_MIN, HU_MAX] and mapped linearly to [0, 1].
    """
    GRID: tl.constexpr = FRAME // 16
    PAD: tl.constexpr = (FRAME - CROP) // 2
    t = token // (GRID * GRID)
    grid_row = (token % (GRID * GRID)) // GRID
    grid_col = token % GRID
    u = k // 256
    p = (k // 16) % 16
    q = k % 16
    # Clip frame 2t + u of sample b lies at sagittal slice frames[b, 2t + u].
    frame = 2 * t[:, None] + u[None, :]
    sagittal = tl.load(frames_ptr + batch[:, None] * 16 + frame, mask=row_mask[:, None], other=0)
    row = 16 * grid_row[:, None] + p[None, :] - PAD
    col = 16 * grid_col[:, None] + q[None, :] - PAD
    # Mask out-of-range slices too: an unmasked bad address crashes the interpreter.
    mask = row_mask[:, None] & (sagittal >= 0) & (sagittal < SLICES)
    if FRAME != CROP:
        # The padding around the slice: masked loads that read the pad value.
        mask = mask & (row >= 0) & (row < CROP) & (col >= 0) & (col < CROP)
    address = (
        batch.to(tl.int64)[:, None] * (SLICES * CROP * CROP) + sagittal * (CROP * CROP)
        + row * CROP + col
    )  # fmt: skip
    # A padded voxel reads PAD_HU.
    hu = tl.load(crops_ptr + address, mask=mask, other=PAD_HU).to(tl.float32)
    hu = tl.minimum(tl.maximum(hu, HU_MIN), HU_MAX)
    return (hu - HU_MIN) / (HU_MAX - HU_MIN)


# num_rows/n_keep vary with batch and mask ratio; not specialising on them saves recompiles.
@triton.jit(do_not_specialize=["num_rows", "n_keep"])
def _patch_embed_fwd_kernel(
    crops_ptr,  # int16 (B, SLICES, CROP, CROP)
    frames_ptr,  # int32 (B, 16)
    keep_ptr,  # int32 (B, K) or unused
    weight_ptr,  # (D, 512)
    bias_ptr,  # (D,)
    pos_ptr,  # (L, D) or unused
    out_ptr,  # (B, K, D)
    num_rows,  # B * K
    n_keep,  # K
    dim,  # D
    SLICES: tl.constexpr,
    CROP: tl.constexpr,
    FRAME: tl.constexpr,
    HU_MIN: tl.constexpr,
    HU_MAX: tl.constexpr,
    PAD_HU: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    HAS_POS: tl.constexpr,
    DOT_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < num_rows
    batch, token = _token_coordinates(keep_ptr, rows, row_mask, n_keep, HAS_KEEP)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < dim

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, 512, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        # A (BLOCK_M, BLOCK_K) tile of scaled patch values.
        patches = _patch_tile(
            crops_ptr, frames_ptr, batch, token, row_mask, k,
            SLICES, CROP, FRAME, HU_MIN, HU_MAX, PAD_HU,
        )  # fmt: skip
        w = tl.load(
            weight_ptr + cols[None, :] * 512 + k[:, None], mask=col_mask[None, :], other=0.0
        )
        if DOT_BF16:
            acc = tl.dot(patches.to(tl.bfloat16), w.to(tl.bfloat16), acc)
        else:
            acc = tl.dot(patches, w.to(tl.float32), acc, input_precision="ieee")

    acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out_mask = row_mask[:, None] & col_mask[None, :]
    if HAS_POS:
        pos = tl.load(pos_ptr + token[:, None] * dim + cols[None, :], mask=out_mask, other=0.0)
        acc += pos.to(tl.float32)
    out_offsets = rows.to(tl.int64)[:, None] * dim + cols[None, :]
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit(do_not_specialize=["num_rows", "n_keep"])
def _patch_embed_grad_weight_kernel(
    crops_ptr,  # int16 (B, SLICES, CROP, CROP)
    frames_ptr,  # int32 (B, 16)
    keep_ptr,  # int32 (B, K) or unused
    grad_ptr,  # (B, K, D) gradient of the output
    partial_ptr,  # float32 (SPLITS, D, 512) partial sums of grad_weight
    num_rows,
    n_keep,
    dim,
    SLICES: tl.constexpr,
    CROP: tl.constexpr,
    FRAME: tl.constexpr,
    HU_MIN: tl.constexpr,
    HU_MAX: tl.constexpr,
    PAD_HU: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    DOT_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCKS_PER_SPLIT: tl.constexpr,  # row blocks of BLOCK_M summed by one program
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_split = tl.program_id(2)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output channels
    col_mask = cols < dim
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # patch-vector positions
    start = pid_split * (BLOCKS_PER_SPLIT * BLOCK_M)

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    # A constexpr trip count: Triton 3.6's interpreter cannot range() over runtime values.
    for block in range(BLOCKS_PER_SPLIT):
        rows = start + block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < num_rows
        batch, token = _token_coordinates(keep_ptr, rows, row_mask, n_keep, HAS_KEEP)
        # A (BLOCK_M, BLOCK_K) tile of scaled patch values.
        patches = _patch_tile(
            crops_ptr, frames_ptr, batch, token, row_mask, k,
            SLICES, CROP, FRAME, HU_MIN, HU_MAX, PAD_HU,
        )  # fmt: skip
        grad_t = tl.load(
            grad_ptr + rows.to(tl.int64)[None, :] * dim + cols[:, None],
            mask=row_mask[None, :] & col_mask[:, None],
            other=0.0,
        )  # (BLOCK_N, BLOCK_M)
        if DOT_BF16:
            acc = tl.dot(grad_t.to(tl.bfloat16), patches.to(tl.bfloat16), acc)
        else:
            acc = tl.dot(grad_t.to(tl.float32), patches, acc, input_precision="ieee")

    out = partial_ptr + pid_split.to(tl.int64) * dim * 512 + cols[:, None] * 512 + k[None, :]
    tl.store(out, acc, mask=col_mask[:, None])


@dataclass(frozen=True, kw_only=True)
class LaunchConfig:
    """Tile sizes and launch parameters of one kernel."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2


def _pow2_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def launch_config(dim: int, *, forward: bool) -> LaunchConfig:
    """The forward (or grad_weight) kernel's one config, for D = `dim` output channels (the
    interpreter cannot autotune over several): big tiles on a GPU, few programs when interpreting."""
    if INTERPRET:
        return LaunchConfig(block_m=64, block_n=min(64, _pow2_at_least_16(dim)), block_k=128)
    block_m, block_k = (128, 64) if forward else (64, 128)
    return LaunchConfig(
        block_m=block_m,
        block_n=min(128, _pow2_at_least_16(dim)),
        block_k=block_k,
        num_warps=8,
        num_stages=3,
    )


def _dot_bf16(device: torch.device, precision: str | None) -> bool:
    if precision is None:
        return device.type == "cuda" and not INTERPRET
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be 'bf16' or 'fp32', got {precision!r}")
    if precision == "bf16" and INTERPRET:
        raise ValueError(
            "bf16 dots are wrong under TRITON_INTERPRET=1 (the interpreter's bf16 arithmetic); use fp32"
        )
    return precision == "bf16"


def kernel_constexprs(
    slices: int, crop: int, frame: int, *, has_keep: bool, dot_bf16: bool, cfg: LaunchConfig
) -> dict[str, Any]:
    """The constexpr arguments both kernels take: the crop and frame geometry, the HU window,
    the variant flags and the tile sizes."""
    return {
        "SLICES": slices,
        "CROP": crop,
        "FRAME": frame,
        **HU_CONSTEXPRS,
        "HAS_KEEP": has_keep,
        "DOT_BF16": dot_bf16,
        "BLOCK_M": cfg.block_m,
        "BLOCK_N": cfg.block_n,
        "BLOCK_K": cfg.block_k,
    }


def _launch_options(
    crops: torch.Tensor,
    keep: torch.Tensor | None,
    dot_bf16: bool,
    frame_size: int,
    cfg: LaunchConfig,
) -> dict[str, Any]:
    """The keyword arguments both launches share: `kernel_constexprs` and the launch options."""
    constexprs = kernel_constexprs(
        crops.shape[1],
        crops.shape[2],
        frame_size,
        has_keep=keep is not None,
        dot_bf16=dot_bf16,
        cfg=cfg,
    )
    return {**constexprs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def _launch_forward(
    crops, frames, keep, weight, bias, pos, dot_bf16: bool, frame_size: int
) -> torch.Tensor:
    batch = crops.shape[0]
    dim = weight.shape[0]
    n_keep = num_tokens(frame_size) if keep is None else keep.shape[1]
    num_rows = batch * n_keep
    out = torch.empty(batch, n_keep, dim, device=crops.device, dtype=weight.dtype)
    if num_rows == 0:
        return out
    cfg = launch_config(dim, forward=True)
    grid = (triton.cdiv(num_rows, cfg.block_m), triton.cdiv(dim, cfg.block_n))
    _patch_embed_fwd_kernel[grid](
        crops,
        frames,
        keep if keep is not None else frames,
        weight,
        bias,
        pos if pos is not None else bias,
        out,
        num_rows,
        n_keep,
        dim,
        HAS_POS=pos is not None,
        **_launch_options(crops, keep, dot_bf16, frame_size, cfg),
    )
    return out


def _launch_grad_weight(
    crops, frames, keep, grad_out, dim: int, dot_bf16: bool, frame_size: int
) -> torch.Tensor:
    batch, n_keep = grad_out.shape[0], grad_out.shape[1]
    num_rows = batch * n_keep
    cfg = launch_config(dim, forward=False)
    tiles = triton.cdiv(dim, cfg.block_n) * triton.cdiv(PATCH_DIM, cfg.block_k)
    row_blocks = triton.cdiv(num_rows, cfg.block_m)
    if grad_out.is_cuda:
        # Enough programs to fill the card twice over; partial sums are summed in torch.
        sms = torch.cuda.get_device_properties(grad_out.device).multi_processor_count
        splits = max(1, min(row_blocks, triton.cdiv(2 * sms, tiles)))
    else:  # interpreter: two splits, so CI exercises the partial-sum path too
        splits = min(row_blocks, 2)
    # A power of two: BLOCKS_PER_SPLIT is a constexpr, so this bounds the number of compiled variants.
    blocks_per_split = triton.next_power_of_2(triton.cdiv(row_blocks, splits))
    splits = triton.cdiv(row_blocks, blocks_per_split)
    partial = torch.empty(splits, dim, PATCH_DIM, device=grad_out.device, dtype=torch.float32)
    grid = (triton.cdiv(dim, cfg.block_n), triton.cdiv(PATCH_DIM, cfg.block_k), splits)
    _patch_embed_grad_weight_kernel[grid](
        crops,
        frames,
        keep if keep is not None else frames,
        grad_out,
        partial,
        num_rows,
        n_keep,
        dim,
        BLOCKS_PER_SPLIT=blocks_per_split,
        **_launch_options(crops, keep, dot_bf16, frame_size, cfg),
    )
    return partial[0] if splits == 1 else partial.sum(0)


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("vctmae::patch_embed", mutates_args=())
def _patch_embed_op(
    crops: torch.Tensor,
    frames: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    keep: torch.Tensor | None,
    pos: torch.Tensor | None,
    dot_bf16: bool,
    frame_size: int,
) -> torch.Tensor:
    return _launch_forward(crops, frames, keep, weight, bias, pos, dot_bf16, frame_size)


@_patch_embed_op.register_fake
def _patch_embed_fake(crops, frames, weight, bias, keep, pos, dot_bf16, frame_size):
    n_keep = num_tokens(frame_size) if keep is None else keep.shape[1]
    return weight.new_empty(crops.shape[0], n_keep, weight.shape[0])


@torch.library.custom_op("vctmae::patch_embed_grad_weight", mutates_args=())
def _grad_weight_op(
    crops: torch.Tensor,
    frames: torch.Tensor,
    keep: torch.Tensor | None,
    grad_out: torch.Tensor,
    dot_bf16: bool,
    frame_size: int,
) -> torch.Tensor:
    return _launch_grad_weight(
        crops, frames, keep, grad_out, grad_out.shape[-1], dot_bf16, frame_size
    )


@_grad_weight_op.register_fake
def _grad_weight_fake(crops, frames, keep, grad_out, dot_bf16, frame_size):
    return grad_out.new_empty(grad_out.shape[-1], PATCH_DIM, dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    crops, frames, weight, bias, keep, pos, dot_bf16, frame_size = inputs
    ctx.save_for_backward(crops, frames, keep)
    ctx.dot_bf16 = dot_bf16
    ctx.frame_size = frame_size
    ctx.dtypes = (weight.dtype, bias.dtype, None if pos is None else pos.dtype)


def _backward(ctx, grad_out):
    """grad_weight in Triton; grad_bias and grad_pos as torch reductions over the tokens."""
    crops, frames, keep = ctx.saved_tensors
    weight_dtype, bias_dtype, pos_dtype = ctx.dtypes
    grad_out = grad_out.contiguous()
    dim = grad_out.shape[-1]
    grad_weight = grad_bias = grad_pos = None
    if ctx.needs_input_grad[2]:
        grad_weight = _grad_weight_op(
            crops, frames, keep, grad_out, ctx.dot_bf16, ctx.frame_size
        ).to(weight_dtype)
    if ctx.needs_input_grad[3]:
        grad_bias = grad_out.float().sum((0, 1)).to(bias_dtype)
    if ctx.needs_input_grad[5]:
        flat = grad_out.float().reshape(-1, dim)
        tokens = num_tokens(ctx.frame_size)
        if keep is None:
            grad_pos = flat.reshape(-1, tokens, dim).sum(0)
        else:
            grad_pos = flat.new_zeros(tokens, dim).index_add_(0, keep.reshape(-1).long(), flat)
        grad_pos = grad_pos.to(pos_dtype)
    return None, None, grad_weight, grad_bias, None, grad_pos, None, None


_patch_embed_op.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(crops, frames, weight, bias, keep, pos, frame_size: int) -> None:
    if crops.dtype != torch.int16 or crops.dim() != 4 or crops.shape[2] != crops.shape[3]:
        raise ValueError(
            f"crops must be int16 (B, S, H, H), e.g. (B, 96, 96, 96), got {crops.dtype} "
            f"{tuple(crops.shape)}"
        )
    if frame_size % 16 or frame_size < crops.shape[2]:
        raise ValueError(
            f"frame size {frame_size} must be a multiple of 16 and hold the "
            f"{crops.shape[2]}-pixel slices"
        )
    batch, slices = crops.shape[0], crops.shape[1]
    tokens = num_tokens(frame_size)
    if frames.shape != (batch, NUM_FRAMES) or frames.dtype.is_floating_point:
        raise ValueError(
            f"frames must be integer (B, {NUM_FRAMES}) = ({batch}, {NUM_FRAMES}) slice indices, "
            f"got {frames.dtype} {tuple(frames.shape)}"
        )
    if weight.dim() != 2 or weight.shape[1] != PATCH_DIM:
        raise ValueError(f"weight must be (D, {PATCH_DIM}), got {tuple(weight.shape)}")
    dim = weight.shape[0]
    if bias.shape != (dim,):
        raise ValueError(f"bias must be ({dim},), got {tuple(bias.shape)}")
    if keep is not None and (
        keep.dim() != 2 or keep.shape[0] != batch or keep.dtype.is_floating_point
    ):
        raise ValueError(
            f"keep must be integer (B, K) with B = {batch}, got {keep.dtype} {tuple(keep.shape)}"
        )
    if pos is not None and pos.shape != (tokens, dim):
        raise ValueError(f"pos must be ({tokens}, {dim}), got {tuple(pos.shape)}")
    devices = {t.device for t in (crops, frames, weight, bias, keep, pos) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    if not crops.is_cuda and not torch.compiler.is_compiling():
        # Only eagerly off-GPU: on CUDA this check would cost a host-device sync every step.
        if batch and (int(frames.min()) < 0 or int(frames.max()) >= slices):
            raise ValueError(f"frame indices must lie in [0, {slices})")
        if keep is not None and keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= tokens):
            raise ValueError(f"keep indices must lie in [0, {tokens})")


def patch_embed_triton(
    crops: torch.Tensor,
    frames: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    keep: torch.Tensor | None = None,
    pos: torch.Tensor | None = None,
    *,
    precision: str | None = None,
    frame_size: int | None = None,
) -> torch.Tensor:
    """Triton path of `vctmae.kernels.patch_embed`; `precision` 'bf16'|'fp32' overrides the dot
    operand type; the frame size follows `pos` unless given (`reference.frame_size_of`)."""
    if not crops.is_cuda and not INTERPRET:
        raise RuntimeError(
            "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before vctmae.kernels "
            "is imported (CPU interpreter)"
        )
    size = frame_size_of(crops, pos, frame_size)
    _check_inputs(crops, frames, weight, bias, keep, pos, size)
    return _patch_embed_op(
        crops.contiguous(),
        frames.to(torch.int32).contiguous(),
        weight.contiguous(),
        bias.contiguous(),
        None if keep is None else keep.to(torch.int32).contiguous(),
        None if pos is None else pos.contiguous(),
        _dot_bf16(crops.device, precision),
        size,
    )
