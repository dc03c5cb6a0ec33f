"""`vctmae ingest`: raw CT cases → WebDataset shards, Zarr store, manifest, report (SPEC §2).

Design — two phases, so that the run is resumable, atomic, byte-deterministic
and flat in memory at once:

1. **Extract** (parallel). Each case is cut into crops by
   `geometry.extract_crops` in a worker process (a process pool with at most
   2 × workers cases queued; a worker that dies fails only its own case), which
   also compresses each crop into its final Zarr chunk bytes and writes the case's
   result into the work folder `OUT/.ingest-work/cases/`: `NAME.crops` (the
   crops, Blosc-compressed one after another) and then `NAME.json` (metadata,
   skipped vertebrae, or the failure line), each under a temporary name and
   renamed when complete. The json is the "case finished" marker: a rerun skips
   cases whose json matches the geometry settings and the source files' size
   and mtime (`--force` redoes them); a killed run loses at most the cases in
   flight. Workers send only a small summary back and each holds one case at a
   time, so memory does not grow with the number of cases.
2. **Assemble** (one process, case order). The finished case files are
   streamed, one case at a time, in sorted case order into shards, the Zarr
   store and the manifest inside `OUT/.ingest-work/staging/`, which are then
   published into `OUT` as one set (`vctmae.ingest.publish`: a journal whose
   rename is the commit point; a run killed while publishing is completed by
   the next run). Since assembly reads only the case files and always
   visits them in the same order, the output bytes do not depend on worker
   count, timing or interruptions (Blosc compresses single-threaded: its
   multi-threaded output differs with the thread count). Assembly is skipped when its inputs are
   unchanged since the last published output (fingerprint in
   `.ingest-work/assembled.json`).

Workers die with the main process (`_worker_started`): a kill -9 of the main
process must not leave workers running and holding its stdout. A full disk
stops the run with one line (`OutOfSpaceError`) and leaves earlier outputs
and finished cases as they were.

`--part I/N` extracts every N-th case of the sorted case list (and assembles
that part's own outputs); `run.json` in the part's work folder lists its cases.
`--merge PART…` assembles the parts' case files into OUT exactly as a single run
would, so the merged shards, manifest and Zarr store equal a full run's bytes.
The work folder is a cache: delete it after a run to save disk (a later run then
extracts again) — but keep the parts' work folders until they are merged.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vctmae.clip import CLASS_MEMBER, CROP_MEMBER, META_MEMBER
from vctmae.errors import OutOfSpaceError, UsageError, is_out_of_space, out_of_space
from vctmae.ingest.discover import BadInput, Case, discover_cases
from vctmae.ingest.errors import IngestError
from vctmae.ingest.files import TEMPORARY, atomic_file, atomic_write
from vctmae.ingest.geometry import GeometryConfig
from vctmae.ingest.labels import UNLABELED, CaseAssignment, Labels, assign_cases, read_labels
from vctmae.ingest.publish import MANIFEST, PUBLISHED, STAGING, WORK, ZARR, finish_publish, publish
from vctmae.ingest.writers import (
    ManifestWriter,
    ShardWriter,
    ZarrWriter,
    decode_crop,
    encode_crop,
    npy_bytes,
    parse_size,
)

FORMATS = ("wds", "zarr")
# Layout of the per-case work files; 2: whole-set label-scheme rule, other labels recorded.
RECORD_VERSION = 2
ASSEMBLY_VERSION = 1  # layout of the published outputs
REPORT = "ingest-report.json"


@dataclass(frozen=True, kw_only=True)
class IngestConfig:
    """One `vctmae ingest` run. Either `src`/`pairs` (extract) or `merge` (join part outputs)."""

    out: Path
    src: Path | None = None
    labels: Path | None = None
    pairs: Path | None = None
    formats: frozenset[str] = frozenset(FORMATS)
    geometry: GeometryConfig = field(default_factory=GeometryConfig)
    workers: int | None = None  # None: one per usable core
    part: tuple[int, int] | None = None  # (i, n), 1-based: every n-th case starting at i
    shard_size: int | str = "1GiB"
    force: bool = False
    merge: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "formats", frozenset(self.formats))
        object.__setattr__(self, "shard_size", parse_size(self.shard_size))
        object.__setattr__(self, "merge", tuple(Path(p) for p in self.merge))
        for name in ("src", "labels", "pairs"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        unknown = self.formats - set(FORMATS)
        if unknown or not self.formats:
            raise UsageError(
                f"formats must be a non-empty subset of {', '.join(FORMATS)}; got {sorted(self.formats)}"
            )
        if self.merge and (self.src is not None or self.pairs is not None or self.part is not None):
            raise UsageError(
                "--merge joins finished part outputs; it takes no --src, --pairs or --part"
            )
        if not self.merge and self.src is None and self.pairs is None:
            raise UsageError(
                "give --src (a folder of cases), --pairs (a csv) or --merge (part outputs)"
            )
        if self.part is not None:
            i, n = self.part
            if not (n >= 1 and 1 <= i <= n):
                raise UsageError(f"--part must be I/N with 1 ≤ I ≤ N, got {i}/{n}")
        if self.workers is not None and self.workers < 1:
            raise UsageError(f"--workers must be ≥ 1, got {self.workers}")


def parse_part(text: str) -> tuple[int, int]:
    """'2/8' → (2, 8)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise UsageError(f"--part must look like I/N (e.g. 2/8), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def default_workers() -> int:
    return (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )


def geometry_settings(geometry: GeometryConfig) -> dict[str, Any]:
    """JSON-able form of the geometry config (frozensets sorted) — part of every case record."""
    out = {}
    for f in dataclasses.fields(geometry):
        value = getattr(geometry, f.name)
        out[f.name] = sorted(value) if isinstance(value, frozenset) else value
    return out


# ---------------------------------------------------------------------------
# Phase 1: extract one case into the work folder (runs in worker processes).


@dataclass(frozen=True, kw_only=True)
class _Job:
    case: Case
    geometry: GeometryConfig
    record: Path  # NAME.json; crops go to NAME.crops


def record_stem(case_id: str) -> str:
    """File name for a case's work files: readable, filesystem-safe, collision-free."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", case_id)[:80]
    return f"{safe}-{hashlib.sha1(case_id.encode('utf-8')).hexdigest()[:10]}"


def _source_stats(case: Case) -> dict[str, list[int]]:
    out = {}
    for name, path in (("ct", case.ct), ("seg", case.seg)):
        try:
            st = os.stat(path)
            out[name] = [st.st_size, st.st_mtime_ns]
        except OSError:
            out[name] = [-1, -1]
    return out


def _round(values, digits: int) -> list[float]:
    return [round(float(v), digits) for v in values]


def extract_case(job: _Job) -> dict[str, Any]:
    """Extract one case, write its work files, return a small summary (for the progress bar)."""
    from vctmae.ingest import geometry

    case = job.case
    started = time.perf_counter()
    record: dict[str, Any] = {
        "version": RECORD_VERSION,
        "case": case.case,
        "patient": case.patient,
        "ct": case.ct_name,
        "seg": case.seg_name,
        "geometry": geometry_settings(job.geometry),
        "sources": _source_stats(case),
    }
    try:
        result = geometry.extract_crops(case.ct, case.seg, job.geometry)
    except Exception as error:  # one bad case must not stop the run
        if hasattr(error, "problem") and hasattr(error, "path"):
            line = str(error)
        else:
            line = f"{case.ct_name}: unexpected {type(error).__name__}: {error}"
        record.update(status="failed", error=line, crops=[], skipped=[])
    else:
        crops, offset = [], 0
        with atomic_file(job.record.with_suffix(".crops")) as f:
            for crop in result.crops:
                array = np.ascontiguousarray(crop.array, dtype="<i2")
                raw = array.tobytes()
                packed = encode_crop(array)
                f.write(packed)
                crops.append(
                    {
                        "level": crop.level,
                        "label_value": int(crop.label_value),
                        "centroid": _round(crop.centroid_world, 4),
                        "tangent": _round(crop.tangent, 6),
                        "inside_fraction": round(float(crop.inside_fraction), 6),
                        "bbox": [int(v) for v in crop.bbox],
                        "truncated": bool(crop.truncated),
                        "shape": list(array.shape),
                        "sha256": hashlib.sha256(raw).hexdigest(),
                        "offset": offset,
                        "nbytes": len(packed),
                    }
                )
                offset += len(packed)
        record.update(
            status="ok",
            error=None,
            source_orientation=result.source_orientation,
            source_spacing=_round(result.source_spacing, 6),
            scheme=result.scheme,
            other_labels=sorted([value, count] for value, count in result.other_labels.items()),
            crops=crops,
            skipped=[{"level": s.level, "reason": s.reason} for s in result.skipped],
        )
    record["seconds"] = round(time.perf_counter() - started, 3)
    atomic_write(job.record, json.dumps(record, indent=1).encode("utf-8"))
    return {
        "case": case.case,
        "status": record["status"],
        "error": record["error"],
        "crops": len(record["crops"]),
    }


def _is_finished(record_path: Path, case: Case, geometry: GeometryConfig) -> bool:
    """A case whose work files are complete for these settings and these source files."""
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return False
    if (
        record.get("version") != RECORD_VERSION
        or record.get("status") != "ok"
        or record.get("geometry") != geometry_settings(geometry)
        or record.get("sources") != _source_stats(case)
        or record.get("ct") != case.ct_name
        or record.get("seg") != case.seg_name
        or record.get("patient") != case.patient
    ):
        return False
    crops = record_path.with_suffix(".crops")
    expected = sum(c["nbytes"] for c in record["crops"])
    return crops.exists() and crops.stat().st_size == expected


# ---------------------------------------------------------------------------
# Phase 2: assemble the case files, in case order, into the outputs.


@dataclass(frozen=True, kw_only=True)
class _Entry:
    """A finished (or failed) case and where its work files are."""

    case: str
    record: Path


@dataclass(kw_only=True)
class _Plan:
    """What assembly will write, computed from the small case records alone."""

    failed: list[dict[str, str]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    cases_ok: int = 0
    samples: int = 0
    fingerprint: str = ""
    splits: dict[str, dict[str, set[str] | int]] = field(default_factory=dict)
    excluded: set[str] = field(default_factory=set)  # cases left out at assembly (key clash)
    # Per case: label values that are no vertebra in the case's scheme, with voxel counts.
    other_labels: list[dict] = field(default_factory=list)

    def count(self, meta: dict) -> None:
        entry = self.splits.setdefault(
            meta["split"], {"vertebrae": 0, "cases": set(), "patients": set()}
        )
        entry["vertebrae"] += 1
        entry["cases"].add(meta["case"])
        entry["patients"].add(meta["patient"])

    def split_summary(self) -> dict[str, dict[str, int]]:
        return {
            split: {
                "vertebrae": e["vertebrae"],
                "cases": len(e["cases"]),
                "patients": len(e["patients"]),
            }
            for split, e in sorted(self.splits.items())
        }


def sample_key(case_id: str, level: str) -> str:
    """`{case}_{level}` as one flat name of `[A-Za-z0-9_-]` (SPEC §2).

    Every other character of the case id becomes "-": dots (WebDataset splits keys
    at the first dot), slashes (a tar member must never name a folder or an
    absolute path), spaces and the like. The case id itself stays in the metadata.
    """
    return f"{re.sub(r'[^A-Za-z0-9_-]', '-', case_id)}_{level}"


def _case_samples(record: dict, assignment: CaseAssignment, labels: Labels | None, spacing: float):
    """(crop record, metadata dict, class, grade) for each crop of a case that will be written,
    plus skipped entries ("no label")."""
    samples, skipped = [], []
    for crop in record["crops"]:
        cls = grade = None
        if labels is not None:
            label = labels.vertebrae.get((record["case"], crop["level"]))
            if label is None:
                skipped.append(
                    {
                        "case": record["case"],
                        "level": crop["level"],
                        "reason": f"no label: {crop['level']} of {record['case']} is not in {labels.path.name}",
                    }
                )
                continue
            cls, grade = label.fracture, label.grade
        key = sample_key(record["case"], crop["level"])
        meta = {
            "key": key,
            "case": record["case"],
            "patient": assignment.patient,
            "level": crop["level"],
            "label_value": crop["label_value"],
            "label_scheme": record["scheme"],
            "source": {"ct": record["ct"], "seg": record["seg"]},
            "source_orientation": record["source_orientation"],
            "source_spacing": record["source_spacing"],
            "centroid": crop["centroid"],
            "spacing": spacing,
            "shape": crop["shape"],
            "tangent": crop["tangent"],
            "inside_fraction": crop["inside_fraction"],
            "bbox": crop["bbox"],
            "truncated": crop["truncated"],
            "split": assignment.split,
        }
        if labels is not None:
            meta["class"] = cls
            meta["grade"] = grade
        samples.append((crop, meta, cls, grade))
    return samples, skipped


def _load_record(entry: _Entry) -> dict:
    return json.loads(entry.record.read_text())


def plan_assembly(entries, assignments, labels, bad, *, spacing, formats, shard_size) -> _Plan:
    """Count what will be written and fingerprint it, reading only the small case records."""
    plan = _Plan()
    digest = hashlib.sha256(
        json.dumps([ASSEMBLY_VERSION, sorted(formats), shard_size, spacing]).encode()
    )
    keys: set[str] = set()
    for item in bad:
        plan.failed.append(
            {"case": item.case, "file": item.path, "reason": item.line(), "stage": "discover"}
        )
    for entry in entries:
        record = _load_record(entry)
        assignment = assignments[entry.case]
        if record["status"] != "ok":
            plan.failed.append(
                {
                    "case": entry.case,
                    "file": record["ct"],
                    "reason": record["error"],
                    "stage": "extract",
                }
            )
            continue
        if assignment.error:
            plan.failed.append(
                {
                    "case": entry.case,
                    "file": str(labels.path),
                    "reason": assignment.error,
                    "stage": "labels",
                }
            )
            continue
        samples, no_label = _case_samples(record, assignment, labels, spacing)
        clash = next((meta["key"] for _, meta, _, _ in samples if meta["key"] in keys), None)
        if clash is not None:
            plan.failed.append(
                {
                    "case": entry.case,
                    "file": record["ct"],
                    "stage": "keys",
                    "reason": f"{record['ct']}: crop key {clash} is already taken by another case "
                    "(case ids that differ only in characters outside A-Za-z0-9_-, which "
                    "become '-'); rename one",
                }
            )
            plan.excluded.add(entry.case)
            continue
        keys.update(meta["key"] for _, meta, _, _ in samples)
        plan.cases_ok += 1
        if record.get("other_labels"):
            plan.other_labels.append(
                {
                    "case": entry.case,
                    "scheme": record["scheme"],
                    "labels": [{"value": v, "voxels": n} for v, n in record["other_labels"]],
                }
            )
        plan.skipped += [{"case": entry.case, **s} for s in record["skipped"]] + no_label
        for crop, meta, _, _ in samples:
            plan.count(meta)
            digest.update(json.dumps(meta, sort_keys=True).encode() + crop["sha256"].encode())
        plan.samples += len(samples)
    plan.failed.sort(key=lambda f: (f["case"], f["file"]))
    plan.fingerprint = digest.hexdigest()
    return plan


def _read_crops(record_path: Path, crops: list[dict]) -> list[tuple[bytes, np.ndarray]]:
    """(encoded bytes, array) of each crop from a case's work file, checksums verified."""
    out = []
    with open(record_path.with_suffix(".crops"), "rb") as f:
        for crop in crops:
            f.seek(crop["offset"])
            encoded = f.read(crop["nbytes"])
            array = decode_crop(encoded, crop["shape"])
            if hashlib.sha256(array.tobytes()).hexdigest() != crop["sha256"]:
                raise IngestError(
                    record_path.with_suffix(".crops"),
                    f"work file corrupt (checksum of {crop['level']}); rerun with --force",
                )
            out.append((encoded, array))
    return out


def write_outputs(
    entries,
    assignments,
    labels,
    plan: _Plan,
    *,
    staging: Path,
    formats,
    shard_size: int,
    spacing: float,
    size: int,
    progress,
) -> list[str]:
    """Stream every sample, in case order, into shards / Zarr / manifest under `staging`."""
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    writers: dict[str, ShardWriter] = {}
    zarr_writer = ZarrWriter(staging / ZARR, plan.samples, size) if "zarr" in formats else None
    manifest = ManifestWriter(staging / MANIFEST)
    index = 0
    task = progress.add_task("assemble", total=plan.samples, rate="")
    for entry in entries:
        record = _load_record(entry)
        assignment = assignments[entry.case]
        if record["status"] != "ok" or assignment.error or entry.case in plan.excluded:
            continue
        samples, _ = _case_samples(record, assignment, labels, spacing)
        if not samples:
            continue
        arrays = _read_crops(entry.record, [crop for crop, *_ in samples])
        for (crop, meta, cls, grade), (encoded, array) in zip(samples, arrays, strict=True):
            key, split = meta["key"], meta["split"]
            shard = ""
            if "wds" in formats:
                if split not in writers:
                    writers[split] = ShardWriter(staging, split, shard_size)
                members = [
                    (CROP_MEMBER, npy_bytes(array)),
                    (META_MEMBER, json.dumps(meta, ensure_ascii=False).encode("utf-8")),
                ]
                if cls is not None:
                    members.append((CLASS_MEMBER, str(cls).encode("ascii")))
                shard = writers[split].write(key, members)
            if zarr_writer is not None:
                zarr_writer.write(
                    index,
                    encoded,
                    key=key,
                    split=split,
                    level=meta["level"],
                    case=meta["case"],
                    patient=meta["patient"],
                    cls=cls,
                    grade=grade,
                )
            manifest.write(
                {
                    "key": key,
                    "case": meta["case"],
                    "patient": meta["patient"],
                    "level": meta["level"],
                    "label_value": meta["label_value"],
                    "class": "" if cls is None else cls,
                    "grade": "" if grade is None else grade,
                    "split": split,
                    "shard": shard,
                    "zarr_index": index if zarr_writer is not None else "",
                    "centroid_x": meta["centroid"][0],
                    "centroid_y": meta["centroid"][1],
                    "centroid_z": meta["centroid"][2],
                    "spacing": spacing,
                    "truncated": int(meta["truncated"]),
                    "sha256": crop["sha256"],
                }
            )
            index += 1
            progress.advance(task)
    for writer in writers.values():
        writer.close()
    if zarr_writer is not None:
        zarr_writer.close()
    manifest.close()
    return sorted(name for writer in writers.values() for name in writer.names)


def _outputs_present(out: Path, published: dict) -> bool:
    names = (
        published.get("shards", [])
        + [MANIFEST]
        + ([ZARR] if "zarr" in published.get("formats", []) else [])
    )
    return all((out / name).exists() for name in names)


def assemble(
    entries,
    assignments,
    labels,
    bad,
    *,
    out: Path,
    formats,
    shard_size,
    geometry,
    force: bool,
    progress,
) -> tuple[_Plan, dict]:
    """Phase 2 (see module docstring). Returns the plan and what was published."""
    work = out / WORK
    plan = plan_assembly(
        entries,
        assignments,
        labels,
        bad,
        spacing=geometry.spacing,
        formats=formats,
        shard_size=shard_size,
    )
    for failure in plan.failed:
        if failure.get("stage") in ("labels", "keys"):
            _error_line(progress, failure["reason"])
    try:
        published = json.loads((work / PUBLISHED).read_text())
    except (OSError, ValueError):
        published = {}
    if (
        not force
        and published.get("fingerprint") == plan.fingerprint
        and _outputs_present(out, published)
    ):
        return plan, {**published, "assembly": "up to date"}
    staging = work / STAGING
    try:
        shards = write_outputs(
            entries,
            assignments,
            labels,
            plan,
            staging=staging,
            formats=formats,
            shard_size=shard_size,
            spacing=geometry.spacing,
            size=geometry.size,
            progress=progress,
        )
    except OutOfSpaceError:
        # Free what the half-written set took; the published set was not touched.
        shutil.rmtree(staging, ignore_errors=True)
        raise
    published = {"fingerprint": plan.fingerprint, "shards": shards, "formats": sorted(formats)}
    publish(out, published)
    return plan, {**published, "assembly": "written"}


# ---------------------------------------------------------------------------
# The run.


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description:<8}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


