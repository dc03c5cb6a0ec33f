"""Extract step of `vctmae ingest`: one case → its crops and work files, and the executors
that run it (in this process, a process pool, or a Dask cluster).

`extract_case(job)` cuts the case (`geometry.extract_crops`), compresses each crop into its
final Zarr chunk bytes, writes `NAME.crops` and then `NAME.json` (the `CaseRecord`, the
"case finished" marker) atomically, and sends back the record and each crop's int16 bytes,
so that assembly neither decodes nor hashes a crop a second time.

Executors share one interface: `run(jobs, done)` calls `done(extracted)` in the calling
thread as each case finishes, in any order, keeping at most 2 × workers cases in flight; a
case whose worker dies is reported failed by itself (`worker_died`) while the others go on.
`vctmae predict` runs its own per-scan step on them (`run(jobs, done, work=…, died=…)`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vctmae.errors import VctmaeError
from vctmae.files import write_atomically
from vctmae.ingest.discover import Case
from vctmae.ingest.errors import IngestError
from vctmae.ingest.geometry import GeometryConfig
from vctmae.ingest.records import (
    CaseRecord,
    CropRecord,
    crops_file,
    geometry_settings,
    source_stats,
)
from vctmae.ingest.writers import encode_crop


@dataclass(frozen=True, kw_only=True)
class ExtractJob:
    """One case to extract, and where its work files go."""

    index: int  # position in the run's sorted case list: the order of assembly
    case: Case
    geometry: GeometryConfig
    record: Path  # NAME.json; crops go to NAME.crops beside it
    series: str | None = None  # DICOM series UID for a folder CT (None: the largest CT series)
    # `case.seg` is made by TotalSegmentator first when it does not exist (ingest --segment).
    segment: bool = False


@dataclass(frozen=True)
class Extracted:
    """A worker's answer: the case's record and each crop's int16 bytes, in record order."""

    index: int
    record: CaseRecord
    crops: tuple[bytes, ...] = ()


def _identity(job: ExtractJob) -> dict:
    """Who the case is and from which files and settings: what a record must match to be reused."""
    case = job.case
    return dict(
        case=case.case,
        patient=case.patient,
        ct=case.ct_name,
        seg=case.seg_name,
        series=job.series,
        geometry=geometry_settings(job.geometry),
        sources={"ct": source_stats(case.ct), "seg": source_stats(case.seg)},
    )


def extract_case(job: ExtractJob) -> Extracted:
    """Extract one case, write its work files, return its record and crops (module docstring)."""
    from vctmae.ingest import geometry

    case = job.case
    started = time.perf_counter()
    try:
        if job.segment and not case.seg.exists():
            from vctmae.ingest.segment import segment_vertebrae

            segment_vertebrae(case.ct, case.seg)
        result = geometry.extract_crops(case.ct, case.seg, job.geometry, series_uid=job.series)
    except IngestError as error:
        record = CaseRecord(**_identity(job), status="failed", error=str(error))
        raw: tuple[bytes, ...] = ()
    except VctmaeError:
        raise  # a full disk, a usage error: not this case's fault
    except Exception as error:  # a bug met by one odd case must not stop a run of thousands
        line = f"{case.ct_name}: unexpected {type(error).__name__}: {error}"
        record = CaseRecord(**_identity(job), status="failed", error=line)
        raw = ()
    else:
        crops, chunks, packed, offset = [], [], [], 0
        for crop in result.crops:
            array = np.ascontiguousarray(crop.array, dtype="<i2")
            data = array.tobytes()
            packed.append(encode_crop(array))
            crops.append(
                CropRecord.of_crop(
                    crop,
                    sha256=hashlib.sha256(data).hexdigest(),
                    offset=offset,
                    nbytes=len(packed[-1]),
                )
            )
            chunks.append(data)
            offset += len(packed[-1])
        write_atomically(crops_file(job.record), b"".join(packed))
        record = CaseRecord(
            **_identity(job),
            status="ok",
            source_orientation=result.source_orientation,
            source_spacing=tuple(round(float(v), 6) for v in result.source_spacing),
            scheme=result.scheme,
            other_labels=tuple(sorted((v, n) for v, n in result.other_labels.items())),
            crops=tuple(crops),
            skipped=tuple(result.skipped),
        )
        raw = tuple(chunks)
    record = dataclasses.replace(record, seconds=round(time.perf_counter() - started, 3))
    record.write(job.record)
    return Extracted(index=job.index, record=record, crops=raw)


def worker_died(job: ExtractJob, why: str = "out of memory?") -> Extracted:
    """Record a case whose worker process died (killed for memory, crashed in a C library)."""
    line = f"{job.case.ct_name}: the worker process died while extracting this case ({why})"
    record = CaseRecord(**_identity(job), status="failed", error=line)
    record.write(job.record)
    return Extracted(index=job.index, record=record)


def finished_record(job: ExtractJob) -> CaseRecord | None:
    """The record of a case whose work files are complete for the job's settings and files."""
    record = CaseRecord.read_if_valid(job.record)
    if record is None or not record.ok:
        return None
    if any(getattr(record, name) != value for name, value in _identity(job).items()):
        return None
    crops = crops_file(job.record)
    expected = sum(c.nbytes for c in record.crops)
    if not crops.exists() or crops.stat().st_size != expected:
        return None
    return record


# ---------------------------------------------------------------------------
# Executors.

