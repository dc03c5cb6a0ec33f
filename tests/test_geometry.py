"""Per-case ingest geometry: NIfTI validation, centring, orientation, video order, alignment."""

from __future__ import annotations

import gzip
import pickle
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import axcodes2ornt, ornt_transform
from nibabel.processing import resample_from_to

from vctmae.ingest.errors import IngestError
from vctmae.ingest.geometry import (
    GeometryConfig,
    LabelSchemeError,
    crop_affine,
    detect_label_scheme,
    extract_crops,
    read_ct,
    spine_tangents,
)
from vctmae.ingest.levels import VERSE_LABEL
from vctmae.ingest.nifti import Volume
from vctmae.synth.phantoms import make_phantom, phantom_images

REAL_LEVELS = {"T11": 33, "T12": 32, "L1": 31, "L2": 30}  # TotalSegmentator v2 values


# ----------------------------------------------------------------------------- helpers


def expected_frame(tangent) -> np.ndarray:
    """Crop axes in world RAS+ as columns, written out independently of the code under test."""
    down = np.asarray(tangent, float) / np.linalg.norm(tangent)
    right = np.array([1.0, 0, 0]) - down[0] * down
    right /= np.linalg.norm(right)
    posterior = np.cross(down, right)  # (0, 0, −1) × (1, 0, 0) = (0, −1, 0): posterior
    return np.stack([right, down, posterior], axis=1)


def grid_affine(centroid, tangent, spacing: float, size: int) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = expected_frame(tangent) * spacing
    affine[:3, 3] = np.asarray(centroid) - affine[:3, :3] @ np.full(3, (size - 1) / 2)
    return affine


def world_centroid(seg: nib.Nifti1Image, value: int) -> np.ndarray:
    voxels = np.argwhere(np.asanyarray(seg.dataobj) == value)
    return nib.affines.apply_affine(seg.affine, voxels).mean(axis=0)


def reorient(image: nib.Nifti1Image, codes: str) -> nib.Nifti1Image:
    """The same image stored with axis codes `codes` (the voxels are only permuted/flipped)."""
    current = nib.orientations.io_orientation(image.affine)
    return image.as_reoriented(ornt_transform(current, axcodes2ornt(tuple(codes))))


def save_pair(folder: Path, ct: nib.Nifti1Image, seg: nib.Nifti1Image) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    ct_path, seg_path = folder / "ct.nii.gz", folder / "seg.nii.gz"
    nib.save(ct, ct_path)
    nib.save(seg, seg_path)
    return ct_path, seg_path


def spine_phantom(
    centres: np.ndarray,
    levels: list[str],
    *,
    spacing=(1.0, 1.0, 1.0),
    orientation: str = "RAS",
    markers: list[tuple[np.ndarray, float]] = (),
    margin: float = 40.0,
    rotation: np.ndarray | None = None,
) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """Ellipsoid 'vertebrae' (VerSe labels, 400 HU) in 40 HU tissue, plus 2000 HU spheres.

    Drawn from world coordinates on a grid whose axes are `rotation`'s columns
    (an oblique scan; default RAS), then stored as `orientation`.
    """
    centres = np.asarray(centres, float)
    spacing = np.asarray(spacing, float)
    rotation = np.eye(3) if rotation is None else np.asarray(rotation, float)
    corners = np.array(
        np.meshgrid(*zip(centres.min(0) - margin, centres.max(0) + margin, strict=True))
    )
    local = rotation.T @ corners.reshape(3, -1)  # the box's corners in the grid's own axes
    low = local.min(axis=1)
    shape = np.ceil((local.max(axis=1) - low) / spacing).astype(int) + 1
    affine = np.eye(4)
    affine[:3, :3] = rotation * spacing
    affine[:3, 3] = rotation @ low
    x, y, z = nib.affines.apply_affine(affine, np.indices(tuple(shape)).T).T
    ct = np.full(tuple(shape), 40, np.int16)
    seg = np.zeros(tuple(shape), np.uint8)
    for centre, level in zip(centres, levels, strict=True):
        body = (
            ((x - centre[0]) / 14) ** 2 + ((y - centre[1]) / 11) ** 2 + ((z - centre[2]) / 9) ** 2
        )
        seg[body <= 1] = VERSE_LABEL[level]
        ct[body <= 1] = 400
    for position, hu in markers:
        ball = (x - position[0]) ** 2 + (y - position[1]) ** 2 + (z - position[2]) ** 2
        ct[ball <= 4.0**2] = hu
    ct_image, seg_image = nib.Nifti1Image(ct, affine), nib.Nifti1Image(seg, affine)
    return reorient(ct_image, orientation), reorient(seg_image, orientation)


LUMBAR = ["L1", "L2", "L3", "L4", "L5"]


def straight_spine(direction=(0.0, 0.0, -1.0), count: int = 5, step: float = 30.0) -> np.ndarray:
    direction = np.asarray(direction, float) / np.linalg.norm(direction)
    return np.array([10.0, -20.0, 100.0]) + step * np.arange(count)[:, None] * direction


# ----------------------------------------------------------------------------- real CT


