"""Vertebra label maps for CTs that have none, from TotalSegmentator (optional `[totalseg]` extra).

`segment_vertebrae(ct_path, out_path)` runs TotalSegmentator's Python API on a
CT (a NIfTI file or a DICOM series folder) for the vertebrae only and writes
one multi-label NIfTI map in TotalSegmentator v2 "total" values (C1 = 50 …
L5 = 27, S1 = 26), which ingest reads as it reads any other label map.
It is the one place vctmae calls TotalSegmentator (`vctmae ingest --segment`;
a predict command reuses it).

TotalSegmentator is never a core dependency (it brings nnU-Net and a model of
~1 GB). When it cannot run, one line says what to do: install the extra, or —
its weights are downloaded at first use, which fails offline — fetch them
where there is internet and point `TOTALSEG_HOME_DIR` at them.
"""

from __future__ import annotations

import os
from pathlib import Path

from vctmae.errors import VctmaeError
from vctmae.files import temporary_name
from vctmae.ingest.errors import IngestError
from vctmae.ingest.levels import TOTALSEG

# TotalSegmentator's class names of the vertebrae it segments ("total" task), head to feet.
VERTEBRA_CLASSES: tuple[str, ...] = (
    *(f"vertebrae_{TOTALSEG[value]}" for value in sorted(TOTALSEG, reverse=True)),
    "vertebrae_S1",
)
INSTALL = "pip install 'vctmae[totalseg]'"
WEIGHTS_HELP = (
    "download them where there is internet (totalseg_download_weights -t total) and set "
    "TOTALSEG_HOME_DIR to the folder that holds them"
)


class SegmentationUnavailable(VctmaeError):
    """TotalSegmentator cannot run here (not installed, or no model weights offline)."""


def require_segmenter():
    """TotalSegmentator's Python API; `SegmentationUnavailable` when it is not installed (called
    before any work, so that a run fails at once)."""
    try:
        from totalsegmentator.python_api import totalsegmentator
    except ImportError as error:
        raise SegmentationUnavailable(
            f"--segment needs TotalSegmentator, which is not installed ({error}): {INSTALL}, "
            "or give every CT a label map"
        ) from None
    return totalsegmentator


def segment_vertebrae(ct_path: str | Path, out_path: str | Path, *, fast: bool = False) -> Path:
    """Write `out_path`: the vertebra label map TotalSegmentator makes of `ct_path`.

    The map appears whole or not at all (temporary name, then rename). Raises
    `SegmentationUnavailable` when TotalSegmentator or its weights are missing and
    `IngestError` when it fails on this CT.
    """
    segmenter = require_segmenter()
    ct_path, out_path = Path(ct_path), Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # TotalSegmentator picks its output format from the name: the temporary name keeps the
    # .nii.gz suffix last.
    partial = temporary_name(out_path)
    try:
        try:
            segmenter(
                input=str(ct_path),
                output=str(partial),
                ml=True,
                task="total",
                roi_subset=list(VERTEBRA_CLASSES),
                fast=fast,
                quiet=True,
            )
        except OSError as error:
            # Offline, its weights download fails with a connection (OSError) or missing-file error.
            home = os.environ.get("TOTALSEG_HOME_DIR", "~/.totalsegmentator")
            detail = " ".join(str(error).split()) or "no details"
            raise SegmentationUnavailable(
                f"TotalSegmentator could not get its model weights ({type(error).__name__}: "
                f"{detail}; looked in {home}): {WEIGHTS_HELP}"
            ) from None
        if not partial.is_file():
            raise IngestError(ct_path, "TotalSegmentator wrote no label map")
        os.replace(partial, out_path)
    finally:
        partial.unlink(missing_ok=True)
    return out_path
