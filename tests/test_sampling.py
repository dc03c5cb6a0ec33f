"""The compiled crop sampler reproduces scipy's `map_coordinates` bit for bit.

`vctmae.ingest.sampling.sample_ct` / `sample_labels` (one numba loop per crop) against
`scipy.ndimage.map_coordinates(order=1 / 0, mode="nearest")` on the whole volume at
`crop_coordinates`, on fresh random volumes and affines: rotated and scaled grids, crops
reaching out of the volume on every side, strided (flipped, transposed) views, int16 and
float32 sources, scaled and unscaled. Tolerance: none — the crops must be the same bytes.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from vctmae.ingest import sampling

SIZE = 20


def random_affine(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Crop index → source voxel: a random rotation, a voxel size of 0.6–1.6 and a centre that
    can put part of the crop outside the volume."""
    to_voxel = np.eye(4)
    scale = rng.uniform(0.6, 1.6, size=3)
    to_voxel[:3, :3] = Rotation.random(random_state=rng).as_matrix() * scale
    centre = rng.uniform(-0.3, 1.3, size=3) * np.array(shape)
    to_voxel[:3, 3] = centre - to_voxel[:3, :3] @ np.full(3, (SIZE - 1) / 2)
    return to_voxel


def scipy_ct(data, to_voxel, slope, intercept, scaled):
    """The rule, written plainly: map_coordinates on the whole volume, then cut_crop's steps."""
    coords = sampling.crop_coordinates(to_voxel, SIZE)
    extent = np.array(data.shape, dtype=np.float64).reshape(3, 1, 1, 1)
    inside = np.all((coords >= -0.5) & (coords <= extent - 0.5), axis=0)
    if scaled:
        raw = ndimage.map_coordinates(data, coords, order=1, mode="nearest", output=np.float64)
        hu = (raw * slope + intercept).astype(np.float32)
    else:
        hu = ndimage.map_coordinates(data, coords, order=1, mode="nearest", output=np.float32)
    hu[~inside] = sampling.AIR_HU
    return np.clip(np.rint(hu), sampling.INT16_MIN, sampling.INT16_MAX).astype(np.int16), inside


def volumes(rng: np.random.Generator):
    """int16 and float32 sources, stored C or F, seen through flipped and transposed views."""
    base = rng.integers(-1100, 2500, size=(31, 27, 23)).astype(np.int16)
    yield base
    yield np.asfortranarray(base)[::-1, :, ::-1]
    yield base.transpose(2, 0, 1)[:, ::-1]
    yield base.transpose(0, 2, 1)  # axis 1 fastest in memory: sampled from a copy
    yield (base.astype(np.float32) * 0.37 + rng.normal(size=base.shape).astype(np.float32))


@pytest.mark.parametrize("scaled", [False, True])
def test_compiled_ct_sampler_equals_map_coordinates(scaled):
    rng = np.random.default_rng(7 + scaled)
    slope, intercept = (1.25, -1024.5) if scaled else (1.0, 0.0)
    compared = outside = interior = 0
    for data in volumes(rng):
        # An axis-aligned grid whose first and last coordinates lie exactly half a voxel
        # outside the outer voxel centres (inside, by the rule) and one beyond (outside).
        edge = np.eye(4)
        edge[:3, 3] = [-0.5, data.shape[1] - SIZE + 0.5, -1.5]
        # A small rotated grid around the centre: every neighbour it reads lies inside.
        inner = random_affine(rng, data.shape)
        inner[:3, :3] *= 0.4 / np.abs(inner[:3, :3]).sum(axis=0).max()
        inner[:3, 3] = (np.array(data.shape) - 1) / 2 - inner[:3, :3] @ np.full(3, (SIZE - 1) / 2)
        for to_voxel in [edge, inner] + [random_affine(rng, data.shape) for _ in range(6)]:
            got, got_inside = sampling.sample_ct(data, to_voxel, SIZE, slope, intercept, scaled)
            want, want_inside = scipy_ct(data, to_voxel, slope, intercept, scaled)
            assert got.dtype == np.int16 and got.shape == (SIZE,) * 3
            np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(got_inside, want_inside)
            compared += got.size
            outside += int((~want_inside).sum())
            interior += int(want_inside.all())
    # The grids reached outside the volume, where the clamping and the air value matter, and
    # some lay wholly inside it, where no index is clamped.
    assert outside > 0.05 * compared
    assert interior >= 4
    # The reference path (scipy on the block the crop reads) is the same rule.
    ref, ref_inside = sampling.reference_ct(data, to_voxel, SIZE, slope, intercept, scaled)
    np.testing.assert_array_equal(ref, want)


def test_crops_beyond_the_volume_and_read_only_sources_sample_as_map_coordinates():
    # The compiled sampler reads a copy of the voxels a crop can touch: crops wholly outside
    # the volume (every side) and a read-only source (a file's voxels used in place) must
    # still give map_coordinates' bytes.
    rng = np.random.default_rng(5)
    stored = rng.integers(-1100, 2500, size=(26, 24, 22)).astype(np.int16)
    # C order (copied before sampling) and NIfTI's order, first axis fastest (read in place).
    for data in (stored, np.asfortranarray(stored)):
        data.flags.writeable = False
        for axis in range(3):
            for side in (-1, 1):
                to_voxel = random_affine(rng, data.shape)
                shift = np.zeros(3)
                shift[axis] = side * (data.shape[axis] + 2 * SIZE)
                to_voxel[:3, 3] += shift
                got, got_inside = sampling.sample_ct(data, to_voxel, SIZE, 1.0, 0.0, False)
                want, want_inside = scipy_ct(data, to_voxel, 1.0, 0.0, False)
                assert not want_inside.any()
                np.testing.assert_array_equal(got, want)
                np.testing.assert_array_equal(got_inside, want_inside)


def test_compiled_label_sampler_equals_map_coordinates_even_at_half_voxels():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 30, size=(25, 22, 19)).astype(np.uint8)
    window = (slice(2, 17), slice(0, 20), slice(5, 6))
    affines = [random_affine(rng, labels.shape) for _ in range(8)]
    # An axis-aligned grid whose coordinates fall exactly on half voxels (the rounding case).
    half = np.eye(4)
    half[:3, 3] = [0.5, -1.5, 2.5]
    affines.append(half)
    # C order (crop axis 2 innermost), a flipped transposed view and NIfTI order (axis 0).
    for view in (labels, labels[::-1, :, ::-1].transpose(1, 0, 2), np.asfortranarray(labels)):
        for to_voxel in affines:
            coords = sampling.crop_coordinates(to_voxel, SIZE)[(slice(None), *window)]
            want = ndimage.map_coordinates(view, coords, order=0, mode="nearest")
            got = sampling.sample_labels(view, to_voxel, SIZE, window)
            assert got.dtype == view.dtype
            np.testing.assert_array_equal(got, want)
    empty = (slice(3, 3), slice(0, SIZE), slice(0, SIZE))
    assert sampling.sample_labels(labels, half, SIZE, empty).shape == (0, SIZE, SIZE)


def test_without_numba_the_reference_path_runs(monkeypatch):
    rng = np.random.default_rng(11)
    data = rng.integers(-1000, 1500, size=(21, 21, 21)).astype(np.int16)
    to_voxel = random_affine(rng, data.shape)
    monkeypatch.setattr(sampling, "numba", None)
    got, inside = sampling.sample_ct(data, to_voxel, SIZE, 1.0, 0.0, False)
    want, want_inside = scipy_ct(data, to_voxel, 1.0, 0.0, False)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(inside, want_inside)