@pytest.fixture(scope="session")
def real_ct(real_ct_dir) -> tuple[Path, Path]:
    ct, seg = real_ct_dir / "ct.nii.gz", real_ct_dir / "seg.nii.gz"
    return ct, seg


@pytest.fixture(scope="session")
def real_all(real_ct):
    return extract_crops(*real_ct, GeometryConfig(keep_truncated=True))


def test_real_ct_default_writes_only_l1(real_ct):
    case = extract_crops(*real_ct, GeometryConfig())
    assert case.scheme == "totalseg"
    assert case.source_orientation == "RAS"
    assert case.source_spacing == pytest.approx((3.0, 3.0, 3.0))
    assert [crop.level for crop in case.crops] == ["L1"]
    assert not case.crops[0].truncated
    reasons = {skip.level: skip.reason for skip in case.skipped}
    assert set(reasons) == {"T11", "T12", "L2"}
    # T11 is a 70-voxel sliver, but 70 × 27 mm³ = 1890 mm³ ≥ 1000 mm³: truncated, not a fragment.
    assert all(reason.startswith("truncated") for reason in reasons.values()), reasons


def test_real_ct_keep_truncated_writes_all_four_centred(real_ct, real_all):
    seg = nib.load(real_ct[1])
    ct = nib.load(real_ct[0])
    assert [crop.level for crop in real_all.crops] == list(REAL_LEVELS)
    assert [crop.truncated for crop in real_all.crops] == [True, True, False, True]
    for crop in real_all.crops:
        value = REAL_LEVELS[crop.level]
        assert crop.label_value == value
        assert crop.array.dtype == np.int16 and crop.array.shape == (96, 96, 96)
        assert crop.array.flags["C_CONTIGUOUS"]
        np.testing.assert_allclose(crop.centroid_world, world_centroid(seg, value), atol=1e-4)
        assert np.linalg.norm(crop.tangent) == pytest.approx(1.0)
        assert crop.tangent[2] < -0.8  # inferior, roughly along the scanner's z axis

        # Resample the label map independently (nibabel) onto a larger grid with the
        # same centre and axes: the vertebra's whole mask must sit at its centre.
        big = ((128, 128, 128), grid_affine(crop.centroid_world, crop.tangent, 1.0, 128))
        mask_image = nib.Nifti1Image(
            (np.asanyarray(seg.dataobj) == value).astype(np.uint8), seg.affine
        )
        mask = np.asanyarray(resample_from_to(mask_image, big, order=0).dataobj) > 0
        # (nearest-neighbour resampling of 3 mm voxels moves a small mask's centroid ≲ half a voxel)
        np.testing.assert_allclose(np.argwhere(mask).mean(axis=0), 63.5, atol=1.5)
        # The crop is the middle 96³ of that grid; its mask's bbox is the crop's bbox.
        assert (
            not mask[[0, -1]].any() and not mask[:, [0, -1]].any() and not mask[..., [0, -1]].any()
        )
        inner = np.argwhere(mask[16:112, 16:112, 16:112])
        x0, x1, y0, y1, z0, z1 = crop.bbox
        np.testing.assert_allclose(
            [x0, y0, z0, x1 - 1, y1 - 1, z1 - 1], [*inner.min(axis=0), *inner.max(axis=0)], atol=1
        )

        # And the CT: linear resampling by nibabel agrees wherever it has all 8 neighbours.
        grid = ((96, 96, 96), grid_affine(crop.centroid_world, crop.tangent, 1.0, 96))
        hu = np.asanyarray(resample_from_to(ct, grid, order=1, cval=-1024).dataobj)
        source = nib.affines.apply_affine(
            np.linalg.inv(ct.affine) @ grid[1], np.indices((96,) * 3).T
        ).T
        interior = np.all(
            (source >= 0) & (source <= np.reshape(ct.shape, (3, 1, 1, 1)) - 1), axis=0
        )
        assert interior.mean() > 0.4
        assert np.abs(crop.array[interior] - np.rint(hu[interior])).max() <= 1


def test_real_ct_axis_alignment_inside_fraction_and_padding(real_ct):
    case = extract_crops(*real_ct, GeometryConfig(align="axis"))
    (crop,) = case.crops
    assert crop.tangent == (0.0, 0.0, -1.0)
    # The scan is 30 × 3 mm = 90 mm tall and the crop 96 mm: about 90/96 of it is inside.
    assert crop.inside_fraction == pytest.approx(90 / 96, abs=1.5 / 96)
    # Axis 1 runs superior → inferior: the rows beyond the scan are air, at both ends.
    row_is_air = np.all(crop.array == -1024, axis=(0, 2))
    assert row_is_air.sum() == pytest.approx(96 - 90, abs=1.5)
    assert row_is_air[0] and row_is_air[-1] and not row_is_air[48]
    ct = nib.load(real_ct[0])
    grid = ((96, 96, 96), grid_affine(crop.centroid_world, (0, 0, -1), 1.0, 96))
    hu = np.rint(np.asanyarray(resample_from_to(ct, grid, order=1, cval=-1024).dataobj))
    middle = np.s_[:, 20:76, :]  # well inside the scan in z
    assert np.abs(crop.array[middle] - hu[middle]).max() <= 1


