"""Load and validate one CT + label-map pair of NIfTI files.

Every problem with the files becomes an `IngestError` naming the file, so a
batch run can report the case and go on.

`read_nifti_ct` / `read_nifti_labels` (what ingest's geometry uses) read the voxels
as stored — the file's dtype and memory order (NIfTI stores the first axis
fastest), no float copy; the CT's scl_slope/scl_inter travel in the `Volume`
and are applied to the few voxels a crop samples. A clinical CT is ~80 M
voxels, and each whole-volume pass (float conversion, reorientation, a C-order
copy) costs about as much as cutting all its crops.

Gzip: a `.nii.gz` file is decompressed whole, in one call, by python-isal's
`igzip` (ISA-L's inflate, about twice zlib's speed on CT; without isal, the
standard `gzip` module); nibabel reads the header from those bytes and the
voxels are used where they lie (a read-only array, no copy).
"""

from __future__ import annotations

import gzip
import io
import itertools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
from nibabel.orientations import (
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)

from vctmae.ingest.errors import IngestError, error_detail

if TYPE_CHECKING:
    from vctmae.ingest.series import DicomSeries

try:
    from isal import igzip as _fast_gzip
except ImportError:  # python-isal is a dependency; a source install without it still reads
    _fast_gzip = None

# CT and label map must share their voxel grid; affines may differ by float noise.
AFFINE_TOLERANCE_MM = 1e-3
# Voxels checked for NaN/inf at a time (a float CT is checked slab by slab, no full mask).
FINITE_CHECK_VOXELS = 1 << 22


@dataclass(frozen=True)
class Volume:
    """A 3-D array with its voxel → world (NIfTI RAS+ mm) affine.

    A voxel's value is `data · slope + intercept` (a CT's scl_slope / scl_inter kept
    as stored; 1 and 0 for arrays that already hold HU or labels).
    """

    path: Path
    data: np.ndarray  # (I, J, K) in storage order
    affine: np.ndarray  # (4, 4) float64
    slope: float = 1.0
    intercept: float = 0.0
    # A CT read from a DICOM series: its files and grid (None for NIfTI), for writing DICOM
    # objects that belong to the same study and lie on the same grid.
    dicom: DicomSeries | None = None

    @property
    def scaled(self) -> bool:
        """Whether `data` must be scaled to give the values (HU)."""
        return self.slope != 1.0 or self.intercept != 0.0

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


def _gunzip(path: Path) -> bytes:
    """The whole decompressed content of a gzip file in one call (isal when available): the
    least a read can cost — no stream buffers, and the voxels are used where they land."""
    compressed = path.read_bytes()
    if _fast_gzip is not None:
        return _fast_gzip.decompress(compressed)
    return gzip.decompress(compressed)


def _gzip_image(path: Path, stream) -> nib.Nifti1Image:
    """The NIfTI-1 or -2 image whose bytes `stream` gives, read through nibabel's file map."""
    head = stream.read(nib.Nifti2Header.template_dtype.itemsize)
    stream.seek(0)
    for image_class in (nib.Nifti1Image, nib.Nifti2Image):
        sized = head[: image_class.header_class.template_dtype.itemsize]
        if image_class.header_class.may_contain_header(sized):
            holder = nib.FileHolder(filename=str(path), fileobj=stream)
            return image_class.from_file_map({"image": holder, "header": holder})
    raise nib.filebasedimages.ImageFileError("no NIfTI-1 or NIfTI-2 header")


def _open(path: Path, stream=None) -> nib.Nifti1Image:
    """The NIfTI image at `path`; `stream`, an open gzip file of it, when it is `.gz`."""
    if not path.exists():
        raise IngestError(path, "file not found")
    if not path.is_file():
        raise IngestError(path, "not a file")
    try:
        image = _gzip_image(path, stream) if stream is not None else nib.load(str(path))
    except nib.filebasedimages.ImageFileError as error:
        raise IngestError(path, f"not a NIfTI file ({error_detail(error, path)})") from None
    except Exception as error:  # gzip/zlib/struct/OS errors: all mean "cannot read"
        raise IngestError(path, f"unreadable file ({error_detail(error, path)})") from None
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise IngestError(path, f"not a NIfTI file (nibabel read it as {type(image).__name__})")
    return image


