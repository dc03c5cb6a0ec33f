"""Read a DICOM CT series folder as the same `Volume` a NIfTI CT gives.

`load_dicom_ct(folder)` returns float32 HU voxels and a voxel → world affine in the NIfTI
RAS+ convention, so the geometry code uses a DICOM scan unchanged; the volume carries its
`DicomSeries` (slice files in position order, the grid), from which predict writes its
DICOM SEG and SR into the source study. `is_dicom_series_folder(path)` is discovery's cheap test.

pydicom, not SimpleITK's series reader: the reader must refuse bad series with a reason
(uneven spacing, gantry tilt, duplicate positions) where SimpleITK/GDCM would only warn, and
those checks need the per-slice headers that pydicom gives directly. JPEG Lossless and
JPEG-LS pixel data need pydicom's optional decoders (pylibjpeg or python-gdcm); without
them a series is refused with pydicom's message naming what to install.

A series folder: the files directly inside it that carry the "DICM" prefix and an image
(Rows and Columns); anything else (a README, a DICOMDIR, reports, sub-folders, files
without the 128-byte preamble) is ignored. A file with the prefix but no readable file meta
header, or an image without Rows/Columns, is refused, never skipped: skipping it could
silently drop a slice at either end of the stack. Files are grouped by SeriesInstanceUID;
without `series_uid` the CT series with the most slices is read.

Geometry (DICOM PS3.3 C.7.6.2): a slice's pixel (row r, column c) lies at
    ImagePositionPatient + c · PixelSpacing[1] · row direction
                         + r · PixelSpacing[0] · column direction
in the patient's LPS frame. Slices are ordered by their position projected on the slice
normal (row × column direction), never by file name or InstanceNumber; voxel (i, j, k) =
(column, row, slice), and NIfTI RAS+ is LPS with x and y negated. Every slice must lie
within `SLICE_TOLERANCE` (0.1) of a voxel of where the affine puts it — along the normal in
slice steps, within the plane in pixels — well above the rounding of positions written to
0.01 mm and well below the half-slice error a missing slice leaves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.multival import MultiValue

from vctmae.ingest.errors import IngestError, error_detail
from vctmae.ingest.nifti import Volume
from vctmae.ingest.series import DicomSeries

# The DICOM file format: a 128-byte preamble, then these four bytes.
PREAMBLE_BYTES = 128
DICOM_PREFIX = b"DICM"
# Largest distance of a slice from where the affine puts it, in voxels (module docstring).
SLICE_TOLERANCE = 0.1
# Two slices closer than this along the normal are at the same position.
DUPLICATE_POSITION_MM = 0.01
# Direction cosines: unit length, orthogonal, and equal in every slice to this much.
ORIENTATION_TOLERANCE = 1e-4
# PixelSpacing equal in every slice to this much (float noise of the decimal strings).
PIXEL_SPACING_TOLERANCE_MM = 1e-4
# NIfTI RAS+ from DICOM LPS: negate x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Header elements read for every file; pixel data is read only for the chosen series.
HEADER_TAGS = (
    "SeriesInstanceUID",
    "Modality",
    "SeriesDescription",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "SamplesPerPixel",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "PixelSpacing",
)


@dataclass(frozen=True)
class _Slice:
    """One image file's header: what grouping, ordering and the affine need."""

    path: Path
    series_uid: str
    modality: str
    description: str
    rows: int
    columns: int
    frames: int
    samples: int
    orientation: np.ndarray | None  # (6,) row direction, column direction (LPS)
    position: np.ndarray | None  # (3,) centre of the first pixel, mm (LPS)
    pixel_spacing: np.ndarray | None  # (2,) between rows, between columns, mm


@dataclass(frozen=True)
class _Series:
    uid: str
    slices: list[_Slice]

    @property
    def modality(self) -> str:
        return self.slices[0].modality

    def describe(self) -> str:
        """E.g. '1.2.3 (CT, 120 slices, "Abdomen 1.0 B30f")'."""
        parts = [self.modality or "no modality", f"{len(self.slices)} slices"]
        if self.slices[0].description:
            parts.append(f'"{self.slices[0].description}"')
        return f"{self.uid} ({', '.join(parts)})"


def _has_dicom_prefix(path: Path) -> bool:
    with open(path, "rb") as stream:
        head = stream.read(PREAMBLE_BYTES + len(DICOM_PREFIX))
    return head[PREAMBLE_BYTES:] == DICOM_PREFIX


