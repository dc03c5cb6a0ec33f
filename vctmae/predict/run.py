"""`run_predict(PredictConfig)`: CT scans → per-vertebra fracture probabilities + a report.

A pipeline across scans:

1. **Find** the scans as ingest does (`vctmae.ingest.discover`: ct/ + seg/, VerSe
   names and layout, DICOM series folders, `--pairs`), or take the one `--ct`.
2. **Read and cut** (`cut_job`, in `--workers` processes ahead of the model, or on a
   Dask cluster's workers with `--executor dask`: ingest's executors, at most
   2 × workers scans in flight): the label map — the scan's own, or (`--segment`)
   TotalSegmentator's, made in the worker and kept as `CASE/vertebrae-totalseg.nii.gz`
   — then the crops, with ingest's own reader and geometry (`read_ct`,
   `read_label_map`, `geometry.crops_from_volumes`), in memory: the very int16 crops
   `vctmae ingest` would write. The worker sends back the crops, the scan's facts
   and its two volumes, cut to the box around the spine the overview picture needs
   (`around_spine`; whole when a DICOM SEG is to be drawn on the CT's grid).
   `--workers 0` does this in this process, one scan at a time.
3. **Model** (`Predictor.assess`, the one place the model is called): crops of several scans
   share each forward pass of `--batch-size` crops; each is the mean of its views'
   softmax (`vctmae.infer.views.assess`, eval's own function), the probabilities
   `ingest` + `eval` give, and (`--attention`) its attention frames, from the same
   forward pass of its middle view.
   Called fractured at the threshold finetuning recorded (`vctmae.infer.threshold`)
   unless `--threshold`.
4. **Report**: as soon as a scan's last crop is assessed, its pictures, DICOM objects,
   `CASE/report.html` and last its record `CASE/scan.json` are written (each file
   atomically): the record marks the scan done. `predictions.csv`, `summary.json`
   and `index.html` list the scans done so far in the scans' order; they are
   rewritten every `RUN_FILES_EVERY_SCANS` scans or `RUN_FILES_EVERY_S` seconds and
   at the end (rewriting them after every scan costs O(n²) over an archive).

`--resume` continues a stopped run in the same `--out`: the settings that change
the results (`run_settings`: the checkpoint by content digest, the threshold applied,
every option not marked resumable) must equal those the run recorded in `run.json`,
and the scans with an ok record are kept, not predicted again. A kill -9 loses at
most the scans in flight. The resumed run's `predictions.csv` equals an
uninterrupted run's, as a pipelined run's equals a sequential one's: each crop's
probability depends on the crop alone, not on which crops share its forward pass
(bit for bit on a CPU, as the tests check; a GPU may choose other kernels for
another batch's make-up, which can move the last printed digit).

A bad scan (unreadable file, mismatched label map, no vertebra, a worker that
died…) is reported in one line by name and the run goes on; `PredictResult.failed`
counts them (the command exits 1). Whatever stops every scan (a missing
checkpoint, a usage error, TotalSegmentator missing, a full disk) raises a
`VctmaeError` at once. This module sits outside `vctmae.infer` because it drives
ingest (nibabel, pydicom), which inference and training code never import.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vctmae.errors import UsageError, VctmaeError
from vctmae.files import write_atomically
from vctmae.flags import refuse_changed_settings
from vctmae.ingest.assemble import sample_key
from vctmae.ingest.discover import BadInput, Case, discover_cases, nifti_stem
from vctmae.ingest.errors import IngestError
from vctmae.ingest.geometry import CaseCrops, GeometryConfig
from vctmae.ingest.levels import SCHEMES
from vctmae.ingest.nifti import Volume
from vctmae.predict.config import PredictConfig, level_set
from vctmae.predict.results import NotAssessed, ScanResult, VertebraResult, case_folder
from vctmae.progress import error_line, progress_bar

if TYPE_CHECKING:
    from vctmae.infer.threshold import ThresholdChoice

SEGMENTATION = "vertebrae-totalseg.nii.gz"  # in CASE/: the label map --segment made
RECORD = "scan.json"  # in CASE/: the scan's record, written last (the scan is done)
RUN_FILE = "run.json"  # in --out: the settings `--resume` must match
# How often predictions.csv, summary.json and index.html are rewritten during a run.
RUN_FILES_EVERY_SCANS = 50
RUN_FILES_EVERY_S = 60.0


@dataclass(frozen=True, kw_only=True)
class PredictResult:
    """Every scan's result, the threshold used, and where the report is."""

    scans: tuple[ScanResult, ...]
    threshold: ThresholdChoice
    out: Path

    @property
    def failed(self) -> tuple[ScanResult, ...]:
        return tuple(scan for scan in self.scans if not scan.ok)

    @property
    def vertebrae(self) -> int:
        return sum(len(scan.vertebrae) for scan in self.scans)

    @property
    def fractured(self) -> int:
        return sum(len(scan.fractured) for scan in self.scans)


