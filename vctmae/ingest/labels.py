"""Fracture labels and the patient-level train/val/test split.

`labels.csv` has columns `case,level` and `fracture` (0/1) or `grade` (Genant 0–3,
fracture = grade ≥ 1), optionally `split` (train|val|test) and `patient`.

Split without a `split` column: the labelled patients are ranked by the SHA-256 of
their id (a fixed pseudo-random order that needs no seed and does not depend on the
order of rows or on which cases a `--part` run sees), and the first 60 % of that
order go to train, the next 20 % to val, the rest to test. Every case of a patient
lands in the same split (paper App. A.5: patient-level separation). Adding patients
moves only the few patients near the 60 % / 80 % boundaries.

A patient whose cases are given two different splits is an error for that
patient's cases (the message names the patient and the file); other cases go on.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from vctmae.errors import VctmaeError
from vctmae.ingest.levels import level_index

SPLITS = ("train", "val", "test")
UNLABELED = "unlabeled"
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)


class LabelsError(VctmaeError, ValueError):
    """The labels file as a whole cannot be used (missing columns, bad value)."""


@dataclass(frozen=True, kw_only=True)
class VertebraLabel:
    fracture: int  # class 0/1
    grade: int | None  # Genant grade when known


@dataclass(frozen=True, kw_only=True)
class Labels:
    """Parsed labels file: per-vertebra classes plus per-case patient/split columns."""

    path: Path
    vertebrae: dict[tuple[str, str], VertebraLabel]
    # Only where the csv has a `patient` / `split` column.
    patient_of_case: dict[str, str] = field(default_factory=dict)
    split_of_case: dict[str, str] = field(default_factory=dict)

    @property
    def cases(self) -> set[str]:
        return {case for case, _ in self.vertebrae}


@dataclass(frozen=True, kw_only=True)
class CaseAssignment:
    """Where a case goes: its patient and split, or why it cannot be used."""

    patient: str
    split: str
    error: str | None = None


def _int_field(row: dict, name: str, where: str, allowed: range) -> int | None:
    text = (row.get(name) or "").strip()
    if text == "":
        return None
    try:
        value = int(float(text))
    except ValueError:
        raise LabelsError(f"{where}: {name} {text!r} is not a number") from None
    if value not in allowed or float(text) != value:
        raise LabelsError(f"{where}: {name} {text!r} must be one of {list(allowed)}")
    return value


def read_labels(path: Path) -> Labels:
    """Parse `labels.csv`; raises LabelsError with file and line on malformed content."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: tolerate an Excel BOM
            reader = csv.DictReader(f)
            columns = {c.strip() for c in (reader.fieldnames or ())}
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise LabelsError(f"{path}: cannot read labels ({error})") from None
    if not {"case", "level"} <= columns or not ({"fracture", "grade"} & columns):
        raise LabelsError(
            f"{path}: needs columns case,level and fracture or grade (optional split, patient); "
            f"found {sorted(columns)}"
        )
    if not rows:
        raise LabelsError(f"{path}: holds only a header, no labels")
    vertebrae: dict[tuple[str, str], VertebraLabel] = {}
    patient_of_case: dict[str, str] = {}
    split_of_case: dict[str, str] = {}
    for line_no, raw in enumerate(rows, start=2):
        row = {(k or "").strip(): v for k, v in raw.items()}
        where = f"{path}:{line_no}"
        case = (row.get("case") or "").strip()
        level = (row.get("level") or "").strip().upper()
        if not case or not level:
            raise LabelsError(f"{where}: empty case or level")
        try:
            level_index(level)
        except ValueError as error:
            raise LabelsError(f"{where}: {error}") from None
        grade = _int_field(row, "grade", where, range(0, 4))
        fracture = _int_field(row, "fracture", where, range(0, 2))
        if fracture is None and grade is None:
            raise LabelsError(f"{where}: neither fracture nor grade given")
        if fracture is None:
            fracture = int(grade >= 1)
        elif grade is not None and fracture != int(grade >= 1):
            raise LabelsError(
                f"{where}: fracture {fracture} contradicts grade {grade} (fracture = grade ≥ 1)"
            )
        if (case, level) in vertebrae:
            raise LabelsError(f"{where}: {case} {level} is labelled twice")
        vertebrae[(case, level)] = VertebraLabel(fracture=fracture, grade=grade)

        patient = (row.get("patient") or "").strip()
        if patient:
            if patient_of_case.setdefault(case, patient) != patient:
                raise LabelsError(
                    f"{where}: case {case} belongs to two patients "
                    f"({patient_of_case[case]}, {patient})"
                )
        split = (row.get("split") or "").strip().lower()
        if split:
            if split not in SPLITS:
                raise LabelsError(f"{where}: split {split!r} must be one of {', '.join(SPLITS)}")
            if split_of_case.setdefault(case, split) != split:
                raise LabelsError(
                    f"{where}: case {case} is given two splits ({split_of_case[case]}, {split})"
                )
    return Labels(
        path=path, vertebrae=vertebrae, patient_of_case=patient_of_case, split_of_case=split_of_case
    )


def hashed_splits(patients: set[str]) -> dict[str, str]:
    """Deterministic 60/20/20 split of `patients` (order by SHA-256 of the id)."""
    ordered = sorted(patients, key=lambda p: (hashlib.sha256(p.encode()).hexdigest(), p))
    n = len(ordered)
    n_train = round(n * SPLIT_FRACTIONS[0])
    n_val = round(n * (SPLIT_FRACTIONS[0] + SPLIT_FRACTIONS[1])) - n_train
    out = {}
    for i, patient in enumerate(ordered):
        out[patient] = "train" if i < n_train else "val" if i < n_train + n_val else "test"
    return out


def assign_cases(
    labels: Labels | None, discovered_patient: dict[str, str]
) -> dict[str, CaseAssignment]:
    """Patient and split of every case in `discovered_patient` (case → patient from discovery).

    Patient: the labels' `patient` column, else the discovery's (pairs csv), else the case id.
    Without labels every case is `unlabeled`.
    """
    if labels is None:
        return {
            case: CaseAssignment(patient=patient, split=UNLABELED)
            for case, patient in discovered_patient.items()
        }
    patient_of = {
        case: labels.patient_of_case.get(case) or patient
        for case, patient in discovered_patient.items()
    }
    for case in labels.cases:  # labelled cases not on disk still shape the split
        patient_of.setdefault(case, labels.patient_of_case.get(case) or case)

    explicit: dict[str, set[str]] = {}
    for case, split in labels.split_of_case.items():
        explicit.setdefault(patient_of[case], set()).add(split)
    labelled_patients = {patient_of[case] for case in labels.cases}
    hashed = hashed_splits(labelled_patients - set(explicit))

    out = {}
    for case, patient in ((c, patient_of[c]) for c in discovered_patient):
        splits = explicit.get(patient, set())
        if len(splits) > 1:
            out[case] = CaseAssignment(
                patient=patient,
                split="",
                error=f"{labels.path}: patient {patient} is in two splits ({', '.join(sorted(splits))}); "
                f"case {case} not written",
            )
        elif splits:
            out[case] = CaseAssignment(patient=patient, split=next(iter(splits)))
        else:
            out[case] = CaseAssignment(patient=patient, split=hashed.get(patient, "train"))
    return out
