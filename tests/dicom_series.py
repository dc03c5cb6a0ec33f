"""Writing a volume as a DICOM CT series the way a scanner would, for the DICOM tests.

One file per slice in LPS, int16 stored values with a rescale, file names and InstanceNumbers in
two unrelated shuffles of the slice order (`write_series`), and small random volumes to write
(`small_volume`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from vctmae.ingest.nifti import Volume

# DICOM's LPS patient frame ↔ NIfTI RAS+: negate x and y (its own inverse).
FLIP_XY = np.diag([-1.0, -1.0, 1.0, 1.0])


SOP_CLASS = {"CT": CTImageStorage, "MR": MRImageStorage}


def make_uid(*parts: object) -> str:
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def decimal_strings(values) -> list[str]:
    # DS values are decimal strings of at most 16 characters.
    return [f"{float(v):.6f}" for v in values]


def write_series(
    folder: Path,
    volume: Volume,
    *,
    series: str = "1",
    modality: str = "CT",
    rescale: list[tuple[float, float]] | None = None,
    positions: np.ndarray | None = None,
    seed: int = 0,
) -> list[Path]:
    """Write `volume` as one DICOM file per slice (storage axis 2); returns the files in slice order.

    Voxel (i, j, k) becomes column i, row j of slice k, and the affine gives
    ImageOrientationPatient / ImagePositionPatient / PixelSpacing in LPS.
    `rescale` holds (slope, intercept) per slice (default (1, −1024));
    `positions` (K, 3) in LPS mm overrides the slice positions. File names and
    InstanceNumbers follow two unrelated shuffles of the slice order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lps = FLIP_XY @ volume.affine
    column_step, row_step, slice_step = (np.linalg.norm(lps[:3, axis]) for axis in range(3))
    row_direction, column_direction = lps[:3, 0] / column_step, lps[:3, 1] / row_step
    count = volume.data.shape[2]
    if positions is None:
        positions = lps[:3, 3] + np.outer(np.arange(count), lps[:3, 2])
    rescale = rescale or [(1.0, -1024.0)] * count
    rng = np.random.default_rng(seed)
    names, instances = rng.permutation(count), rng.permutation(count) + 1
    study = make_uid("study", folder)
    paths = []
    for k in range(count):
        slope, intercept = rescale[k]
        stored = np.rint((volume.data[:, :, k].T - intercept) / slope)
        assert stored.min() >= -32768 and stored.max() <= 32767
        instance = make_uid(folder, series, k)
        dataset = Dataset()
        dataset.file_meta = FileMetaDataset()
        dataset.file_meta.MediaStorageSOPClassUID = SOP_CLASS[modality]
        dataset.file_meta.MediaStorageSOPInstanceUID = instance
        dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        dataset.SOPClassUID = SOP_CLASS[modality]
        dataset.SOPInstanceUID = instance
        dataset.StudyInstanceUID = study
        dataset.SeriesInstanceUID = series
        dataset.FrameOfReferenceUID = make_uid("frame of reference", folder)
        dataset.Modality = modality
        dataset.SeriesDescription = "test series"
        dataset.PatientID = "PHANTOM"
        dataset.InstanceNumber = int(instances[k])
        dataset.ImageOrientationPatient = decimal_strings([*row_direction, *column_direction])
        dataset.ImagePositionPatient = decimal_strings(positions[k])
        dataset.PixelSpacing = decimal_strings([row_step, column_step])
        dataset.SliceThickness = decimal_strings([slice_step])[0]
        dataset.RescaleSlope = decimal_strings([slope])[0]
        dataset.RescaleIntercept = decimal_strings([intercept])[0]
        dataset.set_pixel_data(
            np.ascontiguousarray(stored.astype(np.int16)), "MONOCHROME2", 16,
            generate_instance_uid=False,
        )  # fmt: skip
        path = folder / f"IM{names[k]:05d}-{series}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def small_volume(
    shape: tuple[int, int, int] = (7, 5, 6), seed: int = 0, spacing=(0.8, 0.7, 2.5)
) -> Volume:
    """Random integer HU on an LPS-stored grid (axis-aligned, anisotropic)."""
    rng = np.random.default_rng(seed)
    data = rng.integers(-1024, 2000, size=shape).astype(np.float32)
    # LPS storage: i towards Left (−x in RAS), j towards Posterior (−y), k Superior.
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = (12.5, -40.25, -300.0)
    return Volume(path=Path("small"), data=data, affine=affine)


def write_unreadable_dicom_folders(src: Path, phantoms: Path) -> dict[str, str]:
    """Folders in `src/ct/` holding no readable DICOM series, each with its label map in
    `src/seg/`: case → what its failure line must say."""
    seg = phantoms / "seg" / "case001.nii.gz"
    (src / "ct" / "junk").mkdir(parents=True)
    (src / "ct" / "junk" / "IM0001").write_bytes(b"not a DICOM file" * 20)
    (src / "ct" / "junk" / "notes.txt").write_text("scanner notes\n")
    # A series whose files lost the 128-byte preamble and the DICM prefix.
    for path in write_series(src / "ct" / "bare", small_volume()):
        path.write_bytes(path.read_bytes()[132:])
    (src / "ct" / "empty").mkdir()
    for case in ("junk", "bare", "empty"):
        (src / "seg" / f"{case}.nii.gz").symlink_to(seg)
    return {
        "junk": "no readable DICOM series in this folder (2 file(s)",
        "bare": "no readable DICOM series in this folder (6 file(s)",
        "empty": "empty folder in ct/",
    }