def find_scans(config: PredictConfig) -> tuple[list[Case], list[BadInput]]:
    """The scans of this run (`--ct`, or ingest's discovery under `--src` / `--pairs`)."""
    if config.ct is not None:
        case_id = nifti_stem(config.ct.name) or config.ct.name
        case = Case(
            case=case_id,
            patient=case_id,
            ct=config.ct,
            seg=config.seg,
            ct_name=str(config.ct),
            seg_name=str(config.seg) if config.seg is not None else "",
        )
        return [case], []
    return discover_cases(
        config.src, pairs=config.pairs, exclude=config.out, missing_seg_ok=config.segment
    )


class Predictor:
    """The classifier on its device: batched multi-view probabilities and attention maps."""

    def __init__(self, config: PredictConfig) -> None:
        import torch

        from vctmae.clip import resolve_rule
        from vctmae.infer.attention import refuse_volume
        from vctmae.infer.config import refuse_frame_options
        from vctmae.infer.device import apply_speedups, resolve_device, resolve_precision
        from vctmae.model.checkpoint import load_classifier, read_model_description
        from vctmae.progress import warn

        self.device = resolve_device(config.device)
        self.model = load_classifier(config.checkpoint).to(self.device).eval()
        # The clip rule the model was finetuned with, unless a flag says otherwise.
        self.rule, lines = resolve_rule(
            read_model_description(config.checkpoint).clip,
            who=str(config.checkpoint),
            frames=config.frames,
            multiview=config.multiview,
            combine=config.combine,
            levels=config.levels,
        )
        for line in lines:
            warn(line)
        self.levels = level_set(self.rule.levels)
        refuse_frame_options(self.model.config, str(config.checkpoint), frames=self.rule.frames)
        if config.attention:
            refuse_volume(self.model.config, str(config.checkpoint))
        speed = config.speed
        self.module = apply_speedups(
            self.model, patch_embed=speed.patch_embed, compile=speed.compile, device=self.device
        )
        # The number format that runs (auto: bf16 on a GPU and on CPUs that compute it natively).
        self.precision = resolve_precision(speed.precision, self.device, inference=True)
        self.batch_size = config.batch_size
        self._pin = self.device.type == "cuda"
        self._torch = torch

    def assess(
        self, crops: list[np.ndarray], boxes: list[tuple[int, ...]], attention: bool
    ) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """P(fracture) of each int16 crop (float64, in order), `batch_size` crops at a time, and
        with `attention` each crop's middle view with the attention maps of the same forward pass
        (`frames`, `slices`, `maps` as `vctmae.infer.attention.shown_views` gives them).

        boxes: each crop's mask bounding box in crop indices (its JSON `bbox`, which
        `--frames mask` reads).
        """
        from vctmae.infer.attention import shown_views
        from vctmae.infer.views import assess

        torch = self._torch
        probs, pictures = [], []
        for start in range(0, len(crops), self.batch_size):
            batch = torch.from_numpy(np.stack(crops[start : start + self.batch_size]))
            if self._pin:
                batch = batch.pin_memory()
            batch = batch.to(self.device, non_blocking=True)
            batch_boxes = torch.tensor(boxes[start : start + self.batch_size], dtype=torch.int64)
            batch_boxes = batch_boxes.to(self.device)
            result = assess(
                self.module,
                batch,
                views=self.rule.multiview,
                device=self.device,
                precision=self.precision,
                frames=self.rule.frames,
                boxes=batch_boxes,
                combine=self.rule.combine,
                attention=attention,
            )
            probs.append(result.probs)
            if attention:
                for shown in shown_views(
                    result, batch, batch_boxes, frames=self.rule.frames, model=self.model.config
                ):
                    maps = {name: heat.numpy() for name, heat in shown["maps"].items()}
                    pictures.append({**shown, "frames": shown["frames"].numpy(), "maps": maps})
        if not probs:
            return np.zeros(0), pictures
        # The probabilities' one host-device sync per scan, here (pictures copy theirs per batch).
        return torch.cat(probs).double().cpu().numpy(), pictures


