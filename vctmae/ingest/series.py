"""Where a CT read from a DICOM series came from: its files in slice order and its grid.

A leaf record, so that the volume (`vctmae.ingest.nifti.Volume`) can carry it and the DICOM
writers can use it without importing the reader.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vctmae.ingest.errors import IngestError


@dataclass(frozen=True)
class DicomSeries:
    """The series a DICOM CT volume was read from: what writing DICOM objects on its grid needs.

    Slice k of the volume is `files[k]`; voxel (i, j, k) = (column, row, slice) lies at
    `affine @ (i, j, k, 1)` (NIfTI RAS+ mm), so the grid stays known even if the volume is
    later reoriented.
    """

    folder: Path
    uid: str
    files: tuple[Path, ...]  # in slice-position order
    affine: np.ndarray  # (4, 4) voxel (column, row, slice) → world, RAS+
    shape: tuple[int, int, int]  # (columns, rows, slices)

    def headers(self) -> list:
        """Every slice's header (pydicom datasets without pixel data) in slice order;
        `IngestError` if one is unreadable."""
        import pydicom

        headers = []
        for path in self.files:
            try:
                headers.append(pydicom.dcmread(path, stop_before_pixels=True))
            except MemoryError:
                raise
            except Exception as error:  # the file changed or vanished since it was read
                detail = " ".join(str(error).split()) or type(error).__name__
                raise IngestError(
                    self.folder, f"{path.name}: unreadable DICOM file ({detail})"
                ) from None
        return headers
