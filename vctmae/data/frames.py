"""Device-side video sampling: int16 crops → 16 sagittal frames in [0, 1] (SPEC §4).

Everything here runs on whatever device the crops are on, so the loader only
ever moves int16 crops to the GPU. The three RGB channels the video model
expects are never materialised: the model folds them into its patch-embedding
weights, so `sample_frames` returns one channel.
"""

from __future__ import annotations

import torch

CROP_SIZE = 96
NUM_FRAMES = 16
STRIDE = 6  # 96 / 16: the six offsets 0..5 give six views that tile the crop
HU_MIN = -1000.0
HU_MAX = 1000.0


def sample_frames(
    crops: torch.Tensor, offsets: torch.Tensor, num_frames: int = NUM_FRAMES, stride: int = STRIDE
) -> torch.Tensor:
    """Frames `crop[o + stride*k]`, k < num_frames, HU clipped to [-1000, 1000] and mapped to [0, 1].

    crops: int16 (B, 96, 96, 96) in video order (axis 0 = sagittal slice).
    offsets: integer (B,), each in [0, stride).
    Returns float32 (B, 1, num_frames, 96, 96) on the crops' device.
    """
    if crops.dim() != 4:
        raise ValueError(f"crops must be (B, D, H, W), got shape {tuple(crops.shape)}")
    batch = crops.shape[0]
    offsets = torch.as_tensor(offsets, device=crops.device).long().reshape(-1)
    if offsets.numel() != batch:
        raise ValueError(f"{offsets.numel()} offsets for {batch} crops")
    depth = crops.shape[1]
    if (num_frames - 1) * stride >= depth:
        raise ValueError(f"{num_frames} frames × stride {stride} do not fit {depth} slices")
    rows = torch.arange(batch, device=crops.device)
    if num_frames * stride == depth:
        # Slice o + stride·k is element [k, o] of the (num_frames, stride) view: one gather per sample.
        grouped = crops.view(batch, num_frames, stride, *crops.shape[2:])  # (B, T, stride, H, W)
        frames = grouped[rows, :, offsets]  # (B, T, H, W)
    else:
        frame_index = offsets[:, None] + stride * torch.arange(
            num_frames, device=crops.device
        )  # (B, T)
        frames = crops[rows[:, None], frame_index]  # (B, T, H, W)
    frames = frames.float().clamp_(HU_MIN, HU_MAX).add_(-HU_MIN).div_(HU_MAX - HU_MIN)
    return frames.unsqueeze(1)  # (B, 1, T, H, W)


def check_crop_shape(
    shape: tuple[int, ...],
    *,
    where: str,
    image_size: int = CROP_SIZE,
    num_frames: int = NUM_FRAMES,
    stride: int = STRIDE,
) -> None:
    """Refuse crops the video model cannot sample, before training or evaluation starts.

    The sagittal depth must hold `num_frames` frames `stride` apart, and each slice must be
    `image_size` square (the model's input). Raises ShardError naming `where` (a shard).
    """
    from vctmae.data.shards import ShardError

    if len(shape) != 3:
        raise ShardError(where, f"crops of shape {shape}; expected (depth, height, width)")
    depth, height, width = shape
    if (num_frames - 1) * stride >= depth:
        raise ShardError(
            where,
            f"crops of shape {shape}: {num_frames} frames × stride {stride} do not fit {depth} "
            f"slices (at least {(num_frames - 1) * stride + 1} needed); ingest with --size {image_size}",
        )
    if (height, width) != (image_size, image_size):
        raise ShardError(
            where,
            f"crops of shape {shape}: slices are {height}×{width}, the model expects "
            f"{image_size}×{image_size}",
        )


def offset_frames(
    offsets: torch.Tensor, num_frames: int = NUM_FRAMES, stride: int = STRIDE
) -> torch.Tensor:
    """The paper's frame rule as per-sample slice indices: offsets (B,) → (B, num_frames) = o + stride·k.

    What the model takes (`model(crops, frames)`); `sample_frames(crops, offsets)` gathers the
    same slices.
    """
    offsets = torch.as_tensor(offsets).long().reshape(-1)
    return offsets[:, None] + stride * torch.arange(num_frames, device=offsets.device)


def multiview_offsets(views: int) -> list[int]:
    """Offsets of the evaluation views: 6 → all six (together every slice once); 1 → the middle one."""
    if views == STRIDE:
        return list(range(STRIDE))
    if views == 1:
        return [STRIDE // 2]
    raise ValueError(f"views must be 1 or {STRIDE}, got {views}")


def random_offsets(
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """One random training offset per sample, int64 (B,) uniform in [0, 6)."""
    return torch.randint(0, STRIDE, (batch_size,), generator=generator, device=device)


def mirror(crops: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """Left–right mirror: reverse the sagittal order (axis 1 of (B, 96, 96, 96)) of crops[i] where flags[i]."""
    flags = torch.as_tensor(flags, device=crops.device).bool().reshape(-1, 1, 1, 1)
    return torch.where(flags, crops.flip(1), crops)