def _geometry(
    config: PredictConfig, levels: frozenset[str] | None, segmented: bool
) -> GeometryConfig:
    scheme = config.label_scheme
    if segmented and scheme == "auto":
        # TotalSegmentator's values, even for a map holding only L4 (28) and L5 (27).
        scheme = "totalseg"
    return GeometryConfig(levels=levels, label_scheme=scheme)


def cut_scan(
    case: Case,
    config: PredictConfig,
    seg: Path,
    *,
    levels: frozenset[str] | None,
    segmented: bool,
) -> tuple[Volume, Volume, CaseCrops]:
    """Read the scan and its label map and cut its crops in memory — ingest's reader and
    geometry, the crops `vctmae ingest` writes for it. Raises `IngestError` for a bad scan."""
    from vctmae.ingest.geometry import crops_from_volumes, read_ct, read_label_map

    ct = read_ct(case.ct, series_uid=case.series or config.series)
    labels = read_label_map(seg)
    return ct, labels, crops_from_volumes(ct, labels, _geometry(config, levels, segmented))


# ---------------------------------------------------------------------------------------------
# Read and cut: what a worker runs for one scan.


@dataclass(frozen=True, kw_only=True)
class ScanJob:
    """One scan to read and cut, wherever an executor runs it."""

    index: int  # position in the run's scan list: the order of predictions.csv
    case: Case
    config: PredictConfig
    seg: Path  # its label map (made first by TotalSegmentator when `segmented` and missing)
    segmented: bool
    levels: frozenset[str] | None


@dataclass(frozen=True, kw_only=True)
class CutScan:
    """A worker's answer: the scan's crops, its volumes and facts, or why it failed."""

    job: ScanJob
    cut: CaseCrops | None = None
    # The CT, its label map, and each level's value in the map (for the overview and DICOM SEG).
    volumes: tuple[Volume, Volume, dict[str, int]] | None = None
    error: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def cut_job(job: ScanJob) -> CutScan:
    """Segment (`--segment`) and cut one scan; a bad scan gives its one-line reason."""
    from vctmae.ingest.segment import segment_vertebrae

    case, seconds = job.case, {}
    started = time.perf_counter()
    try:
        if job.segmented:
            if not job.seg.is_file():
                segment_vertebrae(case.ct, job.seg)
            seconds["segment"] = time.perf_counter() - started
        cut_started = time.perf_counter()
        ct, labels, cut = cut_scan(
            case, job.config, job.seg, levels=job.levels, segmented=job.segmented
        )
        seconds["read_and_crop"] = time.perf_counter() - cut_started
    except IngestError as error:
        return CutScan(job=job, error=str(error), seconds=seconds)
    except VctmaeError:
        raise  # TotalSegmentator's weights missing, a full disk: not this scan's fault
    except Exception as error:
        line = f"{case.ct_name}: unexpected {type(error).__name__}: {error}"
        return CutScan(job=job, error=line, seconds=seconds)
    label_values = {name: value for value, name in SCHEMES[cut.scheme].items()}
    if job.config.dicom_out is False or ct.dicom is None:
        # No DICOM SEG to draw on the CT's whole grid: only the overview needs the volumes.
        ct, labels = around_spine(ct, labels, list(label_values.values()))
    return CutScan(job=job, cut=cut, volumes=(ct, labels, label_values), seconds=seconds)