def _numbers(folder: Path, path: Path, header, keyword: str, count: int) -> np.ndarray | None:
    """A multi-valued decimal element as floats; None when absent or empty."""
    value = header.get(keyword)
    if value is None or value == "":
        return None
    values = list(value) if isinstance(value, MultiValue) else [value]
    try:
        numbers = np.array([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        raise IngestError(folder, f"{path.name}: {keyword} is not numeric ({value!r})") from None
    if numbers.shape != (count,) or not np.all(np.isfinite(numbers)):
        raise IngestError(folder, f"{path.name}: {keyword} must be {count} numbers, got {value!r}")
    return numbers


def _dcmread(folder: Path, path: Path, **options):
    """`pydicom.dcmread(path, **options)`; `IngestError` naming the file when it fails."""
    try:
        return pydicom.dcmread(path, **options)
    except MemoryError:
        raise
    except Exception as error:
        # pydicom's parser raises many types for a corrupt file; all mean "cannot read".
        raise IngestError(
            folder, f"{path.name}: unreadable DICOM file ({error_detail(error)})"
        ) from None


def _read_header(folder: Path, path: Path) -> _Slice | None:
    """The header of a DICOM image file; None for a DICOM file of another kind (no image)."""
    header = _dcmread(folder, path, stop_before_pixels=True, specific_tags=list(HEADER_TAGS))
    meta = header.file_meta
    if "TransferSyntaxUID" not in meta or "MediaStorageSOPClassUID" not in meta:
        # The prefix is there but the file meta header is not: a corrupt or cut-off file.
        raise IngestError(folder, f"{path.name}: unreadable DICOM file (no file meta header)")
    if "Rows" not in header or "Columns" not in header:
        if "Image Storage" in meta.MediaStorageSOPClassUID.name:
            raise IngestError(
                folder, f"{path.name}: unreadable DICOM file (an image without Rows/Columns)"
            )
        # A DICOMDIR, a report, a presentation state: not part of any image series.
        return None
    uid = str(header.get("SeriesInstanceUID", "")).strip()
    if not uid:
        raise IngestError(folder, f"{path.name}: image without a SeriesInstanceUID")
    return _Slice(
        path=path,
        series_uid=uid,
        modality=str(header.get("Modality", "")).strip().upper(),
        description=" ".join(str(header.get("SeriesDescription", "")).split()),
        rows=int(header.Rows),
        columns=int(header.Columns),
        frames=int(header.get("NumberOfFrames") or 1),
        samples=int(header.get("SamplesPerPixel") or 1),
        orientation=_numbers(folder, path, header, "ImageOrientationPatient", 6),
        position=_numbers(folder, path, header, "ImagePositionPatient", 3),
        pixel_spacing=_numbers(folder, path, header, "PixelSpacing", 2),
    )


def _series_in(folder: Path) -> list[_Series]:
    """Every series of images directly in `folder`, largest first (ties by UID)."""
    slices = []
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        try:
            is_dicom = _has_dicom_prefix(path)
        except OSError as error:
            raise IngestError(folder, f"{path.name}: cannot read ({error_detail(error)})") from None
        if is_dicom:
            header = _read_header(folder, path)
            if header is not None:
                slices.append(header)
    by_uid: dict[str, list[_Slice]] = {}
    for header in slices:
        by_uid.setdefault(header.series_uid, []).append(header)
    series = [_Series(uid=uid, slices=members) for uid, members in by_uid.items()]
    return sorted(series, key=lambda s: (-len(s.slices), s.uid))


def _listing(series: list[_Series]) -> str:
    return "; ".join(s.describe() for s in series)


def _choose(folder: Path, series: list[_Series], series_uid: str | None) -> _Series:
    """The series to read: `series_uid`, else the CT series with the most slices."""
    if not series:
        raise IngestError(folder, "no DICOM image series in this folder")
    if series_uid is not None:
        chosen = [s for s in series if s.uid == series_uid.strip()]
        if not chosen:
            raise IngestError(folder, f"no series {series_uid}; series found: {_listing(series)}")
        if chosen[0].modality != "CT":
            raise IngestError(folder, f"series {chosen[0].describe()} is not CT")
        return chosen[0]
    ct = [s for s in series if s.modality == "CT"]
    if not ct:
        raise IngestError(folder, f"not CT: no CT series, found {_listing(series)}")
    tied = [s for s in ct if len(s.slices) == len(ct[0].slices)]
    if len(tied) > 1:
        raise IngestError(
            folder,
            f"{len(tied)} CT series have {len(ct[0].slices)} slices each; "
            f"choose one with --series UID: {_listing(tied)}",
        )
    return ct[0]


def _require(folder: Path, series: _Series, name: str, values: list) -> None:
    """Refuses a series where some slice lacks element `name`."""
    missing = [s.path.name for s, v in zip(series.slices, values, strict=True) if v is None]
    if missing:
        raise IngestError(
            folder,
            f"series {series.uid}: {name} missing in {len(missing)} of {len(values)} slices "
            f"(e.g. {missing[0]})",
        )


def _same(folder: Path, series: _Series, name: str, values: list, tolerance: float) -> np.ndarray:
    """The one value every slice of `series` has for `name`; refuses missing or differing ones."""
    _require(folder, series, name, values)
    first = np.asarray(values[0], dtype=np.float64)
    for header, value in zip(series.slices, values, strict=True):
        value = np.asarray(value, dtype=np.float64)
        if np.max(np.abs(value - first)) > tolerance:
            raise IngestError(
                folder,
                f"series {series.uid}: inconsistent {name} ({series.slices[0].path.name}: "
                f"{np.round(first, 6).tolist()}, {header.path.name}: "
                f"{np.round(value, 6).tolist()})",
            )
    return first


def _stack_geometry(folder: Path, series: _Series) -> tuple[list[_Slice], np.ndarray]:
    """The slices in position order and the volume's LPS affine, after every geometry check."""
    slices = series.slices
    uid = series.uid
    if any(s.frames != 1 for s in slices):
        raise IngestError(folder, f"series {uid}: multi-frame (enhanced) images are not supported")
    if any(s.samples != 1 for s in slices):
        raise IngestError(folder, f"series {uid}: not a greyscale image (SamplesPerPixel ≠ 1)")
    _same(folder, series, "image size (Rows, Columns)", [(s.rows, s.columns) for s in slices], 0)
    orientation = _same(
        folder,
        series,
        "ImageOrientationPatient",
        [s.orientation for s in slices],
        ORIENTATION_TOLERANCE,
    )
    spacing = _same(
        folder,
        series,
        "PixelSpacing",
        [s.pixel_spacing for s in slices],
        PIXEL_SPACING_TOLERANCE_MM,
    )
    _require(folder, series, "ImagePositionPatient", [s.position for s in slices])
    if len(slices) < 2:
        raise IngestError(folder, f"series {uid}: one slice is not a 3-D volume")
    if np.any(spacing <= 0):
        raise IngestError(folder, f"series {uid}: PixelSpacing must be positive, got {spacing}")

    row_direction, column_direction = orientation[:3], orientation[3:]
    if (
        abs(np.linalg.norm(row_direction) - 1) > ORIENTATION_TOLERANCE
        or abs(np.linalg.norm(column_direction) - 1) > ORIENTATION_TOLERANCE
        or abs(row_direction @ column_direction) > ORIENTATION_TOLERANCE
    ):
        raise IngestError(
            folder,
            f"series {uid}: ImageOrientationPatient {orientation.tolist()} is not two "
            "orthogonal unit vectors",
        )
    normal = np.cross(row_direction, column_direction)

    along = np.array([s.position @ normal for s in slices])
    order = np.argsort(along, kind="stable")
    slices = [slices[i] for i in order]
    along = along[order]
    positions = np.stack([s.position for s in slices])

    gaps = np.diff(along)
    close = int(np.argmin(gaps))
    if gaps[close] < DUPLICATE_POSITION_MM:
        count = int(np.count_nonzero(gaps < DUPLICATE_POSITION_MM))
        raise IngestError(
            folder,
            f"series {uid}: duplicate slice positions ({slices[close].path.name} and "
            f"{slices[close + 1].path.name} both at {along[close]:.3f} mm along the normal; "
            f"{count} such pair(s))",
        )
    step = (along[-1] - along[0]) / (len(slices) - 1)

    # In-plane offsets of each slice from the first: zero for a stack upright on its planes.
    offsets = positions - positions[0]
    in_plane = offsets - np.outer(offsets @ normal, normal)
    shift = float(np.max(np.linalg.norm(in_plane, axis=1)))
    if shift > SLICE_TOLERANCE * float(np.min(spacing)):
        tilt = np.degrees(np.arctan2(np.linalg.norm(in_plane[-1]), along[-1] - along[0]))
        raise IngestError(
            folder,
            f"series {uid}: slices shifted within their plane by up to {shift:.2f} mm "
            f"(gantry tilt of {tilt:.1f}° or a sheared stack; tolerance "
            f"{SLICE_TOLERANCE:g} pixel); resample it upright first, e.g. with dcm2niix",
        )

    # Distance of each slice from an evenly spaced stack between the first and the last.
    residual = along - (along[0] + step * np.arange(len(slices)))
    if float(np.max(np.abs(residual))) > SLICE_TOLERANCE * step:
        widest = int(np.argmax(gaps))
        raise IngestError(
            folder,
            f"series {uid}: uneven slice spacing (gaps {gaps.min():.3f}–{gaps.max():.3f} mm, "
            f"widest between {slices[widest].path.name} and {slices[widest + 1].path.name}; "
            f"a missing slice?); every slice must lie within {SLICE_TOLERANCE:.0%} of a "
            f"{step:.3f} mm step from where an evenly spaced stack puts it",
        )

    affine = np.eye(4)
    affine[:3, 0] = row_direction * spacing[1]
    affine[:3, 1] = column_direction * spacing[0]
    affine[:3, 2] = normal * step
    affine[:3, 3] = positions[0]
    return slices, affine


def _read_pixels(folder: Path, slices: list[_Slice]) -> np.ndarray:
    """HU of every slice, (slices, rows, columns) float32, each with its own rescale."""
    first = slices[0]
    hu = np.empty((len(slices), first.rows, first.columns), dtype=np.float32)
    for index, header in enumerate(slices):
        dataset = _dcmread(folder, header.path)
        syntax = dataset.file_meta.TransferSyntaxUID
        try:
            stored = dataset.pixel_array
        except MemoryError:
            raise
        except Exception as error:  # truncated data, a compressed syntax without its decoder, …
            encoding = f" compressed as {syntax.name}" if syntax.is_compressed else ""
            raise IngestError(
                folder,
                f"{header.path.name}: cannot read pixel data{encoding} ({error_detail(error)})",
            ) from None
        if stored.shape != hu.shape[1:]:
            raise IngestError(
                folder,
                f"{header.path.name}: pixel data is {stored.shape}, expected {hu.shape[1:]}",
            )
        slope = _numbers(folder, header.path, dataset, "RescaleSlope", 1)
        intercept = _numbers(folder, header.path, dataset, "RescaleIntercept", 1)
        slope_value = 1.0 if slope is None else float(slope[0])
        intercept_value = 0.0 if intercept is None else float(intercept[0])
        hu[index] = stored.astype(np.float64) * slope_value + intercept_value
    return hu


def load_dicom_ct(folder: str | Path, series_uid: str | None = None) -> Volume:
    """Load one CT series of a DICOM folder as float32 HU with a NIfTI RAS+ affine.

    `series_uid` picks a series; without it, the CT series with the most slices.
    Raises `IngestError` naming the folder for every series it refuses.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise IngestError(folder, "not a folder" if folder.exists() else "folder not found")
    series = _choose(folder, _series_in(folder), series_uid)
    slices, affine_lps = _stack_geometry(folder, series)
    hu = _read_pixels(folder, slices)
    # (slice, row, column) → voxel (i, j, k) = (column, row, slice): a view, no copy.
    data = hu.transpose(2, 1, 0)
    affine = LPS_TO_RAS @ affine_lps
    source = DicomSeries(
        folder=folder,
        uid=series.uid,
        files=tuple(s.path for s in slices),
        affine=affine,
        shape=data.shape,
    )
    return Volume(path=folder, data=data, affine=affine, dicom=source)


def is_dicom_series_folder(path: str | Path) -> bool:
    """Whether `path` is a folder directly holding a DICOM image file (a cheap test: a file with
    the DICOM prefix whose header has Rows; a DICOMDIR or a report alone does not count).
    Never raises: `load_dicom_ct` reports what is wrong."""
    path = Path(path)
    try:
        entries = sorted(path.iterdir()) if path.is_dir() else []
    except OSError:
        return False
    for entry in entries:
        try:
            if not (entry.is_file() and _has_dicom_prefix(entry)):
                continue
            header = pydicom.dcmread(entry, stop_before_pixels=True, specific_tags=["Rows"])
        except MemoryError:
            raise
        except Exception:  # unreadable here means "not evidence of a series"
            continue
        if "Rows" in header:
            return True
    return False