def _error_line(progress, line: str) -> None:
    progress.console.print(
        f"[bold red]error[/]: {line}", markup=True, highlight=False, soft_wrap=True
    )


def _pending_jobs(
    cases: list[Case], config: IngestConfig, cases_dir: Path
) -> tuple[list[_Job], int]:
    """Jobs for the cases not finished yet (all with --force), and how many are reused."""
    jobs, reused = [], 0
    for case in cases:
        record = cases_dir / f"{record_stem(case.case)}.json"
        if not config.force and _is_finished(record, case, config.geometry):
            reused += 1
            continue
        jobs.append(_Job(case=case, geometry=config.geometry, record=record))
    return jobs, reused


def _worker_died(job: _Job) -> dict[str, Any]:
    """Record a case whose worker process died (killed for memory, crashed in a C library)."""
    line = (
        f"{job.case.ct_name}: the worker process died while extracting this case (out of memory?)"
    )
    record = {
        "version": RECORD_VERSION,
        "case": job.case.case,
        "patient": job.case.patient,
        "ct": job.case.ct_name,
        "seg": job.case.seg_name,
        "status": "failed",
        "error": line,
        "crops": [],
        "skipped": [],
    }
    atomic_write(job.record, json.dumps(record, indent=1).encode("utf-8"))
    return {"case": job.case.case, "status": "failed", "error": line, "crops": 0}


