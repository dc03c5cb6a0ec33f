"""Per-case geometry of ingest: one CT + label map → int16 vertebra crops in video order.

Everything happens in world coordinates (NIfTI RAS+ mm: +x towards the
patient's Right, +y Anterior, +z Superior), so the result does not depend on
how a file stores its axes. Each crop is sampled directly from the source
voxels on a grid defined in world mm (`vctmae.ingest.sampling`): the
isotropic resampling, the rotation that aligns the crop with the spine and the
cropping are one step, and memory stays flat however large the scan is.

No whole-volume pass that the crops do not need (a clinical CT is ~80 M voxels):
the CT is sampled in its stored dtype (int16, usually), and scl_slope/scl_inter
are applied to the interpolated values — linear interpolation commutes with
them; the label map is read once as stored, its voxel counts and bounding boxes
taken in memory order. Both are seen along the crop's own axis order
(`SAMPLING_ORIENTATION`) through a strided view, no copy, and each crop voxel
is interpolated where it lies (`vctmae.ingest.sampling`: scipy's arithmetic in
one compiled loop), so every crop byte is what sampling a fully reoriented
float copy gave (the tests compare the crops with that old chain, kept in
`vctmae.bench.ingest`).

Video order of a crop (SPEC §2):
    axis 0 = patient's left → right   (world +x)
    axis 1 = superior → inferior      (world −z, or the spine tangent when aligned)
    axis 2 = anterior → posterior     (world −y)
The crop's centre, index (size − 1) / 2 on every axis, is the vertebra's centroid
(the mean world position of its mask voxels).

Alignment: "axis" keeps the scanner axes. "spline" (what "auto" picks for a case
with ≥ 3 vertebrae) fits a smooth curve through the centroids of every
vertebra present, fragments excepted (`spine_tangents`), and turns axis 1 onto
the curve's tangent at each vertebra; axis 0 is world +x made perpendicular to
it (left → right as close to the scanner's as possible), axis 2 completes the
frame (`crop_frame`, `crop_affine`).

Skip rules, first match wins: level outside `levels`; fragment (mask volume
< `min_fragment_mm3`, never written, even with `keep_truncated`); truncated
(mask touches the first or last index of any storage axis).

Label scheme auto-detection (`label_scheme="auto"`, `detect_label_scheme`) is
decided from the whole label set, never from any one value. Only labels whose
mask reaches `min_fragment_mm3` count as evidence — a stray voxel or a speck can
neither become a crop nor decide the scheme (all labels count when none is that
large). The map is TotalSegmentator v2 when its evidence
1. holds vertebrae of TotalSegmentator but none of VerSe (e.g. only 26 S1 and
   27 L5, which VerSe uses for sacrum and coccyx), or
2. holds a value VerSe never uses: above 28 (TotalSegmentator's vertebrae
   reach 50 and its organs, vessels, muscles and ribs 117), or
3. holds 28 without 19 or 20: VerSe's 28 is T13, which only exists between
   T12 (19) and L1 (20), so a lone 28 is TotalSegmentator's L4 — the case that
   once needed an explicit `label_scheme="totalseg"`.
Otherwise it is VerSe. A real TotalSegmentator map always holds values above
28 (muscles, vessels, other vertebrae), so rule 3 only matters for maps cut
down to a few vertebrae; the one map these rules still read as VerSe is a
cut-down TotalSegmentator map holding L4 (28) beside organ 19 or 20 and
nothing above 28 — give `label_scheme="totalseg"` for that one.

Labels that are no vertebra in the chosen scheme are returned with their voxel
counts (`CaseCrops.other_labels`, listed in the ingest report). A case fails
(`IngestError`) when its map holds no vertebra of the chosen scheme, or only
vertebra specks below `min_fragment_mm3` beside other labels that are not:
its vertebrae would be lost for a reason none of the skip rules names (most
likely the wrong scheme).
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from vctmae.clip import NUM_FRAMES, STRIDE
from vctmae.errors import UsageError
from vctmae.ingest import label_pass
from vctmae.ingest.errors import IngestError
from vctmae.ingest.levels import LEVELS, SCHEMES, TOTALSEG, VERSE, VERSE_LABEL, level_index
from vctmae.ingest.nifti import Volume, check_same_grid, orientation_transform, oriented_view
from vctmae.ingest.sampling import sample_ct, sample_labels
from vctmae.ingest.source import read_ct, read_label_map

ALIGNMENTS = ("auto", "spline", "axis")
LABEL_SCHEMES = ("auto", *SCHEMES)
SPLINE_WINDOW = 5  # vertebrae per local fit of the spine curve
LARGEST_VERTEBRA_VALUE = max(max(names) for names in SCHEMES.values())
# VerSe's values stop at 28 (T13); its 26 and 27 are sacrum and coccyx, no vertebrae.
LARGEST_VERSE_VALUE = max(VERSE)
# The smallest `size` the training frame rule can sample: 16 frames `stride` 6 slices apart
# (the clip rules' module imports torch only when a rule runs, not for its constants).
MIN_TRAINING_SIZE = NUM_FRAMES * STRIDE

# World (RAS+) directions of the crop axes before any alignment.
LEFT_TO_RIGHT = np.array([1.0, 0.0, 0.0])
SUPERIOR_TO_INFERIOR = np.array([0.0, 0.0, -1.0])
ANTERIOR_TO_POSTERIOR = np.array([0.0, -1.0, 0.0])
# Voxels are first stored in the crop's own axis order (Right, Inferior, Posterior):
# sampling then walks memory in order, several times faster for the label map.
SAMPLING_ORIENTATION = "RIP"
# Label voxels counted at a time (bincount makes a 64-bit copy of what it counts).
COUNT_CHUNK_VOXELS = 1 << 22


@dataclass(frozen=True, kw_only=True)
class GeometryConfig:
    """How crops are cut from a case."""

    spacing: float = 1.0  # isotropic output voxel size, mm
    size: int = 96  # crop edge, voxels
    align: str = "auto"  # "spline" | "axis" | "auto" (spline when ≥ 3 vertebrae)
    levels: frozenset[str] | None = None  # keep only these levels; None keeps all
    label_scheme: str = "auto"  # "verse" | "totalseg" | "auto"
    keep_truncated: bool = False  # write vertebrae whose mask touches the scan border
    min_fragment_mm3: float = 1000.0  # smaller masks are skipped as fragments

    def __post_init__(self) -> None:
        if not (self.spacing > 0 and np.isfinite(self.spacing)):
            raise UsageError(f"spacing must be a positive number of mm, got {self.spacing}")
        if self.size < 1:
            raise UsageError(f"size must be at least 1 voxel, got {self.size}")
        if self.align not in ALIGNMENTS:
            raise UsageError(f"align must be one of {', '.join(ALIGNMENTS)}, got {self.align!r}")
        if self.label_scheme not in LABEL_SCHEMES:
            raise UsageError(
                f"label_scheme must be one of {', '.join(LABEL_SCHEMES)}, got {self.label_scheme!r}"
            )
        if self.levels is not None:
            unknown = sorted(set(self.levels) - set(LEVELS))
            if unknown:
                raise UsageError(f"unknown levels {unknown}; expected names like T12, L1")
        if self.min_fragment_mm3 < 0:
            raise UsageError(f"min_fragment_mm3 must be ≥ 0, got {self.min_fragment_mm3}")


@dataclass(frozen=True)
class VertebraCrop:
    """One vertebra, ready to store."""

    level: str  # anatomical name, e.g. "L1"
    label_value: int  # value in the source label map
    array: np.ndarray  # int16 (size, size, size), video order, HU
    centroid_world: tuple[float, float, float]  # mask centroid, mm, RAS+
    tangent: tuple[float, float, float]  # unit, RAS+, pointing inferior: direction of axis 1
    inside_fraction: float  # fraction of crop voxels inside the scan
    # Bounding box of the vertebra's mask in crop indices, half-open: (x0, x1, y0, y1, z0, z1).
    bbox: tuple[int, int, int, int, int, int]
    truncated: bool  # the mask touches the scan border


@dataclass(frozen=True)
class Skipped:
    """A vertebra present in the label map but not written, and why."""

    level: str
    reason: str


@dataclass(frozen=True)
class CaseCrops:
    """Result of one case: crops head → feet, skipped vertebrae, facts about the source."""

    crops: list[VertebraCrop]
    skipped: list[Skipped]
    source_orientation: str  # storage axis codes, e.g. "LPS"
    source_spacing: tuple[float, float, float]  # voxel size along the storage axes, mm
    scheme: str  # label scheme used: "verse" | "totalseg"
    # Label value → voxel count of every label that is no vertebra in `scheme`.
    other_labels: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Vertebra:
    level: str
    label_value: int
    centroid_world: np.ndarray  # (3,)
    volume_mm3: float
    truncated: bool
    box: tuple[slice, slice, slice]  # the mask's bounding box in the label volume


def detect_label_scheme(
    present: Mapping[int, float] | Collection[int], *, min_volume_mm3: float = 0.0
) -> str:
    """The label scheme of a map, decided from its whole label set (rule in the module docstring).

    `present` maps each label value to its mask volume in mm³ (labels under
    `min_volume_mm3` are no evidence unless nothing is larger); a plain set of
    values counts every value as evidence.
    """
    volumes = present if isinstance(present, Mapping) else dict.fromkeys(present, np.inf)
    labelled = {value for value in volumes if value > 0}
    evidence = {value for value in labelled if volumes[value] >= min_volume_mm3} or labelled
    if evidence & TOTALSEG.keys() and not evidence & VERSE.keys():
        return "totalseg"
    if any(value > LARGEST_VERSE_VALUE for value in evidence):
        return "totalseg"
    t13_neighbours = {VERSE_LABEL["T12"], VERSE_LABEL["L1"]}
    if VERSE_LABEL["T13"] in evidence and not evidence & t13_neighbours:
        return "totalseg"
    return "verse"


def memory_order(data: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    """`data` transposed so that its axes run from slowest to fastest in memory (a view), and
    the storage axis behind each of its axes. A NIfTI array (first axis fastest) comes back
    as its C-contiguous transpose: passes over it then walk memory in order."""
    order = tuple(int(a) for a in np.argsort([-abs(s) for s in data.strides], kind="stable"))
    return data.transpose(order), order


@dataclass(frozen=True)
class LabelCensus:
    """What one pass over a label map finds: voxel counts, and where labels lie at all."""

    counts: dict[int, int]  # positive label value → voxels
    # Bounding box of every labelled voxel, storage axes (None: nothing labelled).
    region: tuple[slice, slice, slice] | None


def label_census(labels: Volume) -> LabelCensus:
    """Voxel count of every positive label value and the box around all labelled voxels, in
    one pass over the map in memory order.

    Negative values (a few tools write them) are background, as 0 is. Only the
    labelled voxels are counted (most of a scan is background, and bincount makes
    a 64-bit copy of what it counts).
    """
    data, order = memory_order(labels.data)
    counts: dict[int, int] = {}
    if data.size == 0:
        return LabelCensus(counts={}, region=None)
    if _compiled_labels(data):
        return _compiled_census(data, order)
    rows = max(1, COUNT_CHUNK_VOXELS // max(1, data[0].size))
    low, high = [None] * 3, [None] * 3
    for start in range(0, data.shape[0], rows):
        chunk = data[start : start + rows]
        mask = chunk > 0
        labelled = chunk[mask]
        if labelled.size == 0:
            continue
        # Where this slab holds labels, per axis of the memory-order view.
        for axis, others in ((0, (1, 2)), (1, (0, 2)), (2, (0, 1))):
            present = np.flatnonzero(mask.any(axis=others))
            first, last = int(present[0]), int(present[-1]) + 1
            if axis == 0:
                first, last = first + start, last + start
            low[axis] = first if low[axis] is None else min(low[axis], first)
            high[axis] = last if high[axis] is None else max(high[axis], last)
        if int(labelled.max()) < 2**16:
            found = np.bincount(labelled)
            values = np.flatnonzero(found)
            numbers = found[values]
        else:
            values, numbers = np.unique(labelled, return_counts=True)
        for value, number in zip(values.tolist(), numbers.tolist(), strict=True):
            counts[value] = counts.get(value, 0) + number
    if not counts:
        return LabelCensus(counts={}, region=None)
    region = [slice(0, 0)] * 3
    for axis, stored in enumerate(order):
        region[stored] = slice(low[axis], high[axis])
    return LabelCensus(counts=dict(sorted(counts.items())), region=tuple(region))


def _compiled_labels(data: np.ndarray) -> bool:
    """Whether the compiled label passes take `data`: integers of one or two bytes (nearly
    every label map), when numba is present; the numpy passes take the rest."""
    return label_pass.available and data.dtype.kind in "iu" and data.dtype.itemsize <= 2


def _compiled_census(data: np.ndarray, order: tuple[int, int, int]) -> LabelCensus:
    """`label_census` of a memory-order view in one compiled pass (`label_pass.census`)."""
    counts, low, high = label_pass.census(data)
    if not counts:
        return LabelCensus(counts={}, region=None)
    region = [slice(0, 0)] * 3
    for axis, stored in enumerate(order):
        region[stored] = slice(int(low[axis]), int(high[axis]))
    return LabelCensus(counts=counts, region=tuple(region))


def label_counts(labels: Volume) -> dict[int, int]:
    """Voxel count of every positive label value (`label_census`)."""
    return label_census(labels).counts


def _values_text(counts: Mapping[int, int], names: Mapping[int, str] | None = None) -> str:
    """'18 (T11): 5000, 19 (T12): 4800, … (12 values)' — the first few labels with voxel counts."""
    shown = []
    for value in sorted(counts)[:6]:
        name = f" ({names[value]})" if names and value in names else ""
        voxels = "voxel" if counts[value] == 1 else "voxels"
        shown.append(f"{value}{name}: {counts[value]} {voxels}")
    more = f", … ({len(counts)} values)" if len(counts) > 6 else ""
    return ", ".join(shown) + more


def label_boxes(
    labels: Volume, region: tuple[slice, slice, slice] | None = ...
) -> list[tuple[slice, ...] | None]:
    """Bounding boxes (storage axes) of label values 1 … 50 (every vertebra value of any
    scheme), in one pass over `region` of the map (`label_census`; default: found here)
    in memory order."""
    if region is ...:
        region = label_census(labels).region
    if region is None:
        return [None] * LARGEST_VERTEBRA_VALUE
    data, order = memory_order(labels.data[region])
    if _compiled_labels(data):
        found = label_pass.vertebra_boxes(data, LARGEST_VERTEBRA_VALUE)
    else:
        found = ndimage.find_objects(data, max_label=LARGEST_VERTEBRA_VALUE)
    boxes: list[tuple[slice, ...] | None] = []
    for box in found:
        if box is None:
            boxes.append(None)
            continue
        stored = [slice(0, 0)] * 3
        for axis, extent in zip(order, box, strict=True):
            offset = region[axis].start
            stored[axis] = slice(extent.start + offset, extent.stop + offset)
        boxes.append(tuple(stored))
    return boxes


def view_boxes(
    boxes: list[tuple[slice, ...] | None], volume: Volume, codes: str
) -> list[tuple[slice, ...] | None]:
    """`boxes` of `volume`'s storage axes as boxes of `oriented_view(volume, codes)`."""
    transform = orientation_transform(volume, codes)
    shape = volume.data.shape
    out: list[tuple[slice, ...] | None] = []
    for box in boxes:
        if box is None:
            out.append(None)
            continue
        moved = [slice(0, 0)] * 3
        for axis, (extent, (target, flip)) in enumerate(zip(box, transform, strict=True)):
            n = shape[axis]
            moved[int(target)] = slice(n - extent.stop, n - extent.start) if flip < 0 else extent
        out.append(tuple(moved))
    return out