@pytest.mark.parametrize("codes", ["LPS", "SLP", "AIR"])
def test_real_ct_other_storage_orientation_gives_same_crops(real_ct, real_all, tmp_path, codes):
    ct, seg = (nib.load(path) for path in real_ct)
    moved_ct, moved_seg = reorient(ct, codes), reorient(seg, codes)
    assert "".join(nib.aff2axcodes(moved_ct.affine)) == codes
    paths = save_pair(tmp_path, moved_ct, moved_seg)
    case = extract_crops(*paths, GeometryConfig(keep_truncated=True))
    assert case.source_orientation == codes
    assert [c.level for c in case.crops] == [c.level for c in real_all.crops]
    for crop, reference in zip(case.crops, real_all.crops, strict=True):
        np.testing.assert_allclose(crop.centroid_world, reference.centroid_world, atol=1e-6)
        np.testing.assert_allclose(crop.tangent, reference.tangent, atol=1e-9)
        assert crop.inside_fraction == pytest.approx(reference.inside_fraction, abs=1e-4)
        assert np.abs(np.subtract(crop.bbox, reference.bbox)).max() <= 1
        difference = np.abs(crop.array.astype(np.int32) - reference.array)
        # Only voxels are moved, never resampled: identical but for float rounding.
        assert difference.max() <= 1 and np.count_nonzero(difference) < 20


def test_scl_slope_and_inter_are_honoured(real_ct, real_all, tmp_path):
    ct, seg = (nib.load(path) for path in real_ct)
    hu = np.asanyarray(ct.dataobj).astype(np.float64)
    stored = np.floor((hu + 1024) / 2).astype(np.int16)  # HU ≈ 2 · stored − 1024
    scaled = nib.Nifti1Image(stored, ct.affine)
    scaled.header.set_slope_inter(2.0, -1024.0)
    paths = save_pair(tmp_path, scaled, seg)
    case = extract_crops(*paths, GeometryConfig(keep_truncated=True))
    for crop, reference in zip(case.crops, real_all.crops, strict=True):
        # Integer division loses up to 1 HU per voxel; unscaled values would be ~half as large.
        assert np.abs(crop.array.astype(np.int32) - reference.array).max() <= 2


# ----------------------------------------------------------------------------- phantoms


def marker_positions(centre, frame, distance_lr=25.0, distance_ap=25.0, distance_si=15.0):
    """World positions of the Right, Anterior and Superior markers of one vertebra."""
    right, down, posterior = frame.T
    return [
        centre + distance_lr * right,
        centre - distance_ap * posterior,
        centre - distance_si * down,
    ]


def assert_markers_in_video_order(crop: np.ndarray, spacing: float) -> None:
    """Right → high axis 0, superior → low axis 1, anterior → low axis 2; mirrors are tissue."""
    centre = (crop.shape[0] - 1) / 2
    offsets = {
        "right": np.array([25.0, 0, 0]),
        "superior": np.array([0, -15.0, 0]),
        "anterior": np.array([0, 0, -25.0]),
    }
    for name, offset in offsets.items():
        here = tuple(np.rint(centre + offset / spacing).astype(int))
        mirror = tuple(np.rint(centre - offset / spacing).astype(int))
        assert crop[here] > 1500, f"{name} marker missing at crop index {here}"
        assert crop[mirror] < 500, f"{name} marker mirrored to crop index {mirror}"


@pytest.mark.parametrize(
    ("codes", "spacing", "out_spacing"),
    [
        ("RAS", (1.0, 1.0, 1.0), 1.0),
        ("LPS", (0.8, 0.8, 1.5), 1.0),
        ("PIR", (1.3, 0.7, 1.1), 0.8),
        ("SLA", (1.5, 1.2, 0.9), 1.25),
    ],
)
def test_phantom_video_order_and_centring(tmp_path, codes, spacing, out_spacing):
    centres = straight_spine()
    middle = centres[2]
    markers = [(p, 2000.0) for p in marker_positions(middle, expected_frame((0, 0, -1)))]
    ct, seg = spine_phantom(centres, LUMBAR, spacing=spacing, orientation=codes, markers=markers)
    paths = save_pair(tmp_path, ct, seg)
    config = GeometryConfig(spacing=out_spacing, size=64, levels=frozenset({"L3"}))
    case = extract_crops(*paths, config)
    assert case.scheme == "verse" and case.source_orientation == codes
    (crop,) = case.crops
    assert crop.level == "L3" and crop.label_value == VERSE_LABEL["L3"]
    assert [(s.level, s.reason) for s in case.skipped] == [
        (level, "level outside --levels") for level in ["L1", "L2", "L4", "L5"]
    ]
    np.testing.assert_allclose(crop.centroid_world, middle, atol=0.3)
    np.testing.assert_allclose(crop.tangent, (0, 0, -1), atol=1e-3)  # a straight vertical spine
    assert crop.inside_fraction == 1.0
    assert_markers_in_video_order(crop.array, out_spacing)
    # The vertebra (radii 14, 9, 11 mm along axes 0, 1, 2) sits in the middle of the crop.
    x0, x1, y0, y1, z0, z1 = crop.bbox
    for low, high, radius in ((x0, x1, 14), (y0, y1, 9), (z0, z1, 11)):
        assert (low + high - 1) / 2 == pytest.approx(31.5, abs=0.6)
        assert (high - low) * out_spacing == pytest.approx(2 * radius, abs=2 * out_spacing + 0.5)


