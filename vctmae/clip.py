"""The clip rules, defined once: how an int16 vertebra crop becomes the 16 frames the model sees.

A leaf module (torch and the standard library only, nothing from vctmae; torch only inside the
functions) so that ingest, the command line, `data`, `model` and `kernels` can all import it.
Crop layout: axis 0 = sagittal slice, left → right (the frame axis); axis 1 =
superior → inferior (frame rows); axis 2 = anterior → posterior (frame columns).

Two frame rules (`--frames`):

- ``"crop"`` (the paper's text, §3 "Slice Sampling"): 16 equidistant sagittal
  slices with stride 6 = 96 / 16, frames ``crop[o + 6k]``, k = 0..15. Training
  draws the offset o from 0..5; evaluation averages the six views o = 0..5,
  which together cover every slice once.
- ``"mask"`` (the paper's public code, lbuess/Video-CT_MAE): the 16 frames spread
  over the vertebra's own sagittal extent [lo, hi] (its mask's bounding box),
  and an in-plane context cut (`context_cut`). References below are
  ``file:line`` in that repository (commit d27e0b2); `docs/reference-code-notes.md`
  has the full reading.

Every index this module returns lies inside the crop, [0, 95], and in mask mode
inside the extent [lo, hi]: the reference crops the volume to the extent before
it samples, so a slice outside the extent is one it can never show.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that need it: ingest (which never imports torch) and
# the command line's option modules read this module's constants without paying for torch.

# ----------------------------------------------------------------------------- constants

CROP_SIZE = 96
NUM_FRAMES = 16
# 96 / 16: the six offsets 0..5 give six views that tile the crop (paper §3).
STRIDE = 6
# HU window (paper App. A.5): clip to [−1000, 1000], map linearly to [0, 1]. The
# reference: ScaleIntensityRangeD(a_min=-1000, a_max=1000, b_min=0, b_max=1,
# clip=True), src/finetuning/utils/transforms.py:100-107, config/finetuning/data/default.yaml:14-17.
HU_MIN = -1000.0
HU_MAX = 1000.0
# What padding holds, in HU. The reference pads with 0 after scaling
# (ResizeWithPadOrCropD mode="constant", transforms.py:195-199), i.e. −1000 HU.
PAD_HU = -1000
# The pad value after HU scaling: 0.0 (PAD_HU lies inside the window).
PAD_SCALED = (PAD_HU - HU_MIN) / (HU_MAX - HU_MIN)
# Rows kept on each side of the mask's box by the context cut: CropForegroundD
# margin=(0, 16, 100), transforms.py:189-194 and src/pretraining/data.py:80-85.
CONTEXT_MARGIN = 16

FRAME_MODES: tuple[str, ...] = ("crop", "mask")
# The flip augmentations (`--flip`): "rows" reverses every frame's rows, superior <-> inferior
# (the reference's pretraining flip, src/pretraining/data.py:97); "frames" mirrors the sagittal
# order left <-> right; "none" neither.
FLIPS: tuple[str, ...] = ("rows", "frames", "none")
# The whole crop as an inclusive sagittal extent: what mask mode falls back to
# when a sample has no mask voxels (the reference's own mask-less path,
# CenterSpatialCropD then the same linspace rule, transforms.py:201-203).
FULL_EXTENT: tuple[int, int] = (0, CROP_SIZE - 1)

# WebDataset shard members of one sample: KEY.crop.npy, KEY.json, KEY.cls.
CROP_MEMBER = "crop.npy"
META_MEMBER = "json"
CLASS_MEMBER = "cls"
# Arrays of ingest's Zarr store (`crops.zarr`), index-aligned with its attr `keys`.
ZARR_STORE = "crops.zarr"
ZARR_CROPS = "crops"
ZARR_CLASSES = "classes"
ZARR_GRADES = "grades"


# How a classifier's views of one crop make its prediction: "probs" averages the views' softmax
# probabilities, "logits" their logits before one softmax (the reference code's way).
COMBINE_MODES: tuple[str, ...] = ("probs", "logits")
# Views per crop at evaluation: the middle view alone, or the full ensemble (crop mode's six
# offsets, which together cover every slice; mask mode each sample's own shifts).
VIEW_COUNTS: tuple[int, ...] = (1, STRIDE)
# The levels the reference code finetunes on: VerSe 8-25, T1-T12 and L1-L6. A list, because the
# range T1-L6 would also take T13, which lies between T12 and L1.
REFERENCE_LEVELS = "T1-T12,L1-L6"


@dataclass(frozen=True, kw_only=True)
class ClipRule:
    """How a classifier turns a vertebra crop into its decision, beyond the model's own config.

    Finetuning records the rule it validated with in the classifier's description
    (`vctmae.model.checkpoint`), so that eval, explain and predict apply the same one by
    default. The frame size and the input normalisation belong to the model's config, which
    travels beside the weights too.

    frames: `FRAME_MODES`, which slices make the 16 frames.
    multiview: `VIEW_COUNTS`, views per crop whose predictions are combined.
    combine: `COMBINE_MODES`, how the views' predictions combine.
    levels: the vertebra levels the model was trained on ("all", or a list/ranges).
    """

    frames: str = "crop"
    multiview: int = STRIDE
    combine: str = "probs"
    levels: str = REFERENCE_LEVELS

    # The fields a probability depends on (a decision threshold holds only for these).
    PROBABILITY_FIELDS = ("frames", "multiview", "combine")

    def __post_init__(self) -> None:
        for name, kind in (("frames", str), ("combine", str), ("levels", str)):
            if type(getattr(self, name)) is not kind:
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        if type(self.multiview) is not int:
            raise ValueError(f"multiview must be an integer, got {self.multiview!r}")
        check_mode(self.frames)
        if self.multiview not in VIEW_COUNTS:
            raise ValueError(f"multiview must be 1 or {STRIDE}, got {self.multiview}")
        if self.combine not in COMBINE_MODES:
            raise ValueError(
                f"combine must be one of {', '.join(COMBINE_MODES)}, got {self.combine!r}"
            )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> ClipRule:
        """The rule stored by `to_json`; ValueError for a missing, unknown or ill-typed field."""
        if not isinstance(data, dict):
            raise ValueError(f"a clip rule must be a JSON object, got {data!r}")
        expected = set(asdict(cls()))
        if set(data) != expected:
            raise ValueError(
                f"a clip rule has the fields {', '.join(sorted(expected))}, got "
                f"{', '.join(sorted(data)) or 'none'}"
            )
        return cls(**data)

    def describe(self) -> str:
        views = "1 view" if self.multiview == 1 else f"{self.multiview} views"
        return f"--frames {self.frames}, {views} (--combine {self.combine}), levels {self.levels}"

    def same_probabilities(self, other: ClipRule) -> bool:
        """Whether both rules give every crop the same probability (levels aside)."""
        return all(getattr(self, f) == getattr(other, f) for f in self.PROBABILITY_FIELDS)


def resolve_rule(
    recorded: ClipRule | None,
    *,
    who: str,
    frames: str | None = None,
    multiview: int | None = None,
    combine: str | None = None,
    levels: str | None = None,
) -> tuple[ClipRule, list[str]]:
    """The rule a command applies to `who`'s model (a checkpoint), and the lines to say about it.

    Each option left None takes the recorded rule's value; one given explicitly is used even
    where it differs from the recorded rule, and the difference is said in one line. A model
    without a recorded rule gets the default rule, said in one line.
    """
    base = recorded if recorded is not None else ClipRule()
    asked = {"frames": frames, "multiview": multiview, "combine": combine, "levels": levels}
    chosen = {name: value for name, value in asked.items() if value is not None}
    rule = ClipRule(**{**base.to_json(), **chosen})
    lines = []
    if recorded is None:
        lines.append(
            f"{who} records no clip rule (it was not written by vctmae finetune); using "
            f"{ClipRule().describe()} unless flags say otherwise"
        )
    else:
        for name, value in chosen.items():
            if value != getattr(recorded, name):
                flag = "--" + name
                lines.append(
                    f"{flag} {value}: the model in {who} was trained and validated with "
                    f"{flag} {getattr(recorded, name)}; using {value} as asked"
                )
    return rule, lines


def middle_shift(mode: str) -> int:
    """The shift of the single middle view (`--multiview 1`): crop mode offset 3, mask mode 0
    (the unshifted frames over the vertebra's extent)."""
    check_mode(mode)
    return STRIDE // 2 if mode == "crop" else 0


def check_mode(mode: str) -> str:
    """`mode` if it is one of FRAME_MODES, else ValueError naming the choices."""
    if mode not in FRAME_MODES:
        raise ValueError(f"frame mode must be one of {', '.join(FRAME_MODES)}, got {mode!r}")
    return mode


# ----------------------------------------------------------------------------- HU scaling


def scale_hu(hu: torch.Tensor) -> torch.Tensor:
    """HU (any dtype) → a new float32 tensor in [0, 1]: clip to [HU_MIN, HU_MAX], map linearly.

    Computed in place on the fresh float copy (a gathered clip is large; no temporaries).
    """
    scaled = hu.float()
    if scaled is hu:
        scaled = scaled.clone()
    return scaled.clamp_(HU_MIN, HU_MAX).sub_(HU_MIN).div_(HU_MAX - HU_MIN)


# ----------------------------------------------------------------------------- frame geometry


def gather_slices(crops: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """Slices crops[b, frames[b, k]] → (B, K, H, W), the crops' dtype (int16 stays int16).

    crops: (B, S, H, W); frames: integer (B, K) sagittal slice indices. Advanced indexing copies
    whole slices (a gather with an expanded index is several times slower on CPU).
    """
    import torch

    if crops.dim() != 4:
        raise ValueError(f"crops must be (B, S, H, W), got shape {tuple(crops.shape)}")
    if frames.dim() != 2 or frames.shape[0] != crops.shape[0]:
        raise ValueError(
            f"frames must be (B, K) slice indices with B = {crops.shape[0]}, "
            f"got shape {tuple(frames.shape)}"
        )
    rows = torch.arange(crops.shape[0], device=crops.device)[:, None]
    return crops[rows, frames.to(crops.device, torch.long)]


def pad_frames(frames: torch.Tensor, frame_size: int, value: float) -> torch.Tensor:
    """Pad the last two axes (H, W) of `frames` to frame_size × frame_size, centred, with `value`.

    The paper's Table 2 row 5 ("original 16 × 224 × 224 video format by adding padding to the
    96 × 96 slices"): the value is PAD_HU in HU, 0 after scaling. A no-op when they fit already.
    """
    import torch.nn.functional as F

    height, width = frames.shape[-2:]
    if (height, width) == (frame_size, frame_size):
        return frames
    if frame_size < max(height, width):
        raise ValueError(
            f"frame size {frame_size} is smaller than the {max(height, width)}-pixel slices"
        )
    # Centred, the odd pixel after (as MONAI's symmetric SpatialPad): 64 for 96 in 224.
    top, left = (frame_size - height) // 2, (frame_size - width) // 2
    bottom, right = frame_size - height - top, frame_size - width - left
    return F.pad(frames, (left, right, top, bottom), value=value)


def clip_frames(
    crops: torch.Tensor, frames: torch.Tensor, frame_size: int | None = None
) -> torch.Tensor:
    """The model's input frames: crops[b, frames[b, k]], HU-scaled, padded → float (B, 1, K, F, F).

    crops: int16 HU (B, S, H, H); frames: integer (B, K) sagittal slice indices (from
    `frame_index_tensor`); F = `frame_size` (default H: no padding). Values lie in [0, 1], the
    padding at PAD_SCALED. The one gather + HU window + pad that the model, the kernels'
    torch reference and the data helpers share.
    """
    scaled = scale_hu(gather_slices(crops, frames))  # (B, K, H, H)
    if frame_size is not None:
        scaled = pad_frames(scaled, frame_size, PAD_SCALED)  # (B, K, F, F)
    return scaled.unsqueeze(1)  # (B, 1, K, F, F)


def volume_voxels(crops: torch.Tensor) -> torch.Tensor:
    """The whole crops as a 3-D model's input: int16 (B, S, H, W) → float (B, 1, S, H, W) in
    [0, 1], by the same HU window as the frames."""
    if crops.dim() != 4:
        raise ValueError(f"crops must be (B, S, H, W), got shape {tuple(crops.shape)}")
    return scale_hu(crops).unsqueeze(1)  # (B, 1, S, H, W)


def flip_rows(frames: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """The reference's pretraining flip: reverse the rows (superior ↔ inferior) of every frame of
    the samples whose flag is set. frames: (B, K, H, W), rows on dim 2; flags: bool (B,).

    RandFlipD(spatial_axis=1, prob=0.5) on the (C, T, H, W) video, src/pretraining/data.py:97.
    """
    import torch

    flags = torch.as_tensor(flags, device=frames.device).bool().reshape(-1, 1, 1, 1)
    return torch.where(flags, frames.flip(2), frames)


# ----------------------------------------------------------------------------- extents


def check_extent(extent: Sequence[int], size: int = CROP_SIZE) -> tuple[int, int]:
    """`extent` as a pair of ints if 0 <= lo <= hi < size, else ValueError."""
    lo, hi = (int(v) for v in extent)
    if not 0 <= lo <= hi < size:
        raise ValueError(f"extent must satisfy 0 <= lo <= hi < {size}, got ({lo}, {hi})")
    return lo, hi


def extents_from_boxes(boxes: torch.Tensor | Sequence, size: int = CROP_SIZE) -> torch.Tensor:
    """Inclusive sagittal extents (B, 2) from JSON `bbox` rows (B, 6), on the boxes' device.

    A `bbox` is half-open `(x0, x1, y0, y1, z0, z1)` in crop indices (ingest's geometry), so
    the extent is (x0, x1 − 1). An empty box (no mask voxels in the crop; ingest writes all
    zeros) gives the whole crop, FULL_EXTENT. No host–device sync.
    """
    import torch

    boxes = torch.as_tensor(boxes).long().reshape(-1, 6)
    x0, x1 = boxes[:, 0], boxes[:, 1]
    empty = x1 <= x0
    lo = torch.where(empty, torch.zeros_like(x0), x0)
    hi = torch.where(empty, torch.full_like(x1, size - 1), x1 - 1)
    return torch.stack([lo, hi], dim=1)  # (B, 2)


def extent_from_bbox(bbox: Sequence[int], size: int = CROP_SIZE) -> tuple[int, int]:
    """Inclusive sagittal extent (lo, hi) of one sample's mask from its JSON `bbox`
    (`extents_from_boxes`), checked to lie inside the crop."""
    if len(bbox) != 6:
        raise ValueError(f"bbox must be (x0, x1, y0, y1, z0, z1), got {list(bbox)}")
    if int(bbox[1]) < int(bbox[0]):
        raise ValueError(f"bbox x1 < x0: {list(bbox)}")
    lo, hi = extents_from_boxes([bbox], size)[0].tolist()
    return check_extent((lo, hi), size)


def _batch_and_device(
    name: str, extents, batch_size: int | None, device
) -> tuple[int, torch.device | str]:
    """The batch size and device of a call given `extents` or `batch_size` (and maybe `device`)."""
    import torch

    if extents is None and batch_size is None:
        raise ValueError(f"{name} needs extents or batch_size")
    if device is None:
        device = extents.device if isinstance(extents, torch.Tensor) else "cpu"
    if batch_size is None:
        batch_size = torch.as_tensor(extents).reshape(-1, 2).shape[0]
    return batch_size, device


def _as_extents(
    extents: torch.Tensor | Sequence | None, batch: int, device: torch.device | str
) -> torch.Tensor:
    """Per-sample extents as int64 (B, 2); None = the whole crop for every sample."""
    import torch

    if extents is None:
        return torch.tensor(FULL_EXTENT, device=device).expand(batch, 2)
    extents = torch.as_tensor(extents, device=device).long().reshape(-1, 2)
    if extents.shape[0] != batch:
        raise ValueError(f"{extents.shape[0]} extents for {batch} samples")
    return extents


# ----------------------------------------------------------------------------- mask-mode rule
#
# The reference (src/video_ct_transform.py:37-49, training; :108-129, evaluation)
# samples over the crop cut to the mask's sagittal extent, of width w:
#     indices = round(linspace(0, w − 1, 18))[1:−1]                          (:40, :43)
#     sd      = indices[1] − indices[0]                                      (:47, :116)
#     training:   indices + numpy randint(−sd // 2, sd // 2)   (high excluded) (:48)
#     evaluation: one view per shift in range(−sd // 2, sd // 2)             (:127)
# −sd // 2 is Python's (−sd) // 2, floor division: sd = 5 gives shifts −3..1.
#
# round(): numpy rounds half to even, but point k of linspace(0, w − 1, 18) is
# k(w − 1)/17, which is never an odd multiple of ½ (2k(w − 1) is even, 17·odd is
# odd), so it equals floor(k(w − 1)/17 + ½) = (2k(w − 1) + 17) // 34, computed
# here in exact integers on any device.
#
# Where the reference breaks (only for vertebrae narrower than 14 slices, far
# below any real one): sd = 0 for w ≤ 5 and w = 10..13, where numpy's randint and
# np.stack of no views raise; shift −1 reaches index −1 for w = 6..9, which
# wraps to the extent's last slice. vctmae uses shift 0 when sd = 0 and clamps
# every index into [lo, hi].


def _mask_position(k, width):
    """Point k (1..NUM_FRAMES) of round(linspace(0, w − 1, NUM_FRAMES + 2)), in exact integers.

    `k` and `width` may be Python ints or int64 tensors (broadcast); `//` floors on both.
    """
    divisions = NUM_FRAMES + 1
    return (2 * k * (width - 1) + divisions) // (2 * divisions)


def _mask_shift_range(width):
    """(first shift, number of shifts) of one extent width, ints or int64 tensors alike.

    The reference's range(−sd // 2, sd // 2) with sd the spacing of the first two frames; sd = 0
    (where the reference raises) gives shift 0 alone.
    """
    spacing = _mask_position(2, width) - _mask_position(1, width)  # sd
    low, high = (-spacing) // 2, spacing // 2
    sound = spacing > 0
    if isinstance(sound, bool):
        return (low, high - low) if sound else (0, 1)
    import torch

    count = torch.where(sound, high - low, torch.ones_like(spacing))
    return torch.where(sound, low, torch.zeros_like(low)), count


def _shift_range(mode: str, extents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, the first shift and the number of shifts: int64 (B,), (B,)."""
    import torch

    if mode == "crop":
        zeros = torch.zeros(extents.shape[0], dtype=torch.long, device=extents.device)
        return zeros, torch.full_like(zeros, STRIDE)
    return _mask_shift_range(extents[:, 1] - extents[:, 0] + 1)


# Most evaluation views any sample can have, in either mode (6: crop mode's six
# offsets; in mask mode sd ≤ 6 for every extent within 96 slices).
MAX_VIEWS = max(STRIDE, *(_mask_shift_range(width)[1] for width in range(1, CROP_SIZE + 1)))


# ----------------------------------------------------------------------------- batched forms


def frame_index_tensor(
    mode: str,
    shifts: torch.Tensor | Sequence[int],
    extents: torch.Tensor | Sequence | None = None,
    *,
    mirror: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Per-sample frame indices, int64 (B, NUM_FRAMES), in crop coordinates on `device`.

    mode: one of FRAME_MODES, for the whole batch.
    shifts: int (B,): crop mode, the offset o in 0..5; mask mode, the shift added
        to the unshifted frames (one of `view_shifts`, 0 = none).
    extents: int (B, 2), the inclusive sagittal extent [lo, hi] of each sample's
        mask (`extents_from_boxes`); ignored in crop mode; None = the whole crop.
    mirror: bool (B,) or None: the samples to mirror left–right (`--flip frames`). A mirrored
        sample's view is the one its reversed crop would give — frames counted from the other
        side, extent mirrored too — expressed as indices into the crop as stored, so mirroring
        costs no copy: crop[95 − i] of the stored crop is slice i of the reversed one.
    device: where the result lives; default the shifts' device.
    No host–device sync. Indices are clamped into [lo, hi] (crop mode: [0, 95]),
    so an out-of-range shift can never make a gather read outside the crop.
    """
    import torch

    check_mode(mode)
    if device is None:
        device = shifts.device if isinstance(shifts, torch.Tensor) else "cpu"
    shifts = torch.as_tensor(shifts, device=device).long().reshape(-1)
    batch = shifts.shape[0]
    flags = None if mirror is None else torch.as_tensor(mirror, device=device).bool().reshape(-1)
    if mode == "crop":
        frames = torch.arange(NUM_FRAMES, device=device) * STRIDE  # (T,)
        index = (shifts[:, None] + frames).clamp(0, CROP_SIZE - 1)  # (B, T)
    else:
        extents = _as_extents(extents, batch, device)
        if flags is not None:
            # The mirrored crop's extent: slice i ↔ 95 − i.
            mirrored = CROP_SIZE - 1 - extents.flip(1)
            extents = torch.where(flags[:, None], mirrored, extents)
        lo, hi = extents[:, :1], extents[:, 1:]  # (B, 1) each
        k = torch.arange(1, NUM_FRAMES + 1, device=device)  # (T,)
        index = lo + _mask_position(k, hi - lo + 1) + shifts[:, None]  # (B, T)
        index = torch.minimum(torch.maximum(index, lo), hi)
    if flags is not None:
        index = torch.where(flags[:, None], CROP_SIZE - 1 - index, index)
    return index


def shifts_from_uniform(
    mode: str, uniform: torch.Tensor, extents: torch.Tensor | Sequence | None = None
) -> torch.Tensor:
    """Training shifts int64 (B,) from uniform draws in [0, 1) (B,): each sample's
    `view_shifts` entry number ⌊u · count⌋, so the shift is uniform over that list.

    Lets a trainer draw its randomness on the host before it knows the batch (`uniform` from the
    seeded generator) and turn it into shifts on the device, where the extents are, without a
    sync. float64 keeps u · count < count; the clamp is belt and braces.
    """
    import torch

    check_mode(mode)
    uniform = torch.as_tensor(uniform)
    extents = _as_extents(extents, uniform.shape[0], uniform.device)
    low, count = _shift_range(mode, extents)
    pick = torch.minimum((uniform.double() * count).long(), count - 1)
    return low + pick


def draw_train_shifts(
    mode: str,
    extents: torch.Tensor | Sequence | None = None,
    *,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """One random training shift per sample, int64 (B,), uniform over `view_shifts`.

    Crop mode draws `torch.randint(0, 6, (B,))` exactly as `vctmae.data.random_offsets`
    does (same generator, same numbers); it needs `batch_size` when `extents` is
    None. Mask mode draws `torch.rand(B, dtype=float64)` and maps it with
    `shifts_from_uniform` (the reference's numpy randint, high excluded,
    src/video_ct_transform.py:48, has the same distribution).
    `generator`, when given, must live on `device` (as for torch.randint).
    """
    import torch

    check_mode(mode)
    batch_size, device = _batch_and_device("draw_train_shifts", extents, batch_size, device)
    if mode == "crop":
        return torch.randint(0, STRIDE, (batch_size,), generator=generator, device=device)
    uniform = torch.rand(batch_size, generator=generator, device=device, dtype=torch.float64)
    return shifts_from_uniform(mode, uniform, _as_extents(extents, batch_size, device))


def view_shift_table(
    mode: str,
    extents: torch.Tensor | Sequence | None = None,
    *,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample's evaluation shifts as a dense table: (shifts, valid), each (B, MAX_VIEWS).

    shifts: int64; row b's first `valid[b].sum()` entries are `view_shifts(mode,
    extents[b])` in order, the rest repeat its first shift (still a legal view).
    valid: bool; average a sample's predictions over its valid views only.
    The fixed width MAX_VIEWS keeps shapes static and needs no host sync.
    """
    import torch

    check_mode(mode)
    batch_size, device = _batch_and_device("view_shift_table", extents, batch_size, device)
    extents = _as_extents(extents, batch_size, device)
    low, count = _shift_range(mode, extents)
    view = torch.arange(MAX_VIEWS, device=device)  # (V,)
    valid = view[None, :] < count[:, None]  # (B, V)
    shifts = low[:, None] + torch.where(valid, view[None, :], torch.zeros_like(view))
    return shifts, valid


# ----------------------------------------------------------------------------- list forms


def view_shifts(mode: str, extent: Sequence[int] = FULL_EXTENT) -> list[int]:
    """The shifts of one sample's views: training draws one of them uniformly, evaluation's
    ensemble takes each.

    Crop mode: 0..5, the six views that cover every slice once (paper §3). Mask mode: the
    reference's range(−sd//2, sd//2) (training src/video_ct_transform.py:48, ensemble :127);
    sd views, 3 to 6 for real vertebrae.
    """
    check_mode(mode)
    if mode == "crop":
        return list(range(STRIDE))
    lo, hi = check_extent(extent)
    low, count = _mask_shift_range(hi - lo + 1)
    return list(range(low, low + count))


def frame_indices(mode: str, shift: int = 0, extent: Sequence[int] = FULL_EXTENT) -> list[int]:
    """The 16 slice indices (crop coordinates) of one view.

    Crop mode: `shift + 6k`, k = 0..15, with shift (the offset o) in 0..5; `extent`
    is ignored. Mask mode: `lo + round(linspace(0, w − 1, 18))[1:−1] + shift` over
    the inclusive extent [lo, hi] of width w = hi − lo + 1, clamped into [lo, hi];
    shift 0 is the unshifted frames (what the paper's text evaluates).
    """
    import torch

    check_mode(mode)
    if mode == "crop" and not 0 <= int(shift) < STRIDE:
        raise ValueError(f"crop-mode offset must lie in 0..{STRIDE - 1}, got {shift}")
    extents = torch.tensor([check_extent(extent)])
    return frame_index_tensor(mode, torch.tensor([int(shift)]), extents)[0].tolist()


# ----------------------------------------------------------------------------- context cut


def context_cut(
    crops: torch.Tensor,
    boxes: torch.Tensor | Sequence,
    *,
    margin: int = CONTEXT_MARGIN,
    recentre: bool = True,
    pad_hu: int = PAD_HU,
) -> torch.Tensor:
    """Mask mode's in-plane context cut: keep the mask's rows ±`margin`, pad the rest with −1000 HU.

    crops: HU (B, N, H, W), rows on dim 2 — whole crops (B, 96, 96, 96) or their
        sampled frames (B, 16, 96, 96); the cut commutes with frame selection.
    boxes: int (B, 6), each sample's JSON `bbox` (half-open x0, x1, y0, y1, z0, z1).
    Returns a new tensor of the same shape and dtype.

    The reference (transforms.py:189-199; pretraining data.py:80-90) cuts the
    volume to the mask's box with margin (0, 16, 100) — sagittal: the extent
    itself (here the frame indices' job); superior–inferior: ±16 rows, clamped;
    anterior–posterior: margin 100 > 96, the whole axis — and pads back to 96
    with ResizeWithPadOrCropD, which pads symmetrically: the kept s rows land at
    rows [(H − s) // 2, (H − s) // 2 + s), centred, the odd row at the end.
    `recentre=False` keeps them at their own rows instead (not the reference).
    """
    import torch

    if crops.dim() != 4:
        raise ValueError(f"crops must be (B, N, H, W), got shape {tuple(crops.shape)}")
    batch, _, height, _ = crops.shape
    boxes = torch.as_tensor(boxes).long().reshape(-1, 6).to(crops.device)
    if boxes.shape[0] != batch:
        raise ValueError(f"{boxes.shape[0]} boxes for {batch} samples")
    # The rows kept, half-open [start, stop): the mask's rows [y0, y1) widened by `margin` on each
    # side and clamped to the crop (CropForegroundD's allow_smaller=True, transforms.py:192). An
    # empty box keeps every row.
    y0, y1 = boxes[:, 2], boxes[:, 3]
    empty = y1 <= y0
    start = torch.where(empty, torch.zeros_like(y0), (y0 - margin).clamp(min=0))
    stop = torch.where(empty, torch.full_like(y1, height), (y1 + margin).clamp(max=height))
    rows = torch.arange(height, device=crops.device)  # (H,)
    kept = stop - start  # (B,)
    first = (height - kept) // 2 if recentre else start  # (B,) output row of the first kept row
    source = start[:, None] + rows[None, :] - first[:, None]  # (B, H) input row of each output row
    inside = (rows[None, :] >= first[:, None]) & (rows[None, :] < (first + kept)[:, None])
    source = source.clamp(0, height - 1)
    sample = torch.arange(batch, device=crops.device)[:, None]  # (B, 1)
    moved = crops.transpose(1, 2)[sample, source].transpose(1, 2)  # (B, N, H, W)
    # A Python scalar, not a new device tensor: no host-to-device copy (a CUDA graph captures it).
    return torch.where(inside[:, None, :, None], moved, pad_hu)