def around_spine(ct: Volume, labels: Volume, values: list[int]) -> tuple[Volume, Volume]:
    """The CT and label map cut to the box of the vertebra labels `values` and the overview's
    margin around it (`pictures.MARGIN_MM`, wider than its slab), so that only that part of them
    crosses from a worker and the overview is drawn as from the whole. Unchanged when the label
    map lies on another grid or holds none of `values`."""
    from vctmae.predict.pictures import MARGIN_MM, SLAB_MM

    if ct.data.shape != labels.data.shape or not np.allclose(ct.affine, labels.affine):
        return ct, labels
    inside = np.isin(labels.data, values)
    spacing = np.linalg.norm(ct.affine[:3, :3], axis=0)
    box = []
    for axis in range(3):
        hit = np.flatnonzero(inside.any(axis=tuple(a for a in range(3) if a != axis)))
        if not hit.size:
            return ct, labels
        margin = int(np.ceil(max(MARGIN_MM, SLAB_MM) / spacing[axis])) + 1
        box.append(slice(max(0, hit[0] - margin), hit[-1] + margin + 1))
    shift = np.eye(4)
    shift[:3, 3] = [axis.start for axis in box]
    affine = ct.affine @ shift

    def cut(volume: Volume) -> Volume:
        data = np.ascontiguousarray(volume.data[tuple(box)])
        return dataclasses.replace(volume, data=data, affine=affine)

    return cut(ct), cut(labels)


def worker_died(job: ScanJob, why: str) -> CutScan:
    """The answer for a scan whose worker process died (killed for memory, a crash in C)."""
    line = f"{job.case.ct_name}: the worker process died while reading this scan ({why})"
    return CutScan(job=job, error=line)


def _executor(config: PredictConfig, jobs: int):
    """Ingest's executor for `--workers` / `--executor` (0 workers: this process)."""
    from vctmae.ingest.extract import InProcess, ProcessPool, make_executor
    from vctmae.ingest.pipeline import default_workers

    if config.executor == "dask":
        return make_executor(
            "dask", config.workers or default_workers(), scheduler=config.scheduler
        )
    workers = config.workers
    if workers is None:
        import torch

        # On the CPU the model needs every core, and reading and cutting are a small part of a
        # scan (ViT-L: 0.4 of 47 s measured): a worker would only slow the model. With a GPU,
        # one core is the model's.
        on_cpu = config.device == "cpu" or (
            config.device == "auto" and not torch.cuda.is_available()
        )
        workers = 0 if on_cpu else max(1, default_workers() - 1)
    workers = min(workers, jobs)
    return InProcess() if workers == 0 else ProcessPool(workers)


# ---------------------------------------------------------------------------------------------
# The model, and each scan's results.


def _failed(case: Case | BadInput, line: str, seconds: dict[str, float]) -> ScanResult:
    if isinstance(case, BadInput):
        return ScanResult(
            case=case.case, folder=case_folder(case.case), ct=case.path, seg="",
            status="failed", error=line,
        )  # fmt: skip
    return ScanResult(
        case=case.case, folder=case_folder(case.case), ct=case.ct_name, seg=case.seg_name,
        status="failed", error=line, series=case.series, seconds=seconds,
    )  # fmt: skip