def test_phantom_tilted_spine_is_aligned_by_the_spline(tmp_path):
    direction = np.array([0.25, 0.35, -1.0])
    direction /= np.linalg.norm(direction)
    centres = straight_spine(direction)
    frame = expected_frame(direction)
    markers = [(p, 2000.0) for p in marker_positions(centres[2], frame)]
    ct, seg = spine_phantom(
        centres, LUMBAR, spacing=(1.2, 1.0, 1.4), orientation="LPS", markers=markers
    )
    paths = save_pair(tmp_path, ct, seg)
    case = extract_crops(*paths, GeometryConfig(size=64))  # auto: 5 vertebrae → spline
    assert [crop.level for crop in case.crops] == LUMBAR
    for crop in case.crops:
        angle = np.degrees(np.arccos(np.clip(np.dot(crop.tangent, direction), -1, 1)))
        assert angle < 1.0, (crop.level, crop.tangent)
    # In the aligned crop the markers placed in the spine's own frame land where
    # they would for an upright spine.
    assert_markers_in_video_order(case.crops[2].array, 1.0)
    # crop_affine maps the crop centre to the centroid along the same frame.
    affine = crop_affine(case.crops[2].centroid_world, case.crops[2].tangent, 1.0, 64)
    np.testing.assert_allclose(affine[:3, :3], expected_frame(case.crops[2].tangent), atol=1e-9)
    np.testing.assert_allclose(
        affine[:3, :3] @ np.full(3, 31.5) + affine[:3, 3], case.crops[2].centroid_world
    )
    # axis alignment ignores the tilt.
    axis = extract_crops(*paths, GeometryConfig(size=64, align="axis", levels=frozenset({"L3"})))
    assert axis.crops[0].tangent == (0.0, 0.0, -1.0)


def test_phantom_oblique_scan(tmp_path):
    """A scan whose voxel axes are rotated against the patient still gives upright crops."""
    turn_z, turn_x = np.radians(25), np.radians(-15)
    rotation = np.array(
        [[np.cos(turn_z), -np.sin(turn_z), 0], [np.sin(turn_z), np.cos(turn_z), 0], [0, 0, 1]]
    ) @ np.array(
        [[1, 0, 0], [0, np.cos(turn_x), -np.sin(turn_x)], [0, np.sin(turn_x), np.cos(turn_x)]]
    )
    centres = straight_spine(count=3)
    markers = [(p, 2000.0) for p in marker_positions(centres[1], expected_frame((0, 0, -1)))]
    ct, seg = spine_phantom(
        centres,
        LUMBAR[:3],
        spacing=(1.2, 1.4, 1.3),
        markers=markers,
        rotation=rotation,
        orientation="PSL",
        margin=32,
    )
    assert "".join(nib.aff2axcodes(ct.affine)) == "PSL"
    paths = save_pair(tmp_path, ct, seg)
    case = extract_crops(*paths, GeometryConfig(size=64, levels=frozenset({"L2"})))
    (crop,) = case.crops
    np.testing.assert_allclose(crop.centroid_world, centres[1], atol=0.3)
    np.testing.assert_allclose(crop.tangent, (0, 0, -1), atol=0.01)
    assert_markers_in_video_order(crop.array, 1.0)


def assert_matches_nibabel_resampling(crop, ct: nib.Nifti1Image, seg: nib.Nifti1Image) -> None:
    """The crop equals nibabel's own resampling on the crop grid; its mask sits at the centre."""
    size = crop.array.shape[0]
    grid = (crop.array.shape, grid_affine(crop.centroid_world, crop.tangent, 1.0, size))
    hu = np.asanyarray(resample_from_to(ct, grid, order=1, cval=-1024).dataobj)
    source = nib.affines.apply_affine(
        np.linalg.inv(ct.affine) @ grid[1], np.indices(crop.array.shape).T
    ).T
    interior = np.all((source >= 0) & (source <= np.reshape(ct.shape, (3, 1, 1, 1)) - 1), axis=0)
    assert interior.mean() > 0.4
    assert np.abs(crop.array[interior] - np.rint(hu[interior])).max() <= 1
    mask_image = nib.Nifti1Image(
        (np.asanyarray(seg.dataobj) == crop.label_value).astype(np.uint8), seg.affine
    )
    mask = np.asanyarray(resample_from_to(mask_image, grid, order=0).dataobj) > 0
    inner = np.argwhere(mask)
    x0, x1, y0, y1, z0, z1 = crop.bbox
    np.testing.assert_allclose(
        [x0, y0, z0, x1 - 1, y1 - 1, z1 - 1], [*inner.min(axis=0), *inner.max(axis=0)], atol=1
    )


