"""`run_predict(PredictConfig)`: a patient's CT → per-vertebra fracture probabilities + a report.

Per scan, one after another (a progress bar over the scans):

1. **Find** the scans as ingest does (`vctmae.ingest.discover`: ct/ + seg/, VerSe
   names and layout, DICOM series folders, `--pairs`), or take the one `--ct`.
2. **Label map**: the scan's own, or — `--segment` — TotalSegmentator's
   (`vctmae.ingest.segment`), kept as `CASE/vertebrae-totalseg.nii.gz`.
3. **Crops** with ingest's own reader and geometry (`read_ct`, `read_label_map`,
   `geometry.crops_from_volumes`), in memory: the very int16 crops `vctmae ingest`
   would write, no shards.
4. **Model**: the crops in batches of `--batch-size` on the device, each the mean
   of its views' softmax (`vctmae.infer.views.multiview_probs`, eval's own
   function): the probabilities `ingest` + `eval` give. Called fractured at the
   threshold finetuning recorded (`vctmae.infer.threshold`) unless `--threshold`.
5. **Report**: each vertebra's frames with attention (`attention_frames`, the maps
   `vctmae explain` draws), the sagittal overview, `CASE/report.html`; then
   `predictions.csv`, `summary.json` and `index.html` are rewritten, so a run
   stopped midway leaves a complete report of the scans done so far.

A bad scan (unreadable file, mismatched label map, no vertebra…) is reported in
one line by name and the run goes on; `PredictResult.failed` counts them (the
command exits 1). Whatever stops every scan (a missing checkpoint, a usage error,
TotalSegmentator missing, a full disk) raises a `VctmaeError` at once.
This module sits outside `vctmae.infer` because it drives ingest (nibabel,
pydicom), which inference and training code never import.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vctmae.clip import ClipRule
from vctmae.errors import UsageError, VctmaeError
from vctmae.ingest.assemble import sample_key
from vctmae.ingest.discover import BadInput, Case, discover_cases, nifti_stem
from vctmae.ingest.errors import IngestError
from vctmae.ingest.geometry import CaseCrops, GeometryConfig
from vctmae.ingest.levels import SCHEMES
from vctmae.ingest.nifti import Volume
from vctmae.predict.config import PredictConfig, level_set
from vctmae.predict.results import (
    NotAssessed,
    ScanResult,
    Threshold,
    VertebraResult,
    case_folder,
)
from vctmae.progress import error_line, progress_bar

SEGMENTATION = "vertebrae-totalseg.nii.gz"  # in CASE/: the label map --segment made


@dataclass(frozen=True, kw_only=True)
class PredictResult:
    """Every scan's result, the threshold used, and where the report is."""

    scans: tuple[ScanResult, ...]
    threshold: Threshold
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


def choose_threshold(config: PredictConfig, rule: ClipRule) -> Threshold:
    """`--threshold`, else the validation-optimal one beside the checkpoint when it was measured
    under `rule`, else 0.5 (`vctmae.infer.threshold.choose_threshold`)."""
    from vctmae.infer.threshold import choose_threshold as choose

    choice = choose(config.checkpoint, rule, config.threshold)
    return Threshold(value=choice.value, source=choice.source, detail=choice.detail)


