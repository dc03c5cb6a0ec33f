"""What `vctmae predict` found, as typed records: one per vertebra, one per scan.

These travel from the run (`vctmae.predict.run`) to the report writers
(`vctmae.predict.report`) and into `summary.json` and each scan's record (`to_json`); a
resumed run reads the records back (`from_json`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from vctmae.ingest.assemble import sample_key

# Longest report folder name: far below the 255 bytes file systems allow, so that the folder and
# the temporary names of the files written in it always fit.
MAX_FOLDER = 96


def case_folder(case_id: str) -> str:
    """The report folder of a case: its id as crop keys spell it (`sample_key`: every
    character outside [A-Za-z0-9_-] becomes "-"), so `CASE/` and the keys `CASE_L1` agree.

    An id too long for a file name is cut, and a digest of the whole id keeps distinct ids
    apart; the full id stays in the pages, predictions.csv and summary.json.
    """
    folder = sample_key(case_id, "").removesuffix("_")
    if len(folder) <= MAX_FOLDER:
        return folder
    digest = hashlib.sha256(case_id.encode("utf-8")).hexdigest()[:16]
    return f"{folder[: MAX_FOLDER - len(digest) - 1]}-{digest}"


@dataclass(frozen=True, kw_only=True)
class VertebraResult:
    """One assessed vertebra."""

    key: str  # `{case}_{level}`, the key ingest gives its crop
    level: str
    prob_fracture: float  # multi-view mean of the softmax probability of "fracture"
    predicted: bool  # prob_fracture >= the run's threshold
    centroid: tuple[float, float, float]  # world mm, RAS+ (NIfTI convention)
    tangent: tuple[float, float, float]  # the crop's superior → inferior axis, RAS+
    inside_fraction: float  # of the crop lying inside the scan
    # The vertebra mask's box in crop indices, half-open (x0, x1, y0, y1, z0, z1).
    bbox: tuple[int, int, int, int, int, int]
    picture: str | None = None  # frames + attention PNG, relative to the case folder

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "level": self.level,
            "prob_fracture": self.prob_fracture,
            "predicted": int(self.predicted),
            "centroid_mm": list(self.centroid),
            "tangent": list(self.tangent),
            "inside_fraction": self.inside_fraction,
            "bbox": list(self.bbox),
            "picture": self.picture,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VertebraResult:
        return cls(
            key=data["key"],
            level=data["level"],
            prob_fracture=float(data["prob_fracture"]),
            predicted=bool(data["predicted"]),
            centroid=tuple(data["centroid_mm"]),
            tangent=tuple(data["tangent"]),
            inside_fraction=data["inside_fraction"],
            bbox=tuple(data["bbox"]),
            picture=data["picture"],
        )


@dataclass(frozen=True, kw_only=True)
class NotAssessed:
    """A vertebra of the label map without a prediction, and why (ingest's skip reason)."""

    level: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"level": self.level, "reason": self.reason}

    @classmethod
    def from_json(cls, data: dict[str, str]) -> NotAssessed:
        return cls(level=data["level"], reason=data["reason"])


@dataclass(frozen=True, kw_only=True)
class ScanResult:
    """One scan: its vertebrae, or why it failed; timings in seconds by stage."""

    case: str
    folder: str  # `case_folder(case)`: CASE/ under --out
    ct: str
    seg: str  # the label map used ("" when the scan failed before one was found)
    status: str  # "ok" | "failed"
    error: str | None = None  # the one-line reason, when failed
    segmented: bool = False  # the label map was made by TotalSegmentator
    series: str | None = None
    source_orientation: str | None = None
    source_spacing: tuple[float, float, float] | None = None
    scheme: str | None = None
    vertebrae: tuple[VertebraResult, ...] = ()
    not_assessed: tuple[NotAssessed, ...] = ()
    seconds: dict[str, float] = field(default_factory=dict)
    page: str | None = None  # CASE/report.html, relative to --out
    overview: str | None = None  # the overview picture, relative to --out
    # The DICOM SEG and SR written into the CT's study, relative to --out; or why there are none.
    dicom: tuple[str, ...] = ()
    dicom_note: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def fractured(self) -> tuple[VertebraResult, ...]:
        return tuple(v for v in self.vertebrae if v.predicted)

    def to_json(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "folder": self.folder,
            "status": self.status,
            "error": self.error,
            "ct": self.ct,
            "seg": self.seg,
            "segmented": self.segmented,
            "series": self.series,
            "source_orientation": self.source_orientation,
            "source_spacing_mm": list(self.source_spacing) if self.source_spacing else None,
            "label_scheme": self.scheme,
            "vertebrae_assessed": len(self.vertebrae),
            "fractured_levels": [v.level for v in self.fractured],
            "vertebrae": [v.to_json() for v in self.vertebrae],
            "not_assessed": [v.to_json() for v in self.not_assessed],
            "timings_s": {k: round(v, 3) for k, v in self.seconds.items()},
            "page": self.page,
            "overview": self.overview,
            "dicom": list(self.dicom),
            "dicom_note": self.dicom_note,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ScanResult:
        """The scan `to_json` wrote (timings as rounded there)."""
        spacing = data["source_spacing_mm"]
        return cls(
            case=data["case"],
            folder=data["folder"],
            ct=data["ct"],
            seg=data["seg"],
            status=data["status"],
            error=data["error"],
            segmented=data["segmented"],
            series=data["series"],
            source_orientation=data["source_orientation"],
            source_spacing=tuple(spacing) if spacing else None,
            scheme=data["label_scheme"],
            vertebrae=tuple(VertebraResult.from_json(v) for v in data["vertebrae"]),
            not_assessed=tuple(NotAssessed.from_json(n) for n in data["not_assessed"]),
            seconds=dict(data["timings_s"]),
            page=data["page"],
            overview=data["overview"],
            dicom=tuple(data["dicom"]),
            dicom_note=data["dicom_note"],
        )