def find_vertebrae(
    labels: Volume, scheme: str, boxes: list[tuple[slice, ...] | None]
) -> list[_Vertebra]:
    """Every vertebra of `scheme` present in `labels`, head → feet.

    `boxes` come from `label_boxes`; only each vertebra's box is read again.
    """
    names = SCHEMES[scheme]
    objects = boxes
    shape = labels.data.shape
    found = []
    for value, level in names.items():
        box = objects[value - 1]
        if box is None:
            continue
        # A copy of the box only: `labels` may be a strided view of the stored map.
        indices = np.nonzero(np.ascontiguousarray(labels.data[box]) == value)
        count = indices[0].size
        centroid_index = np.array(
            [idx.mean() + sl.start for idx, sl in zip(indices, box, strict=True)]
        )
        # The affine is linear, so the world centroid is the affine of the index centroid.
        centroid_world = labels.affine[:3, :3] @ centroid_index + labels.affine[:3, 3]
        truncated = any(sl.start == 0 or sl.stop == n for sl, n in zip(box, shape, strict=True))
        found.append(
            _Vertebra(
                level=level,
                label_value=value,
                centroid_world=centroid_world,
                volume_mm3=count * labels.voxel_volume_mm3,
                truncated=truncated,
                box=box,
            )
        )
    found.sort(key=lambda v: level_index(v.level))
    return found