@pytest.mark.parametrize(
    ("orientation", "spacing"), [("LPS", (0.8, 0.8, 1.5)), ("PIR", (1.3, 1.3, 1.3))]
)
def test_synth_phantom_crops(tmp_path, orientation, spacing):
    phantom = make_phantom(5, orientation=orientation, spacing=spacing)
    ct, seg = phantom_images(phantom)
    paths = save_pair(tmp_path, ct, seg)
    case = extract_crops(*paths, GeometryConfig(size=80))
    assert case.scheme == "verse" and case.source_orientation == orientation
    assert case.source_spacing == pytest.approx(spacing)
    assert sorted([c.level for c in case.crops] + [s.level for s in case.skipped]) == sorted(
        phantom.levels
    )
    assert len(case.crops) >= 3
    for crop in case.crops:
        np.testing.assert_allclose(
            crop.centroid_world, world_centroid(seg, crop.label_value), atol=1e-4
        )
        assert crop.tangent[2] < -0.9  # a gently curved spine, head to feet along −z
    assert_matches_nibabel_resampling(case.crops[len(case.crops) // 2], ct, seg)


def curved_spine(count: int, radius: float, step: float = 30.0) -> tuple[np.ndarray, np.ndarray]:
    """Centroids on a circle arc (plus a slight lateral drift) and the true unit tangents."""
    arclength = step * np.arange(count)
    angle = arclength / radius
    points = np.stack([0.1 * arclength, radius * (1 - np.cos(angle)), -radius * np.sin(angle)], 1)
    truth = np.stack([np.full_like(angle, 0.1), np.sin(angle), -np.cos(angle)], axis=1)
    return points, truth / np.linalg.norm(truth, axis=1, keepdims=True)


def angles_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.degrees(np.arccos(np.clip(np.sum(a * b, axis=-1), -1, 1)))


@pytest.mark.parametrize("count", [3, 5, 8, 24])
def test_spline_tangents_follow_a_curved_spine(count):
    # Lumbar lordosis is roughly an arc of radius ~150–250 mm, vertebrae ~30 mm apart.
    for radius in (150.0, 250.0):
        points, truth = curved_spine(count, radius)
        assert angles_deg(spine_tangents(points), truth).max() < 1.5
    # Centroid noise of 0.5 mm tilts the tangents by a few degrees at most (worst at the ends).
    points, truth = curved_spine(count, 200.0)
    rng = np.random.default_rng(count)
    noisy = spine_tangents(points + rng.normal(0, 0.5, points.shape))
    assert angles_deg(noisy, truth).max() < (10.0 if count == 3 else 5.0)


def test_spline_tangents_few_points_and_untrusted_centroids():
    points, truth = curved_spine(5, 200.0)
    two = spine_tangents(points[:2])
    np.testing.assert_allclose(
        two[0], (points[1] - points[0]) / np.linalg.norm(points[1] - points[0])
    )
    np.testing.assert_allclose(spine_tangents(points[:1]), [[0, 0, -1]])
    # A truncated sliver with a wild centroid (low weight) barely moves the curve.
    wild = points.copy()
    wild[0] += (0, -40, 10)
    assert angles_deg(spine_tangents(wild)[1], truth[1]) > 10  # trusted fully, it would
    trusted = spine_tangents(wild, np.array([0.05, 1, 1, 1, 1]))
    assert angles_deg(trusted[1:], truth[1:]).max() < 2.5


def test_fragment_and_truncated_rules(tmp_path):
    centres = straight_spine(count=3)
    ct, seg = spine_phantom(centres, ["L1", "L2", "L3"], spacing=(1.0, 1.0, 1.0), margin=35)
    data = np.asanyarray(seg.dataobj).copy()
    data[2:6, 2:6, 2:6] = VERSE_LABEL["L5"]  # 64 mm³, touching no border: a fragment
    data[40:50, 30:40, 0:8] = VERSE_LABEL["L4"]  # 800 mm³ at the border: fragment beats truncated
    data[0:12, 30:45, 60:75] = VERSE_LABEL["T12"]  # 2700 mm³ touching the first x slice
    paths = save_pair(tmp_path, ct, nib.Nifti1Image(data, seg.affine))
    case = extract_crops(*paths, GeometryConfig(size=32))
    reasons = {skip.level: skip.reason for skip in case.skipped}
    assert reasons == {
        "L4": "fragment: 800 mm³ < 1000 mm³",
        "L5": "fragment: 64 mm³ < 1000 mm³",
        "T12": "truncated: mask touches the scan border",
    }
    assert [crop.level for crop in case.crops] == ["L1", "L2", "L3"]
    kept = extract_crops(*paths, GeometryConfig(size=32, keep_truncated=True, min_fragment_mm3=500))
    assert [(c.level, c.truncated) for c in kept.crops] == [
        ("T12", True),
        ("L1", False),
        ("L2", False),
        ("L3", False),
        ("L4", True),
    ]
    assert {s.level for s in kept.skipped} == {"L5"}


# ----------------------------------------------------------------------------- label schemes


def test_label_scheme_detection_rule():
    assert detect_label_scheme({20, 21, 22}) == "verse"
    # T1, T12, T13 in VerSe; TotalSegmentator's L4 among two organs: both read, so neither.
    with pytest.raises(LabelSchemeError, match="ambiguous.*T1, T12, T13 in VerSe, but L4"):
        detect_label_scheme({8, 19, 28})
    assert (
        detect_label_scheme({1, 5, 18, 30, 31, 32, 33, 52, 117}) == "totalseg"
    )  # organs + vertebrae
    assert detect_label_scheme({27}) == "totalseg"  # L5
    assert detect_label_scheme({26, 27}) == "totalseg"


def test_label_scheme_is_decided_from_the_whole_label_set():
    # Mask volumes in mm³. A stray voxel of a value VerSe never uses is no evidence …
    eight_verse = {value: 30_000.0 for value in range(13, 21)}
    assert detect_label_scheme({**eight_verse, 35: 1.0}, min_volume_mm3=1000) == "verse"
    # … a vertebra-sized mask of one is.
    assert detect_label_scheme({**eight_verse, 35: 30_000.0}, min_volume_mm3=1000) == "totalseg"
    # VerSe's sacrum (26) and coccyx (27) below L5 read as VerSe, and 27 as TotalSegmentator's
    # L5 beside organs and S1: the set supports both schemes, so it names no level.
    for ambiguous in ({22, 23, 24, 26, 27}, {19, 28}, {28, 20}):
        with pytest.raises(LabelSchemeError, match="--label-scheme verse or --label-scheme"):
            detect_label_scheme(ambiguous)
    # VerSe's T13 (28) lies between T12 (19) and L1 (20); a lone 28 is TotalSegmentator's L4.
    assert detect_label_scheme({28}) == "totalseg"
    assert detect_label_scheme({28: 40_000.0, 21: 300_000.0}) == "totalseg"  # L4 + bladder
    # A coccyx (27) without a sacrum (26), a sacrum without L5 or L6 are no VerSe map.
    assert detect_label_scheme({20, 21, 27}) == detect_label_scheme({20, 26, 27}) == "totalseg"
    # A lone L6 (25) is no VerSe map, nor a TotalSegmentator one (its sacrum): neither fits.
    with pytest.raises(LabelSchemeError, match=r"either scheme supports.*25 \(L6\) without 24"):
        detect_label_scheme({25})
    # Values above 50 are a vertebra in no scheme: never evidence, whatever their size.
    assert detect_label_scheme({**eight_verse, 100: 30_000.0}, min_volume_mm3=1000) == "verse"
    # Nothing reaches the evidence threshold: every label counts.
    assert detect_label_scheme({35: 1.0, 20: 2.0}, min_volume_mm3=1000) == "totalseg"


def test_a_stray_voxel_and_a_lone_28_on_phantom_maps(tmp_path):
    ct, seg = spine_phantom(straight_spine(count=3), ["L1", "L2", "L3"], margin=30)
    data = np.asanyarray(seg.dataobj).copy()
    data[20, 20, 20] = 35  # a stray voxel in the soft tissue
    assert data[19:22, 19:22, 19:22].sum() == 35
    case = extract_crops(*save_pair(tmp_path / "stray", ct, nib.Nifti1Image(data, seg.affine)))
    assert case.scheme == "verse" and [c.level for c in case.crops] == ["L1", "L2", "L3"]
    assert case.other_labels == {35: 1}

    ct, seg = spine_phantom(straight_spine(count=1), ["T13"], margin=30)  # value 28 alone
    case = extract_crops(*save_pair(tmp_path / "lone", ct, seg), GeometryConfig(size=32))
    assert case.scheme == "totalseg" and [c.level for c in case.crops] == ["L4"]


def relabel(seg: nib.Nifti1Image, values: dict[int, int]) -> nib.Nifti1Image:
    """`seg` with its label values replaced as `values` says (all at once)."""
    data = np.asanyarray(seg.dataobj)
    out = data.copy()
    for old, new in values.items():
        out[data == old] = new
    return nib.Nifti1Image(out, seg.affine)


def with_blob(
    seg: nib.Nifti1Image, world: np.ndarray, value: int, half: int = 6
) -> nib.Nifti1Image:
    """`seg` with a cube of `value`, (2·half)³ voxels, centred at `world` (RAS mm)."""
    data = np.asanyarray(seg.dataobj).copy()
    centre = np.rint(nib.affines.apply_affine(np.linalg.inv(seg.affine), world)).astype(int)
    box = tuple(slice(c - half, c + half) for c in centre)
    assert not data[box].any()  # clear of the vertebrae
    data[box] = value
    return nib.Nifti1Image(data, seg.affine)


def test_a_totalsegmentator_sacrum_s1_and_l5_are_not_verse_l6(tmp_path):
    # TotalSegmentator's L5 (27) above S1 (26) above the sacrum (25): VerSe would call the
    # sacrum "L6" — an L6 without an L5 — and miss L5.
    ct, seg = spine_phantom(straight_spine(count=3), ["L3", "L4", "L5"], margin=30)
    seg = relabel(seg, {VERSE_LABEL["L3"]: 27, VERSE_LABEL["L4"]: 26, VERSE_LABEL["L5"]: 25})
    case = extract_crops(*save_pair(tmp_path, ct, seg), GeometryConfig(size=32))
    assert case.scheme == "totalseg" and [c.level for c in case.crops] == ["L5"]
    assert sorted(case.other_labels) == [25, 26] and not case.skipped


def test_a_verse_t13_beside_an_unused_value_is_ambiguous_and_named(tmp_path):
    centres = straight_spine(count=3)
    ct, seg = spine_phantom(centres, ["T12", "T13", "L1"], margin=40)
    seg = with_blob(seg, centres[0] + [25.0, 0, 0], 100)  # 1728 mm³ of a value no scheme uses
    paths = save_pair(tmp_path, ct, seg)
    with pytest.raises(IngestError) as error:
        extract_crops(*paths, GeometryConfig(size=32))
    assert error.value.path == paths[1]
    problem = error.value.problem
    assert "values 19, 20, 28 are T12, L1, T13 in VerSe" in problem
    assert "but L4 beside organs in TotalSegmentator" in problem
    assert "--label-scheme verse or --label-scheme totalseg" in problem
    assert "100: 1728 voxels" in problem
    told = extract_crops(*paths, GeometryConfig(size=32, label_scheme="verse"))
    assert [c.level for c in told.crops] == ["T12", "T13", "L1"]
    assert told.other_labels == {100: 1728}


def test_a_verse_map_beside_an_unused_value_stays_verse(tmp_path):
    centres = straight_spine(count=3)
    ct, seg = spine_phantom(centres, ["T12", "L1", "L2"], margin=40)
    seg = with_blob(seg, centres[0] + [25.0, 0, 0], 100)
    case = extract_crops(*save_pair(tmp_path, ct, seg), GeometryConfig(size=32))
    assert case.scheme == "verse" and [c.level for c in case.crops] == ["T12", "L1", "L2"]
    assert case.other_labels == {100: 1728} and not case.skipped


def test_a_binary_mask_is_no_c1(tmp_path):
    ct, seg = spine_phantom(straight_spine(count=3), ["L1", "L2", "L3"], margin=30)
    mask = nib.Nifti1Image((np.asanyarray(seg.dataobj) > 0).astype(np.uint8), seg.affine)
    paths = save_pair(tmp_path, ct, mask)
    with pytest.raises(IngestError) as error:
        extract_crops(*paths, GeometryConfig(size=32))
    assert error.value.path == paths[1]
    assert "only the value 1: a binary mask names no vertebra" in error.value.problem
    assert "--label-scheme verse" in error.value.problem


def test_forced_scheme_and_levels_on_a_totalseg_map(real_ct):
    case = extract_crops(
        *real_ct, GeometryConfig(label_scheme="totalseg", levels=frozenset({"T12", "L1"}))
    )
    assert [c.level for c in case.crops] == ["L1"]
    reasons = {s.level: s.reason for s in case.skipped}
    assert reasons["L2"] == reasons["T11"] == "level outside --levels"
    assert reasons["T12"].startswith("truncated")


def test_geometry_config_refuses_bad_values():
    with pytest.raises(ValueError):
        GeometryConfig(spacing=0)
    with pytest.raises(ValueError):
        GeometryConfig(align="curvy")
    with pytest.raises(ValueError):
        GeometryConfig(label_scheme="nnunet")
    with pytest.raises(ValueError):
        GeometryConfig(levels=frozenset({"X9"}))
    with pytest.raises(TypeError):
        GeometryConfig(1.0)  # keyword-only


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="session")
def small_pair() -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    return spine_phantom(straight_spine(count=3), ["L1", "L2", "L3"], margin=30)


def assert_names(error: pytest.ExceptionInfo, path: Path, words: str) -> None:
    assert error.value.path == path
    assert str(error.value).startswith(f"{path}: ")
    assert words in error.value.problem, error.value.problem


def test_missing_or_unreadable_scans_are_refused_by_name(tmp_path, small_pair, real_ct):
    ct_path, seg_path = save_pair(tmp_path / "good", *small_pair)
    cases = {
        "missing.nii.gz": (None, "file not found"),
        "garbage.nii.gz": (b"this is not a scan" * 50, "not a NIfTI"),
        "plain.txt": (b"hello", "not a NIfTI"),
        "garbage.nii": (b"\0" * 400, "NIfTI"),
        "truncated.nii.gz": (real_ct[0].read_bytes()[:30_000], "truncated"),
    }
    for name, (content, words) in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(IngestError) as error:
            extract_crops(path, seg_path)
        assert_names(error, path, words)
        with pytest.raises(IngestError) as error:
            extract_crops(ct_path, path)
        assert_names(error, path, words)


def test_truncated_uncompressed_file(tmp_path, small_pair):
    ct_path = tmp_path / "ct.nii"
    nib.save(small_pair[0], ct_path)
    ct_path.write_bytes(ct_path.read_bytes()[:5000])
    seg_path = tmp_path / "seg.nii.gz"
    nib.save(small_pair[1], seg_path)
    with pytest.raises(IngestError) as error:
        extract_crops(ct_path, seg_path)
    assert error.value.path == ct_path


def test_bad_shapes_affines_and_values(tmp_path, small_pair):
    ct, seg = small_pair
    ct_data, seg_data = np.asanyarray(ct.dataobj), np.asanyarray(seg.dataobj)
    good_ct, good_seg = save_pair(tmp_path / "good", ct, seg)

    def write(name: str, data: np.ndarray, affine=ct.affine) -> Path:
        path = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data, affine), path)
        return path

    # A trailing singleton 4th axis is fine; two volumes are not.
    fine = extract_crops(write("ct4d", ct_data[..., None]), write("seg4d", seg_data[..., None]))
    assert [c.level for c in fine.crops] == ["L1", "L2", "L3"]
    bad = {
        "two volumes": (
            write("ct2vol", np.stack([ct_data, ct_data], -1)),
            good_seg,
            "not a 3-D image",
        ),
        "2-D": (write("ct2d", ct_data[:, :, 0]), good_seg, "not a 3-D image"),
        "shape": (good_ct, write("segshape", seg_data[:-1]), "shape"),
        "affine": (
            good_ct,
            write("segshift", seg_data, ct.affine + np.pad([[0.0, 0, 0, 0.5]], ((2, 1), (0, 0)))),
            "voxel centres lie up to 0.5 mm apart",
        ),
        "empty": (good_ct, write("segempty", np.zeros_like(seg_data)), "no vertebra labels"),
        "organs only": (
            good_ct,
            write("segorgans", (seg_data > 0).astype(np.uint8) * 60),
            "no vertebra",
        ),
    }
    nan_ct = ct_data.astype(np.float32)
    nan_ct[5, 5, 5] = np.nan
    nan_ct[6, 6, 6] = np.inf
    bad["nan"] = (write("ctnan", nan_ct), good_seg, "2 NaN/inf")
    float_seg = seg_data.astype(np.float32) + 0.4
    bad["float labels"] = (good_ct, write("segfloat", float_seg), "non-integer")
    for label, (ct_path, seg_path, words) in bad.items():
        with pytest.raises(IngestError) as error:
            extract_crops(ct_path, seg_path)
        culprit = seg_path if ct_path == good_ct else ct_path
        assert error.value.path == culprit, label
        assert words in error.value.problem, (label, error.value.problem)


