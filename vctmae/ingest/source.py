"""Where a case's volumes come from: a CT as a NIfTI file or a DICOM series folder, a label map.

`read_ct` and `read_label_map` are the loading entry points of ingest's geometry
(and of anything else that cuts crops, e.g. a predict command): each returns a
`Volume` in the source's own dtype and memory order, so that no whole-volume
copy is made before the crops are sampled.
"""

from __future__ import annotations

from pathlib import Path

from vctmae.ingest.nifti import Volume, read_nifti_ct, read_nifti_labels


def read_ct(path: str | Path, *, series_uid: str | None = None) -> Volume:
    """A CT from a NIfTI file or a DICOM series folder (`series_uid` picks a series there).

    NIfTI: stored voxels with scl_slope / scl_inter in the Volume. DICOM: float32 HU
    (each slice carries its own rescale), slices ordered by position, RAS+ affine.
    Raises `IngestError` naming the file or folder.
    """
    path = Path(path)
    if path.is_dir():
        from vctmae.ingest.dicom import load_dicom_ct

        return load_dicom_ct(path, series_uid=series_uid)
    return read_nifti_ct(path)


def read_label_map(path: str | Path) -> Volume:
    """A vertebra label map (NIfTI) in its stored integer dtype and memory order."""
    return read_nifti_labels(path)
