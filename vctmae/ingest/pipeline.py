"""`vctmae ingest`: raw CT cases → WebDataset shards, Zarr store, manifest, report.

This module runs the two steps and says what happened:

1. **Extract** (`vctmae.ingest.extract`, in a process pool or a Dask cluster): each case is
   cut into crops in a worker, which writes its work files into `OUT/.ingest-work/cases/`.
   A rerun skips cases already extracted with these settings from these files (`--force`
   redoes them); a killed run loses at most the cases in flight.
2. **Assemble** (`vctmae.ingest.assemble`, in this process, behind extraction): each case,
   as soon as it and every case before it in sorted case order are extracted, is streamed
   into the staged outputs, published into OUT as one set when the last case is in
   (`vctmae.ingest.publish`). The order never depends on which worker finished first, so
   the output bytes do not depend on worker count, executor, timing or interruptions.

Memory stays flat as cases grow: at most 2 × workers cases are in flight, and at most
`BUFFERED_CASES` finished cases wait with their crops in memory for an earlier case
(beyond that, their crops are read back from the work files when their turn comes).

`--part I/N` extracts every N-th case of the sorted case list (`run.json` in the part's
work folder lists them); `--merge PART…` assembles the parts' case files into OUT exactly
as a single run would, byte for byte. The work folder is a cache: delete it after a run
to save disk — but keep the parts' work folders until they are merged.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vctmae.errors import UsageError
from vctmae.files import TEMPORARY, write_atomically
from vctmae.ingest.assemble import Assembly, AssemblyResult, adopt_published
from vctmae.ingest.config import IngestConfig
from vctmae.ingest.discover import BadInput, Case, discover_cases
from vctmae.ingest.errors import IngestError
from vctmae.ingest.extract import Extracted, ExtractJob, finished_record, make_executor
from vctmae.ingest.labels import assign_cases, read_labels
from vctmae.ingest.publish import WORK, ZARR, finish_publish, interrupted_publish
from vctmae.ingest.records import (
    CaseRecord,
    geometry_from_settings,
    geometry_settings,
    record_stem,
)
from vctmae.ingest.segment import require_segmenter
from vctmae.outlock import hold_output, make_output_folder
from vctmae.progress import error_line, progress_bar

REPORT = "ingest-report.json"
# Finished cases that may wait in memory, crops included, for an earlier case to finish.
BUFFERED_CASES = 32


def default_workers() -> int:
    return (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )


# ---------------------------------------------------------------------------
# The output folder: created, locked against a second run.


@contextmanager
def output_lock(out: Path):
    """Hold the lock on `out` (`vctmae.outlock`: freed on exit, never held by forked workers).
    A second run writing into the same `out` is refused."""
    make_output_folder(out)
    make_output_folder(out / WORK)
    with hold_output(out, "ingest"):
        yield


@contextmanager
def _progress(enabled: bool, errors: list[str]):
    """The run's progress bars, the lines of `errors` printed above them first."""
    with progress_bar("{task.description:<8}", "{task.fields[rate]}", enabled=enabled) as bar:
        for line in errors:
            error_line(bar, line)
        yield bar


# ---------------------------------------------------------------------------
# The run.


def run_ingest(config: IngestConfig) -> dict[str, Any]:
    """Run ingest (or merge) as `config` says; returns the report (also written to OUT/ingest-report.json).

    Raises a `VctmaeError` for what stops the whole run: `UsageError` (a flag or
    part folder that cannot be used), `LabelsError`, `IngestError` (an unusable
    pairs csv, output folder or work file), `OutOfSpaceError` (disk full; earlier
    outputs and finished cases are kept). Bad cases do not raise — they are
    listed in the report's `failed`. A publish that a killed run left half done
    is completed first (`vctmae.ingest.publish`), saying so in one line on stderr.
    """
    with output_lock(config.out):
        interrupted = interrupted_publish(config.out)
        if interrupted is not None:
            finish_publish(config.out)
            print(f"note: {interrupted}; completed them before this run", file=sys.stderr)
        if config.merge:
            return _run_merge(config)
        return _run_ingest(config)


