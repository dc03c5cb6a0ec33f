"""Per-case geometry of ingest: one CT + label map → int16 vertebra crops in video order.

Everything happens in world coordinates (NIfTI RAS+ mm: +x towards the patient's Right,
+y Anterior, +z Superior), so the result does not depend on how a file stores its axes.
Each crop is sampled directly from the source voxels on a grid defined in world mm
(`vctmae.ingest.sampling`): resampling, alignment with the spine and cropping are one step.

No whole-volume pass that the crops do not need (a clinical CT is ~80 M voxels): the CT is
sampled in its stored dtype, its scl_slope/scl_inter applied to the interpolated values
(linear interpolation commutes with them); the label map is counted and boxed once in
memory order. Both are seen along the crop's own axis order (`SAMPLING_ORIENTATION`)
through a strided view, no copy, and every crop byte is what sampling a fully reoriented
float copy gave (the tests compare the crops with that whole-volume way, `tests/whole_volume_chain.py`).

Video order of a crop:
    axis 0 = patient's left → right   (world +x)
    axis 1 = superior → inferior      (world −z, or the spine tangent when aligned)
    axis 2 = anterior → posterior     (world −y)
The crop's centre, index (size − 1) / 2 on every axis, is the vertebra's centroid (the
mean world position of its mask voxels). Alignment "axis" keeps the scanner axes;
"spline" ("auto" with ≥ 3 vertebrae) turns axis 1 onto the tangent of a smooth curve
through the centroids of every vertebra present, fragments excepted (`spine_tangents`,
`crop_frame`).

Skip rules, first match wins: level outside `levels`; fragment (mask volume <
`min_fragment_mm3`, never written, even with `keep_truncated`); truncated (mask touches
the first or last index of any storage axis).

Label scheme auto-detection (`detect_label_scheme`) decides from the whole label set,
never from any one value. Evidence: the labels of values 1–50 whose mask reaches
`min_fragment_mm3` (all of them when none is that large); a value above 50 is a vertebra
in no scheme, reported, never used to pick one.
- VerSe fits when the evidence holds a VerSe vertebra (1–25, 28), no value VerSe never
  uses (29–50), and each of VerSe's labels that only exists beside another has that
  neighbour in the map (`VERSE_NEIGHBOURS`: T13 beside T12 or L1, L6 below L5, the sacrum
  below L5 or L6, the coccyx below the sacrum).
- TotalSegmentator v2 fits when the evidence holds one of its vertebrae (27 L5 … 50 C1).
One scheme fits: that one. Both or neither, or a map of 1s only (a binary mask): the case
fails, naming the values and `--label-scheme verse|totalseg`. Real maps are never
ambiguous (TotalSegmentator's hold vertebrae above L4, VerSe's values 1–25); only maps
cut down to a few vertebrae around T13, L4 or L5 need the flag.

Labels that are no vertebra in the chosen scheme are returned with their voxel counts
(`CaseCrops.other_labels`, listed in the ingest report). A case fails (`IngestError`) when
its map holds no vertebra of the scheme, or only vertebra specks below `min_fragment_mm3`
beside substantial labels that are not: its vertebrae would be lost for a reason no skip
rule names (most likely the wrong scheme).
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from vctmae.errors import VctmaeError
from vctmae.ingest import label_pass
from vctmae.ingest.config import GeometryConfig
from vctmae.ingest.errors import IngestError
from vctmae.ingest.levels import (
    SCHEMES,
    TOTALSEG,
    VERSE,
    VERSE_COCCYX,
    VERSE_LABEL,
    VERSE_SACRUM,
    level_index,
)
from vctmae.ingest.nifti import (
    Volume,
    check_same_grid,
    orientation_transform,
    oriented_view,
    read_nifti_ct,
)
from vctmae.ingest.nifti import read_nifti_labels as read_label_map
from vctmae.ingest.sampling import sample_ct, sample_labels

SPLINE_WINDOW = 5  # vertebrae per local fit of the spine curve
LARGEST_VERTEBRA_VALUE = max(max(names) for names in SCHEMES.values())
# VerSe's values stop at 28 (T13); its 26 and 27 are sacrum and coccyx, no vertebrae.
LARGEST_VERSE_VALUE = max(VERSE)

# World (RAS+) directions of crop axes 0 and 1 before any alignment (axis 2 completes the frame).
LEFT_TO_RIGHT = np.array([1.0, 0.0, 0.0])
SUPERIOR_TO_INFERIOR = np.array([0.0, 0.0, -1.0])
# Voxels are first stored in the crop's own axis order (Right, Inferior, Posterior):
# sampling then walks memory in order, several times faster for the label map.
SAMPLING_ORIENTATION = "RIP"
# Label voxels counted at a time (bincount makes a 64-bit copy of what it counts).
COUNT_CHUNK_VOXELS = 1 << 22


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


class LabelSchemeError(VctmaeError, ValueError):
    """The label set supports both schemes, or neither (the case's map is named by the caller)."""


# VerSe labels that only exist beside another one: label → the labels one of which must be there.
VERSE_NEIGHBOURS: dict[int, tuple[int, ...]] = {
    VERSE_LABEL["T13"]: (VERSE_LABEL["T12"], VERSE_LABEL["L1"]),
    VERSE_LABEL["L6"]: (VERSE_LABEL["L5"],),
    VERSE_SACRUM: (VERSE_LABEL["L5"], VERSE_LABEL["L6"]),
    VERSE_COCCYX: (VERSE_SACRUM,),
}
VERSE_NAMES: dict[int, str] = {**VERSE, VERSE_SACRUM: "sacrum", VERSE_COCCYX: "coccyx"}


def _values_named(values: Collection[int], names: Mapping[int, str]) -> str:
    """'19 (T12), 28 (T13)' — values with their names in a scheme."""
    return ", ".join(f"{v} ({names[v]})" if v in names else str(v) for v in sorted(values))


def _scheme_misfits(
    present: Mapping[int, float] | Collection[int], *, min_volume_mm3: float = 0.0
) -> tuple[set[int], dict[str, str | None]]:
    """The evidence of a label set, and why each scheme does not fit it (None: it fits).

    `present` maps each label value to its mask volume in mm³ (labels under
    `min_volume_mm3` are no evidence unless nothing is larger); a plain set of
    values counts every value as evidence. Rule in the module docstring.
    """
    volumes = present if isinstance(present, Mapping) else dict.fromkeys(present, np.inf)
    labelled = {value for value in volumes if 0 < value <= LARGEST_VERTEBRA_VALUE}
    evidence = {value for value in labelled if volumes[value] >= min_volume_mm3} or labelled
    verse = evidence & VERSE.keys()
    foreign = {value for value in evidence if value > LARGEST_VERSE_VALUE}
    lonely = {
        value
        for value, neighbours in VERSE_NEIGHBOURS.items()
        if value in evidence and not labelled.intersection(neighbours)
    }
    misfit: dict[str, str | None] = {"verse": None, "totalseg": None}
    if not verse:
        misfit["verse"] = "no VerSe vertebra value (1–25, 28)"
    elif foreign:
        misfit["verse"] = f"VerSe never uses {_values_named(foreign, TOTALSEG)}"
    elif lonely:
        needed = "; ".join(
            f"{_values_named({value}, VERSE_NAMES)} without "
            + " or ".join(_values_named({n}, VERSE_NAMES) for n in VERSE_NEIGHBOURS[value])
            for value in sorted(lonely)
        )
        misfit["verse"] = f"VerSe's {needed}"
    if not evidence & TOTALSEG.keys():
        misfit["totalseg"] = "no TotalSegmentator vertebra value (27–50)"
    return evidence, misfit


def detect_label_scheme(
    present: Mapping[int, float] | Collection[int], *, min_volume_mm3: float = 0.0
) -> str:
    """The one label scheme the whole label set supports (rule in the module docstring).

    Raises `LabelSchemeError` (one line naming the values and `--label-scheme`) when
    the set supports both schemes, neither, or is a binary mask of 1s.
    """
    evidence, misfit = _scheme_misfits(present, min_volume_mm3=min_volume_mm3)
    fitting = [scheme for scheme, reason in misfit.items() if reason is None]
    if not evidence:
        raise LabelSchemeError(
            f"label map holds no vertebra labels (no value 1–{LARGEST_VERTEBRA_VALUE})"
        )
    if evidence == {1}:
        raise LabelSchemeError(
            "label map holds only the value 1: a binary mask names no vertebra; label each "
            "vertebra (VerSe or TotalSegmentator values), or give --label-scheme verse if it "
            "is VerSe's C1 alone"
        )
    if len(fitting) == 1:
        return fitting[0]
    values = ", ".join(str(value) for value in sorted(evidence))
    if fitting:
        as_verse = ", ".join(VERSE[v] for v in sorted(evidence & VERSE.keys()))
        as_totalseg = ", ".join(TOTALSEG[v] for v in sorted(evidence & TOTALSEG.keys()))
        raise LabelSchemeError(
            f"label scheme is ambiguous: values {values} are {as_verse} in VerSe, but "
            f"{as_totalseg} beside organs in TotalSegmentator; give --label-scheme verse or "
            "--label-scheme totalseg"
        )
    raise LabelSchemeError(
        f"label map holds no vertebra labels either scheme supports (values {values}: "
        f"{misfit['verse']}; {misfit['totalseg']}); "
        "give --label-scheme verse or --label-scheme totalseg if you know its scheme"
    )


def memory_order(data: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    """`data` transposed so that its axes run from slowest to fastest in memory (a view), and
    the storage axis behind each of its axes. A NIfTI array (first axis fastest) comes back
    as its C-contiguous transpose: passes over it then walk memory in order."""
    order = tuple(int(a) for a in np.argsort([-abs(s) for s in data.strides], kind="stable"))
    return data.transpose(order), order


@dataclass(frozen=True)
class LabelCensus:
    """What one pass over a label map finds: voxel counts, where labels lie, and where each
    vertebra value lies (storage axes)."""

    counts: dict[int, int]  # positive label value → voxels
    # Bounding box of every labelled voxel (None: nothing labelled).
    region: tuple[slice, slice, slice] | None
    # Per vertebra value 1 … 50, at index value − 1: the box of its voxels (None: absent),
    # and the sums of their indices along each axis (the numerators of its centroid).
    boxes: list[tuple[slice, ...] | None]
    index_sums: np.ndarray  # (50, 3) int64


def label_census(labels: Volume) -> LabelCensus:
    """Voxel counts, the box around all labelled voxels, and each vertebra value's box and
    index sums, in one pass over the map in memory order (two without numba).

    Negative values (a few tools write them) are background, as 0 is.
    """
    data, order = memory_order(labels.data)
    top = LARGEST_VERTEBRA_VALUE
    index_sums = np.zeros((top, 3), dtype=np.int64)
    if data.size == 0:
        return LabelCensus(counts={}, region=None, boxes=[None] * top, index_sums=index_sums)
    if _compiled_labels(data):
        counts, found, sums = label_pass.label_stats(data, top)
        boxes = [_stored_box(box, order) for box in found]
        # Memory-order axis k is storage axis order[k].
        index_sums[:, list(order)] = sums[1:]
        region, boxes = boxes[0], boxes[1:]
    else:
        counts, low, high = _numpy_census(data)
        region = None
        if counts:
            region = _stored_box(tuple(map(slice, low, high)), order)
        boxes = label_boxes(labels, region)
        for value, box in enumerate(boxes, start=1):
            if box is not None:
                indices = np.nonzero(labels.data[box] == value)
                index_sums[value - 1] = [
                    int(idx.sum()) + sl.start * idx.size
                    for idx, sl in zip(indices, box, strict=True)
                ]
    return LabelCensus(
        counts=dict(sorted(counts.items())), region=region, boxes=boxes, index_sums=index_sums
    )


def _stored_box(
    box: tuple[slice, ...] | None,
    order: tuple[int, int, int],
    region: tuple[slice, slice, slice] | None = None,
):
    """A box of the memory-order view (`memory_order`) of `region` of the map (default: all of
    it) as a box of the storage axes."""
    if box is None:
        return None
    stored = [slice(0, 0)] * 3
    for axis, extent in zip(order, box, strict=True):
        offset = 0 if region is None else region[axis].start
        stored[axis] = slice(extent.start + offset, extent.stop + offset)
    return tuple(stored)


def _numpy_census(data: np.ndarray) -> tuple[dict[int, int], list, list]:
    """`label_pass.census` with numpy, slab by slab: only the labelled voxels are counted
    (most of a scan is background, and bincount makes a 64-bit copy of what it counts)."""
    rows = max(1, COUNT_CHUNK_VOXELS // max(1, data[0].size))
    counts: dict[int, int] = {}
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
    return counts, low, high


def _compiled_labels(data: np.ndarray) -> bool:
    """Whether the compiled label passes take `data`: integers of one or two bytes (nearly
    every label map), when numba is present; the numpy passes take the rest."""
    return label_pass.available and data.dtype.kind in "iu" and data.dtype.itemsize <= 2


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
        found = label_pass.label_stats(data, LARGEST_VERTEBRA_VALUE)[1][1:]
    else:
        found = ndimage.find_objects(data, max_label=LARGEST_VERTEBRA_VALUE)
    return [_stored_box(box, order, region) for box in found]


def find_vertebrae(labels: Volume, census: LabelCensus, scheme: str) -> list[_Vertebra]:
    """Every vertebra of `scheme` in `census` (of `labels`), head → feet, with its box and
    centroid along `SAMPLING_ORIENTATION` (the view crops are cut from); nothing is read again.

    The centroid is the mean index of the vertebra's voxels: the exact integer sum of their
    indices along each axis of the view, over their count (as `np.mean` of the indices gives it).
    """
    view = oriented_view(labels, SAMPLING_ORIENTATION)
    transform = orientation_transform(labels, SAMPLING_ORIENTATION)
    shape = labels.data.shape
    found = []
    for value, level in SCHEMES[scheme].items():
        box = census.boxes[value - 1]
        if box is None:
            continue
        count = census.counts[value]
        moved = [slice(0, 0)] * 3
        centroid_index = np.zeros(3)
        for axis, (extent, (target, flip)) in enumerate(zip(box, transform, strict=True)):
            total = int(census.index_sums[value - 1, axis])
            if flip < 0:
                # Index i of this storage axis is n − 1 − i along the view.
                start, stop = shape[axis] - extent.stop, shape[axis] - extent.start
                local = count * (extent.stop - 1) - total
            else:
                start, stop = extent.start, extent.stop
                local = total - extent.start * count
            moved[int(target)] = slice(start, stop)
            centroid_index[int(target)] = local / count + start
        # The affine is linear, so the world centroid is the affine of the index centroid.
        centroid_world = view.affine[:3, :3] @ centroid_index + view.affine[:3, 3]
        truncated = any(sl.start == 0 or sl.stop == n for sl, n in zip(box, shape, strict=True))
        found.append(
            _Vertebra(
                level=level,
                label_value=value,
                centroid_world=centroid_world,
                volume_mm3=count * view.voxel_volume_mm3,
                truncated=truncated,
                box=tuple(moved),
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
    """Crop index (axis 0, 1, 2) → world RAS+ mm, as a NIfTI-style (4, 4) affine."""
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
    # crop index → world → source voxel, composed into one (4, 4) affine.
    to_voxel = np.linalg.inv(ct.affine) @ crop_affine(
        vertebra.centroid_world, tangent, config.spacing, config.size
    )
    array, inside = sample_ct(
        ct.data, to_voxel, config.size, ct.slope, ct.intercept, scaled=ct.scaled
    )
    window = _mask_window(vertebra.box, to_voxel, config.size)
    label = sample_labels(labels.data, to_voxel, config.size, window)
    return vertebra_crop(vertebra, tangent, array, inside, label, window)


def vertebra_crop(
    vertebra: _Vertebra,
    tangent: np.ndarray,
    array: np.ndarray,
    inside: np.ndarray,
    label: np.ndarray,
    window: tuple[slice, slice, slice],
) -> VertebraCrop:
    """The crop record of a sampled vertebra: `array` its CT crop, `inside` the crop voxels
    within the scan, `label` the label values sampled at the crop voxels of `window`."""
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


def crop_plan(
    vertebrae: list[_Vertebra], config: GeometryConfig
) -> tuple[list[tuple[_Vertebra, np.ndarray]], list[Skipped]]:
    """The vertebrae to cut, each with the world direction of its crop axis 1, and the
    vertebrae skipped (`_skip_reason`), head → feet.

    The spine curve runs through every vertebra found (fragments excepted: their centroids
    are noise), whether or not it is written.
    """
    on_curve = [v for v in vertebrae if v.volume_mm3 >= config.min_fragment_mm3]
    align = config.align
    if align == "auto":
        align = "spline" if len(on_curve) >= 3 else "axis"
    tangent_of: dict[str, np.ndarray] = {}
    if align == "spline":
        centroids = np.stack([v.centroid_world for v in on_curve])
        tangents = spine_tangents(centroids, curve_weights(on_curve))
        tangent_of = {v.level: t for v, t in zip(on_curve, tangents, strict=True)}
    plan, skipped = [], []
    for vertebra in vertebrae:
        reason = _skip_reason(vertebra, config)
        if reason is not None:
            skipped.append(Skipped(level=vertebra.level, reason=reason))
        else:
            plan.append((vertebra, tangent_of.get(vertebra.level, SUPERIOR_TO_INFERIOR)))
    return plan, skipped


def read_ct(path: str | Path, *, series_uid: str | None = None) -> Volume:
    """A CT from a NIfTI file or a DICOM series folder (`series_uid` picks a series there), in
    the source's own dtype and memory order: no whole-volume copy before the crops are cut.

    NIfTI: stored voxels with scl_slope / scl_inter in the Volume. DICOM: float32 HU
    (each slice carries its own rescale), slices ordered by position, RAS+ affine.
    Raises `IngestError` naming the file or folder.
    """
    path = Path(path)
    if path.is_dir():
        from vctmae.ingest.dicom import load_dicom_ct

        return load_dicom_ct(path, series_uid=series_uid)
    return read_nifti_ct(path)


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


def crops_from_volumes(ct: Volume, labels: Volume, config: GeometryConfig) -> CaseCrops:
    """`extract_crops` on volumes already read (`read_ct`, `read_label_map`)."""
    check_same_grid(ct, labels)
    source_orientation, source_spacing = ct.orientation, ct.voxel_sizes
    # Counts, boxes and centroids from the stored map in memory order.
    census = label_census(labels)
    counts = census.counts
    if config.label_scheme == "auto":
        volumes = {value: n * labels.voxel_volume_mm3 for value, n in counts.items()}
        try:
            scheme = detect_label_scheme(volumes, min_volume_mm3=config.min_fragment_mm3)
        except LabelSchemeError as error:
            others = {value: n for value, n in counts.items() if value > LARGEST_VERTEBRA_VALUE}
            found = f" (also {_values_text(others)}: no vertebra in any scheme)" if others else ""
            raise IngestError(labels.path, f"{error}{found}") from None
    else:
        scheme = config.label_scheme
    names = SCHEMES[scheme]
    other_labels = {value: n for value, n in counts.items() if value not in names}
    vertebrae = find_vertebrae(labels, census, scheme)
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

    plan, skipped = crop_plan(vertebrae, config)
    # Both volumes seen along the crops' axis order (views, no copy).
    ct, labels = (
        oriented_view(ct, SAMPLING_ORIENTATION),
        oriented_view(labels, SAMPLING_ORIENTATION),
    )
    crops = [cut_crop(ct, labels, vertebra, tangent, config) for vertebra, tangent in plan]
    return CaseCrops(
        crops=crops,
        skipped=skipped,
        source_orientation=source_orientation,
        source_spacing=source_spacing,
        scheme=scheme,
        other_labels=other_labels,
    )