class Predictor:
    """The classifier on its device: batched multi-view probabilities and attention maps."""

    def __init__(self, config: PredictConfig) -> None:
        import torch

        from vctmae.clip import resolve_rule
        from vctmae.infer.attention import refuse_volume
        from vctmae.infer.config import refuse_frame_options
        from vctmae.infer.device import apply_speedups, resolve_device
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
        self.precision = speed.precision
        self.batch_size = config.batch_size
        self._pin = self.device.type == "cuda"
        self._torch = torch

    def probabilities(self, crops: list[np.ndarray], boxes: list[tuple[int, ...]]) -> np.ndarray:
        """P(fracture) of each int16 crop (float64, in order), `batch_size` crops at a time.

        boxes: each crop's mask bounding box in crop indices (its JSON `bbox`, which
        `--frames mask` reads).
        """
        from vctmae.infer.views import multiview_probs

        torch = self._torch
        out = []
        for start in range(0, len(crops), self.batch_size):
            batch = torch.from_numpy(np.stack(crops[start : start + self.batch_size]))
            if self._pin:
                batch = batch.pin_memory()
            batch = batch.to(self.device, non_blocking=True)
            batch_boxes = torch.tensor(boxes[start : start + self.batch_size], dtype=torch.int64)
            out.append(
                multiview_probs(
                    self.module,
                    batch,
                    views=self.rule.multiview,
                    device=self.device,
                    precision=self.precision,
                    frames=self.rule.frames,
                    boxes=batch_boxes.to(self.device),
                    combine=self.rule.combine,
                )
            )
        if not out:
            return np.zeros(0)
        # One host-device sync per scan, here.
        return torch.cat(out).double().cpu().numpy()

    def attention(self, crop: np.ndarray, bbox: tuple[int, ...]) -> dict[str, Any]:
        """The frames, crop slices and attention maps of the middle view under the model's frame
        rule (`vctmae.infer.attention.attention_frames`)."""
        from vctmae.infer.attention import attention_frames

        result = attention_frames(self.model, crop, frames=self.rule.frames, bbox=bbox)
        return {
            "frames": result["frames"].numpy(),
            "slices": result["slices"],
            "maps": {name: heat.numpy() for name, heat in result["maps"].items()},
        }


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
    from vctmae.ingest.geometry import crops_from_volumes
    from vctmae.ingest.source import read_ct, read_label_map

    ct = read_ct(case.ct, series_uid=case.series or config.series)
    labels = read_label_map(seg)
    return ct, labels, crops_from_volumes(ct, labels, _geometry(config, levels, segmented))


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


def predict_scan(
    case: Case, config: PredictConfig, predictor: Predictor, threshold: Threshold
) -> tuple[ScanResult, tuple[Volume, Volume, dict[str, int]] | None, list[dict[str, Any]]]:
    """One scan → its result, its volumes (for the overview) and each vertebra's attention.

    A bad scan gives a failed result (its one-line reason), never an exception.
    """
    from vctmae.ingest.segment import segment_vertebrae

    seconds: dict[str, float] = {}
    started = time.perf_counter()
    folder = config.out / case_folder(case.case)
    seg, segmented = case.seg, case.seg is None
    try:
        if segmented:
            seg = folder / SEGMENTATION
            if not seg.is_file():
                segment_vertebrae(case.ct, seg)
            seconds["segment"] = time.perf_counter() - started
        cut_started = time.perf_counter()
        ct, labels, cut = cut_scan(case, config, seg, levels=predictor.levels, segmented=segmented)
        seconds["read_and_crop"] = time.perf_counter() - cut_started
    except IngestError as error:
        return _failed(case, str(error), seconds), None, []
    except VctmaeError:
        raise  # TotalSegmentator's weights missing, a full disk: not this scan's fault
    except Exception as error:  # noqa: BLE001 - as ingest: one odd scan must not stop the others
        line = f"{case.ct_name}: unexpected {type(error).__name__}: {error}"
        return _failed(case, line, seconds), None, []

    model_started = time.perf_counter()
    probs = predictor.probabilities(
        [crop.array for crop in cut.crops], [tuple(crop.bbox) for crop in cut.crops]
    )
    seconds["model"] = time.perf_counter() - model_started
    vertebrae = []
    for crop, prob in zip(cut.crops, probs, strict=True):
        vertebrae.append(
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
        )
    attention = []
    if config.attention:
        attention_started = time.perf_counter()
        attention = [predictor.attention(crop.array, tuple(crop.bbox)) for crop in cut.crops]
        seconds["attention"] = time.perf_counter() - attention_started
    label_values = {name: value for value, name in SCHEMES[cut.scheme].items()}
    result = ScanResult(
        case=case.case,
        folder=case_folder(case.case),
        ct=case.ct_name,
        seg=str(seg) if segmented else case.seg_name,
        status="ok",
        segmented=segmented,
        series=case.series or config.series,
        source_orientation=cut.source_orientation,
        source_spacing=tuple(round(float(v), 6) for v in cut.source_spacing),
        scheme=cut.scheme,
        vertebrae=tuple(vertebrae),
        not_assessed=tuple(NotAssessed(level=s.level, reason=s.reason) for s in cut.skipped),
        seconds=seconds,
    )
    return result, (ct, labels, label_values), attention


def _progress(enabled: bool):
    return progress_bar("predict", "scans", "{task.fields[scan]}", enabled=enabled)