def _scan_result(scanned: CutScan, probs: list[float], threshold: ThresholdChoice) -> ScanResult:
    """A cut scan and its crops' probabilities → its result."""
    job, cut = scanned.job, scanned.cut
    case = job.case
    vertebrae = tuple(
        VertebraResult(
            key=sample_key(case.case, crop.level),
            level=crop.level,
            prob_fracture=float(prob),
            predicted=bool(prob >= threshold.value),
            centroid=tuple(round(float(v), 4) for v in crop.centroid_world),
            tangent=tuple(round(float(v), 6) for v in crop.tangent),
            inside_fraction=round(float(crop.inside_fraction), 6),
            bbox=tuple(int(v) for v in crop.bbox),
        )
        for crop, prob in zip(cut.crops, probs, strict=True)
    )
    return ScanResult(
        case=case.case,
        folder=case_folder(case.case),
        ct=case.ct_name,
        seg=str(job.seg) if job.segmented else case.seg_name,
        status="ok",
        segmented=job.segmented,
        series=case.series or job.config.series,
        source_orientation=cut.source_orientation,
        source_spacing=tuple(round(float(v), 6) for v in cut.source_spacing),
        scheme=cut.scheme,
        vertebrae=vertebrae,
        not_assessed=tuple(NotAssessed(level=s.level, reason=s.reason) for s in cut.skipped),
        seconds=dict(scanned.seconds),
    )


# ---------------------------------------------------------------------------------------------
# The report folder: an earlier run's files, the settings a resumed run must match.


def _report_files(out: Path) -> list[Path]:
    """The files of an earlier predict report in `out`: its settings, index, CSV and summary, and
    each case folder's page, record, overview and pictures (not the TotalSegmentator label maps
    kept there)."""
    from vctmae.predict.dicom_out import SEG_FILE, SR_FILE
    from vctmae.predict.report import INDEX, OVERVIEW, PAGE, PREDICTIONS, SUMMARY

    run_files = (RUN_FILE, INDEX, PREDICTIONS, SUMMARY)
    found = [out / name for name in run_files if (out / name).is_file()]
    for folder in sorted(path for path in out.iterdir() if path.is_dir()):
        if (folder / PAGE).is_file() or (folder / RECORD).is_file():
            written = [folder / name for name in (RECORD, PAGE, OVERVIEW, SEG_FILE, SR_FILE)]
            found += [path for path in written if path.is_file()] + sorted(folder.glob("*.png"))
    return found


def prepare_out(config: PredictConfig) -> None:
    """Refuse an --out that holds another run's report, or (`--replace`) remove that report, so
    that no page outlives its run; `--resume` keeps it (its settings are checked once the model
    is loaded: `check_resume`). Other files, and the TotalSegmentator label maps an earlier
    `--segment` kept, stay."""
    out = config.out
    if not out.is_dir():
        return
    earlier = _report_files(out)
    if not earlier:
        return
    if config.resume:
        if not (out / RUN_FILE).is_file():
            raise UsageError(
                f"{out}: --resume: the report there has no {RUN_FILE} (the settings of its run), "
                "so it cannot be continued; pass --replace to replace it, or choose another --out"
            )
        return
    if not config.replace:
        raise UsageError(
            f"{out}: holds the report of an earlier predict run ({len(earlier)} files, e.g. "
            f"{earlier[0].relative_to(out)}); pass --resume to continue it, --replace to replace "
            "it, or choose another --out"
        )
    for path in earlier:
        path.unlink()
    for folder in {path.parent for path in earlier if path.parent != out}:
        if not any(folder.iterdir()):
            folder.rmdir()


def run_settings(
    config: PredictConfig, threshold: ThresholdChoice, digest: str, device: str, precision: str
) -> dict:
    """What `--resume` compares: each option that changes the results (every flag not marked
    `resumable`; paths absolute), the checkpoint by its content's sha256 (wherever it lies now),
    the threshold applied, the kind of device and the precision that runs (`--precision auto`
    depends on the machine)."""
    from vctmae.flags import config_fields

    settings: dict[str, Any] = {}
    for leaf in config_fields(PredictConfig):
        if leaf.flag is None or leaf.flag.resumable or leaf.path[-1] in ("checkpoint", "out"):
            continue
        value = leaf.value(config)
        settings[leaf.name] = str(Path(value).resolve()) if isinstance(value, Path) else value
    settings["checkpoint sha256"] = digest
    settings["threshold applied"] = threshold.value
    settings["device"] = device
    settings["precision that runs"] = precision
    return settings