Done = Callable[[Extracted], None]
# What a worker runs on one job, and what stands for its answer when the worker died.
Work = Callable[[ExtractJob], Extracted]
Died = Callable[[ExtractJob, str], Extracted]


class InProcess:
    """Extract in this process, one case after another (one worker)."""

    workers = 1

    def run(
        self, jobs: Sequence, done: Done, work: Work = extract_case, died: Died = worker_died
    ) -> None:
        for job in jobs:
            done(work(job))

    def close(self) -> None:
        pass


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
PARENT_CHECK_S = 1.0  # how often a worker checks that the main process is still alive


def _worker_started(parent: int) -> None:
    """Worker initializer: die with the main process, whose stdout a worker would otherwise
    hold open (`vctmae ingest … | cat` would never return).

    On Linux the kernel kills the worker when the main process dies (PR_SET_PDEATHSIG; workers
    are forked from its main thread, which lives as long as the process); everywhere, as a
    backstop, a thread exits the worker within `PARENT_CHECK_S` of it being re-parented.
    """
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


class ProcessPool:
    """Extract in `workers` forked processes on this machine. A worker that dies breaks the
    pool: the cases then in flight are rerun one at a time in fresh single-worker pools, so
    only the case that killed its worker is marked failed."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        # Start the workers now, before any display thread runs (fork + threads).
        self._pool = self._new(workers)

    def _new(self, workers: int):
        from concurrent.futures import ProcessPoolExecutor

        # fork: workers start at once, without re-importing the program (spawn/forkserver
        # would re-run an unguarded `python -m vctmae`).
        pool = ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("fork"),
            initializer=_worker_started,
            initargs=(os.getpid(),),
        )
        pool.submit(int).result()
        return pool

    def run(
        self, jobs: Sequence, done: Done, work: Work = extract_case, died: Died = worker_died
    ) -> None:
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        queue = list(reversed(jobs))
        in_flight: dict = {}
        suspects: list[ExtractJob] = []
        while queue or in_flight:
            while queue and len(in_flight) < 2 * self.workers:
                job = queue.pop()
                in_flight[self._pool.submit(work, job)] = job
            finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in finished:
                job = in_flight.pop(future)
                try:
                    done(future.result())
                except BrokenProcessPool:
                    suspects.append(job)
            if suspects and not in_flight:
                self._pool.shutdown(wait=True)
                for job in suspects:
                    single = self._new(1)
                    try:
                        done(single.submit(work, job).result())
                    except BrokenProcessPool:
                        done(died(job, "out of memory?"))
                    finally:
                        single.shutdown(wait=True)
                suspects = []
                self._pool = self._new(self.workers)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class DaskExecutor:
    """Extract on a Dask cluster: the one at `scheduler` (e.g. tcp://host:8786, started by
    `dask scheduler` / `dask worker` or dask-jobqueue), else a LocalCluster of `workers`
    single-threaded worker processes on this machine.

    The work folder must be on storage the workers share (they write the work files;
    this process reads them to resume). A worker that dies has its case rerun
    elsewhere by the scheduler; a case that has killed more workers than the
    scheduler allows (`distributed.scheduler.allowed-failures`, default 3) is
    reported failed, alone.
    """

    def __init__(self, workers: int, scheduler: str | None = None) -> None:
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            raise VctmaeError(
                "--executor dask needs dask.distributed: pip install 'vctmae[dask]'"
            ) from None
        self._cluster = None
        # distributed's nannies set OMP_NUM_THREADS=1, PYTHONHASHSEED, … in *this* process's
        # environment before spawning workers; `close` puts the environment back, so later
        # subprocesses (and torch in this process) are not left single-threaded.
        self._environment = dict(os.environ)
        if scheduler:
            try:
                self._client = Client(scheduler, timeout="30s")
            except OSError as error:
                raise VctmaeError(
                    f"--scheduler {scheduler}: cannot reach the Dask scheduler ({error})"
                ) from None
        else:
            self._cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
            )
            self._client = Client(self._cluster)
        threads = sum(self._client.nthreads().values())
        self.workers = max(1, threads or workers)

    def run(
        self, jobs: Sequence, done: Done, work: Work = extract_case, died: Died = worker_died
    ) -> None:
        from distributed import as_completed
        from distributed.client import FutureCancelledError
        from distributed.scheduler import KilledWorker

        queue = list(reversed(jobs))
        in_flight: dict = {}
        pending = as_completed()

        def submit() -> None:
            while queue and len(in_flight) < 2 * self.workers:
                job = queue.pop()
                # pure=False: a rerun must extract again, never reuse a cached result.
                future = self._client.submit(work, job, pure=False)
                in_flight[future.key] = job
                pending.add(future)

        submit()
        for future in pending:
            job = in_flight.pop(future.key)
            try:
                result = future.result()
            except (KilledWorker, FutureCancelledError) as error:
                result = died(job, f"Dask: {type(error).__name__}")
            future.release()
            done(result)
            submit()

    def close(self) -> None:
        self._client.close()
        if self._cluster is not None:
            self._cluster.close()
        os.environ.clear()
        os.environ.update(self._environment)


def make_executor(kind: str, workers: int, *, scheduler: str | None = None):
    """The executor for `--executor KIND` (process: in this process when `workers` is 1)."""
    if kind == "dask":
        return DaskExecutor(workers, scheduler)
    if workers <= 1:
        return InProcess()
    return ProcessPool(workers)
