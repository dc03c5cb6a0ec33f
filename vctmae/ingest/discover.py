"""Find the (CT, label map) pairs to ingest.

The layouts, all found recursively under `--src`:

- `…/ct/NAME.nii[.gz]` with `…/seg/NAME.nii[.gz]` beside it (the reference code's
  layout); `…/ct/NAME/` may also be a DICOM series folder (the CT; its label map
  stays `seg/NAME.nii[.gz]`);
- VerSe naming: `X_ct.nii.gz` with `X_seg-vert_msk.nii.gz` in the same folder;
- VerSe's official layout: `…/rawdata/sub-Y/[…/]X_ct.nii.gz` with its label map at
  the same place under the sibling `derivatives/` folder,
  `…/derivatives/sub-Y/[…/]X_seg-vert_msk.nii.gz`;
- `--pairs pairs.csv` with columns `ct,seg[,case,patient,series]`; relative paths
  are resolved against the csv's folder, and `ct` may name a DICOM series folder
  (`series`: the SeriesInstanceUID to read there).

Case id = NAME / X (or the csv's `case`); patient = the csv's `patient`, else the
case id. Problems (a file in `ct/` that is not NIfTI, a folder in `ct/` holding
no readable DICOM series, a CT without its label map, a label map without its
CT, the same case id twice) are returned as `BadInput`s, never raised, so the
run can go on with the good cases and counts the bad ones as failed. With
`missing_seg_ok` (ingest `--segment`) a CT without a label map is a case with
`seg=None`, to be segmented.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from vctmae.ingest.dicom import is_dicom_series_folder
from vctmae.ingest.errors import IngestError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
VERSE_CT = "_ct"
VERSE_SEG = "_seg-vert_msk"
# VerSe's official (BIDS-like) layout: images under rawdata/, label maps under derivatives/.
VERSE_RAW, VERSE_DERIVED = "rawdata", "derivatives"


@dataclass(frozen=True, kw_only=True)
class Case:
    """One CT scan and its vertebra label map.

    `ct_name` / `seg_name` are the paths as recorded in the output metadata:
    relative to `--src` (or to the pairs csv's folder), so that runs on
    different machines (`--part`) record the same names.
    """

    case: str
    patient: str
    ct: Path  # a NIfTI file or a DICOM series folder
    seg: Path | None  # None: no label map yet (ingest --segment makes one)
    ct_name: str
    seg_name: str
    series: str | None = None  # DICOM SeriesInstanceUID to read (pairs csv `series`)


@dataclass(frozen=True, kw_only=True)
class BadInput:
    """A file that cannot become a case; `case` is the best guess of its case id."""

    case: str
    path: str
    problem: str

    def line(self) -> str:
        return f"{self.path}: {self.problem}"


def nifti_stem(name: str) -> str | None:
    """'abc.nii.gz' → 'abc'; None when `name` is not a NIfTI file name."""
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def _display(path: Path, root: Path) -> str:
    # abspath, not resolve: a symlinked case keeps the name it has under --src.
    absolute, base = Path(os.path.abspath(path)), Path(os.path.abspath(root))
    try:
        return absolute.relative_to(base).as_posix()
    except ValueError:
        return str(absolute)


def _walk(src: Path, skip: set[Path]):
    """os.walk in sorted order, not descending into hidden folders or `skip` (e.g. --out)."""
    for folder, dirs, files in os.walk(src):
        here = Path(folder)
        dirs[:] = sorted(
            d for d in dirs if not d.startswith(".") and Path(os.path.abspath(here / d)) not in skip
        )
        yield here, set(dirs), sorted(f for f in files if not f.startswith("."))


def _verse_counterpart(folder: Path, stem: str, *, source: str, target: str) -> Path | None:
    """Where VerSe's official layout keeps `stem.nii[.gz]` of the other tree: `folder`'s place
    under the `target` folder (e.g. `derivatives/`) beside the nearest `source` folder (e.g.
    `rawdata/`) above it. The file that exists, else the `.nii.gz` name (for messages); None
    when `folder` is not under a `source` folder."""
    parts = folder.parts
    if source not in parts:
        return None
    at = len(parts) - 1 - parts[::-1].index(source)
    place = Path(*parts[:at], target, *parts[at + 1 :])
    found = [place / f"{stem}{suffix}" for suffix in NIFTI_SUFFIXES]
    return next((path for path in found if path.is_file()), found[0])


def _not_a_series(folder: Path) -> str:
    """Why a folder in `ct/` is no DICOM series (`is_dicom_series_folder` said so)."""
    try:
        entries = list(folder.iterdir())
    except OSError as error:
        return f"cannot list this DICOM folder ({error.strerror or error})"
    if not entries:
        return "empty folder in ct/: no DICOM series to read"
    files = sum(1 for entry in entries if entry.is_file())
    return (
        f"no readable DICOM series in this folder ({files} file(s), "
        f"{len(entries) - files} folder(s); no DICOM image file with the DICM preamble)"
    )


def _case(
    case_id: str,
    ct: Path,
    seg: Path | None,
    root: Path,
    *,
    patient: str | None = None,
    series: str | None = None,
) -> Case:
    """A case whose file names are recorded relative to `root`; its patient is its id unless given."""
    return Case(
        case=case_id,
        patient=patient or case_id,
        ct=ct,
        seg=seg,
        ct_name=_display(ct, root),
        seg_name=_display(seg, root) if seg is not None else "",
        series=series,
    )


def scan_folder(
    src: Path, *, exclude: Path | None = None, missing_seg_ok: bool = False
) -> tuple[list[Case], list[BadInput]]:
    """Cases under `src` in every folder layout (unsorted; see `discover_cases`)."""
    skip = {Path(os.path.abspath(exclude))} if exclude is not None else set()
    cases: list[Case] = []
    bad: list[BadInput] = []

    def refuse(case_id: str, path: Path, problem: str) -> None:
        bad.append(BadInput(case=case_id, path=_display(path, src), problem=problem))

    def no_seg(case_id: str, ct: Path, problem: str) -> None:
        if missing_seg_ok:
            cases.append(_case(case_id, ct, None, src))
        else:
            refuse(case_id, ct, problem)

    for folder, dirs, files in _walk(src, skip):
        # VerSe naming: X_ct.nii.gz + X_seg-vert_msk.nii.gz in one folder (or, in VerSe's
        # official layout, at the same place under derivatives/).
        stems = {nifti_stem(f): f for f in files if nifti_stem(f) is not None}
        for stem, name in stems.items():
            if stem.endswith(VERSE_CT) and folder.name not in ("ct", "seg"):
                case_id = stem[: -len(VERSE_CT)]
                ct_path = folder / name
                if case_id + VERSE_SEG in stems:
                    cases.append(_case(case_id, ct_path, folder / stems[case_id + VERSE_SEG], src))
                    continue
                derived = _verse_counterpart(
                    folder, case_id + VERSE_SEG, source=VERSE_RAW, target=VERSE_DERIVED
                )
                if derived is not None and derived.is_file():
                    cases.append(_case(case_id, ct_path, derived, src))
                    continue
                where = "beside it"
                if derived is not None:
                    where = f"beside it or at {_display(derived, src)}"
                no_seg(case_id, ct_path, f"no label map {case_id}{VERSE_SEG}.nii.gz {where}")
            elif stem.endswith(VERSE_SEG) and folder.name not in ("ct", "seg"):
                # A VerSe label map whose CT is neither beside it nor under rawdata/.
                case_id = stem[: -len(VERSE_SEG)]
                ct = _verse_counterpart(
                    folder, case_id + VERSE_CT, source=VERSE_DERIVED, target=VERSE_RAW
                )
                if case_id + VERSE_CT in stems or (ct is not None and ct.is_file()):
                    continue
                refuse(
                    case_id, folder / name, f"no CT {case_id}{VERSE_CT}.nii.gz for this label map"
                )
        # ct/ + seg/ layout; a folder in ct/ may be a DICOM series.
        if "ct" in dirs or "seg" in dirs:
            ct_dir, seg_dir = folder / "ct", folder / "seg"
            seg_stems: dict[str, Path] = {}
            if seg_dir.is_dir():
                for f in sorted(os.listdir(seg_dir)):
                    stem = nifti_stem(f)
                    if stem is not None and not f.startswith("."):
                        seg_stems.setdefault(stem, seg_dir / f)
            ct_names = sorted(os.listdir(ct_dir)) if ct_dir.is_dir() else []
            with_ct: set[str] = set()  # stems of the label maps a CT in ct/ claims
            for f in ct_names:
                path = ct_dir / f
                if f.startswith("."):
                    continue
                if path.is_dir():
                    stem = f
                    if not is_dicom_series_folder(path):
                        with_ct.add(stem)  # the case fails here, not again for its label map
                        refuse(stem, path, _not_a_series(path))
                        continue
                else:
                    stem = nifti_stem(f)
                if stem is None:
                    refuse(f, path, "not a NIfTI file (expected NAME.nii or NAME.nii.gz)")
                    continue
                with_ct.add(stem)
                seg = seg_stems.get(stem)
                if seg is None:
                    no_seg(stem, path, f"no label map seg/{stem}.nii.gz for this CT")
                    continue
                cases.append(_case(stem, path, seg, src))
            for stem, seg in seg_stems.items():
                if stem in with_ct:
                    continue
                refuse(
                    stem,
                    seg,
                    f"no CT ct/{stem}.nii.gz or DICOM folder ct/{stem}/ for this label map",
                )
    return cases, bad


def read_pairs(
    pairs_csv: Path, *, missing_seg_ok: bool = False
) -> tuple[list[Case], list[BadInput]]:
    """Cases listed in a pairs csv (`ct,seg[,case,patient,series]`; `seg` may be empty
    with `missing_seg_ok`)."""
    root = pairs_csv.parent
    try:
        # utf-8-sig: tolerate an Excel BOM.
        with open(pairs_csv, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = set(reader.fieldnames or ())
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise IngestError(pairs_csv, f"cannot read the pairs csv ({error})") from None
    if not {"ct", "seg"} <= columns:
        raise IngestError(
            pairs_csv, f"needs columns ct,seg[,case,patient,series]; found {sorted(columns)}"
        )
    if not rows:
        raise IngestError(pairs_csv, "holds only a header, no ct,seg pairs")
    cases: list[Case] = []
    bad: list[BadInput] = []
    for line_no, row in enumerate(rows, start=2):
        ct_text, seg_text = (row.get("ct") or "").strip(), (row.get("seg") or "").strip()
        if not ct_text or (not seg_text and not missing_seg_ok):
            bad.append(
                BadInput(
                    case=f"{pairs_csv.name}:{line_no}",
                    path=f"{pairs_csv}:{line_no}",
                    problem="empty ct or seg path",
                )
            )
            continue
        ct, seg = root / ct_text, (root / seg_text if seg_text else None)
        case_id = (row.get("case") or "").strip() or nifti_stem(ct.name) or ct.name
        patient = (row.get("patient") or "").strip() or None
        series = (row.get("series") or "").strip() or None
        cases.append(_case(case_id, ct, seg, root, patient=patient, series=series))
    return cases, bad


def discover_cases(
    src: Path | None,
    *,
    pairs: Path | None = None,
    exclude: Path | None = None,
    missing_seg_ok: bool = False,
) -> tuple[list[Case], list[BadInput]]:
    """All cases from `src` and/or a pairs csv, sorted by case id; duplicates become BadInputs."""
    cases: list[Case] = []
    bad: list[BadInput] = []
    if src is not None:
        cases, bad = scan_folder(src, exclude=exclude, missing_seg_ok=missing_seg_ok)
    if pairs is not None:
        found, problems = read_pairs(pairs, missing_seg_ok=missing_seg_ok)
        cases, bad = cases + found, bad + problems
    by_id: dict[str, Case] = {}
    for case in sorted(cases, key=lambda c: (c.case, c.ct_name)):
        if case.case in by_id:
            bad.append(
                BadInput(
                    case=case.case,
                    path=case.ct_name,
                    problem=f"duplicate case id {case.case!r} (also {by_id[case.case].ct_name}); ignored",
                )
            )
            continue
        by_id[case.case] = case
    return sorted(by_id.values(), key=lambda c: c.case), sorted(bad, key=lambda b: (b.case, b.path))
