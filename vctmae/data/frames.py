"""Device-side video sampling: int16 crops → 16 sagittal frames in [0, 1].

The rules (which slices, which shifts, HU window, context cut, flips) are `vctmae.clip`'s; this
module applies them to batches. Everything here runs on whatever device the crops are on, so the
loader only ever moves int16 crops to the GPU. The three RGB channels the video model expects
are never materialised: the model folds them into its patch-embedding weights, so
`sample_frames` returns one channel.

`FrameSampler` is what the trainers and evaluation use: it draws a micro-batch's frame
randomness from the seeded CPU generator (`draw`) and turns it, with the batch's per-sample
mask boxes, into the model's input (`model_input` for training, `view_input` for one
evaluation view) — `--frames crop|mask` and `--flip rows|frames|none`. For a 3-D model
(`volume=True`) it passes the whole crops, flipped along the chosen axis, and no frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from vctmae import clip
from vctmae.clip import FLIPS, NUM_FRAMES, STRIDE

if TYPE_CHECKING:
    from vctmae.data.shards import ShardIndex
    from vctmae.model.config import ModelConfig


def sample_frames(crops: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The paper's frames `crop[o + 6k]`, k < 16, as the model's input: float32 (B, 1, 16, H, W).

    crops: int16 (B, 96, H, W) in video order (axis 0 = sagittal slice); offsets: integer (B,),
    each in [0, 6).
    """
    return clip.clip_frames(crops, clip.frame_index_tensor("crop", offsets, device=crops.device))


def check_crop_shape(index: ShardIndex, model: ModelConfig) -> None:
    """Refuse crops the model cannot read, before training or evaluation starts.

    `index`: a shard's (its crops' shape; every shard of a run is ingested alike). Video model:
    the sagittal depth must hold NUM_FRAMES frames STRIDE apart, and each slice must be square
    and fit the model's `img` frames (smaller slices are padded to it with −1000 HU,
    `--frame-size`). 3-D model: the crop must be the cube img³ it reads whole. Raises ShardError
    naming the shard.
    """
    from vctmae.data.shards import ShardError

    shape, where, image_size = index.shape, index.path, model.img
    if len(shape) != 3:
        raise ShardError(where, f"crops of shape {shape}; expected (depth, height, width)")
    if model.volume:
        if tuple(shape) != (image_size,) * 3:
            raise ShardError(
                where,
                f"crops of shape {shape}: the 3-D model reads the whole crop and expects "
                f"{(image_size,) * 3}; ingest with --size {image_size}",
            )
        return
    depth, height, width = shape
    needed = (NUM_FRAMES - 1) * STRIDE + 1
    if depth < needed:
        raise ShardError(
            where,
            f"crops of shape {shape}: {NUM_FRAMES} frames × stride {STRIDE} do not fit {depth} "
            f"slices (at least {needed} needed); ingest with --size {image_size}",
        )
    if height != width or height > image_size:
        raise ShardError(
            where,
            f"crops of shape {shape}: slices are {height}×{width}, the model expects "
            f"{image_size}×{image_size} (or square slices it pads to that size)",
        )


def offset_frames(offsets: torch.Tensor) -> torch.Tensor:
    """The paper's frame rule as per-sample slice indices: offsets (B,) → (B, 16) = o + 6k.

    What the model takes (`model(crops, frames)`); `sample_frames(crops, offsets)` gathers the
    same slices.
    """
    return clip.frame_index_tensor("crop", offsets)


