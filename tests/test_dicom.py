"""DICOM CT series input: the test writes each series itself with pydicom.

The main check writes a phantom NIfTI as a DICOM series the way a scanner
would (LPS, one file per slice, int16 stored values with rescale intercept
−1024, file names and InstanceNumbers in shuffled order) and reads it back:
voxels and affine must equal the NIfTI's. The refusal tests use a few slices of
small random images.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from dicom_series import FLIP_XY, make_uid, small_volume, write_series
from helpers import load_ct, load_labels, reorient
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGLosslessSV1,
    MediaStorageDirectoryStorage,
)

from vctmae.errors import VctmaeError
from vctmae.ingest.dicom import is_dicom_series_folder, load_dicom_ct
from vctmae.ingest.errors import IngestError
from vctmae.ingest.geometry import GeometryConfig, extract_crops
from vctmae.ingest.nifti import Volume
from vctmae.synth import SynthConfig
from vctmae.synth.phantoms import write_phantoms

# The DICOM files store rint(HU) as int16 and the phantom's HU are integers, so
# reading back may differ only by that rounding: at most half a HU.
HU_TOLERANCE = 0.5
# Positions and directions are written as decimal strings with 6 decimals.
AFFINE_TOLERANCE_MM = 1e-3


def write_dicomdir_like(path: Path) -> None:
    """A DICOM file that is no image (a DICOMDIR's SOP class): must be ignored."""
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = MediaStorageDirectoryStorage
    dataset.file_meta.MediaStorageSOPInstanceUID = make_uid("dicomdir", path)
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.FileSetID = "PHANTOM"
    dataset.save_as(path, enforce_file_format=True)


def assert_same_volume(dicom: Volume, reference: Volume, codes: str = "RAS") -> None:
    a, b = reorient(dicom, codes), reorient(reference, codes)
    assert a.data.shape == b.data.shape
    np.testing.assert_allclose(a.affine, b.affine, rtol=0, atol=AFFINE_TOLERANCE_MM)
    np.testing.assert_allclose(a.data, b.data, rtol=0, atol=HU_TOLERANCE)


def refusal(folder: Path, **kwargs) -> str:
    with pytest.raises(IngestError) as caught:
        load_dicom_ct(folder, **kwargs)
    message = str(caught.value)
    assert message.startswith(f"{folder}: ") and "\n" not in message
    return message


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> tuple[Volume, Path]:
    """A phantom NIfTI CT and the same scan written as a DICOM series (plus files to ignore)."""
    root = tmp_path_factory.mktemp("dicom-phantom")
    write_phantoms(SynthConfig(out=root / "raw", cases=1, seed=5))
    nifti = load_ct(root / "raw" / "ct" / "case000.nii.gz")
    folder = root / "series"
    write_series(folder, reorient(nifti, "LPS"), series=make_uid("phantom"))
    (folder / "README").write_text("exported by the test\n")
    write_dicomdir_like(folder / "DICOMDIR")
    (folder / "notes").mkdir()
    return nifti, folder


def test_phantom_series_equals_its_nifti(phantom):
    nifti, folder = phantom
    assert nifti.orientation != "LPS"  # the NIfTI is stored otherwise: reorient is exercised
    dicom = load_dicom_ct(folder)
    assert dicom.path == folder
    assert dicom.data.dtype == np.float32
    assert dicom.orientation == "LPS"
    assert dicom.data.shape == reorient(nifti, "LPS").data.shape
    for codes in ("RAS", "LPS", "RIP"):
        assert_same_volume(dicom, nifti, codes)


def test_phantom_series_world_positions_of_voxels(phantom):
    # Independent of `reorient`: a voxel of the NIfTI sits, with the same HU, at the
    # DICOM voxel whose world position (through the DICOM affine) is the same.
    nifti, folder = phantom
    dicom = load_dicom_ct(folder)
    rng = np.random.default_rng(1)
    to_dicom_voxel = np.linalg.inv(dicom.affine) @ nifti.affine
    for index in zip(*(rng.integers(0, n, size=25) for n in nifti.data.shape), strict=True):
        target = to_dicom_voxel[:3, :3] @ np.array(index) + to_dicom_voxel[:3, 3]
        nearest = np.rint(target).astype(int)
        # Within 1e-3 mm at a voxel size ≥ 0.5 mm: the voxel centres coincide.
        assert np.max(np.abs(target - nearest)) < 2e-3
        assert abs(dicom.data[tuple(nearest)] - nifti.data[index]) <= HU_TOLERANCE


def test_real_ct_round_trip(real_ct_dir, tmp_path):
    nifti = load_ct(real_ct_dir / "ct.nii.gz")
    folder = tmp_path / "real"
    write_series(folder, reorient(nifti, "LPS"), series=make_uid("real"))
    assert_same_volume(load_dicom_ct(folder), nifti)


def test_oblique_series_affine_matches_the_dicom_formula(tmp_path):
    # Rotated about two axes: the affine must follow the DICOM pixel-position formula.
    angle_z, angle_x = np.radians(30.0), np.radians(12.0)
    rotate_z = np.array(
        [[np.cos(angle_z), -np.sin(angle_z), 0], [np.sin(angle_z), np.cos(angle_z), 0], [0, 0, 1]]
    )
    rotate_x = np.array(
        [[1, 0, 0], [0, np.cos(angle_x), -np.sin(angle_x)], [0, np.sin(angle_x), np.cos(angle_x)]]
    )
    spacing = np.array([0.6, 0.9, 1.5])
    volume = small_volume((9, 6, 5), seed=3)
    affine = np.eye(4)
    affine[:3, :3] = rotate_x @ rotate_z @ np.diag(spacing)
    affine[:3, 3] = (-20.0, 35.0, 110.0)
    volume = Volume(path=volume.path, data=volume.data, affine=affine)
    paths = write_series(tmp_path, volume, seed=4)
    loaded = load_dicom_ct(tmp_path)
    for path in paths[::2]:
        header = pydicom.dcmread(path)
        row_direction = np.array(header.ImageOrientationPatient[:3], dtype=float)
        column_direction = np.array(header.ImageOrientationPatient[3:], dtype=float)
        position = np.array(header.ImagePositionPatient, dtype=float)
        row_spacing, column_spacing = (float(v) for v in header.PixelSpacing)
        pixels = header.pixel_array * float(header.RescaleSlope) + float(header.RescaleIntercept)
        # Which slice of the volume is this file? The one whose origin is its position.
        origins = loaded.affine[:3, :3] @ np.stack(
            [np.zeros(loaded.data.shape[2]), np.zeros(loaded.data.shape[2]),
             np.arange(loaded.data.shape[2])]
        ) + loaded.affine[:3, 3:4]  # fmt: skip
        k = int(np.argmin(np.linalg.norm(origins.T - FLIP_XY[:3, :3] @ position, axis=1)))
        for row, column in ((0, 0), (5, 8), (2, 3)):
            world_lps = (
                position
                + column * column_spacing * row_direction
                + row * row_spacing * column_direction
            )
            world_ras = FLIP_XY[:3, :3] @ world_lps
            np.testing.assert_allclose(
                loaded.affine[:3, :3] @ (column, row, k) + loaded.affine[:3, 3],
                world_ras,
                atol=AFFINE_TOLERANCE_MM,
            )
            assert loaded.data[column, row, k] == pixels[row, column]


def test_rescale_applied_per_slice(tmp_path):
    volume = small_volume((6, 4, 5), seed=2)
    rescale = [(1.0, -1024.0), (0.5, -3000.0), (0.25, 100.0), (1.0, 0.0), (2.0, -2048.0)]
    # Slope 2 stores half the HU: keep that slice's HU even so that it is exact.
    volume.data[:, :, 4] = 2 * np.floor(volume.data[:, :, 4] / 2)
    write_series(tmp_path, volume, rescale=rescale)
    assert_same_volume(load_dicom_ct(tmp_path), volume)


def test_two_series_largest_chosen_or_by_uid(tmp_path):
    big, small = small_volume((5, 4, 6), seed=1), small_volume((3, 3, 4), seed=2)
    write_series(tmp_path, big, series="1.2.3.6")
    write_series(tmp_path, small, series="1.2.3.4")
    assert_same_volume(load_dicom_ct(tmp_path), big)
    assert_same_volume(load_dicom_ct(tmp_path, series_uid="1.2.3.4"), small)
    message = refusal(tmp_path, series_uid="9.9.9")
    assert "no series 9.9.9" in message
    assert '1.2.3.6 (CT, 6 slices, "test series")' in message and "1.2.3.4 (CT, 4 slices" in message


def test_tied_ct_series_need_a_uid(tmp_path):
    write_series(tmp_path, small_volume(seed=1), series="1.2.3.1")
    write_series(tmp_path, small_volume(seed=2), series="1.2.3.2")
    message = refusal(tmp_path)
    assert "2 CT series have 6 slices each" in message and "--series" in message
    assert "1.2.3.1" in message and "1.2.3.2" in message
    assert_same_volume(load_dicom_ct(tmp_path, series_uid="1.2.3.2"), small_volume(seed=2))


def test_non_ct_refused_and_ct_preferred(tmp_path):
    mr_only = tmp_path / "mr"
    write_series(mr_only, small_volume(seed=1), series="1.2.5", modality="MR")
    assert "not CT" in refusal(mr_only) and "1.2.5 (MR, 6 slices" in refusal(mr_only)
    # With a larger MR series beside it, the CT series is still the one read.
    mixed = tmp_path / "mixed"
    write_series(mixed, small_volume((4, 4, 8), seed=1), series="1.2.5", modality="MR")
    write_series(mixed, small_volume(seed=2), series="1.2.6")
    assert_same_volume(load_dicom_ct(mixed), small_volume(seed=2))
    assert "is not CT" in refusal(mixed, series_uid="1.2.5")


def test_missing_slice_refused_as_uneven_spacing(tmp_path):
    paths = write_series(tmp_path, small_volume(seed=1))
    load_dicom_ct(tmp_path)
    paths[2].unlink()
    message = refusal(tmp_path)
    assert "uneven slice spacing" in message and "2.500–5.000 mm" in message


def test_rounded_positions_accepted(tmp_path):
    # Positions off by up to 0.02 mm (0.01 mm rounding, twice over) are still a regular stack.
    volume = small_volume(seed=1)
    lps = FLIP_XY @ volume.affine
    count = volume.data.shape[2]
    exact = lps[:3, 3] + np.outer(np.arange(count), lps[:3, 2])
    jitter = np.random.default_rng(0).uniform(-0.02, 0.02, size=exact.shape)
    write_series(tmp_path, volume, positions=exact + jitter)
    loaded = load_dicom_ct(tmp_path)
    np.testing.assert_allclose(reorient(loaded, "RAS").data, reorient(volume, "RAS").data)


def test_gantry_tilt_refused(tmp_path):
    volume = small_volume(seed=1)
    lps = FLIP_XY @ volume.affine
    count = volume.data.shape[2]
    positions = lps[:3, 3] + np.outer(np.arange(count), lps[:3, 2])
    # A 15° tilt: each slice shifted along the column direction (+y LPS) by step · tan 15°.
    positions[:, 1] += np.arange(count) * 2.5 * np.tan(np.radians(15.0))
    write_series(tmp_path, volume, positions=positions)
    message = refusal(tmp_path)
    assert "gantry tilt of 15.0°" in message


def test_duplicate_positions_refused(tmp_path):
    paths = write_series(tmp_path, small_volume(seed=1))
    duplicate = pydicom.dcmread(paths[3])
    duplicate.SOPInstanceUID = duplicate.file_meta.MediaStorageSOPInstanceUID = make_uid("copy")
    duplicate.save_as(tmp_path / "copy.dcm", enforce_file_format=True)
    message = refusal(tmp_path)
    assert "duplicate slice positions" in message and "copy.dcm" in message


@pytest.mark.parametrize(
    ("keyword", "value", "expected"),
    [
        ("ImagePositionPatient", None, "ImagePositionPatient missing in 1 of 6 slices"),
        ("ImageOrientationPatient", None, "ImageOrientationPatient missing in 1 of 6 slices"),
        ("PixelSpacing", None, "PixelSpacing missing in 1 of 6 slices"),
        ("ImageOrientationPatient", ["0", "1", "0", "0", "0", "-1"], "inconsistent Image"),
        ("PixelSpacing", ["0.7", "0.9"], "inconsistent PixelSpacing"),
        ("ImagePositionPatient", ["1", "2"], "ImagePositionPatient must be 3 numbers"),
    ],
)
def test_missing_or_inconsistent_geometry_refused(tmp_path, keyword, value, expected):
    paths = write_series(tmp_path, small_volume(seed=1))
    header = pydicom.dcmread(paths[4])
    if value is None:
        delattr(header, keyword)
    else:
        setattr(header, keyword, value)
    header.save_as(paths[4], enforce_file_format=True)
    message = refusal(tmp_path)
    assert expected in message


def test_single_slice_refused(tmp_path):
    write_series(tmp_path, small_volume((5, 5, 1), seed=1))
    assert "one slice is not a 3-D volume" in refusal(tmp_path)


def test_folders_without_a_series_refused(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no DICOM image series" in refusal(empty)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "README").write_text("not DICOM\n")
    (junk / "noise.dcm").write_bytes(np.random.default_rng(0).bytes(4000))
    write_dicomdir_like(junk / "DICOMDIR")
    assert "no DICOM image series" in refusal(junk)
    assert "folder not found" in refusal(tmp_path / "absent")
    error = pytest.raises(VctmaeError, load_dicom_ct, junk / "README")
    assert "not a folder" in str(error.value)


def test_unreadable_dicom_files_refused(tmp_path):
    paths = write_series(tmp_path / "cut", small_volume(seed=1))
    whole = paths[1].read_bytes()
    paths[1].write_bytes(whole[:-50])
    message = refusal(tmp_path / "cut")
    assert f"{paths[1].name}: cannot read pixel data" in message
    # Compressed pixel data that cannot be decoded: named, in one line.
    paths = write_series(tmp_path / "jpeg", small_volume(seed=1))
    dataset = pydicom.dcmread(paths[0])
    dataset.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    dataset.PixelData = encapsulate([b"\xff\xd8 not a JPEG stream \xff\xd9"])
    dataset["PixelData"].VR = "OB"
    dataset.save_as(paths[0], enforce_file_format=True)
    message = refusal(tmp_path / "jpeg")
    assert f"{paths[0].name}: cannot read pixel data" in message and "JPEG Lossless" in message
    # The prefix but a cut-off header; the prefix then noise.
    for name, content in (
        ("head", whole[:200]),
        ("noise", b"\0" * 128 + b"DICM" + np.random.default_rng(0).bytes(300)),
    ):
        folder = tmp_path / name
        write_series(folder, small_volume(seed=1))
        (folder / "bad.dcm").write_bytes(content)
        assert "bad.dcm: unreadable DICOM file" in refusal(folder)


def test_is_dicom_series_folder(phantom, tmp_path):
    nifti, folder = phantom
    assert is_dicom_series_folder(folder)
    assert not is_dicom_series_folder(nifti.path.parent)  # a folder of NIfTI files
    assert not is_dicom_series_folder(folder / "README")
    assert not is_dicom_series_folder(tmp_path / "absent")
    only_dicomdir = tmp_path / "dicomdir"
    only_dicomdir.mkdir()
    write_dicomdir_like(only_dicomdir / "DICOMDIR")
    (only_dicomdir / "README").write_text("index only\n")
    assert not is_dicom_series_folder(only_dicomdir)
    mr = tmp_path / "mr"
    write_series(mr, small_volume(seed=1), modality="MR")
    # An MR folder is a series folder: load_dicom_ct then says why it is refused.
    assert is_dicom_series_folder(mr)


def test_geometry_cuts_the_same_crops_from_the_dicom_volume(phantom, tmp_path):
    # geometry's entry point takes file paths, so the DICOM volume goes in as a NIfTI
    # written from it (float32 voxels unchanged; the affine stored as float32, ~1e-5 mm),
    # with the phantom's label map stored in the DICOM volume's voxel order.
    nifti, folder = phantom
    dicom = load_dicom_ct(folder)
    ct_path = tmp_path / "from-dicom.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(dicom.data), dicom.affine), ct_path)
    seg_path = nifti.path.parent.parent / "seg" / nifti.path.name
    labels = reorient(load_labels(seg_path), dicom.orientation)
    lps_seg_path = tmp_path / "seg-lps.nii.gz"
    nib.save(nib.Nifti1Image(labels.data, labels.affine), lps_seg_path)
    config = GeometryConfig(size=32, spacing=2.0)
    expected = extract_crops(nifti.path, seg_path, config)
    got = extract_crops(ct_path, lps_seg_path, config)
    assert got.source_orientation == "LPS" and expected.source_orientation == nifti.orientation
    assert [c.level for c in got.crops] == [c.level for c in expected.crops]
    assert expected.crops
    for a, b in zip(got.crops, expected.crops, strict=True):
        np.testing.assert_allclose(a.centroid_world, b.centroid_world, atol=AFFINE_TOLERANCE_MM)
        # Crops are rounded to integer HU: a sampling point moved by float noise can
        # flip one rounding, so 1 HU.
        difference = np.abs(a.array.astype(np.int32) - b.array.astype(np.int32))
        assert difference.max() <= 1