def test_a_jittered_dicom_series_is_measured_against_its_label_map_in_world_space(tmp_path):
    from dicom_series import FLIP_XY, write_series

    ct, seg = spine_phantom(straight_spine(count=1), ["L1"], margin=20)
    stored = reorient(ct, "LPS")
    volume = Volume(path=Path("ct"), data=np.asanyarray(stored.dataobj), affine=stored.affine)
    lps = FLIP_XY @ volume.affine
    count = volume.data.shape[2]
    # Every slice up to 5 % of the slice step off its place along the stack.
    jitter = np.random.default_rng(3).uniform(-0.05, 0.05, count)
    positions = lps[:3, 3] + np.outer(np.arange(count) + jitter, lps[:3, 2])
    series = tmp_path / "series"
    write_series(series, volume, positions=positions)
    seg_path = tmp_path / "seg.nii.gz"
    nib.save(seg, seg_path)  # stored RAS: other axes than the series
    read = read_ct(series)
    # Expected: each corner voxel of the CT against the label map's voxel nearest to it.
    corners = np.array(np.meshgrid(*[(0, n - 1) for n in read.data.shape])).reshape(3, -1).T
    world = nib.affines.apply_affine(read.affine, corners)
    nearest = np.rint(nib.affines.apply_affine(np.linalg.inv(seg.affine), world))
    expected = np.linalg.norm(nib.affines.apply_affine(seg.affine, nearest) - world, axis=1).max()
    assert 0.001 < expected <= 0.05 + 1e-6  # 1 mm slices, each at most 0.05 mm off
    with pytest.raises(IngestError) as error:
        extract_crops(series, seg_path)
    assert error.value.path == seg_path
    match = re.search(r"voxel centres lie up to ([0-9.e-]+) mm apart", error.value.problem)
    assert match, error.value.problem
    assert float(match.group(1)) == pytest.approx(expected, rel=1e-3)


def test_ingest_error_pickles_and_formats(tmp_path):
    error = IngestError(tmp_path / "x.nii.gz", "CT contains 3 NaN/inf voxels")
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy, IngestError)
    assert copy.path == error.path and copy.problem == error.problem
    assert str(copy) == f"{tmp_path / 'x.nii.gz'}: CT contains 3 NaN/inf voxels"


def test_gzip_of_non_nifti_is_rejected(tmp_path, small_pair):
    path = tmp_path / "notnifti.nii.gz"
    path.write_bytes(gzip.compress(b"x" * 1000))
    good = save_pair(tmp_path / "good", *small_pair)
    with pytest.raises(IngestError) as error:
        extract_crops(path, good[1])
    assert error.value.path == path