GZIP_MAGIC = b"\x1f\x8b"


def _has_gzip_magic(path: Path) -> bool:
    """Whether `path` is a file starting as gzip data does (else nibabel says what it is)."""
    try:
        with open(path, "rb") as file:
            return file.read(len(GZIP_MAGIC)) == GZIP_MAGIC
    except OSError:
        return False


def _read_image(path: Path) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Stored voxels (the file's dtype and memory order, trailing singleton axes dropped),
    affine, and the scl_slope / scl_inter that turn them into values."""
    is_gzip = path.name.lower().endswith(".gz") and _has_gzip_magic(path)
    content = None
    if is_gzip:
        try:
            content = _gunzip(path)
        except OSError as error:
            raise IngestError(path, f"unreadable file ({error_detail(error, path)})") from None
        except MemoryError:
            raise
        except Exception as error:  # EOFError, zlib/isal errors: the compressed data is bad
            raise IngestError(
                path, f"corrupt or truncated data ({error_detail(error, path)})"
            ) from None
    image = _open(path, None if content is None else io.BytesIO(content))
    shape = _spatial_shape(path, image.shape)
    affine = _affine(path, image)
    proxy = image.dataobj
    slope, intercept = float(proxy.slope), float(proxy.inter)
    data = _read(path, image, content).reshape(shape, order="A")
    if not (np.isfinite(slope) and np.isfinite(intercept)):
        raise IngestError(path, f"scl_slope/scl_inter are not finite ({slope}, {intercept})")
    return data, affine, slope, intercept


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


def _read(path: Path, image: nib.Nifti1Image, content: bytes | None = None) -> np.ndarray:
    """Read the stored voxels (no scaling); truncated or corrupt payloads fail here, not at load.

    `content`: the whole decompressed file, whose voxels are then used in place (read-only).
    """
    if content is not None:
        proxy = image.dataobj
        count = int(np.prod(proxy.shape))
        end = proxy.offset + count * proxy.dtype.itemsize
        if len(content) < end:
            raise IngestError(
                path, f"corrupt or truncated data ({len(content)} bytes, the voxels end at {end})"
            )
        voxels = np.frombuffer(content, dtype=proxy.dtype, count=count, offset=proxy.offset)
        return voxels.reshape(proxy.shape, order=proxy.order)
    try:
        return np.asanyarray(image.dataobj.get_unscaled())
    except MemoryError:
        raise
    except Exception as error:
        raise IngestError(
            path, f"corrupt or truncated data ({error_detail(error, path)})"
        ) from None


def _count_nonfinite(data: np.ndarray) -> int:
    """NaN/inf voxels of a float array, counted slab by slab in memory order."""
    flat = np.ravel(data, order="K")
    return sum(
        int(np.count_nonzero(~np.isfinite(flat[start : start + FINITE_CHECK_VOXELS])))
        for start in range(0, flat.size, FINITE_CHECK_VOXELS)
    )


def read_nifti_ct(path: str | Path) -> Volume:
    """A NIfTI CT as stored: its dtype and memory order, scl_slope / scl_inter in the Volume.

    Rejects non-3-D images and, for float data (the only kind that can hold them),
    NaN/inf voxels.
    """
    path = Path(path)
    data, affine, slope, intercept = _read_image(path)
    if data.dtype.kind not in "iuf":
        raise IngestError(path, f"CT has unsupported data type {data.dtype}")
    if data.dtype.kind == "f":
        bad = _count_nonfinite(data)
        if bad:
            raise IngestError(path, f"CT contains {bad} NaN/inf voxels")
    return Volume(path=path, data=data, affine=affine, slope=slope, intercept=intercept)


def read_nifti_labels(path: str | Path) -> Volume:
    """A NIfTI label map as stored (its integer dtype and memory order), values ≥ 0 meaningful.

    Integer maps are used as they are (negative values count as background
    wherever labels are read); float maps — a few tools write them — are checked
    to hold whole numbers and converted once. Scaled maps are scaled first.
    """
    path = Path(path)
    data, affine, slope, intercept = _read_image(path)
    if slope != 1.0 or intercept != 0.0:
        data = data * slope + intercept
    if data.dtype.kind == "f":
        data = _float_labels(path, data)
    elif data.dtype.kind == "b":
        data = data.view(np.uint8)
    elif data.dtype.kind not in "iu":
        raise IngestError(path, f"label map has unsupported data type {data.dtype}")
    if data.dtype.itemsize > 4 or data.dtype == np.uint32:
        top = int(data.max()) if data.size else 0
        if top >= 2**31:
            raise IngestError(path, f"label value {top} is out of range")
    return Volume(path=path, data=data, affine=affine)


def _float_labels(path: Path, data: np.ndarray) -> np.ndarray:
    if _count_nonfinite(data):
        raise IngestError(path, "label map contains NaN/inf voxels")
    rounded = np.rint(data)
    if np.any(np.abs(data - rounded) > 1e-3):
        raise IngestError(path, "label map has non-integer values (is this a CT, not a label map?)")
    rounded = np.clip(rounded, 0, None)
    top = int(rounded.max()) if rounded.size else 0
    if top >= 2**31:
        raise IngestError(path, f"label value {top} is out of range")
    dtype = np.uint8 if top < 2**8 else np.uint16 if top < 2**16 else np.int32
    return rounded.astype(dtype, order="K")


def check_same_grid(ct: Volume, labels: Volume) -> None:
    """CT and label map must describe the same voxels in the same place.

    They may store them along different axes (a DICOM series, stored LPS, beside a
    NIfTI map stored RAS): the label map is seen along the CT's axes, then the
    world positions of corresponding voxel centres are compared (`grid_distance_mm`).
    """
    seen = oriented_view(labels, ct.orientation)
    if seen.data.shape != ct.data.shape:
        along = ""
        if seen is not labels:
            along = f", {seen.data.shape} along the CT's {ct.orientation} axes"
        raise IngestError(
            labels.path,
            f"shape {labels.data.shape} (stored {labels.orientation}{along}) differs from "
            f"the CT's {ct.data.shape} ({ct.path})",
        )
    distance = grid_distance_mm(ct, seen)
    if distance > AFFINE_TOLERANCE_MM:
        raise IngestError(
            labels.path,
            f"affine differs from the CT's ({ct.path}): corresponding voxel centres lie up to "
            f"{distance:.4g} mm apart (tolerance {AFFINE_TOLERANCE_MM} mm)",
        )


def grid_distance_mm(a: Volume, b: Volume) -> float:
    """Largest world distance between the centres of voxel (i, j, k) of `a` and of `b`, two
    grids of one shape. Affines are linear, so it is reached at a corner of the grid."""
    corners = np.array(list(itertools.product(*((0, n - 1) for n in a.data.shape))), float)
    world_a = corners @ a.affine[:3, :3].T + a.affine[:3, 3]
    world_b = corners @ b.affine[:3, :3].T + b.affine[:3, 3]
    return float(np.max(np.linalg.norm(world_a - world_b, axis=1)))


def oriented_view(volume: Volume, codes: str) -> Volume:
    """The same volume seen along axis codes `codes` (e.g. "RIP"): a strided view, no copy.

    Only permutes and flips axes (no resampling); the affine changes to match, so
    world coordinates are untouched. For an oblique scan the nearest axes win.
    """
    transform = orientation_transform(volume, codes)
    if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):  # identity: already stored so
        return volume
    data = apply_orientation(volume.data, transform)
    affine = volume.affine @ inv_ornt_aff(transform, volume.data.shape)
    return replace(volume, data=data, affine=affine)


def orientation_transform(volume: Volume, codes: str) -> np.ndarray:
    """nibabel orientation transform (3, 2) from `volume`'s storage axes to `codes`."""
    return ornt_transform(io_orientation(volume.affine), axcodes2ornt(tuple(codes)))