def random_offsets(
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """One random training offset per sample, int64 (B,) uniform in [0, 6)."""
    return clip.draw_train_shifts("crop", batch_size=batch_size, generator=generator, device=device)


def mirror(crops: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """Left–right mirror: reverse the sagittal order (axis 1 of (B, 96, 96, 96)) of crops[i] where flags[i].

    The trainers mirror a video model's input through the frame indices instead
    (`clip.frame_index_tensor(mirror=…)`, no copy of the crops); this copy is the plain statement
    of what that computes, and the 3-D model's `--flip frames` (`FrameSampler`).
    """
    flags = torch.as_tensor(flags, device=crops.device).bool().reshape(-1, 1, 1, 1)
    return torch.where(flags, crops.flip(1), crops)


# ----------------------------------------------------------------------------- trainers' sampler


def _needed_boxes(boxes: torch.Tensor | None, mode: str) -> torch.Tensor | None:
    """The mask boxes (B, 6) mask mode needs; None in crop mode (which never reads them)."""
    if mode == "crop":
        return None
    if boxes is None:
        raise ValueError("--frames mask needs each sample's mask box (Batch.boxes); none came")
    return boxes


@dataclass(frozen=True, kw_only=True)
class FrameSampler:
    """How a batch of crops becomes the model's input: the frame rule (`mode`, `clip.FRAME_MODES`)
    and the flip augmentation (`flip`, `clip.FLIPS`, p = 0.5 per sample). `volume`: a 3-D model
    (`ModelConfig.volume`), which reads the whole crop: no views to draw, the flip reverses the
    crop's rows or its sagittal order, the frames are an empty (B, 0) index; mode "crop" only.

    The model takes (crops, frames): int16 (B, S, H, W) and slice indices (B, 16). Crop mode
    without a row flip passes the stored crops and the o + 6k indices (mirroring through the
    indices). When an in-plane step is needed — mask mode's context cut, the row flip — the 16
    int16 frames are gathered first, cut and flipped on the device (16 of 96 slices: cheap), and
    passed as (B, 16, H, W) with indices 0..15 (`_input`). `boxes`: `Batch.boxes` (B, 6).
    """

    mode: str = "crop"
    flip: str = "none"
    volume: bool = False

    def __post_init__(self) -> None:
        clip.check_mode(self.mode)
        if self.flip not in FLIPS:
            raise ValueError(f"flip must be one of {', '.join(FLIPS)}, got {self.flip!r}")
        if self.volume and self.mode != "crop":
            raise ValueError(
                f"a 3-D model reads the whole crop; frame rule {self.mode!r} is unused"
            )

    def draw(self, size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """A micro-batch's frame randomness from the seeded CPU generator, in a fixed order.

        Crop mode: "offsets" = torch.randint(0, 6) first, then "flip" = rand < 0.5; the order is
        fixed so that a seed gives the same draws in every run. Mask mode: "uniform" in [0, 1) instead of the
        offsets, turned into each sample's shift on the device (`clip.shifts_from_uniform`).
        A 3-D model: the flip flag only (nothing when `flip` is "none").
        """
        if self.volume:
            draws = {}
        elif self.mode == "crop":
            draws = {"offsets": random_offsets(size, generator=generator)}
        else:
            draws = {"uniform": torch.rand(size, generator=generator, dtype=torch.float64)}
        if self.flip != "none":
            draws["flip"] = torch.rand(size, generator=generator) < 0.5
        return draws

    def model_input(
        self, crops: torch.Tensor, boxes: torch.Tensor | None, draws: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(crops, frames) for the model from a training batch and its `draw`s."""
        if self.volume:
            return self._volume_input(crops, draws.get("flip"))
        boxes = _needed_boxes(boxes, self.mode)
        if self.mode == "crop":
            shifts = draws["offsets"]
        else:
            extents = clip.extents_from_boxes(boxes.to(crops.device))
            shifts = clip.shifts_from_uniform("mask", draws["uniform"].to(crops.device), extents)
        return self._input(crops, shifts, boxes, draws.get("flip"))

    def view_input(
        self, crops: torch.Tensor, boxes: torch.Tensor | None, shifts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(crops, frames) of one evaluation view: per-sample `shifts` (B,), no flip."""
        if self.volume:
            return self._volume_input(crops, None)
        return self._input(crops, shifts, _needed_boxes(boxes, self.mode), None)

    def view_table(
        self, crops: torch.Tensor, boxes: torch.Tensor | None, views: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every sample's evaluation shifts (B, V) and which of them are real views (B, V).

        views 6 (`--multiview 6`, the full ensemble): crop mode the six offsets; mask mode each
        sample's own sd shifts (`clip.view_shift_table`, 3–6 of them). views 1: crop mode
        offset 3 (the middle one); mask mode shift 0, the unshifted frames the paper's text
        evaluates (the reference's no-ensemble evaluation draws a random training shift).
        A 3-D model sees the whole crop: one view whatever `views` asks (no test-time flips).
        """
        batch, device = crops.shape[0], crops.device
        if views == 1 or self.volume:
            single = clip.middle_shift(self.mode)
            shifts = torch.full((batch, 1), single, dtype=torch.long, device=device)
            return shifts, torch.ones_like(shifts, dtype=torch.bool)
        if views not in clip.VIEW_COUNTS:
            raise ValueError(f"views must be 1 or {STRIDE}, got {views}")
        boxes = _needed_boxes(boxes, self.mode)
        extents = None if boxes is None else clip.extents_from_boxes(boxes.to(device))
        return clip.view_shift_table(self.mode, extents, batch_size=batch, device=device)

    def _volume_input(
        self, crops: torch.Tensor, flip: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The 3-D model's input: the whole crops, flipped where `flip` says, and no frames."""
        if flip is not None:
            flip = flip.to(crops.device)
            # A crop batch (B, S, H, W) has its rows on dim 2, as a batch of frames: flip_rows
            # reverses superior ↔ inferior; mirror the sagittal order (dim 1).
            crops = clip.flip_rows(crops, flip) if self.flip == "rows" else mirror(crops, flip)
        return crops, torch.zeros((crops.shape[0], 0), dtype=torch.long, device=crops.device)

    def _input(
        self,
        crops: torch.Tensor,
        shifts: torch.Tensor,
        boxes: torch.Tensor | None,
        flip: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        device = crops.device
        shifts = shifts.to(device)
        boxes = None if boxes is None else boxes.to(device)
        extents = None if boxes is None else clip.extents_from_boxes(boxes)
        flip = None if flip is None else flip.to(device)
        mirror_flags = flip if self.flip == "frames" else None
        frames = clip.frame_index_tensor(self.mode, shifts, extents, mirror=mirror_flags)
        row_flip = flip is not None and self.flip == "rows"
        if self.mode == "crop" and not row_flip:
            return crops, frames
        # The in-plane steps, on the device: gather the 16 int16 frames, then (mask mode) the
        # context cut, then (rows) the flip — the reference's order (cut, pad back, flip).
        clips = clip.gather_slices(crops, frames)  # (B, 16, H, W) int16
        if self.mode == "mask":
            clips = clip.context_cut(clips, boxes)
        if row_flip:
            clips = clip.flip_rows(clips, flip)
        local = torch.arange(clips.shape[1], device=device).expand(clips.shape[0], -1)  # (B, 16)
        return clips, local
