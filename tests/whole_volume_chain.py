"""Ingest's crops cut the plain way: the whole volume reoriented in memory, then scipy's
`map_coordinates` per crop. The tests compare ingest's compiled, streamed cutting with it (the
same bytes); nothing in the package uses it.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from helpers import reorient
from scipy import ndimage

from vctmae.ingest import geometry, sampling
from vctmae.ingest.config import GeometryConfig
from vctmae.ingest.geometry import (
    LARGEST_VERTEBRA_VALUE,
    SAMPLING_ORIENTATION,
    SCHEMES,
    CaseCrops,
)
from vctmae.ingest.nifti import Volume, check_same_grid
from vctmae.ingest.sampling import AIR_HU, INT16_MAX, INT16_MIN


def _old_load_ct(path: Path) -> Volume:
    image = nib.load(str(path))
    data = image.get_fdata(dtype=np.float32, caching="unchanged").reshape(image.shape[:3])
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise ValueError(f"{path}: CT contains {bad} NaN/inf voxels")
    return Volume(path=path, data=data, affine=np.asarray(image.affine, dtype=np.float64))


def _old_load_labels(path: Path) -> Volume:
    image = nib.load(str(path))
    data = np.asanyarray(image.dataobj).reshape(image.shape[:3])
    if data.dtype.kind == "f":
        data = np.rint(data)
    data = np.clip(data, 0, None) if data.dtype.kind in "if" and data.min() < 0 else data
    top = int(data.max()) if data.size else 0
    dtype = np.uint8 if top < 2**8 else np.uint16 if top < 2**16 else np.int32
    return Volume(
        path=path,
        data=np.ascontiguousarray(data, dtype=dtype),
        affine=np.asarray(image.affine, dtype=np.float64),
    )


def _old_counts(labels: Volume) -> dict[int, int]:
    data = labels.data.ravel()
    if int(data.max()) < 2**16:
        counts = np.bincount(data)
        values = np.flatnonzero(counts)
        found = zip(values.tolist(), counts[values].tolist(), strict=True)
    else:
        values, counts = np.unique(data, return_counts=True)
        found = zip(values.tolist(), counts.tolist(), strict=True)
    return {value: count for value, count in found if value != 0}


def _old_cut(ct: Volume, labels: Volume, vertebra, tangent, config: GeometryConfig):
    to_voxel = np.linalg.inv(ct.affine) @ geometry.crop_affine(
        vertebra.centroid_world, tangent, config.spacing, config.size
    )
    coords = sampling.crop_coordinates(to_voxel, config.size)
    shape = np.array(ct.data.shape, dtype=np.float64).reshape(3, 1, 1, 1)
    inside = np.all((coords >= -0.5) & (coords <= shape - 0.5), axis=0)
    hu = ndimage.map_coordinates(ct.data, coords, order=1, mode="nearest", output=np.float32)
    hu[~inside] = AIR_HU
    array = np.clip(np.rint(hu), INT16_MIN, INT16_MAX).astype(np.int16)
    window = geometry._mask_window(vertebra.box, to_voxel, config.size)
    label = ndimage.map_coordinates(
        labels.data, coords[(slice(None), *window)], order=0, mode="nearest"
    )
    return geometry.vertebra_crop(vertebra, tangent, array, inside, label, window)


def _old_find_vertebrae(labels: Volume, scheme: str, boxes: list) -> list:
    """Every vertebra of `scheme` in the reoriented `labels`, head → feet: each one's voxels
    found again in its box, its centroid their mean index."""
    found = []
    for value, level in SCHEMES[scheme].items():
        box = boxes[value - 1]
        if box is None:
            continue
        indices = np.nonzero(labels.data[box] == value)
        centroid_index = np.array(
            [idx.mean() + sl.start for idx, sl in zip(indices, box, strict=True)]
        )
        truncated = any(
            sl.start == 0 or sl.stop == n for sl, n in zip(box, labels.data.shape, strict=True)
        )
        found.append(
            geometry._Vertebra(
                level=level,
                label_value=value,
                centroid_world=labels.affine[:3, :3] @ centroid_index + labels.affine[:3, 3],
                volume_mm3=indices[0].size * labels.voxel_volume_mm3,
                truncated=truncated,
                box=box,
            )
        )
    return sorted(found, key=lambda v: geometry.level_index(v.level))


def whole_volume_crops(
    ct_path: Path, seg_path: Path, config: GeometryConfig = GeometryConfig()
) -> CaseCrops:
    """The crops of one case the way ingest cut them at commit bb6ecb0 (module docstring)."""
    ct, labels = _old_load_ct(Path(ct_path)), _old_load_labels(Path(seg_path))
    check_same_grid(ct, labels)
    source_orientation, source_spacing = ct.orientation, ct.voxel_sizes
    ct, labels = reorient(ct, SAMPLING_ORIENTATION), reorient(labels, SAMPLING_ORIENTATION)
    boxes = ndimage.find_objects(labels.data, max_label=LARGEST_VERTEBRA_VALUE)
    counts = _old_counts(labels)
    if config.label_scheme == "auto":
        volumes = {value: n * labels.voxel_volume_mm3 for value, n in counts.items()}
        scheme = geometry.detect_label_scheme(volumes, min_volume_mm3=config.min_fragment_mm3)
    else:
        scheme = config.label_scheme
    vertebrae = _old_find_vertebrae(labels, scheme, boxes)
    plan, skipped = geometry.crop_plan(vertebrae, config)
    crops = [_old_cut(ct, labels, vertebra, tangent, config) for vertebra, tangent in plan]
    others = {v: n for v, n in counts.items() if v not in SCHEMES[scheme]}
    # CaseCrops' fields in their declared order.
    return CaseCrops(crops, skipped, source_orientation, source_spacing, scheme, others)


def crop_differences(a: CaseCrops, b: CaseCrops) -> dict[str, float]:
    """Largest |Δ HU| between two results' crops, and whether everything else is equal."""
    same_levels = [c.level for c in a.crops] == [c.level for c in b.crops]
    worst, facts_equal = 0, same_levels
    for x, y in zip(a.crops, b.crops, strict=False):
        worst = max(worst, int(np.abs(x.array.astype(np.int32) - y.array).max()))
        facts_equal &= (x.centroid_world, x.tangent, x.inside_fraction, x.bbox, x.truncated) == (
            y.centroid_world,
            y.tangent,
            y.inside_fraction,
            y.bbox,
            y.truncated,
        )
    return {"max_abs_hu": float(worst), "label_facts_equal": bool(facts_equal)}
