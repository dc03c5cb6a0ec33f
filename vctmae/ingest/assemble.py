"""Assemble step of `vctmae ingest`: case records, in case order, → shards, Zarr store, manifest.

An `Assembly` takes the cases one at a time, always in the run's sorted case order, and
streams their samples into `OUT/.ingest-work/staging/` (`vctmae.ingest.writers`). Since it
sees the same records in the same order whatever the worker count, executor, timing or
interruptions, the output bytes depend only on the inputs and flags. `finish` publishes
the staged set into `OUT` as one step (`vctmae.ingest.publish`), unless it equals the set
already published (same fingerprint), which is left as it is.

A freshly extracted case arrives with its crops' int16 bytes, so nothing is decoded or
hashed again; a resumed case's crops are read back from its work file and checked against
their recorded sha256. With `write=False` an `Assembly` only plans: it computes the
fingerprint of what it would write from the small records alone.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vctmae.clip import CLASS_MEMBER, CROP_MEMBER, META_MEMBER
from vctmae.errors import OutOfSpaceError
from vctmae.ingest.config import IngestConfig
from vctmae.ingest.discover import BadInput
from vctmae.ingest.errors import IngestError
from vctmae.ingest.labels import CaseAssignment, Labels
from vctmae.ingest.publish import MANIFEST, PUBLISHED, STAGING, WORK, ZARR, publish
from vctmae.ingest.records import CaseRecord, CropRecord, crops_file
from vctmae.ingest.writers import (
    ManifestWriter,
    ShardWriter,
    ZarrWriter,
    decode_crop,
    npy_header,
)

ASSEMBLY_VERSION = 1  # layout of the published outputs


def sample_key(case_id: str, level: str) -> str:
    """`{case}_{level}` as one flat name of `[A-Za-z0-9_-]`.

    Every other character of the case id becomes "-": dots (WebDataset splits keys
    at the first dot), slashes (a tar member must never name a folder or an
    absolute path), spaces and the like. The case id itself stays in the metadata.
    """
    return f"{re.sub(r'[^A-Za-z0-9_-]', '-', case_id)}_{level}"


@dataclass(frozen=True, kw_only=True)
class Sample:
    """One crop that will be written: its record, its metadata (`KEY.json`), class and grade."""

    crop: CropRecord
    position: int  # of `crop` in its case record (and of its bytes in `Extracted.crops`)
    meta: dict[str, Any]
    cls: int | None
    grade: int | None

    @property
    def key(self) -> str:
        return self.meta["key"]


def case_samples(
    record: CaseRecord, assignment: CaseAssignment, labels: Labels | None, spacing: float
) -> tuple[list[Sample], list[dict[str, str]]]:
    """The samples of an extracted case, and its crops skipped for want of a label."""
    samples, skipped = [], []
    for position, crop in enumerate(record.crops):
        cls = grade = None
        if labels is not None:
            label = labels.vertebrae.get((record.case, crop.level))
            if label is None:
                skipped.append(
                    {
                        "case": record.case,
                        "level": crop.level,
                        "reason": f"no label: {crop.level} of {record.case} is not in {labels.path.name}",
                    }
                )
                continue
            cls, grade = label.fracture, label.grade
        meta = {
            "key": sample_key(record.case, crop.level),
            "case": record.case,
            "patient": assignment.patient,
            "level": crop.level,
            "label_value": crop.label_value,
            "label_scheme": record.scheme,
            "source": {"ct": record.ct, "seg": record.seg},
            "source_orientation": record.source_orientation,
            "source_spacing": list(record.source_spacing),
            "centroid": list(crop.centroid),
            "spacing": spacing,
            "shape": list(crop.shape),
            "tangent": list(crop.tangent),
            "inside_fraction": crop.inside_fraction,
            "bbox": list(crop.bbox),
            "truncated": crop.truncated,
            "split": assignment.split,
        }
        if labels is not None:
            meta["class"] = cls
            meta["grade"] = grade
        samples.append(Sample(crop=crop, position=position, meta=meta, cls=cls, grade=grade))
    return samples, skipped


@dataclass(kw_only=True)
class AssemblyResult:
    """What an assembly wrote (or would write), for the report."""

    failed: list[dict[str, str]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    cases_ok: int = 0
    samples: int = 0
    fingerprint: str = ""
    # Per case: label values that are no vertebra in the case's scheme, with voxel counts.
    other_labels: list[dict] = field(default_factory=list)
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)
    shards: list[str] = field(default_factory=list)
    assembly: str = ""  # "written" | "up to date"

    def split_summary(self) -> dict[str, dict[str, int]]:
        return {
            split: {
                "vertebrae": e["vertebrae"],
                "cases": len(e["cases"]),
                "patients": len(e["patients"]),
            }
            for split, e in sorted(self.splits.items())
        }

    def skipped_by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(s["reason"].split(":")[0] for s in self.skipped).items()))


class Assembly:
    """Streams cases, in case order, into the staged outputs (module docstring).

    `report(line)` is called at once for each case refused at assembly (labels, key
    clash); `advance(n)` after each case with the number of samples it wrote.
    """

    def __init__(
        self,
        *,
        config: IngestConfig,
        labels: Labels | None,
        assignments: Mapping[str, CaseAssignment],
        bad: list[BadInput],
        write: bool,
        report: Callable[[str], None] = lambda line: None,
        advance: Callable[[int], None] = lambda samples: None,
    ) -> None:
        self.out = config.out
        self.formats = config.formats
        self.shard_size = config.shard_size
        self.spacing = config.geometry.spacing
        self.labels = labels
        self.assignments = assignments
        self.write = write
        self._report = report
        self._advance = advance
        self.result = AssemblyResult()
        self._keys: set[str] = set()
        self._written = 0  # samples staged so far: the next one's Zarr index
        settings = [ASSEMBLY_VERSION, sorted(self.formats), self.shard_size, self.spacing]
        self._digest = hashlib.sha256(json.dumps(settings).encode())
        for item in bad:
            self.result.failed.append(
                {"case": item.case, "file": item.path, "reason": item.line(), "stage": "discover"}
            )
        self.staging = self.out / WORK / STAGING
        self._shards: dict[str, ShardWriter] = {}
        self._zarr: ZarrWriter | None = None
        self._manifest: ManifestWriter | None = None
        if write:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging.mkdir(parents=True)
            try:
                if "zarr" in self.formats:
                    self._zarr = ZarrWriter(self.staging / ZARR, config.geometry.size)
                self._manifest = ManifestWriter(self.staging / MANIFEST)
            except OutOfSpaceError:
                self.abort()
                raise

    def add(
        self, record: CaseRecord, record_path: Path, crops: tuple[bytes, ...] | None = None
    ) -> None:
        """Take the next case in order; `crops`: its crops' int16 bytes when just extracted."""
        try:
            self._add(record, record_path, crops)
        except OutOfSpaceError:
            self.abort()
            raise

    def _fail(self, record: CaseRecord, file: str, stage: str, reason: str) -> None:
        self.result.failed.append(
            {"case": record.case, "file": file, "reason": reason, "stage": stage}
        )
        if stage != "extract":
            self._report(reason)

    def _add(self, record: CaseRecord, record_path: Path, crops: tuple[bytes, ...] | None) -> None:
        assignment = self.assignments[record.case]
        if not record.ok:
            self._fail(record, record.ct, "extract", record.error)
            return
        if assignment.error:
            self._fail(record, str(self.labels.path), "labels", assignment.error)
            return
        samples, no_label = case_samples(record, assignment, self.labels, self.spacing)
        clash = next((s.key for s in samples if s.key in self._keys), None)
        if clash is not None:
            self._fail(
                record,
                record.ct,
                "keys",
                f"{record.ct}: crop key {clash} is already taken by another case "
                "(case ids that differ only in characters outside A-Za-z0-9_-, which "
                "become '-'); rename one",
            )
            return
        self._keys.update(s.key for s in samples)
        result = self.result
        result.cases_ok += 1
        if record.other_labels:
            result.other_labels.append(
                {
                    "case": record.case,
                    "scheme": record.scheme,
                    "labels": [{"value": v, "voxels": n} for v, n in record.other_labels],
                }
            )
        result.skipped += [{"case": record.case, **asdict(s)} for s in record.skipped] + no_label
        for sample in samples:
            entry = result.splits.setdefault(
                sample.meta["split"], {"vertebrae": 0, "cases": set(), "patients": set()}
            )
            entry["vertebrae"] += 1
            entry["cases"].add(sample.meta["case"])
            entry["patients"].add(sample.meta["patient"])
            self._digest.update(
                json.dumps(sample.meta, sort_keys=True).encode() + sample.crop.sha256.encode()
            )
        if self.write and samples:
            self._write(record, record_path, samples, crops)
        result.samples += len(samples)
        self._advance(len(samples))

    def _write(
        self,
        record: CaseRecord,
        record_path: Path,
        samples: list[Sample],
        crops: tuple[bytes, ...] | None,
    ) -> None:
        path = crops_file(record_path)
        with open(path, "rb") as work_file:
            for sample in samples:
                crop = sample.crop
                work_file.seek(crop.offset)
                encoded = work_file.read(crop.nbytes)
                if crops is not None:
                    raw = crops[sample.position]
                else:
                    raw = decode_crop(encoded, crop.shape).tobytes()
                    if hashlib.sha256(raw).hexdigest() != crop.sha256:
                        raise IngestError(
                            path,
                            f"work file corrupt (checksum of {crop.level}); rerun with --force",
                        )
                self._write_sample(sample, encoded, raw)

    def _write_sample(self, sample: Sample, encoded: bytes, raw: bytes) -> None:
        meta, split = sample.meta, sample.meta["split"]
        index = self._written
        shard = ""
        if "wds" in self.formats:
            if split not in self._shards:
                self._shards[split] = ShardWriter(self.staging, split, self.shard_size)
            members = [
                (CROP_MEMBER, npy_header(sample.crop.shape) + raw),
                (META_MEMBER, json.dumps(meta, ensure_ascii=False).encode("utf-8")),
            ]
            if sample.cls is not None:
                members.append((CLASS_MEMBER, str(sample.cls).encode("ascii")))
            shard = self._shards[split].write(sample.key, members)
        if self._zarr is not None:
            self._zarr.write(index, encoded, meta, sample.cls, sample.grade)
        self._manifest.write(
            {
                "key": sample.key,
                "case": meta["case"],
                "patient": meta["patient"],
                "level": meta["level"],
                "label_value": meta["label_value"],
                "class": "" if sample.cls is None else sample.cls,
                "grade": "" if sample.grade is None else sample.grade,
                "split": split,
                "shard": shard,
                "zarr_index": index if self._zarr is not None else "",
                "centroid_x": meta["centroid"][0],
                "centroid_y": meta["centroid"][1],
                "centroid_z": meta["centroid"][2],
                "spacing": self.spacing,
                "truncated": int(meta["truncated"]),
                "sha256": sample.crop.sha256,
            }
        )
        self._written += 1

    def finish(self, *, force: bool = False) -> AssemblyResult:
        """Close the staged outputs and publish them (unless they equal the published set)."""
        result = self.result
        result.failed.sort(key=lambda f: (f["case"], f["file"]))
        result.fingerprint = self._digest.hexdigest()
        if not self.write:
            return result
        try:
            for writer in self._shards.values():
                writer.close()
            if self._zarr is not None:
                self._zarr.close()
            self._manifest.close()
        except OutOfSpaceError:
            self.abort()
            raise
        shards = sorted(name for writer in self._shards.values() for name in writer.names)
        if not force and adopt_published(self.out, result):
            # Leave the published set (and its files' times) alone.
            self.abort()
            return result
        record = {
            "fingerprint": result.fingerprint,
            "shards": shards,
            "formats": sorted(self.formats),
        }
        publish(self.out, record)
        result.shards, result.assembly = shards, "written"
        return result

    def abort(self) -> None:
        """Drop the staged outputs (the published set is untouched)."""
        for writer in self._shards.values():
            try:
                writer.close()
            except OSError:
                pass
        self._shards = {}
        shutil.rmtree(self.staging, ignore_errors=True)


def adopt_published(out: Path, result: AssemblyResult) -> bool:
    """If the set `publish` last recorded in `out` is `result`'s (same fingerprint) and all there,
    mark `result` "up to date" with that set's shards; returns whether it did."""
    try:
        published = json.loads((out / WORK / PUBLISHED).read_text())
    except (OSError, ValueError):
        return False
    names = (
        published.get("shards", [])
        + [MANIFEST]
        + ([ZARR] if "zarr" in published.get("formats", []) else [])
    )
    if published.get("fingerprint") != result.fingerprint:
        return False
    if not all((out / name).exists() for name in names):
        return False
    result.shards, result.assembly = published.get("shards", []), "up to date"
    return True