_lock_fd: int | None = None  # this process's lock on the output folder (see `_output_lock`)


def _make_out(out: Path) -> None:
    """Create `out` and its work folder; an `--out` that cannot be a folder is a usage error."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: --out must be a folder, but a file of that name exists")
    try:
        (out / WORK).mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UsageError(f"{out}: --out cannot be created: part of its path is a file") from None
    except PermissionError:
        raise IngestError(out, "cannot create the output folder (permission denied)") from None
    except OSError as error:
        if is_out_of_space(error):
            raise out_of_space(out) from None
        raise


@contextmanager
def _output_lock(out: Path):
    """Refuse a second ingest writing into the same `out` at the same time (flock; freed on exit)."""
    global _lock_fd
    import fcntl

    _make_out(out)
    fd = os.open(out / WORK / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise IngestError(
            out, "another `vctmae ingest` is writing here; wait for it or use another --out"
        ) from None
    _lock_fd = fd
    try:
        yield
    finally:
        _lock_fd = None
        os.close(fd)


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
PARENT_CHECK_S = 1.0  # how often a worker checks that the main process is still alive


def _worker_started(parent: int) -> None:
    """Worker initializer: drop the main process's output lock and die with the main process.

    A worker outliving a killed main process would run on forever and hold its
    stdout open (`vctmae ingest … | cat` would never return). On Linux the
    kernel kills the worker the moment the main process dies
    (prctl PR_SET_PDEATHSIG; the workers are forked from its main thread, which
    lives as long as the process). Everywhere, and as a backstop, a thread exits
    the worker within `PARENT_CHECK_S` of it being re-parented.
    """
    if _lock_fd is not None:
        os.close(_lock_fd)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(1)  # the main process died before the line above took effect
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()


def _exit_when_orphaned(parent: int) -> None:
    while True:
        time.sleep(PARENT_CHECK_S)
        if os.getppid() != parent:
            os._exit(1)


def _new_executor(workers: int):
    from concurrent.futures import ProcessPoolExecutor

    # fork: workers start at once, without re-importing the program (spawn/forkserver
    # would re-run an unguarded `python -m vctmae`).
    executor = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("fork"),
        initializer=_worker_started,
        initargs=(os.getpid(),),
    )
    executor.submit(int).result()  # start the workers now, before any display thread runs
    return executor


def _run_jobs(jobs: list[_Job], workers: int, executor, done) -> None:
    """Run `jobs` with at most 2 × workers in flight; call `done(summary)` as each finishes.

    A worker that dies breaks the executor: the cases then in flight are rerun one
    at a time in fresh single-worker executors, so only the case that killed its
    worker is marked failed.
    """
    from concurrent.futures import FIRST_COMPLETED, wait
    from concurrent.futures.process import BrokenProcessPool

    if executor is None:
        for job in jobs:
            done(extract_case(job))
        return
    queue = list(reversed(jobs))
    in_flight: dict[Any, _Job] = {}
    suspects: list[_Job] = []
    while queue or in_flight:
        while queue and len(in_flight) < 2 * workers:
            job = queue.pop()
            in_flight[executor.submit(extract_case, job)] = job
        finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
        for future in finished:
            job = in_flight.pop(future)
            try:
                done(future.result())
            except BrokenProcessPool:
                suspects.append(job)
        if suspects and not in_flight:
            executor.shutdown(wait=True)
            for job in suspects:
                single = _new_executor(1)
                try:
                    done(single.submit(extract_case, job).result())
                except BrokenProcessPool:
                    done(_worker_died(job))
                finally:
                    single.shutdown(wait=True)
            suspects = []
            executor = _new_executor(workers)
    executor.shutdown(wait=True)


def _extract(
    jobs: list[_Job], *, total: int, reused: int, workers: int, executor, progress
) -> dict[str, int]:
    """Phase 1: run the jobs (in `executor` when given, else here); returns counts."""
    task = progress.add_task("extract", total=total, completed=reused, rate="")
    crops = 0
    started = time.perf_counter()

    def done(summary: dict) -> None:
        nonlocal crops
        crops += summary["crops"]
        if summary["status"] != "ok":
            _error_line(progress, summary["error"])
        elapsed = time.perf_counter() - started
        progress.update(task, advance=1, rate=f"{crops / max(elapsed, 1e-9):.1f} crops/s")

    # Jobs are paths and results small summaries; each worker holds one case at a
    # time, so memory does not depend on the number of cases.
    _run_jobs(jobs, workers, executor, done)
    return {"extracted": len(jobs), "reused": reused, "crops": crops}


def _clean_work(work: Path) -> None:
    """Remove temporary files a killed run left in the work folder."""
    for folder in (work, work / "cases"):
        for stale in folder.glob(f"*{TEMPORARY}*"):
            stale.unlink(missing_ok=True)


def _case_list(run: dict) -> list[Case]:
    return [
        Case(
            case=c["case"],
            patient=c["patient"],
            ct=Path(c["ct"]),
            seg=Path(c["seg"]),
            ct_name=c["ct"],
            seg_name=c["seg"],
        )
        for c in run["cases"]
    ]


def run_ingest(config: IngestConfig, progress: bool = True) -> dict[str, Any]:
    """Run ingest (or merge) as `config` says; returns the report (also written to OUT/ingest-report.json).

    Raises a `VctmaeError` for what stops the whole run: `UsageError` (a flag or
    part folder that cannot be used), `LabelsError`, `IngestError` (an unusable
    pairs csv, output folder or work file), `OutOfSpaceError` (disk full; earlier
    outputs and finished cases are kept). Bad cases do not raise — they are
    listed in the report's `failed`. A publish that a killed run left half done
    is completed first (`vctmae.ingest.publish`).
    """
    with _output_lock(config.out):
        finish_publish(config.out)
        return _run_merge(config, progress) if config.merge else _run_ingest(config, progress)


def _run_ingest(config: IngestConfig, progress: bool) -> dict[str, Any]:
    started = time.perf_counter()
    out = config.out
    work = out / WORK
    cases_dir = work / "cases"
    labels = read_labels(config.labels) if config.labels is not None else None
    cases, bad = discover_cases(config.src, pairs=config.pairs, exclude=out)
    if not cases and not bad:
        raise IngestError(
            config.src or config.pairs,
            "no cases found (expected ct/NAME.nii[.gz] with seg/NAME.nii[.gz], "
            "VerSe X_ct.nii.gz with X_seg-vert_msk.nii.gz, or --pairs)",
        )
    assignments = assign_cases(labels, {c.case: c.patient for c in cases})
    if config.part is not None:
        i, n = config.part
        items = sorted(
            [*cases, *bad], key=lambda x: (x.case, getattr(x, "ct_name", getattr(x, "path", "")))
        )
        mine = items[i - 1 :: n]
        cases = [x for x in mine if isinstance(x, Case)]
        bad = [x for x in mine if isinstance(x, BadInput)]
    discovered = time.perf_counter()

    cases_dir.mkdir(parents=True, exist_ok=True)
    _clean_work(work)
    (work / "run.json").unlink(missing_ok=True)  # present again only once this run has extracted
    jobs, reused = _pending_jobs(cases, config, cases_dir)
    workers = min(config.workers or default_workers(), max(1, len(jobs)))
    # Start the workers before the progress display starts its refresh thread (fork + threads).
    executor = _new_executor(workers) if workers > 1 else None
    try:
        with _progress(progress) as bar:
            for item in bad:
                _error_line(bar, item.line())
            counts = _extract(
                jobs,
                total=len(cases),
                reused=reused,
                workers=workers,
                executor=executor,
                progress=bar,
            )
    finally:
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
    counts["workers"] = workers
    extracted = time.perf_counter()
    with _progress(progress) as bar:
        # What this run covers, for a later --merge of parts.
        run = {
            "part": list(config.part) if config.part else None,
            "geometry": geometry_settings(config.geometry),
            "labels": config.labels is not None,
            "cases": [
                {
                    "case": c.case,
                    "patient": c.patient,
                    "ct": c.ct_name,
                    "seg": c.seg_name,
                    "record": f"{record_stem(c.case)}.json",
                }
                for c in cases
            ],
            "bad": [dataclasses.asdict(b) for b in bad],
        }
        if labels is not None:
            atomic_write(work / "labels.csv", config.labels.read_bytes())
        else:
            (work / "labels.csv").unlink(missing_ok=True)
        atomic_write(work / "run.json", json.dumps(run, indent=1).encode())
        entries = [
            _Entry(case=c.case, record=cases_dir / f"{record_stem(c.case)}.json") for c in cases
        ]
        plan, published = assemble(
            entries,
            assignments,
            labels,
            bad,
            out=out,
            formats=config.formats,
            shard_size=config.shard_size,
            geometry=config.geometry,
            force=config.force,
            progress=bar,
        )
    finished = time.perf_counter()
    report = _report(
        config,
        plan,
        published,
        counts=counts,
        cases_seen=len(cases) + len(bad),
        timings={
            "discover": discovered - started,
            "extract": extracted - discovered,
            "assemble": finished - extracted,
            "total": finished - started,
        },
    )
    atomic_write(out / REPORT, (json.dumps(report, indent=1, ensure_ascii=False) + "\n").encode())
    return report


def _run_merge(config: IngestConfig, progress: bool) -> dict[str, Any]:
    """Assemble the case files of finished `--part` runs into one output."""
    started = time.perf_counter()
    runs = []
    for part_dir in config.merge:
        path = part_dir / WORK / "run.json"
        try:
            runs.append((part_dir, json.loads(path.read_text())))
        except (OSError, ValueError):
            raise IngestError(
                path,
                "not a finished ingest output (no readable run.json); "
                "run `vctmae ingest --part I/N` into it first",
            ) from None
    geometry = runs[0][1]["geometry"]
    for part_dir, run in runs:
        if run["geometry"] != geometry:
            raise UsageError(
                f"{part_dir}: made with other geometry settings than {runs[0][0]} "
                f"({run['geometry']} vs {geometry})"
            )
    parts = [tuple(run["part"]) for _, run in runs if run["part"]]
    if parts:
        n = parts[0][1]
        missing = sorted(set(range(1, n + 1)) - {i for i, _ in parts})
        if any(p[1] != n for p in parts) or len(parts) != len(set(parts)):
            raise UsageError(f"--merge: parts do not fit together: {sorted(parts)}")
        if missing:
            raise UsageError(
                "--merge: missing part(s) "
                + ", ".join(f"{i}/{n}" for i in missing)
                + " — merge needs every part"
            )
    labels_path = config.labels
    if labels_path is None:
        copies = {(d / WORK / "labels.csv").read_bytes() for d, run in runs if run["labels"]}
        if len(copies) > 1:
            raise UsageError(
                "--merge: the parts were ingested with different labels files; pass --labels"
            )
        if copies and not all(run["labels"] for _, run in runs):
            raise UsageError("--merge: some parts were ingested with --labels and some without")
        if copies:
            labels_path = runs[0][0] / WORK / "labels.csv"
    labels = read_labels(labels_path) if labels_path is not None else None
    geometry_config = GeometryConfig(
        **{
            **geometry,
            "levels": frozenset(geometry["levels"]) if geometry["levels"] is not None else None,
        }
    )

    cases: dict[str, tuple[Case, _Entry]] = {}
    bad: list[BadInput] = []
    for part_dir, run in runs:
        for case, raw in zip(_case_list(run), run["cases"], strict=True):
            if case.case in cases:
                raise UsageError(f"--merge: case {case.case} is in two of the merged outputs")
            record = part_dir / WORK / "cases" / raw["record"]
            if not record.exists():
                raise IngestError(
                    record,
                    f"missing — {part_dir} is incomplete; rerun its `vctmae ingest --part`",
                )
            cases[case.case] = (case, _Entry(case=case.case, record=record))
        bad += [BadInput(**b) for b in run["bad"]]
    bad = sorted(set(bad), key=lambda b: (b.case, b.path))
    ordered = [cases[c] for c in sorted(cases)]
    assignments = assign_cases(labels, {c.case: c.patient for c, _ in ordered})
    read = time.perf_counter()
    with _progress(progress) as bar:
        for item in bad:
            _error_line(bar, item.line())
        for _, entry in ordered:
            record = _load_record(entry)
            if record["status"] != "ok":
                _error_line(bar, record["error"])
        plan, published = assemble(
            [e for _, e in ordered],
            assignments,
            labels,
            bad,
            out=config.out,
            formats=config.formats,
            shard_size=config.shard_size,
            geometry=geometry_config,
            force=config.force,
            progress=bar,
        )
    finished = time.perf_counter()
    report = _report(
        config,
        plan,
        published,
        counts={"extracted": 0, "reused": len(ordered), "crops": 0, "workers": 0},
        cases_seen=len(ordered) + len(bad),
        geometry=geometry_config,
        timings={
            "discover": read - started,
            "extract": 0.0,
            "assemble": finished - read,
            "total": finished - started,
        },
    )
    report["merged_from"] = [str(d) for d in config.merge]
    atomic_write(
        config.out / REPORT, (json.dumps(report, indent=1, ensure_ascii=False) + "\n").encode()
    )
    return report


def _report(
    config: IngestConfig,
    plan: _Plan,
    published: dict,
    *,
    counts: dict,
    cases_seen: int,
    timings: dict[str, float],
    geometry: GeometryConfig | None = None,
) -> dict[str, Any]:
    total = timings["total"]
    return {
        "src": str(config.src) if config.src else None,
        "pairs": str(config.pairs) if config.pairs else None,
        "labels": str(config.labels) if config.labels else None,
        "out": str(config.out),
        "part": f"{config.part[0]}/{config.part[1]}" if config.part else None,
        "formats": sorted(config.formats),
        "geometry": geometry_settings(geometry or config.geometry),
        "shard_size": config.shard_size,
        "cases_seen": cases_seen,
        "cases_ok": plan.cases_ok,
        "cases_failed": len(plan.failed),
        "failed": plan.failed,
        "cases_extracted": counts["extracted"],
        "cases_resumed": counts["reused"],
        "workers": counts["workers"],
        "vertebrae_written": plan.samples,
        "splits": plan.split_summary(),
        "vertebrae_skipped": len(plan.skipped),
        "skipped_by_reason": dict(
            sorted(Counter(s["reason"].split(":")[0] for s in plan.skipped).items())
        ),
        "skipped": plan.skipped,
        # Label values that are no vertebra in their case's scheme (organs, sacrum, strays).
        "label_values_not_vertebrae": plan.other_labels,
        "shards": published.get("shards", []),
        "zarr": ZARR if "zarr" in config.formats else None,
        "assembly": published["assembly"],
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "crops_extracted": counts["crops"],
        "crops_per_s": round(counts["crops"] / timings["extract"], 3)
        if timings["extract"] > 0
        else None,
        "cases_per_s": round(counts["extracted"] / timings["extract"], 3)
        if timings["extract"] > 0
        else None,
        "written_per_s": round(plan.samples / total, 3) if total > 0 else None,
    }


__all__ = ["IngestConfig", "run_ingest", "parse_part", "sample_key", "UNLABELED"]