@dataclass(kw_only=True)
class _Order:
    """Feeds an `Assembly` the cases in case order as they become ready (resumed or extracted)."""

    assembly: Assembly
    records: list[Path]  # each case's NAME.json, in case order
    ready: dict[int, tuple[CaseRecord, tuple[bytes, ...] | None]] = field(default_factory=dict)
    next: int = 0
    seconds: float = 0.0  # spent assembling

    def put(self, index: int, record: CaseRecord, crops: tuple[bytes, ...] | None) -> None:
        held = sum(1 for _, c in self.ready.values() if c is not None)
        self.ready[index] = (record, crops if held < BUFFERED_CASES else None)

    def feed(self) -> None:
        started = time.perf_counter()
        while self.next in self.ready:
            record, crops = self.ready.pop(self.next)
            self.assembly.add(record, self.records[self.next], crops)
            self.next += 1
        self.seconds += time.perf_counter() - started


def _run_ingest(config: IngestConfig) -> dict[str, Any]:
    started = time.perf_counter()
    out = config.out
    work = out / WORK
    cases_dir = work / "cases"
    labels = read_labels(config.labels) if config.labels is not None else None
    cases, bad = discover_cases(
        config.src, pairs=config.pairs, exclude=out, missing_seg_ok=config.segment
    )
    cases = [_with_segmentation(case, work) if case.seg is None else case for case in cases]
    if not cases and not bad:
        raise IngestError(
            config.src or config.pairs,
            "no cases found (expected ct/NAME.nii[.gz] with seg/NAME.nii[.gz], VerSe "
            "X_ct.nii.gz with X_seg-vert_msk.nii.gz, a DICOM series folder in ct/, or --pairs)",
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
    records = [cases_dir / f"{record_stem(c.case)}.json" for c in cases]
    jobs, resumed = [], {}
    for index, (case, path) in enumerate(zip(cases, records, strict=True)):
        series = case.series or config.series
        segment = _segmented(case, work)
        geometry = config.geometry
        if segment and geometry.label_scheme == "auto":
            # TotalSegmentator's values, even for a map holding only L4 (28) and L5 (27).
            geometry = dataclasses.replace(geometry, label_scheme="totalseg")
        job = ExtractJob(
            index=index, case=case, geometry=geometry, record=path, series=series, segment=segment
        )
        record = None if config.force else finished_record(job)
        if record is not None:
            resumed[index] = record
        else:
            jobs.append(job)
    if any(job.segment and not job.case.seg.exists() for job in jobs):
        require_segmenter()
    workers = min(config.workers or default_workers(), max(1, len(jobs)))
    if config.executor == "dask":
        workers = config.workers or default_workers()
    settings = dict(config=config, labels=labels, assignments=assignments, bad=bad)
    counts = {"extracted": len(jobs), "reused": len(resumed), "crops": 0, "workers": workers}
    timings = {"discover": discovered - started}
    if not jobs:
        with _progress(config.progress, [item.line() for item in bad]) as bar:
            result = _assemble_finished(
                [(resumed[i], records[i]) for i in range(len(cases))], settings, config.force, bar
            )
        timings.update(extract=0.0, assemble=time.perf_counter() - discovered)
    else:
        # Start the workers before the progress display starts its refresh thread (fork + threads).
        executor = make_executor(config.executor, workers, scheduler=config.scheduler)
        counts["workers"] = executor.workers
        try:
            with _progress(config.progress, [item.line() for item in bad]) as bar:
                result, seconds = _extract_and_assemble(
                    jobs, resumed, records, executor, settings, config.force, bar
                )
        finally:
            executor.close()
        timings.update(extract=seconds["extract"], assemble=seconds["assemble"])
        counts["crops"] = seconds["crops"]
    _write_run(config, cases, bad, labels is not None)
    timings["total"] = time.perf_counter() - started
    return _write_report(
        config, result, counts=counts, cases_seen=len(cases) + len(bad), timings=timings
    )


def _extract_and_assemble(
    jobs: list[ExtractJob],
    resumed: dict[int, CaseRecord],
    records: list[Path],
    executor,
    settings: dict,
    force: bool,
    bar,
) -> tuple[AssemblyResult, dict[str, float]]:
    """Extract `jobs` with `executor` while assembling every case, in order, behind them."""
    extract_task = bar.add_task("extract", total=len(records), completed=len(resumed), rate="")
    assemble_task = bar.add_task("assemble", total=None, rate="")
    assembly = Assembly(
        **settings,
        write=True,
        report=lambda line: error_line(bar, line),
        advance=lambda samples: bar.advance(assemble_task, samples),
    )
    order = _Order(assembly=assembly, records=records)
    for index, record in resumed.items():
        order.put(index, record, None)
    crops = 0
    started = time.perf_counter()

    def done(extracted: Extracted) -> None:
        nonlocal crops
        record = extracted.record
        crops += len(record.crops)
        if not record.ok:
            error_line(bar, record.error)
        elapsed = time.perf_counter() - started
        bar.update(extract_task, advance=1, rate=f"{crops / max(elapsed, 1e-9):.1f} crops/s")
        order.put(extracted.index, record, extracted.crops)
        order.feed()

    try:
        executor.run(jobs, done)
        extract_seconds = time.perf_counter() - started
        order.feed()
    except BaseException:
        # Before the publish's commit point: the staged set goes, the published one stays.
        assembly.abort()
        raise
    finishing = time.perf_counter()
    result = assembly.finish(force=force)
    order.seconds += time.perf_counter() - finishing
    return result, {"extract": extract_seconds, "assemble": order.seconds, "crops": crops}


def _assemble_finished(
    entries: list[tuple[CaseRecord, Path]], settings: dict, force: bool, bar
) -> AssemblyResult:
    """Assemble cases that are all extracted already: first plan from the records alone, and
    write only when the published set differs (or with `force`)."""
    plan = Assembly(**settings, write=False)
    for record, path in entries:
        plan.add(record, path)
    planned = plan.finish()
    if not force and adopt_published(settings["config"].out, planned):
        for failure in planned.failed:
            if failure["stage"] in ("labels", "keys"):
                error_line(bar, failure["reason"])
        return planned
    task = bar.add_task("assemble", total=planned.samples, rate="")
    assembly = Assembly(
        **settings,
        write=True,
        report=lambda line: error_line(bar, line),
        advance=lambda samples: bar.advance(task, samples),
    )
    try:
        for record, path in entries:
            assembly.add(record, path)
    except BaseException:
        assembly.abort()  # before the publish's commit point: the published set stays
        raise
    return assembly.finish(force=True)


SEGMENTATIONS = "segmentations"  # inside WORK: label maps TotalSegmentator made (--segment)


def _with_segmentation(case: Case, work: Path) -> Case:
    """A case without a label map, given the one --segment makes for it in the work folder."""
    name = f"{record_stem(case.case)}.nii.gz"
    return dataclasses.replace(
        case, seg=work / SEGMENTATIONS / name, seg_name=f"{WORK}/{SEGMENTATIONS}/{name}"
    )


def _segmented(case: Case, work: Path) -> bool:
    return case.seg is not None and case.seg.parent == work / SEGMENTATIONS


def _write_run(config: IngestConfig, cases: list[Case], bad: list[BadInput], labelled: bool):
    """What this run covers (`run.json`, and its labels), for a later `--merge` of parts."""
    work = config.out / WORK
    run = {
        "part": list(config.part) if config.part else None,
        "geometry": geometry_settings(config.geometry),
        "labels": labelled,
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
    if labelled:
        write_atomically(work / "labels.csv", config.labels.read_bytes())
    else:
        (work / "labels.csv").unlink(missing_ok=True)
    write_atomically(work / "run.json", json.dumps(run, indent=1).encode())


def _clean_work(work: Path) -> None:
    """Remove temporary files a killed run left in the work folder."""
    for folder in (work, work / "cases"):
        for stale in folder.glob(f"{TEMPORARY}*"):
            stale.unlink(missing_ok=True)


def _run_merge(config: IngestConfig) -> dict[str, Any]:
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
    # The parts' geometry, not this command's: the crops were cut with it.
    config = dataclasses.replace(config, geometry=geometry_from_settings(geometry))

    # Case id → its patient and its work file, from every part's run.json.
    patients: dict[str, str] = {}
    records: dict[str, Path] = {}
    bad: list[BadInput] = []
    for part_dir, run in runs:
        for case in run["cases"]:
            if case["case"] in records:
                raise UsageError(f"--merge: case {case['case']} is in two of the merged outputs")
            record = part_dir / WORK / "cases" / case["record"]
            if not record.exists():
                raise IngestError(
                    record,
                    f"missing — {part_dir} is incomplete; rerun its `vctmae ingest --part`",
                )
            patients[case["case"]] = case["patient"]
            records[case["case"]] = record
        bad += [BadInput(**b) for b in run["bad"]]
    bad = sorted(set(bad), key=lambda b: (b.case, b.path))
    ordered = sorted(records)
    assignments = assign_cases(labels, {case: patients[case] for case in ordered})
    entries = [(CaseRecord.read(records[case]), records[case]) for case in ordered]
    read = time.perf_counter()
    settings = dict(config=config, labels=labels, assignments=assignments, bad=bad)
    errors = [item.line() for item in bad] + [r.error for r, _ in entries if not r.ok]
    with _progress(config.progress, errors) as bar:
        result = _assemble_finished(entries, settings, config.force, bar)
    finished = time.perf_counter()
    return _write_report(
        config,
        result,
        counts={"extracted": 0, "reused": len(ordered), "crops": 0, "workers": 0},
        cases_seen=len(ordered) + len(bad),
        timings={
            "discover": read - started,
            "extract": 0.0,
            "assemble": finished - read,
            "total": finished - started,
        },
        merged_from=[str(d) for d in config.merge],
    )


def _write_report(
    config: IngestConfig,
    result: AssemblyResult,
    *,
    counts: dict,
    cases_seen: int,
    timings: dict[str, float],
    merged_from: list[str] | None = None,
) -> dict[str, Any]:
    """Write OUT/ingest-report.json and return the report."""

    def rate(count: int, stage: str) -> float | None:
        return round(count / timings[stage], 3) if timings[stage] > 0 else None

    report = {
        "src": str(config.src) if config.src else None,
        "pairs": str(config.pairs) if config.pairs else None,
        "labels": str(config.labels) if config.labels else None,
        "out": str(config.out),
        "part": f"{config.part[0]}/{config.part[1]}" if config.part else None,
        "formats": sorted(config.formats),
        "geometry": geometry_settings(config.geometry),
        "shard_size": config.shard_size,
        "executor": config.executor,
        "cases_seen": cases_seen,
        "cases_ok": result.cases_ok,
        "cases_failed": len(result.failed),
        "failed": result.failed,
        "cases_extracted": counts["extracted"],
        "cases_resumed": counts["reused"],
        "workers": counts["workers"],
        "vertebrae_written": result.samples,
        "splits": result.split_summary(),
        "vertebrae_skipped": len(result.skipped),
        "skipped_by_reason": result.skipped_by_reason(),
        "skipped": result.skipped,
        # Label values that are no vertebra in their case's scheme (organs, sacrum, strays).
        "label_values_not_vertebrae": result.other_labels,
        "shards": result.shards,
        "zarr": ZARR if "zarr" in config.formats else None,
        "assembly": result.assembly,
        # extract: until the last case was extracted (assembly runs behind it, overlapping);
        # assemble: time spent assembling, most of it while extraction was going on.
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "crops_extracted": counts["crops"],
        "crops_per_s": rate(counts["crops"], "extract"),
        "cases_per_s": rate(counts["extracted"], "extract"),
        "written_per_s": rate(result.samples, "total"),
    }
    if merged_from is not None:
        report["merged_from"] = merged_from
    text = json.dumps(report, indent=1, ensure_ascii=False) + "\n"
    write_atomically(config.out / REPORT, text.encode())
    return report


__all__ = ["IngestConfig", "run_ingest"]