def spine_tangents(centroids: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Unit tangents (pointing from head to feet) of a smooth curve through `centroids`.

    `centroids` is (N, 3), ordered head → feet; `weights` (N,) in (0, 1] say how
    much to trust each centroid (a truncated vertebra's centroid is biased by
    the cut). At each vertebra the curve is a local weighted least-squares
    quadratic per world coordinate in the chord-length parameter, fitted to
    the five nearest vertebrae (a circle arc of the spine's curvature is
    followed to ~1°, for any N from 3 to a whole spine), and a line where fewer
    than three centroids are well trusted, so one poor centroid cannot bend it.
    Fewer than two points give the world superior → inferior axis.
    """
    points = np.asarray(centroids, dtype=np.float64)
    count = len(points)
    fallback = np.tile(SUPERIOR_TO_INFERIOR, (count, 1))
    if count < 2:
        return fallback
    weights = np.ones(count) if weights is None else np.asarray(weights, dtype=np.float64)
    steps = np.linalg.norm(np.diff(points, axis=0), axis=1)
    if np.any(steps < 1e-6):
        return fallback  # two vertebrae at one place: no curve to speak of
    arclength = np.concatenate([[0.0], np.cumsum(steps)])
    width = min(count, SPLINE_WINDOW)
    derivative = np.empty_like(points)
    for index in range(count):
        start = min(max(index - width // 2, 0), count - width)
        window = slice(start, start + width)
        trusted = int(np.count_nonzero(weights[window] >= 0.5))
        degree = max(1, min(2, width - 1, trusted - 1))
        for axis in range(3):
            curve = np.polynomial.Polynomial.fit(
                arclength[window], points[window, axis], degree, w=weights[window]
            )
            derivative[index, axis] = curve.deriv()(arclength[index])
    norms = np.linalg.norm(derivative, axis=1, keepdims=True)
    return np.where(norms > 1e-9, derivative / np.maximum(norms, 1e-12), fallback)


def curve_weights(vertebrae: list[_Vertebra]) -> np.ndarray:
    """Trust in each centroid: 1 for whole vertebrae, the kept volume fraction for truncated ones."""
    whole = [v.volume_mm3 for v in vertebrae if not v.truncated]
    typical = float(np.median(whole if whole else [v.volume_mm3 for v in vertebrae]))
    return np.array(
        [1.0 if not v.truncated else min(1.0, v.volume_mm3 / typical) for v in vertebrae]
    )


def crop_frame(tangent: np.ndarray) -> np.ndarray:
    """World directions of the crop axes as the columns of a (3, 3) matrix.

    Column 1 (superior → inferior) is `tangent`; column 0 (left → right) is the
    world +x axis made perpendicular to it (as close to world left → right as
    possible); column 2 completes the frame so that the axis-aligned case gives
    exactly (+x, −z, −y).
    """
    down = np.asarray(tangent, dtype=np.float64)
    down = down / np.linalg.norm(down)
    across = LEFT_TO_RIGHT - (LEFT_TO_RIGHT @ down) * down
    if np.linalg.norm(across) < 1e-6:  # spine along left-right: cannot happen in a real body
        across = np.array([0.0, 1.0, 0.0]) - down[1] * down
    across /= np.linalg.norm(across)
    back = -np.cross(across, down)
    return np.stack([across, down, back], axis=1)


def crop_affine(centroid_world, tangent, spacing: float, size: int) -> np.ndarray:
    """Crop index (axis 0, 1, 2) → world RAS+ mm, as a NIfTI-style (4, 4) affine.

    Handy to write a crop back as NIfTI for inspection, and to check crops.
    """
    frame = crop_frame(np.asarray(tangent)) * spacing
    centre = (size - 1) / 2.0
    affine = np.eye(4)
    affine[:3, :3] = frame
    affine[:3, 3] = np.asarray(centroid_world, dtype=np.float64) - frame @ np.full(3, centre)
    return affine


def _mask_window(
    box: tuple[slice, slice, slice], to_voxel: np.ndarray, size: int
) -> tuple[slice, slice, slice]:
    """Crop index ranges that can hold the vertebra's mask (sampling labels elsewhere is waste)."""
    # Under nearest-neighbour sampling mask voxel k covers source coordinates [k − ½, k + ½].
    extent = [(sl.start - 0.5, sl.stop - 0.5) for sl in box]
    corners = np.array(list(itertools.product(*extent)))  # (8, 3)
    to_crop = np.linalg.inv(to_voxel)
    in_crop = corners @ to_crop[:3, :3].T + to_crop[:3, 3]
    low = np.clip(np.floor(in_crop.min(axis=0)).astype(int), 0, size)
    high = np.clip(np.ceil(in_crop.max(axis=0)).astype(int) + 1, 0, size)
    return (slice(low[0], high[0]), slice(low[1], high[1]), slice(low[2], high[2]))


def _mask_bbox(
    mask: np.ndarray, window: tuple[slice, slice, slice]
) -> tuple[int, int, int, int, int, int]:
    found = ndimage.find_objects(mask.astype(np.uint8))
    if not found or found[0] is None:
        return (0, 0, 0, 0, 0, 0)
    a, b, c = (
        slice(inner.start + outer.start, inner.stop + outer.start)
        for inner, outer in zip(found[0], window, strict=True)
    )
    return (a.start, a.stop, b.start, b.stop, c.start, c.stop)


def cut_crop(
    ct: Volume, labels: Volume, vertebra: _Vertebra, tangent: np.ndarray, config: GeometryConfig
) -> VertebraCrop:
    """Sample one vertebra's crop: CT linear, labels nearest, outside the scan −1024 HU.

    `ct` and `labels` share their grid (usually views along `SAMPLING_ORIENTATION`);
    the CT's slope and intercept are applied after interpolation (linear sampling
    commutes with them).
    """
    # crop index → world → source voxel, composed into one (4, 4) affine (CT and
    # label map share their grid).
    to_voxel = np.linalg.inv(ct.affine) @ crop_affine(
        vertebra.centroid_world, tangent, config.spacing, config.size
    )
    array, inside = sample_ct(
        ct.data, to_voxel, config.size, ct.slope, ct.intercept, scaled=ct.scaled
    )
    window = _mask_window(vertebra.box, to_voxel, config.size)
    label = sample_labels(labels.data, to_voxel, config.size, window)
    mask = (label == vertebra.label_value) & inside[window]
    return VertebraCrop(
        level=vertebra.level,
        label_value=vertebra.label_value,
        array=array,
        centroid_world=tuple(float(v) for v in vertebra.centroid_world),
        tangent=tuple(float(v) for v in tangent),
        inside_fraction=float(inside.mean()),
        bbox=_mask_bbox(mask, window),
        truncated=vertebra.truncated,
    )


def _skip_reason(vertebra: _Vertebra, config: GeometryConfig) -> str | None:
    # Order matters: a fragment is never written, even with keep_truncated.
    if config.levels is not None and vertebra.level not in config.levels:
        return "level outside --levels"
    if vertebra.volume_mm3 < config.min_fragment_mm3:
        return f"fragment: {vertebra.volume_mm3:.0f} mm³ < {config.min_fragment_mm3:.0f} mm³"
    if vertebra.truncated and not config.keep_truncated:
        return "truncated: mask touches the scan border"
    return None


def extract_crops(
    ct_path: str | Path,
    seg_path: str | Path,
    config: GeometryConfig = GeometryConfig(),
    *,
    series_uid: str | None = None,
) -> CaseCrops:
    """Cut every vertebra of one case into a `size³` int16 crop in video order.

    `ct_path` is a NIfTI file or a DICOM series folder (`series_uid` picks a series
    there); `seg_path` a NIfTI label map on the same grid. Raises `IngestError`
    naming the file for unreadable, non-3-D, mismatched, empty or NaN-containing inputs.
    """
    ct = read_ct(ct_path, series_uid=series_uid)
    labels = read_label_map(seg_path)
    return crops_from_volumes(ct, labels, config)


def _check_grids(ct: Volume, labels: Volume) -> None:
    """CT and label map must describe the same voxels — stored along the same axes, or along
    others (a DICOM series, stored LPS, beside a NIfTI map stored RAS): only the grid counts."""
    try:
        check_same_grid(ct, labels)
    except IngestError as stored_differently:
        try:
            check_same_grid(
                oriented_view(ct, SAMPLING_ORIENTATION),
                oriented_view(labels, SAMPLING_ORIENTATION),
            )
        except IngestError:
            raise stored_differently from None


def crops_from_volumes(ct: Volume, labels: Volume, config: GeometryConfig) -> CaseCrops:
    """`extract_crops` on volumes already read (`read_ct`, `read_label_map`)."""
    _check_grids(ct, labels)
    source_orientation, source_spacing = ct.orientation, ct.voxel_sizes
    # Counts and boxes from the stored map in memory order; then both volumes are seen
    # along the sampling order (views, no copy).
    census = label_census(labels)
    counts = census.counts
    boxes = view_boxes(label_boxes(labels, census.region), labels, SAMPLING_ORIENTATION)
    ct, labels = (
        oriented_view(ct, SAMPLING_ORIENTATION),
        oriented_view(labels, SAMPLING_ORIENTATION),
    )

    if config.label_scheme == "auto":
        volumes = {value: n * labels.voxel_volume_mm3 for value, n in counts.items()}
        scheme = detect_label_scheme(volumes, min_volume_mm3=config.min_fragment_mm3)
    else:
        scheme = config.label_scheme
    names = SCHEMES[scheme]
    other_labels = {value: n for value, n in counts.items() if value not in names}
    vertebrae = find_vertebrae(labels, scheme, boxes)
    if not vertebrae:
        found = f" (it holds {_values_text(other_labels)})" if other_labels else ""
        raise IngestError(
            labels.path, f"label map holds no vertebra labels of the {scheme} scheme{found}"
        )
    substantial_others = {
        value: n
        for value, n in other_labels.items()
        if n * labels.voxel_volume_mm3 >= config.min_fragment_mm3
    }
    if substantial_others and all(v.volume_mm3 < config.min_fragment_mm3 for v in vertebrae):
        specks = {v.label_value: counts[v.label_value] for v in vertebrae}
        raise IngestError(
            labels.path,
            f"no {scheme} vertebra to crop: its {scheme} vertebra labels are specks under "
            f"{config.min_fragment_mm3:.0f} mm³ ({_values_text(specks, names)}), while labels "
            f"{_values_text(substantial_others)} are no vertebra in the {scheme} scheme; "
            "check --label-scheme",
        )

    # The curve runs through every vertebra found (fragments excepted: their
    # centroids are noise), whether or not it is written.
    on_curve = [v for v in vertebrae if v.volume_mm3 >= config.min_fragment_mm3]
    align = config.align
    if align == "auto":
        align = "spline" if len(on_curve) >= 3 else "axis"
    tangent_of: dict[str, np.ndarray] = {}
    if align == "spline":
        centroids = np.stack([v.centroid_world for v in on_curve])
        tangents = spine_tangents(centroids, curve_weights(on_curve))
        tangent_of = {v.level: t for v, t in zip(on_curve, tangents, strict=True)}

    crops, skipped = [], []
    for vertebra in vertebrae:
        reason = _skip_reason(vertebra, config)
        if reason is not None:
            skipped.append(Skipped(level=vertebra.level, reason=reason))
            continue
        tangent = tangent_of.get(vertebra.level, SUPERIOR_TO_INFERIOR)
        crops.append(cut_crop(ct, labels, vertebra, tangent, config))
    return CaseCrops(
        crops=crops,
        skipped=skipped,
        source_orientation=source_orientation,
        source_spacing=source_spacing,
        scheme=scheme,
        other_labels=other_labels,
    )
