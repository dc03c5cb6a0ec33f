"""Load and validate one CT + label-map pair of NIfTI files.

Every problem with the files becomes an `IngestError` naming the file, so a
batch run can report the case and go on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import (
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)

from vctmae.ingest.errors import IngestError

# CT and label map must share their voxel grid; affines may differ by float noise.
AFFINE_TOLERANCE_MM = 1e-3


@dataclass(frozen=True)
class Volume:
    """A 3-D array with its voxel → world (NIfTI RAS+ mm) affine."""

    path: Path
    data: np.ndarray  # (I, J, K) in storage order
    affine: np.ndarray  # (4, 4) float64

    @property
    def orientation(self) -> str:
        """Storage axis codes, e.g. "RAS" or "LPS" (axis increases towards that side)."""
        return "".join(nib.aff2axcodes(self.affine))

    @property
    def voxel_sizes(self) -> tuple[float, float, float]:
        sizes = nib.affines.voxel_sizes(self.affine)
        return (float(sizes[0]), float(sizes[1]), float(sizes[2]))

    @property
    def voxel_volume_mm3(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3])))


def _detail(error: Exception, path: Path) -> str:
    """The underlying error on one line, without repeating the full path (a library's message may
    span lines, e.g. nibabel's through indexed_gzip)."""
    text = " ".join(str(error).replace(str(path), path.name).split()) or "no details"
    return f"{type(error).__name__}: {text}"


def _open(path: Path) -> nib.Nifti1Image:
    if not path.exists():
        raise IngestError(path, "file not found")
    if not path.is_file():
        raise IngestError(path, "not a file")
    try:
        image = nib.load(str(path))
    except nib.filebasedimages.ImageFileError as error:
        raise IngestError(path, f"not a NIfTI file ({_detail(error, path)})") from None
    except Exception as error:  # gzip/zlib/struct/OS errors: all mean "cannot read"
        raise IngestError(path, f"unreadable file ({_detail(error, path)})") from None
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise IngestError(path, f"not a NIfTI file (nibabel read it as {type(image).__name__})")
    return image


def _spatial_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, int, int]:
    # Many tools write 3-D volumes as (I, J, K, 1); trailing singleton axes are harmless.
    trimmed = list(shape)
    while len(trimmed) > 3 and trimmed[-1] == 1:
        trimmed.pop()
    if len(trimmed) != 3:
        raise IngestError(path, f"not a 3-D image (shape {tuple(shape)})")
    if min(trimmed) < 1:
        raise IngestError(path, f"empty image (shape {tuple(shape)})")
    return (trimmed[0], trimmed[1], trimmed[2])


def _affine(path: Path, image: nib.Nifti1Image) -> np.ndarray:
    affine = np.asarray(image.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise IngestError(path, "affine contains NaN or inf")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise IngestError(path, "affine is singular (zero voxel size or degenerate axes)")
    return affine


def _read(path: Path, image: nib.Nifti1Image, scaled_float: bool) -> np.ndarray:
    """Read the voxel data; truncated or corrupt payloads fail here, not at load."""
    try:
        if scaled_float:
            # get_fdata applies scl_slope / scl_inter: CT values come out in HU.
            return image.get_fdata(dtype=np.float32, caching="unchanged")
        return np.asanyarray(image.dataobj)
    except MemoryError:
        raise
    except Exception as error:
        raise IngestError(path, f"corrupt or truncated data ({_detail(error, path)})") from None


def load_ct(path: str | Path) -> Volume:
    """Load a CT volume as float32 HU; rejects non-3-D images and NaN/inf voxels."""
    path = Path(path)
    image = _open(path)
    shape = _spatial_shape(path, image.shape)
    affine = _affine(path, image)
    data = _read(path, image, scaled_float=True).reshape(shape)
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise IngestError(path, f"CT contains {bad} NaN/inf voxels")
    return Volume(path=path, data=data, affine=affine)


def load_labels(path: str | Path) -> Volume:
    """Load a label map as a non-negative integer array (uint8/uint16/int32)."""
    path = Path(path)
    image = _open(path)
    shape = _spatial_shape(path, image.shape)
    affine = _affine(path, image)
    data = _read(path, image, scaled_float=False).reshape(shape)
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)):
            raise IngestError(path, "label map contains NaN/inf voxels")
        rounded = np.rint(data)
        if np.any(np.abs(data - rounded) > 1e-3):
            raise IngestError(
                path, "label map has non-integer values (is this a CT, not a label map?)"
            )
        data = rounded
    elif data.dtype.kind not in "iub":
        raise IngestError(path, f"label map has unsupported data type {data.dtype}")
    # Negative values are no vertebra in any scheme; treat them as background.
    data = np.clip(data, 0, None) if data.dtype.kind in "if" and data.min() < 0 else data
    top = int(data.max()) if data.size else 0
    dtype = np.uint8 if top < 2**8 else np.uint16 if top < 2**16 else np.int32
    if top >= 2**31:
        raise IngestError(path, f"label value {top} is out of range")
    return Volume(path=path, data=np.ascontiguousarray(data, dtype=dtype), affine=affine)


def check_same_grid(ct: Volume, labels: Volume) -> None:
    """CT and label map must describe the same voxels in the same place."""
    if ct.data.shape != labels.data.shape:
        raise IngestError(
            labels.path,
            f"shape {labels.data.shape} differs from the CT's {ct.data.shape} ({ct.path})",
        )
    difference = float(np.max(np.abs(ct.affine - labels.affine)))
    if difference > AFFINE_TOLERANCE_MM:
        raise IngestError(
            labels.path,
            f"affine differs from the CT's ({ct.path}) by up to {difference:.4g} mm "
            f"(tolerance {AFFINE_TOLERANCE_MM} mm)",
        )


def reorient(volume: Volume, codes: str) -> Volume:
    """The same volume with its voxels stored along axis codes `codes` (e.g. "RIP").

    Only permutes and flips voxels (no resampling); the affine changes to match,
    so world coordinates are untouched. For an oblique scan the nearest axes win.
    """
    current = io_orientation(volume.affine)
    transform = ornt_transform(current, axcodes2ornt(tuple(codes)))
    if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):  # identity: already stored so
        return volume
    data = np.ascontiguousarray(apply_orientation(volume.data, transform))
    affine = volume.affine @ inv_ornt_aff(transform, volume.data.shape)
    return Volume(path=volume.path, data=data, affine=affine)