def _report_files(out: Path) -> list[Path]:
    """The files of an earlier predict report in `out`: its index, CSV and summary, and each
    case folder's page, overview and pictures (not the TotalSegmentator label maps kept there)."""
    from vctmae.predict.dicom_out import SEG_FILE, SR_FILE
    from vctmae.predict.report import INDEX, OVERVIEW, PAGE, PREDICTIONS, SUMMARY

    found = [out / name for name in (INDEX, PREDICTIONS, SUMMARY) if (out / name).is_file()]
    for folder in sorted(path for path in out.iterdir() if path.is_dir()):
        if (folder / PAGE).is_file():
            written = [folder / name for name in (PAGE, OVERVIEW, SEG_FILE, SR_FILE)]
            found += [path for path in written if path.is_file()] + sorted(folder.glob("*.png"))
    return found


def prepare_out(config: PredictConfig) -> None:
    """Refuse an --out that holds another run's report, or (`--replace`) remove that report, so
    that no page outlives its run. Other files, and the TotalSegmentator label maps an earlier
    `--segment` kept, stay."""
    out = config.out
    if not out.is_dir():
        return
    earlier = _report_files(out)
    if not earlier:
        return
    if not config.replace:
        raise UsageError(
            f"{out}: holds the report of an earlier predict run ({len(earlier)} files, e.g. "
            f"{earlier[0].relative_to(out)}); pass --replace to replace it, or choose another --out"
        )
    for path in earlier:
        path.unlink()
    for folder in {path.parent for path in earlier if path.parent != out}:
        if not any(folder.iterdir()):
            folder.rmdir()


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
    from vctmae.ingest.segment import require_segmenter
    from vctmae.predict import report
    from vctmae.predict.dicom_out import write_dicom_objects

    run_started = time.perf_counter()
    prepare_out(config)
    cases, bad = find_scans(config)
    if not cases and not bad:
        raise IngestError(
            config.src or config.pairs,
            "no scans found (expected ct/NAME.nii[.gz] with seg/NAME.nii[.gz], VerSe "
            "X_ct.nii.gz with X_seg-vert_msk.nii.gz, a DICOM series folder in ct/, or --pairs)",
        )
    if any(
        case.seg is None and not (config.out / case_folder(case.case) / SEGMENTATION).is_file()
        for case in cases
    ):
        require_segmenter()
    predictor = Predictor(config)
    threshold = choose_threshold(config, predictor.rule)
    try:
        config.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        if is_out_of_space(error):
            raise out_of_space(config.out) from None
        raise IngestError(config.out, f"cannot create the report folder ({error})") from None
    run = report.RunFacts.of(config, threshold, predictor.rule, device=str(predictor.device))

    scans: list[ScanResult] = []
    folders: dict[str, str] = {}
    with _progress(config.progress) as bar:
        task = bar.add_task("predict", total=len(cases) + len(bad), scan="")
        for item in bad:
            error_line(bar, item.line())
            failed = _failed(item, item.line(), {})
            scans.append(_write_scan(report, failed, None, [], config.out, run))
            bar.advance(task)
        for case in cases:
            bar.update(task, scan=case.case)
            folder = case_folder(case.case)
            if folder in folders:
                line = (
                    f"{case.ct_name}: case id {case.case!r} gives the report folder {folder}/, "
                    f"as {folders[folder]!r} does; rename one of them"
                )
                error_line(bar, line)
                # No page: the folder is the other case's.
                scans.append(_failed(case, line, {}))
                bar.advance(task)
                continue
            folders[folder] = case.case
            started = time.perf_counter()
            scan, volumes, attention = predict_scan(case, config, predictor, threshold)
            scan = write_dicom_objects(scan, volumes, config.out, run, enabled=config.dicom_out)
            if not scan.ok:
                error_line(bar, scan.error)
            report_started = time.perf_counter()
            written = _write_scan(report, scan, volumes, attention, config.out, run)
            if scan.ok and not written.ok:
                error_line(bar, written.error)
            finished = time.perf_counter()
            seconds = {"report": finished - report_started, "total": finished - started}
            scans.append(dataclasses.replace(written, seconds={**written.seconds, **seconds}))
            del volumes, attention
            # The run's files after every scan: a stopped run leaves a whole report of the
            # scans done so far.
            report.write_run(scans, config.out, run, seconds=time.perf_counter() - run_started)
            bar.advance(task)
    report.write_run(scans, config.out, run, seconds=time.perf_counter() - run_started)
    return PredictResult(scans=tuple(scans), threshold=threshold, out=config.out)


__all__ = ["PredictResult", "run_predict", "find_scans", "cut_scan", "choose_threshold"]
