"""What travels between ingest's extract and assemble steps: typed, frozen records with JSON forms.

A `CaseRecord` is one case's result, written by the worker that extracted it as
`OUT/.ingest-work/cases/NAME.json` beside `NAME.crops` (the crops' Blosc chunk
bytes, one after another). It holds everything assembly needs except the voxels:
one `CropRecord` per crop (level, geometry facts, checksum, where its chunk lies
in the `.crops` file), the vertebrae skipped and why, or the failure line.

The JSON form is the work-file format (`RECORD_VERSION`); a record of another
version, or of other geometry settings or source files, is extracted again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vctmae.files import write_atomically
from vctmae.ingest.errors import IngestError
from vctmae.ingest.geometry import GeometryConfig, Skipped

# Layout of the per-case work files; 2: whole-set label-scheme rule, other labels recorded;
# 3: typed records, the DICOM series of a folder CT recorded; 4: a level is named only under
# the one scheme the label set supports (an ambiguous set fails its case).
RECORD_VERSION = 4


def geometry_settings(geometry: GeometryConfig) -> dict[str, Any]:
    """JSON-able form of the geometry config (frozensets sorted) — part of every case record."""
    out = {}
    for f in dataclasses.fields(geometry):
        value = getattr(geometry, f.name)
        out[f.name] = sorted(value) if isinstance(value, frozenset) else value
    return out


def geometry_from_settings(settings: dict[str, Any]) -> GeometryConfig:
    """The inverse of `geometry_settings`."""
    levels = settings.get("levels")
    return GeometryConfig(**{**settings, "levels": frozenset(levels) if levels else levels})


def record_stem(case_id: str) -> str:
    """File name for a case's work files: readable, filesystem-safe, collision-free."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", case_id)[:80]
    return f"{safe}-{hashlib.sha1(case_id.encode('utf-8')).hexdigest()[:10]}"


def source_stats(path: Path) -> list[int]:
    """[size, mtime_ns] of a source file (of a DICOM folder: total size, newest mtime, files);
    [-1, -1] when it cannot be read. A record made from other bytes is extracted again."""
    try:
        if path.is_dir():
            sizes, newest = 0, 0
            entries = [entry for entry in os.scandir(path) if entry.is_file()]
            for entry in entries:
                stat = entry.stat()
                sizes += stat.st_size
                newest = max(newest, stat.st_mtime_ns)
            return [sizes, newest, len(entries)]
        stat = os.stat(path)
        return [stat.st_size, stat.st_mtime_ns]
    except OSError:
        return [-1, -1]


def crops_file(record_path: Path) -> Path:
    """`NAME.crops` beside a case's `NAME.json`: its crops' Blosc chunks, one after another."""
    return Path(record_path).with_suffix(".crops")


def _rounded(values, digits: int) -> tuple[float, ...]:
    return tuple(round(float(v), digits) for v in values)


def _tuples(value: Any) -> Any:
    """A JSON list (of lists) as the tuple (of tuples) a record holds; other values as they are."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


@dataclass(frozen=True, kw_only=True)
class CropRecord:
    """One crop of a case: what the metadata and manifest say about it, and where its bytes are."""

    level: str
    label_value: int
    centroid: tuple[float, float, float]  # world mm, RAS+, 4 decimals
    tangent: tuple[float, float, float]  # unit, 6 decimals
    inside_fraction: float
    bbox: tuple[int, int, int, int, int, int]
    truncated: bool
    shape: tuple[int, int, int]
    sha256: str  # of the crop's int16 little-endian C-order bytes
    offset: int  # of its Blosc chunk in NAME.crops
    nbytes: int  # of that chunk

    @classmethod
    def of_crop(cls, crop, *, sha256: str, offset: int, nbytes: int) -> CropRecord:
        """The record of a `geometry.VertebraCrop` whose chunk was written at `offset`."""
        return cls(
            level=crop.level,
            label_value=int(crop.label_value),
            centroid=_rounded(crop.centroid_world, 4),
            tangent=_rounded(crop.tangent, 6),
            inside_fraction=round(float(crop.inside_fraction), 6),
            bbox=tuple(int(v) for v in crop.bbox),
            truncated=bool(crop.truncated),
            shape=tuple(int(n) for n in crop.array.shape),
            sha256=sha256,
            offset=offset,
            nbytes=nbytes,
        )


@dataclass(frozen=True, kw_only=True)
class CaseRecord:
    """One extracted (or failed) case, as its work file `NAME.json` holds it.

    The fields' order is the order of the keys in that file (`dataclasses.asdict`).
    """

    version: int = RECORD_VERSION
    case: str
    patient: str
    ct: str  # the CT's name as recorded (relative to --src or the pairs csv)
    seg: str
    series: str | None = None  # the DICOM series asked for (None: NIfTI, or the largest CT series)
    geometry: dict[str, Any]  # `geometry_settings` of the run that extracted it
    sources: dict[str, list[int]]  # `source_stats` of ct and seg
    status: str  # "ok" | "failed"
    error: str | None = None  # the one-line reason, when failed
    source_orientation: str | None = None
    source_spacing: tuple[float, float, float] | None = None
    scheme: str | None = None
    # Label values that are no vertebra in `scheme`, with voxel counts, ascending.
    other_labels: tuple[tuple[int, int], ...] = ()
    crops: tuple[CropRecord, ...] = ()
    skipped: tuple[Skipped, ...] = ()
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CaseRecord:
        nested = {"crops", "skipped"}
        return cls(
            **{name: _tuples(value) for name, value in data.items() if name not in nested},
            crops=tuple(
                CropRecord(**{name: _tuples(value) for name, value in crop.items()})
                for crop in data.get("crops", ())
            ),
            skipped=tuple(Skipped(**skip) for skip in data.get("skipped", ())),
        )

    def write(self, path: Path) -> None:
        """Write the record to `path` atomically (the case's "finished" marker)."""
        write_atomically(path, json.dumps(dataclasses.asdict(self), indent=1).encode("utf-8"))

    @classmethod
    def read(cls, path: Path) -> CaseRecord:
        """The record at `path`; `IngestError` when it is missing or unreadable."""
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise IngestError(
                path, f"work file unreadable ({type(error).__name__}); rerun with --force"
            ) from None

    @classmethod
    def read_if_valid(cls, path: Path) -> CaseRecord | None:
        """The record at `path`, or None when it is missing, garbled or of another version."""
        try:
            record = cls.read(path)
        except IngestError:
            return None
        return record if record.version == RECORD_VERSION else None