def check_resume(out: Path, settings: dict[str, Any]) -> None:
    """Refuse to continue the run recorded in `out` with settings that change its results."""
    path = out / RUN_FILE
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))["settings"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UsageError(f"{path}: --resume: cannot read the run's settings ({error})") from None
    refuse_changed_settings(
        saved,
        settings,
        where=path,
        why="they change the results of the run being continued — resume with its settings, or "
        "pass --replace, or choose another --out",
    )


def finished_scans(
    out: Path, cases: list[tuple[int, Case]], config: PredictConfig
) -> dict[int, ScanResult]:
    """The scans an earlier run in `out` finished: an ok record for the same case, CT, label
    map and series (a failed scan is tried again)."""
    finished = {}
    for index, case in cases:
        path = out / case_folder(case.case) / RECORD
        try:
            scan = ScanResult.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        seg = str(out / scan.folder / SEGMENTATION) if case.seg is None else case.seg_name
        if scan.ok and (scan.case, scan.ct, scan.seg, scan.series) == (
            case.case,
            case.ct_name,
            seg,
            case.series or config.series,
        ):
            finished[index] = scan
    return finished


# ---------------------------------------------------------------------------------------------
# The run.


@dataclass(kw_only=True)
class _Waiting:
    """A cut scan in the main process, its crops' probabilities and attention as they come."""

    scanned: CutScan
    probs: list[float]
    attention: list[dict[str, Any] | None]
    left: int  # crops not assessed yet
    seconds: dict[str, float] = field(default_factory=dict)  # its share of the model's time


# Scans held (each with its volumes) waiting for a full batch, beyond which a part-filled batch
# is run: memory stays flat even when scans hold few crops each.
MAX_WAITING_SCANS = 4


class _Pipeline:
    """The main process's side: cut scans in, crops of several scans per forward pass, each scan
    reported as soon as its last crop is assessed."""

    def __init__(
        self, config: PredictConfig, predictor: Predictor, threshold: ThresholdChoice, run, bar, task,
        *, finished: dict[int, ScanResult], started: float,
    ) -> None:  # fmt: skip
        self.config, self.predictor, self.threshold, self.run = config, predictor, threshold, run
        self.bar, self.task, self.started = bar, task, started
        # Every scan reported, by its place in the run's scan list.
        self.results: dict[int, ScanResult] = dict(finished)
        # Scans waiting for their crops' probabilities, and their crops in arrival order.
        self.waiting: list[_Waiting] = []
        self.queue: list[tuple[_Waiting, int]] = []
        self.written_at = (time.perf_counter(), len(self.results))

    def put(self, scanned: CutScan) -> None:
        """A worker's answer: queue its crops (a scan without any is reported at once)."""
        self.bar.update(self.task, scan=scanned.job.case.case)
        count = len(scanned.cut.crops) if scanned.cut is not None else 0
        scan = _Waiting(scanned=scanned, probs=[0.0] * count, attention=[None] * count, left=count)
        if not count:
            self._finish(scan)
            return
        self.waiting.append(scan)
        self.queue += [(scan, i) for i in range(count)]
        while len(self.queue) >= self.config.batch_size or len(self.waiting) > MAX_WAITING_SCANS:
            self.assess_batch()

    def flush(self) -> None:
        while self.queue:
            self.assess_batch()

    def assess_batch(self) -> None:
        """One forward pass over the first `--batch-size` queued crops; the scans it completes
        are reported."""
        size = self.config.batch_size
        batch, self.queue = self.queue[:size], self.queue[size:]
        crops = [scan.scanned.cut.crops[i] for scan, i in batch]
        started = time.perf_counter()
        # The one place the run calls the model: crops of one scan or several.
        probs, attention = self.predictor.assess(
            [crop.array for crop in crops],
            [tuple(crop.bbox) for crop in crops],
            self.config.attention,
        )
        seconds = {"model": time.perf_counter() - started}
        for k, (scan, i) in enumerate(batch):
            scan.probs[i] = float(probs[k])
            scan.attention[i] = attention[k] if self.config.attention else None
            scan.left -= 1
            # Each scan is charged its crops' share of the pass.
            for stage, spent in seconds.items():
                scan.seconds[stage] = scan.seconds.get(stage, 0.0) + spent / len(batch)
        for scan in [scan for scan in self.waiting if scan.left == 0]:
            self.waiting.remove(scan)
            self._finish(scan)

    def _finish(self, scan: _Waiting) -> None:
        """Write a scan's DICOM objects, pictures and page, then its record."""
        from vctmae.predict import report
        from vctmae.predict.dicom_out import write_dicom_objects

        scanned, out = scan.scanned, self.config.out
        if scanned.cut is None:
            result = _failed(scanned.job.case, scanned.error, scanned.seconds)
        else:
            result = _scan_result(scanned, scan.probs, self.threshold)
            result.seconds.update(scan.seconds)
        result = write_dicom_objects(
            result, scanned.volumes, out, self.run, enabled=self.config.dicom_out
        )
        if not result.ok:
            error_line(self.bar, result.error)
        report_started = time.perf_counter()
        attention = scan.attention if self.config.attention and result.ok else []
        written = _write_scan(report, result, scanned.volumes, attention, out, self.run)
        if result.ok and not written.ok:
            error_line(self.bar, written.error)
        seconds = {**written.seconds, "report": time.perf_counter() - report_started}
        seconds["total"] = sum(seconds.values())
        self.done(scanned.job.index, dataclasses.replace(written, seconds=seconds))

    def done(self, index: int, scan: ScanResult) -> None:
        """A scan is reported: its record, then (every so often) the run's files."""
        from vctmae.errors import is_out_of_space

        if scan.page is not None:
            text = (json.dumps(scan.to_json(), indent=1, ensure_ascii=False) + "\n").encode()
            try:
                write_atomically(self.config.out / scan.folder / RECORD, lambda h: h.write(text))
            except OSError as error:
                if is_out_of_space(error):
                    raise
                error_line(self.bar, f"{scan.ct}: cannot write its record ({error})")
        self.results[index] = scan
        self.bar.advance(self.task)
        at, count = self.written_at
        now = time.perf_counter()
        if len(self.results) - count >= RUN_FILES_EVERY_SCANS or now - at >= RUN_FILES_EVERY_S:
            self.write_run()

    def write_run(self) -> list[ScanResult]:
        """predictions.csv, summary.json and index.html of the scans done, in the scans' order."""
        from vctmae.predict import report

        scans = [self.results[index] for index in sorted(self.results)]
        now = time.perf_counter()
        report.write_run(scans, self.config.out, self.run, seconds=now - self.started)
        self.written_at = (now, len(self.results))
        return scans


def _write_scan(report, scan, volumes, attention, out: Path, run) -> ScanResult:
    """`report.write_scan`, a scan whose files cannot be written failing alone (a full disk
    stops the run: every later scan would fail the same way)."""
    from vctmae.errors import is_out_of_space

    try:
        return report.write_scan(scan, volumes, attention, out, run)
    except OSError as error:
        if is_out_of_space(error):
            raise
        line = f"{scan.ct}: cannot write its report under {out / scan.folder} ({error})"
        return dataclasses.replace(scan, status="failed", error=line, vertebrae=(), page=None)


def run_predict(config: PredictConfig) -> PredictResult:
    """Predict every scan of `config` and write the report under `config.out` (module doc)."""
    from vctmae.errors import is_out_of_space, out_of_space
    from vctmae.infer.threshold import choose_threshold
    from vctmae.ingest.segment import require_segmenter
    from vctmae.predict import report

    run_started = time.perf_counter()
    prepare_out(config)
    cases, bad = find_scans(config)
    if not cases and not bad:
        raise IngestError(
            config.src or config.pairs,
            "no scans found (expected ct/NAME.nii[.gz] with seg/NAME.nii[.gz], VerSe "
            "X_ct.nii.gz with X_seg-vert_msk.nii.gz, a DICOM series folder in ct/, or --pairs)",
        )
    # The scans' order: the bad inputs, then the cases as found.
    numbered = list(enumerate(cases, start=len(bad)))
    finished = finished_scans(config.out, numbered, config) if config.resume else {}
    todo = [(index, case) for index, case in numbered if index not in finished]
    if any(
        case.seg is None and not (config.out / case_folder(case.case) / SEGMENTATION).is_file()
        for _, case in todo
    ):
        require_segmenter()
    # The workers start before the model loads and before the progress display's thread runs
    # (fork + threads).
    executor = _executor(config, len(todo))
    try:
        predictor = Predictor(config)
        threshold = choose_threshold(config.checkpoint, predictor.rule, config.threshold)
        try:
            config.out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            if is_out_of_space(error):
                raise out_of_space(config.out) from None
            raise IngestError(config.out, f"cannot create the report folder ({error})") from None
        run = report.RunFacts.of(
            config,
            threshold,
            predictor.rule,
            device=str(predictor.device),
            precision=predictor.precision,
        )
        settings = run_settings(
            config, threshold, run.checkpoint_sha256, predictor.device.type, predictor.precision
        )
        if config.resume and (config.out / RUN_FILE).is_file():
            check_resume(config.out, settings)
        else:
            text = (json.dumps({"settings": settings}, indent=1) + "\n").encode("utf-8")
            write_atomically(config.out / RUN_FILE, lambda handle: handle.write(text))
        scans = _predict_all(
            config, executor, predictor, threshold, run, bad, todo, finished, run_started
        )
    finally:
        executor.close()
    return PredictResult(scans=tuple(scans), threshold=threshold, out=config.out)


def _predict_all(config, executor, predictor, threshold, run, bad, todo, finished, started):
    """Report the bad inputs, cut and assess the scans to do, and write the run's files."""
    from vctmae.predict import report

    jobs: list[ScanJob] = []
    folders = {scan.folder: scan.case for scan in finished.values()}
    with progress_bar("predict", "scans", "{task.fields[scan]}", enabled=config.progress) as bar:
        task = bar.add_task("predict", total=len(bad) + len(todo) + len(finished), scan="")
        bar.advance(task, len(finished))
        pipeline = _Pipeline(
            config, predictor, threshold, run, bar, task, finished=finished, started=started
        )
        try:
            for index, item in enumerate(bad):
                error_line(bar, item.line())
                failed = _failed(item, item.line(), {})
                pipeline.done(index, _write_scan(report, failed, None, [], config.out, run))
            for index, case in todo:
                folder = case_folder(case.case)
                if folder in folders:
                    line = (
                        f"{case.ct_name}: case id {case.case!r} gives the report folder {folder}/, "
                        f"as {folders[folder]!r} does; rename one of them"
                    )
                    error_line(bar, line)
                    # No page: the folder is the other case's.
                    pipeline.done(index, _failed(case, line, {}))
                    continue
                folders[folder] = case.case
                segmented = case.seg is None
                seg = config.out / folder / SEGMENTATION if segmented else case.seg
                jobs.append(
                    ScanJob(index=index, case=case, config=config, seg=seg, segmented=segmented,
                            levels=predictor.levels)
                )  # fmt: skip
            executor.run(jobs, pipeline.put, work=cut_job, died=worker_died)
            pipeline.flush()
        except BaseException:
            # Stopped: the report covers the scans done so far (a resumed run rewrites it from
            # their records).
            if pipeline.results:
                pipeline.write_run()
            raise
        return pipeline.write_run()


__all__ = ["PredictResult", "run_predict", "find_scans", "cut_scan"]
